"""Survey section 4, heterogeneity: where Part III's methods go, one module per leaf.

The leaves of the survey's taxonomy: heterogeneous rank (4.1, e.g. HetLoRA and
replication-based padding), personalized LoRA (4.2, e.g. FedSA-LoRA, FedDPA, pFedLoRA) and
clustering (4.3, e.g. FedLEASE), with the newer methods of the branch. No method lives here
yet; Part III adds them. Modules here may import :mod:`fedlora_edu.core`,
:mod:`fedlora_edu.foundations` and :mod:`fedlora_edu.distributed`.
"""
