"""Seed derivation: every random stream of a run from the run's one seed.

A run has one seed. Everything random in it that must be reproducible and independent of
everything else (a client's mini-batches in a round, the fresh adapter a method broadcasts,
the masks of a sparse phase, a k-means restart) draws from its own stream, named by a label
and the indices that tell its instances apart (round, client)::

    derive_seed(seed, "client batches", round_index, client_id)

One function derives them all, so two streams never collide by an accident of arithmetic
(hand-mixed formulas such as ``seed * 1_000_003 + round * 10_007 + client`` overlap as soon as
one index outgrows its multiplier) and a reader finds every stream of the package by its label.
The mixing is numpy's :class:`~numpy.random.SeedSequence`, a hash designed for exactly this
(nearby inputs give unrelated outputs); a label enters as the CRC-32 of its UTF-8 bytes, followed
by the number of indices and the indices.
"""

from __future__ import annotations

import zlib

import numpy as np

MAX_SEED = 2**31 - 1
"""Derived seeds lie in [0, 2**31 - 1): valid for torch.Generator.manual_seed, numpy and Python's random."""


def derive_seed(seed: int, label: str, *indices: int) -> int:
    """The seed of the stream ``label`` (at ``indices``) of a run with seed ``seed``; the same inputs, the same seed.

    ``seed`` and ``indices`` are integers >= 0; ``label`` is a non-empty string naming the stream.
    """
    for name, value in (("seed", seed), *((f"indices[{i}]", v) for i, v in enumerate(indices))):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if not isinstance(label, str) or not label:
        raise ValueError(f"label must be a non-empty string naming the stream, got {label!r}")
    # The count of indices enters too: SeedSequence pads its entropy with zeros, so (1,) and (1, 0) would agree.
    entropy = [int(seed), zlib.crc32(label.encode("utf-8")), len(indices), *(int(i) for i in indices)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] % MAX_SEED)
