"""Survey section 2, the foundations: federated learning (eq. 1), LoRA (eq. 2), FedLoRA (eq. 3).

- :mod:`.fedavg`: FedAvg on model states and a federated linear probe (eq. 1);
- :mod:`.lora`: LoRA written from scratch (eq. 2);
- :mod:`.partition`: how a data set is split over clients (IID and non-IID);
- :mod:`.training`: one client's local training and evaluation (the local update of eq. 3).

Taught in Part I (``book/part1/``). Imports only :mod:`fedlora_edu.core`.
"""
