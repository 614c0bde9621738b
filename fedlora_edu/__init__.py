"""fedlora_edu: the companion package of the executable textbook on federated LoRA.

The modules follow the taxonomy of the survey *Federated Low-Rank Adaptation for
Foundation Models* (arXiv 2505.13502):

- foundations: :mod:`~fedlora_edu.profiles` (cost switch), :mod:`~fedlora_edu.models`
  (embedded encoder, peft LoRA), :mod:`~fedlora_edu.data` (offline text),
  :mod:`~fedlora_edu.partition` (non-IID splits), :mod:`~fedlora_edu.lora` (LoRA from
  scratch, eq. 2), :mod:`~fedlora_edu.adapters` (peft factors as tensors),
  :mod:`~fedlora_edu.strategy` (the method interface), :mod:`~fedlora_edu.simulator`
  (eq. 3 on one machine), :mod:`~fedlora_edu.plotting`;
- distributed learning, server aggregation (survey 3.1): :mod:`~fedlora_edu.aggregation`.
"""

__version__ = "0.1.0"
