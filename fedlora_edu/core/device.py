"""Where tensors go by default: the GPU when CUDA is available, else the CPU."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
