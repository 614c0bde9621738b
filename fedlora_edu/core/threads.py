"""Run small tensor work on one CPU thread.

Several solvers of the package work on tiny matrices: the federated linear probe
(:mod:`fedlora_edu.foundations.fedavg`), LoRA-FAIR's server correction (m x r and r x r
matrices) and FedInc's k-means over tens of rank vectors. With several intra-op threads
the thread pool's hand-offs cost far more than the arithmetic: measured 300 times slower
for the probe, about 40 times for LoRA-FAIR's steps and 50 times for the k-means on a
loaded 2-core machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block, then restore the caller's setting."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
