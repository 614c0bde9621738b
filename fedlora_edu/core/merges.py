"""Merges into the frozen weight, and what a client must download to keep its W' in step.

Several methods fold an aggregated product into the frozen weight W' on the server and start
the adapter afresh: FLoRA (the clients' stack, every round), FedLoRU (the averaged adapter every
tau rounds), Re-Initial (every round), FRLoRA (a residual every round). Every client holds its
own copy of W', so a client that did not take part in some rounds must apply every merge it
missed before it trains, not only the last one. :func:`missed_merges` lists those merges and
counts their bytes at the cheaper of two encodings: the merged factors themselves, or one
dense m x n change per layer (their sum, which the client can add at once).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from fedlora_edu.core.adapters import Factors


@dataclass
class MergingState:
    """The server state of a method that folds adapters into W': every merge so far.

    ``merges`` lists, per merge, every layer's (A, B) whose product went into W';
    ``merge_rounds`` the 1-based rounds after which they were merged.
    """

    merges: list[dict[str, Factors]] = field(default_factory=list)
    merge_rounds: list[int] = field(default_factory=list)


@dataclass
class MergingClientState:
    """How many of the server's merges this client has applied to its own W'."""

    merges_applied: int = 0


def missed_merges(state: MergingState, client_state: MergingClientState) -> tuple[dict[str, Tensor], int]:
    """What a client downloads to bring its W' up to date: the merges it has not applied yet, and their bytes.

    ``state.merges`` lists, per merge, every layer's (A, B), whose product s B A was folded into
    W'; the client applies each merge it missed (it may have skipped rounds), and its state
    records that it is now up to date. Counted as the factors, or as the dense m x n change per
    layer where that is smaller. Returns the tensors (named ``<layer>.A@merge<j>``) and the bytes.
    """
    merges = state.merges
    applied = client_state.merges_applied
    missed = merges[applied:]
    client_state.merges_applied = len(merges)
    tensors: dict[str, Tensor] = {}
    if not missed:
        return tensors, 0
    for j, merge in enumerate(missed):
        for name, (a, b) in merge.items():
            tensors[f"{name}.A@merge{applied + j}"] = a
            tensors[f"{name}.B@merge{applied + j}"] = b
    factored = sum(t.numel() * t.element_size() for t in tensors.values())
    dense = sum(a.shape[1] * b.shape[0] * a.element_size() for a, b in missed[0].values())
    return tensors, min(factored, dense)
