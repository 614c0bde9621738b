"""studies/deviations.py: the reference code's variants change what they say and nothing else."""

from __future__ import annotations

import math

import torch
from helpers import load_script

from fedlora_edu.core.svd import truncated_factors

deviations = load_script("studies/deviations.py")


def test_singular_values_move_into_b_and_the_product_stays():
    generator = torch.Generator().manual_seed(0)
    update = torch.randn(12, 4, generator=generator) @ torch.randn(4, 10, generator=generator)
    a, b = truncated_factors(update, 3)  # the package's even split: A = S^(1/2) V^T, B = U S^(1/2)
    a_ref, b_ref = deviations.singular_values_in_b(a, b)
    assert torch.allclose(b_ref @ a_ref, b @ a, atol=1e-5)
    assert torch.allclose(a_ref @ a_ref.T, torch.eye(3), atol=1e-5)  # A = V^T: orthonormal rows
    sigma = torch.linalg.svdvals(update)[:3]
    assert torch.allclose(b_ref.norm(dim=0), sigma, rtol=1e-4)  # B = U S: column i has length sigma_i


def test_a_zero_component_stays_zero():
    a, b = torch.zeros(2, 5), torch.zeros(6, 2)
    a_ref, b_ref = deviations.singular_values_in_b(a, b)
    assert not a_ref.any() and not b_ref.any()


def test_the_orthonormal_frozen_factor_applies_the_reference_scale():
    generator = torch.Generator().manual_seed(1)
    m, r, scaling = 16, 4, 2.0
    b = torch.empty(m, r).uniform_(-0.25, 0.25, generator=generator)
    frozen = deviations.orthonormal_frozen(b, scaling)
    applied = scaling * frozen  # what the model multiplies A by, with the package's constant
    assert torch.allclose(applied.T @ applied, (m / r) * torch.eye(r), atol=1e-4)  # B^T B = (m / r) I, constant 1
    assert torch.equal(frozen, deviations.orthonormal_frozen(b.clone(), scaling))  # a function of the draw
    q, _ = torch.linalg.qr(b)
    assert torch.allclose((frozen * scaling / math.sqrt(m / r)).abs(), q.abs(), atol=1e-5)  # spans b's columns
