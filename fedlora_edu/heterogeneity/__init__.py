"""Survey section 4, heterogeneity: where Part III's methods go, one module per leaf.

The leaves of the survey's taxonomy: heterogeneous rank (4.1, e.g. HetLoRA and
replication-based padding), personalized LoRA (4.2, e.g. FedSA-LoRA, FedDPA, pFedLoRA) and
clustering (4.3, e.g. FedLEASE), with the newer methods of the branch. So far:
:mod:`~fedlora_edu.heterogeneity.ranks` (eq. 12: HetLoRA and replication padding; truncation, padding,
HetLoRA's sparsity weights, rank-tail penalty and self-pruning),
:mod:`~fedlora_edu.heterogeneity.personalized` (eq. 13: FedDPA, FDLoRA, FedSA-LoRA and CE-LoRA),
:mod:`~fedlora_edu.heterogeneity.structure` (eq. 14: PerFIT's personal sparse structure of one shared adapter),
:mod:`~fedlora_edu.heterogeneity.experts` (eq. 14 over several adapters: FedLEASE's and FedMoE's mixtures of LoRA
experts, a personal router or sub-mixture per client),
:mod:`~fedlora_edu.heterogeneity.clustering` (eq. 16: FL-TAC's k-means and FedLEASE's B-cosine
grouping of uploaded adapters) and :mod:`~fedlora_edu.heterogeneity.hypernetwork` (eq. 15). Their
methods join the registry with Part III's chapters. Modules here may import :mod:`fedlora_edu.core`,
:mod:`fedlora_edu.foundations` and :mod:`fedlora_edu.distributed`.
"""
