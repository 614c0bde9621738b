"""Survey section 5, efficiency: where Part IV's methods go, one module per leaf.

The leaves of the survey's taxonomy: sparse learning at parameter and layer level (e.g.
FLASC, FSLoRA, FedRA), split learning (e.g. SplitLoRA) and compressed learning, one module per
leaf: :mod:`~fedlora_edu.efficiency.sparse` (parameter-level sparsity: FLASC's top-k payloads,
FSLoRA's sketches), :mod:`~fedlora_edu.efficiency.layers` (layer-level sparsity: FedRA, Fed-piLot,
FibecFed, FedFMSL), :mod:`~fedlora_edu.efficiency.split` (split learning: SplitFedLoRA's client with the
embeddings and head, SplitLoRA's with the first blocks; bytes at the cut; what the cut leaks),
:mod:`~fedlora_edu.efficiency.compression` (compressed uploads: quantized and
top-k baselines, CG-FedLLM's autoencoder; FwdLLM's forward-only gradients),
:mod:`~fedlora_edu.efficiency.privacy` (privacy as a cost: DP-FedAvg's clipped, noised updates
around FedIT or FFA-LoRA, the privacy spent by opacus's accountant) and
:mod:`~fedlora_edu.efficiency.costs` (what a method costs a client, counted
in one place for every method: compute, memory and bytes of a round).
Modules here may import :mod:`fedlora_edu.core`,
:mod:`fedlora_edu.foundations`, :mod:`fedlora_edu.distributed` and
:mod:`fedlora_edu.heterogeneity`.
"""
