"""Solutions to exercises/aggregation_basics.ipynb (teachers: leave this folder out when you hand
the exercises out). tests/test_exercises.py checks each one with fedlora_edu.teaching.exercises.check."""

from __future__ import annotations

import torch


def ideal_update(As, Bs, weights):
    """Survey eq. 4, right side: multiply each client's factors first, then average."""
    return sum(p * (B @ A) for p, A, B in zip(weights, As, Bs, strict=True))


def fedit_average(As, Bs, weights):
    """Survey eq. 4, left side: average A and B separately (FedIT)."""
    A_avg = sum(p * A for p, A in zip(weights, As, strict=True))
    B_avg = sum(p * B for p, B in zip(weights, Bs, strict=True))
    return A_avg, B_avg


def discordance(As, Bs, weights):
    """How far FedIT's product lands from the ideal update, in Frobenius norm."""
    A_avg, B_avg = fedit_average(As, Bs, weights)
    return torch.linalg.matrix_norm(B_avg @ A_avg - ideal_update(As, Bs, weights)).item()


def fedex_residual(As, Bs, weights):
    """Survey eq. 7 (FedEx-LoRA): what must be added to the frozen weight to close the gap."""
    A_avg, B_avg = fedit_average(As, Bs, weights)
    return ideal_update(As, Bs, weights) - B_avg @ A_avg


def lora_forward(x, W, A, B, alpha):
    """Survey eq. 2 for a batch of rows x: h = x W^T + (alpha / r) x A^T B^T."""
    r = A.shape[0]
    return x @ W.T + (alpha / r) * (x @ A.T @ B.T)
