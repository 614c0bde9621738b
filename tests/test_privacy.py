"""Privacy as a cost: DP-FedAvg around FedIT and FFA-LoRA, the accountant, and FFA-LoRA's noise argument.

What defines each piece: a clipped change never exceeds the clip norm and one inside it is left
alone; the server's noise has standard deviation z C on the sum; the package's epsilon is opacus's
for the same z, q, T and delta, and grows with T and with 1/z; with noise on both factors the error
of B A has a term in the noise squared that noise on B alone does not; through the simulator the
wrapper sends what the wrapped method sends, clipped, and FFA-LoRA's A never moves.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import recording
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedlora_edu.core.adapters import get_lora_factors
from fedlora_edu.core.strategy import Payload, ServerState, Upload
from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.distributed.single_matrix import FFALoRA
from fedlora_edu.efficiency.privacy import (
    DPFedAvg,
    clip_update,
    epsilon_curve,
    epsilon_spent,
    expected_product_error,
    noise_multiplier_for,
    noisy_mean,
    product_noise_error,
    update_norm,
)
from fedlora_edu.efficiency.sparse import FLASC
from fedlora_edu.registry import METHODS, make_strategy


def _tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"q.A": scale * torch.randn(3, 7, generator=generator),
            "q.B": scale * torch.randn(5, 3, generator=generator)}


# ----- clipping and noise ---------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3), clip=st.floats(1e-2, 1e2))
def test_a_clipped_change_is_inside_the_ball_and_points_the_same_way(seed, scale, clip):
    change = _tensors(seed, scale)
    clipped, norm = clip_update(change, clip)
    assert norm == pytest.approx(update_norm(change))
    assert update_norm(clipped) <= clip * (1 + 1e-5)
    if norm <= clip:  # inside the ball: unchanged
        assert all(torch.equal(clipped[k], change[k]) for k in change)
    else:  # on the sphere, same direction: a positive multiple of the change
        assert update_norm(clipped) == pytest.approx(clip, rel=1e-5)
        factor = clip / norm
        assert all(torch.allclose(clipped[k], factor * change[k]) for k in change)


def test_clipping_refuses_a_norm_that_is_not_positive():
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update(_tensors(0), 0.0)
    clipped, _ = clip_update(_tensors(0), math.inf)
    assert all(torch.equal(clipped[k], v) for k, v in _tensors(0).items())


def test_the_noisy_mean_is_the_mean_plus_noise_of_std_z_c_over_k():
    changes = [{"x": torch.full((400, 500), float(k))} for k in range(4)]  # mean 1.5
    assert torch.equal(noisy_mean(changes, 1.0, 0.0)["x"], torch.full((400, 500), 1.5))
    z, clip = 0.7, 2.0
    noise = noisy_mean(changes, clip, z, torch.Generator().manual_seed(0))["x"] - 1.5
    assert float(noise.mean()) == pytest.approx(0.0, abs=5e-3)
    assert float(noise.std()) == pytest.approx(z * clip / len(changes), rel=1e-2)
    again = noisy_mean(changes, clip, z, torch.Generator().manual_seed(0))["x"] - 1.5
    assert torch.equal(noise, again)  # the same seed, the same noise
    with pytest.raises(ValueError, match="at least one"):
        noisy_mean([], 1.0, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        noisy_mean(changes, 1.0, -1.0)


# ----- the accountant -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("z, q, rounds, delta", [(0.5, 0.25, 30, 1e-5), (1.0, 2 / 16, 2, 1e-5), (1.3, 0.01, 1000, 1e-6),
                                                 (4.0, 1.0, 5, 1e-3)])
def test_the_package_epsilon_is_the_library_s(z, q, rounds, delta):
    accountant = RDPAccountant()
    for _ in range(rounds):  # one step per round, as opacus's own training loop records it
        accountant.step(noise_multiplier=z, sample_rate=q)
    assert epsilon_spent(z, q, rounds, delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    orders = RDPAccountant.DEFAULT_ALPHAS
    epsilon, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=orders),
                                   delta=delta)
    assert epsilon_spent(z, q, rounds, delta) == pytest.approx(epsilon, rel=1e-9)


def test_the_curve_is_the_accountant_after_each_number_of_rounds():
    rounds = [0, 1, 2, 7, 30, 300]
    curve = epsilon_curve(0.8, 0.3, rounds, 1e-5)
    for count, epsilon in zip(rounds, curve, strict=True):
        accountant = RDPAccountant()
        if count:
            accountant.history = [(0.8, 0.3, count)]
        assert epsilon == (pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9) if count else 0.0)
    assert epsilon_curve(0.0, 0.3, [0, 3]) == [0.0, math.inf]


@settings(max_examples=25, deadline=None)
@given(z=st.floats(0.3, 5.0), q=st.floats(0.01, 1.0), rounds=st.integers(1, 200))
def test_epsilon_grows_with_the_rounds_and_with_less_noise(z, q, rounds):
    epsilon = epsilon_spent(z, q, rounds)
    assert 0 < epsilon < math.inf
    assert epsilon_spent(z, q, rounds + 1) >= epsilon
    assert epsilon_spent(z * 1.25, q, rounds) <= epsilon
    assert epsilon_spent(z, q, 2 * rounds) > epsilon or epsilon_spent(z, q, 2 * rounds) == pytest.approx(epsilon)


def test_no_noise_no_guarantee_no_rounds_nothing_spent_and_bad_inputs_are_named():
    assert epsilon_spent(0.0, 0.5, 10) == math.inf
    assert epsilon_spent(1.0, 0.5, 0) == 0.0
    for args, word in (((-1.0, 0.5, 3), "noise_multiplier"), ((1.0, 0.0, 3), "sample_rate"),
                       ((1.0, 0.5, 2.5), "rounds"), ((1.0, 0.5, 3, 0.0), "delta")):
        with pytest.raises(ValueError, match=word):
            epsilon_spent(*args)


def test_the_noise_for_a_target_epsilon_spends_at_most_it():
    z = noise_multiplier_for(2.0, 0.25, 20)
    assert epsilon_spent(z, 0.25, 20) <= 2.0 + 0.01
    assert epsilon_spent(0.9 * z, 0.25, 20) > 2.0


# ----- FFA-LoRA's argument: noise in the product ----------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), r=st.integers(1, 8), n=st.integers(1, 40), std=st.floats(1e-3, 10.0),
       seed=st.integers(0, 1000))
def test_noise_on_both_factors_costs_more_than_on_b_alone_and_grows_faster(m, r, n, std, seed):
    generator = torch.Generator().manual_seed(seed)
    A, B = torch.randn(r, n, generator=generator), torch.randn(m, r, generator=generator)
    both, b_only = expected_product_error(A, B, std, "AB"), expected_product_error(A, B, std, "B")
    assert both > b_only
    assert expected_product_error(A, B, 2 * std, "B") == pytest.approx(2 * b_only)  # linear in the noise
    assert expected_product_error(A, B, 2 * std, "AB") > 2 * both  # the product of the noises: faster than linear
    # B = 0 (LoRA's start): on B alone the error is std sqrt(m) ||A||, on both it adds n r m std^4 under the root
    zero = torch.zeros(m, r)
    assert expected_product_error(A, zero, std, "AB") ** 2 == pytest.approx(
        expected_product_error(A, zero, std, "B") ** 2 + std ** 4 * m * r * n, rel=1e-9)


@pytest.mark.parametrize("noise_on", ["AB", "B"])
def test_the_closed_form_is_the_mean_square_of_draws(noise_on):
    generator = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 30, generator=generator), torch.randn(20, 4, generator=generator)
    std = 0.5
    draws = [product_noise_error(A, B, std, noise_on, generator) ** 2 for _ in range(2000)]
    assert math.sqrt(sum(draws) / len(draws)) == pytest.approx(expected_product_error(A, B, std, noise_on), rel=0.02)


def test_noise_on_b_alone_is_linear_draw_by_draw():
    A, B = torch.randn(4, 30), torch.randn(20, 4)
    one = product_noise_error(A, B, 0.1, "B", torch.Generator().manual_seed(5))
    two = product_noise_error(A, B, 0.2, "B", torch.Generator().manual_seed(5))
    assert two == pytest.approx(2 * one, rel=1e-12)
    with pytest.raises(ValueError, match="noise_on"):
        product_noise_error(A, B, 0.1, "A")


# ----- the wrapper ----------------------------------------------------------------------------------------------------
def _server(generator) -> ServerState:
    adapters = {"q": (torch.randn(3, 7, generator=generator), torch.randn(5, 3, generator=generator))}
    return ServerState(adapters=adapters, head={}, scaling=1.0, rank=3)


def test_without_noise_or_clipping_the_wrapper_is_fedit_for_clients_of_equal_size():
    generator = torch.Generator().manual_seed(0)
    server = _server(generator)
    trained = [{"q.A": server.adapters["q"][0] + torch.randn(3, 7, generator=generator),
                "q.B": server.adapters["q"][1] + torch.randn(5, 3, generator=generator)} for _ in range(3)]
    plain = ServerState(adapters=dict(server.adapters), head={}, scaling=1.0, rank=3)
    FedIT().aggregate(plain, [Upload(k, 10, Payload(t), 3) for k, t in enumerate(trained)], 0)
    changes = [{key: value - (server.adapters["q"][0] if key.endswith("A") else server.adapters["q"][1])
                for key, value in t.items()} for t in trained]
    private = DPFedAvg(FedIT(), clip_norm=math.inf, noise_multiplier=0.0)
    private.aggregate(server, [Upload(k, 10, Payload(c), 3) for k, c in enumerate(changes)], 0)
    for got, want in zip(server.adapters["q"], plain.adapters["q"], strict=True):
        torch.testing.assert_close(got, want)


def test_wrapping_ffa_lora_noises_b_only_at_std_z_c_over_k():
    generator = torch.Generator().manual_seed(1)
    server = ServerState(adapters={"q": (torch.randn(8, 300, generator=generator), torch.zeros(400, 8))}, head={},
                         scaling=1.0, rank=8)
    a_before = server.adapters["q"][0].clone()
    zero = [{"q.B": torch.zeros(400, 8)} for _ in range(4)]
    DPFedAvg(FFALoRA(), clip_norm=0.5, noise_multiplier=1.2).aggregate(
        server, [Upload(k, 1 + k, Payload(c), 8) for k, c in enumerate(zero)], 0)
    assert torch.equal(server.adapters["q"][0], a_before)  # A frozen: no noise on it
    assert float(server.adapters["q"][1].std()) == pytest.approx(1.2 * 0.5 / 4, rel=0.05)


def test_through_the_simulator_the_wrapper_sends_what_the_method_sends_clipped(federation):
    ffa = federation.run(FFALoRA(), rounds=1, seed=0, evaluate=False, progress=False)
    private = recording(DPFedAvg)(FFALoRA(), clip_norm=1e-3, noise_multiplier=1.0)
    a_start = {n: a.clone() for n, (a, _) in get_lora_factors(federation.fresh_model(seed=0)).items()}
    history = federation.run(private, rounds=1, seed=0, evaluate=False, progress=False)
    assert history["bytes_up"].tolist() == ffa["bytes_up"].tolist()  # the same tensors' shapes, the same bytes
    assert len(private.update_norms) == len(private.sent) == int(history["clients"].iloc[0])
    for (_, _, payload, _), record in zip(private.sent, private.update_norms, strict=True):
        assert all(not key.endswith(".A") for key in payload.tensors)  # FFA-LoRA never sends A
        assert update_norm(payload.tensors) <= 1e-3 * (1 + 1e-5) < record["norm"]  # every change was clipped
    for name, (a, _) in federation.last_server.adapters.items():
        torch.testing.assert_close(a, a_start[name])  # and A never moves


def test_the_wrapper_refuses_what_it_cannot_wrap(federation):
    with pytest.raises(TypeError, match="inner"):
        DPFedAvg(DPFedAvg())
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPFedAvg(clip_norm=math.inf, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="factors and the head"):  # FLASC sends sparse values and indices
        federation.run(DPFedAvg(FLASC(0.1, 0.1)), rounds=1, seed=0, evaluate=False, progress=False)


def test_the_registry_builds_it_by_name_around_any_factor_method():
    assert METHODS["DP-FedAvg"] is DPFedAvg
    default = make_strategy("DP-FedAvg")
    assert isinstance(default.inner, FedIT) and default.clip_norm == 1.0 and default.noise_multiplier == 1.0
    wrapped = make_strategy("DP-FedAvg", inner=make_strategy("FFA-LoRA"), noise_multiplier=0.5)
    assert wrapped.trainable(0) == frozenset({"B"}) and wrapped.batched_training_obstacle() is None
