"""Survey section 3, distributed learning: one module per leaf of the taxonomy.

Section 3.1, server aggregation:

- :mod:`.discordance`: separate averaging and its discordance (eq. 4): FedIT;
- :mod:`.single_matrix`: one low-rank matrix per round (eq. 5): FFA-LoRA, CoLR, RoLoRA, LoRA-A2;
- :mod:`.full_size`: full-size matrix aggregation (eq. 6): FLoRA, FlexLoRA, FedPipe;
- :mod:`.corrective`: corrective mechanisms (eq. 7): FedEx-LoRA, LoRA-FAIR;
- :mod:`.rank_clustering`: rank clustering aggregation (eq. 8): FedInc.

Section 3.2, LoRA initialization:

- :mod:`.server_init`: server-side (eqs. 9, 10): standard init, FeDeRA, SLoRA;
- :mod:`.client_init`: client-side (eq. 11): Avg-Initial, Re-Initial, Local-Initial, FedLoRU,
  pFedLoRU, mFedLoRU, FRLoRA.

Taught in Part II (``book/part2/``). Modules here import :mod:`fedlora_edu.core` and
:mod:`fedlora_edu.foundations` (and one another), never the simulation; only
:mod:`fedlora_edu.registry` imports them for the rest of the package.
"""
