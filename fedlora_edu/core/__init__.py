"""The core every branch builds on: the factor math of survey eqs. 1 and 4, input checks, SVD
routes, seed derivation, the strategy interface, and peft LoRA factors as plain tensors.

Nothing here imports any other part of :mod:`fedlora_edu`: it is the bottom of the package's
one-way import order (``tests/test_layout.py`` checks it).
"""
