"""The batched multi-client engine: its products on random tensors, and equivalence with the sequential
peft loop on the real embedded MiniLM (dropout off) for FedIT, FFA-LoRA, an alternating schedule, mixed
per-client schedules, heterogeneous ranks (FlexLoRA, FLoRA) and a whole Federation.run history."""

from __future__ import annotations

import copy
import warnings

import helpers
import pytest
import torch
from torch import nn

from fedlora_edu.core import adapters as adapter_io
from fedlora_edu.core.seeds import derive_seed
from fedlora_edu.core.strategy import Payload, Strategy
from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.distributed.full_size import FlexLoRA, FLoRA
from fedlora_edu.distributed.single_matrix import FFALoRA
from fedlora_edu.heterogeneity.personalized import FedSALoRA
from fedlora_edu.simulation.engine import (
    ClientJob,
    batched_linear,
    batched_lora_forward,
    disable_dropout,
    train_clients_batched,
    train_clients_in_groups,
    unsupported_reason,
)
from fedlora_edu.simulation.federation import Federation, build_federation

warnings.filterwarnings("ignore", category=FutureWarning)

TINY = helpers.TINY.with_overrides(num_clients=4, rounds=2, local_steps=3, train_examples=64)  # 3 of 4 sampled
# AdamW moves a weight by at most about lr per step whatever the gradient's size, so an element with a
# gradient near AdamW's eps, computed in another summation order, can move by a visible fraction of lr.
# Two checks: the whole update (result minus start) agrees to RELATIVE in Frobenius norm, and no element
# is off by more than 10% of the largest movement AdamW allows. (5% held with the earlier seeds; with the
# batch streams of derive_seed one element of the decoder's 233,280 moved 5.2% away, with a relative
# gap of 2.5e-4: float noise on an element whose gradient is near eps.) A changed batch breaks both
# (negative control below).
RELATIVE = 1e-3
ATOL = 0.10 * TINY.learning_rate * TINY.local_steps


@pytest.fixture(scope="module")
def federation() -> Federation:
    """A federation whose model has every dropout probability at 0 (the engine's exact regime)."""
    federation = build_federation("bbc_news", scheme="iid", profile=TINY, seed=0)
    disable_dropout(federation.base_model)
    return federation


class SendsBoth(Strategy):
    """Test strategies' common part: upload A, B and the head; aggregate as FedIT does."""

    def client_upload(self, result, client_state, round_index):
        tensors = {f"{n}.{s}": t for n, (a, b) in result.adapters.items() for s, t in (("A", a), ("B", b))}
        tensors.update({f"head.{k}": v for k, v in result.head.items()})
        return Payload(tensors)

    def aggregate(self, server, uploads, round_index):
        FedIT.aggregate(self, server, uploads, round_index)


class Alternating(SendsBoth):
    """A test schedule: B trains in even rounds, A in odd ones (RoLoRA-like)."""

    name = "alternating"

    def trainable(self, round_index):
        return frozenset({"B"}) if round_index % 2 == 0 else frozenset({"A"})


class MixedPerClient(SendsBoth):
    """Clients of one round train different matrices: even ids train A only, odd ids B only."""

    name = "mixed"

    def client_start(self, server, client_id, client_state, round_index):
        start = super().client_start(server, client_id, client_state, round_index)
        start.trainable = frozenset({"A"}) if client_id % 2 == 0 else frozenset({"B"})
        return start


def run_both(federation, make_strategy, **options):
    """Run the same strategy with each engine; return {engine: (history, recorded strategy)}."""
    out = {}
    for engine in ("sequential", "batched"):
        strategy = make_strategy()
        history = federation.run(strategy, engine=engine, progress=False, **options)
        out[engine] = (history, strategy)
    return out


def replay(federation, strategy, rounds):
    """Run ``strategy`` sequentially, then retrain every round's clients from the SAME recorded starts with
    the engine; return {(round, client): (start, sequential result, batched result)}.

    Identical starts isolate one round's local training (otherwise round t + 1 starts from aggregates
    that already differ by float noise). Valid for strategies that leave W' alone (no base_deltas).
    """

    federation.run(strategy, rounds=rounds, engine="sequential", progress=False)
    model = federation.fresh_model(strategy.max_rank(federation.num_clients))
    out = {}
    for t in range(rounds):
        starts = strategy.starts[t]
        sequential = {result.client_id: result for round_index, result, _, _ in strategy.sent if round_index == t}
        clients = sorted(starts)
        jobs = [ClientJob(k, federation.clients[k], copy.deepcopy(starts[k]), derive_seed(0, "client batches", t, k))
                for k in clients]
        trained = train_clients_batched(model, jobs, steps=TINY.local_steps, batch_size=TINY.batch_size,
                                        learning_rate=TINY.learning_rate)
        for k, result in zip(clients, trained, strict=True):
            out[(t, k)] = (starts[k], sequential[k], result)
    return out


def update_gap(start, expected, got) -> tuple[float, float]:
    """(||got - expected|| / ||expected - start||, max |got - expected|) over all factors and the head."""
    pairs = [(start.adapters[n][i], expected.adapters[n][i], got.adapters[n][i])
             for n in expected.adapters for i in (0, 1)]
    pairs += [(start.head[n], expected.head[n], got.head[n]) for n in expected.head]
    moved = sum(float((e - s).norm() ** 2) for s, e, _ in pairs) ** 0.5
    gap = sum(float((g - e).norm() ** 2) for _, e, g in pairs) ** 0.5
    return gap / moved, max(float((g - e).abs().max()) for _, e, g in pairs)


def assert_same_client_results(replayed):
    assert replayed
    for start, expected, got in replayed.values():
        assert got.client_id == expected.client_id and got.rank == expected.rank
        assert got.num_examples == expected.num_examples
        for name, (a, b) in expected.adapters.items():
            assert got.adapters[name][0].shape == a.shape and got.adapters[name][1].shape == b.shape
        relative, largest = update_gap(start, expected, got)
        assert relative < RELATIVE, relative
        assert largest < ATOL, largest
        assert got.train_loss == pytest.approx(expected.train_loss, abs=1e-4)


# ----- the batched products on random tensors ---------------------------------------------------
def test_batched_lora_forward_is_each_clients_lora_layer():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        clients, rows, length = (int(v) for v in torch.randint(1, 5, (3,), generator=generator))
        n, m, r = (int(v) for v in torch.randint(1, 9, (3,), generator=generator))
        base = nn.Linear(n, m)
        x = torch.randn(clients * rows, length, n, generator=generator)
        A = torch.randn(clients, r, n, generator=generator)  # A_k is r x n
        B = torch.randn(clients, m, r, generator=generator)  # B_k is m x r
        scaling = float(torch.rand(1, generator=generator)) * 4
        got = batched_lora_forward(base, nn.Identity(), x, A, B, scaling)
        with torch.no_grad():
            for k in range(clients):
                block = x[k * rows:(k + 1) * rows]
                expected = block @ (base.weight + scaling * B[k] @ A[k]).T + base.bias  # W' + s B_k A_k
                torch.testing.assert_close(got[k * rows:(k + 1) * rows], expected, atol=1e-5, rtol=1e-5)


def test_batched_linear_is_each_clients_head():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        clients, rows, n, out = (int(v) for v in torch.randint(1, 6, (4,), generator=generator))
        x = torch.randn(clients * rows, n, generator=generator)
        weight = torch.randn(clients, out, n, generator=generator)
        bias = torch.randn(clients, out, generator=generator)
        got = batched_linear(x, weight, bias)
        for k in range(clients):
            block = x[k * rows:(k + 1) * rows]
            torch.testing.assert_close(got[k * rows:(k + 1) * rows], block @ weight[k].T + bias[k])
        torch.testing.assert_close(batched_linear(x, weight, None), got - bias.repeat_interleave(rows, dim=0))


# ----- equivalence with the sequential loop on MiniLM -------------------------------------------
def test_fedit_clients_match_the_sequential_loop(federation):
    assert_same_client_results(replay(federation, helpers.recording(FedIT)(), rounds=2))


def test_ffa_lora_clients_match_and_a_stays_bit_identical(federation):
    replayed = replay(federation, helpers.recording(FFALoRA)(), rounds=2)
    assert_same_client_results(replayed)
    for start, _, got in replayed.values():
        for name, (a, _) in got.adapters.items():
            assert torch.equal(a, start.adapters[name][0])  # frozen A: not one bit moved


def test_alternating_schedule_matches_and_freezes_the_other_matrix(federation):
    replayed = replay(federation, helpers.recording(Alternating)(), rounds=2)
    assert_same_client_results(replayed)
    for (round_index, _), (start, _, got) in replayed.items():
        frozen = 0 if round_index % 2 == 0 else 1  # A frozen in even rounds, B in odd rounds
        for name, factors in got.adapters.items():
            assert torch.equal(factors[frozen], start.adapters[name][frozen])
            assert not torch.equal(factors[1 - frozen], start.adapters[name][1 - frozen])


def test_mixed_schedules_within_one_round_match(federation):
    replayed = replay(federation, helpers.recording(MixedPerClient)(), rounds=1)
    assert_same_client_results(replayed)
    for (_, client_id), (start, _, got) in replayed.items():
        frozen = 1 if client_id % 2 == 0 else 0
        for name, factors in got.adapters.items():
            assert torch.equal(factors[frozen], start.adapters[name][frozen])


@pytest.mark.parametrize(("cls", "rounds"), [(FlexLoRA, 2), (FLoRA, 1)])  # FLoRA changes W' after round 1
def test_heterogeneous_ranks_match_the_sequential_loop(federation, cls, rounds):
    ranks = [1, 2, 4, 3]
    replayed = replay(federation, helpers.recording(cls)(ranks=ranks), rounds=rounds)
    assert_same_client_results(replayed)
    for (_, client_id), (_, _, got) in replayed.items():
        assert all(a.shape[0] == ranks[client_id] and b.shape[1] == ranks[client_id]
                   for a, b in got.adapters.values())


def test_clients_with_their_own_b_match_the_sequential_loop(federation):
    """FedSA-LoRA: every client starts from the shared A and its own B (zero before its first round)."""
    replayed = replay(federation, helpers.recording(FedSALoRA)(), rounds=3)
    assert_same_client_results(replayed)
    assert any(start.adapters[name][1].any() for start, _, _ in replayed.values() for name in start.adapters)


def test_whole_history_matches_the_sequential_loop(federation):
    out = run_both(federation, FedIT, rounds=3)
    sequential, batched = out["sequential"][0], out["batched"][0]
    assert (batched["engine"] == "batched").all() and (sequential["engine"] == "sequential").all()
    # Later rounds start from aggregates that differ by float noise, which AdamW amplifies a little each
    # round: losses agree to 1%, accuracy to one test example (a prediction on a decision boundary may flip).
    one_example = 1 / len(federation.test) + 1e-9
    assert batched["accuracy"].tolist() == pytest.approx(sequential["accuracy"].tolist(), abs=one_example)
    for column in ("test_loss", "train_loss", "discordance"):
        assert batched[column].tolist() == pytest.approx(sequential[column].tolist(), rel=1e-2)
    for column in ("bytes_up", "bytes_down", "clients", "excluded"):
        assert batched[column].tolist() == sequential[column].tolist()


def test_other_batches_break_the_match(federation):
    """Negative control: the tolerance is tight enough to see one client's batches changed."""
    start = FedIT().client_start(_server(federation), 0, {}, 0)
    jobs = [ClientJob(k, federation.clients[k], copy.deepcopy(start), seed=10 + k) for k in range(3)]
    shifted = [ClientJob(k, federation.clients[k], copy.deepcopy(start), seed=10 + k + (k == 1)) for k in range(3)]
    options = {"steps": TINY.local_steps, "batch_size": TINY.batch_size, "learning_rate": TINY.learning_rate}
    model = federation.fresh_model()
    first = train_clients_batched(model, jobs, **options)
    second = train_clients_batched(model, shifted, **options)
    gaps = [update_gap(start, first[k], second[k]) for k in range(3)]
    assert gaps[0][0] < RELATIVE and gaps[2][0] < RELATIVE  # the other clients do not see client 1's batches
    assert gaps[1][0] > 100 * RELATIVE and gaps[1][1] > ATOL


# ----- a round in groups of clients: same results, and a halving when the device runs out of memory --
def _jobs(federation, count):
    start = FedIT().client_start(_server(federation), 0, {}, 0)
    return [ClientJob(k % federation.num_clients, federation.clients[k % federation.num_clients],
                      copy.deepcopy(start), seed=20 + k) for k in range(count)]


def test_groups_of_clients_give_the_one_pass_results(federation):
    options = {"steps": TINY.local_steps, "batch_size": TINY.batch_size, "learning_rate": TINY.learning_rate}
    model = federation.fresh_model()
    jobs = _jobs(federation, 5)
    whole = train_clients_batched(model, jobs, **options)
    grouped, size = train_clients_in_groups(model, jobs, clients_per_pass=2, **options)  # groups of 2, 2, 1
    assert size == 2 and [r.client_id for r in grouped] == [r.client_id for r in whole]
    for job, expected, got in zip(jobs, whole, grouped, strict=True):
        relative, largest = update_gap(job.start, expected, got)
        assert relative < RELATIVE and largest < ATOL, (relative, largest)
    assert train_clients_in_groups(model, jobs, **options)[1] == 5  # None: all clients in one pass
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match="clients_per_pass"):
            train_clients_in_groups(model, jobs, clients_per_pass=bad, **options)


def test_running_out_of_memory_halves_the_group(federation, monkeypatch):
    """A device that holds at most 2 clients per pass (simulated): 5 clients run as 3 passes of <= 2,
    with the results of one pass; an explicit clients_per_pass that does not fit raises instead."""
    import fedlora_edu.simulation.engine as engine

    options = {"steps": 1, "batch_size": TINY.batch_size, "learning_rate": TINY.learning_rate}
    model = federation.fresh_model()
    jobs = _jobs(federation, 5)
    whole = train_clients_batched(model, jobs, **options)
    real, tried = engine.train_clients_batched, []

    def small_device(model, jobs, **kwargs):
        tried.append(len(jobs))
        if len(jobs) > 2:
            raise torch.OutOfMemoryError("simulated: the stacked activations do not fit")
        return real(model, jobs, **kwargs)

    monkeypatch.setattr(engine, "train_clients_batched", small_device)
    grouped, size = train_clients_in_groups(model, jobs, **options)
    assert size == 2 and tried == [5, 3, 2, 2, 1]
    for job, expected, got in zip(jobs, whole, grouped, strict=True):
        assert update_gap(job.start, expected, got)[0] < RELATIVE
    with pytest.raises(torch.OutOfMemoryError):
        train_clients_in_groups(model, jobs, clients_per_pass=3, **options)

    history = federation.run(FedIT(), rounds=1, clients_per_round=3, progress=False)
    assert history["clients_per_pass"].tolist() == [2] and federation.last_clients_per_pass == 2


def test_run_reports_and_checks_clients_per_pass(federation):
    history = federation.run(FedIT(), rounds=2, progress=False, clients_per_pass=2)
    assert history["clients_per_pass"].tolist() == [2, 2]
    whole = federation.run(FedIT(), rounds=1, progress=False)
    assert whole["clients_per_pass"].tolist() == [TINY.clients_per_round]
    sequential = federation.run(FedIT(), rounds=1, progress=False, engine="sequential")
    assert sequential["clients_per_pass"].tolist() == [1]
    with pytest.raises(ValueError, match="clients_per_pass"):
        federation.run(FedIT(), rounds=1, progress=False, clients_per_pass=0)
    with pytest.raises(ValueError, match="clients_per_pass"):
        federation.run(FedIT(), rounds=1, progress=False, engine="sequential", clients_per_pass=2)


def _server(federation):
    from fedlora_edu.core.strategy import ServerState

    model = federation.fresh_model()
    return ServerState(adapter_io.get_lora_factors(model), adapter_io.get_head_state(model),
                       adapter_io.lora_scaling(model), adapter_io.model_rank(model))


# ----- the model is left as it was; engine choice; bad input ------------------------------------
def test_engine_leaves_the_model_unchanged(federation):
    model = federation.fresh_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    start = FedIT().client_start(_server(federation), 0, {}, 0)
    jobs = [ClientJob(k, federation.clients[k], copy.deepcopy(start), seed=k) for k in range(2)]
    train_clients_batched(model, jobs, steps=2, batch_size=4, learning_rate=1e-2)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert not any("forward" in vars(module) for module in model.modules())  # routing undone
    data = federation.clients[0]
    bad_labels = type(data)(data.input_ids, data.attention_mask, torch.full_like(data.labels, 99))
    with pytest.raises((IndexError, RuntimeError)):  # fails inside the routed forward pass
        train_clients_batched(model, [ClientJob(0, bad_labels, copy.deepcopy(start), seed=0)], steps=1,
                              batch_size=4, learning_rate=1e-2)
    assert not any("forward" in vars(module) for module in model.modules())


def test_dropout_runs_are_reproducible_and_use_the_engine():
    federation = build_federation("bbc_news", scheme="iid", profile=TINY, seed=0)  # dropout on
    first = federation.run(FedIT(), rounds=1, progress=False)
    second = federation.run(FedIT(), rounds=1, progress=False)
    assert federation.last_engine == "batched" and (first["engine"] == "batched").all()
    assert first["accuracy"].tolist() == second["accuracy"].tolist()
    assert first["train_loss"].tolist() == second["train_loss"].tolist()


def test_auto_falls_back_to_the_sequential_loop(federation):
    class OwnTraining(FedIT):
        batched_training = False

    history = federation.run(OwnTraining(), rounds=1, progress=False)
    assert (history["engine"] == "sequential").all() and federation.last_engine == "sequential"
    with pytest.raises(ValueError, match="batched_training"):
        federation.run(OwnTraining(), rounds=1, progress=False, engine="batched")
    with pytest.raises(ValueError, match="engine"):
        federation.run(FedIT(), rounds=1, progress=False, engine="fast")


def test_unsupported_models_are_named():
    from peft import LoraConfig, get_peft_model

    federation = build_federation("bbc_news", scheme="iid", profile=TINY, seed=0)
    assert unsupported_reason(federation.fresh_model()) is None
    dora = get_peft_model(copy.deepcopy(federation.base_model),
                          LoraConfig(r=2, target_modules=["query"], use_dora=True))
    for parameter in dora.base_model.model.classifier.parameters():
        parameter.requires_grad_(True)
    assert "variant" in unsupported_reason(dora)
    assert "LoRA" in unsupported_reason(copy.deepcopy(federation.base_model))


def test_bad_engine_arguments_are_named(federation):
    model = federation.fresh_model()
    start = FedIT().client_start(_server(federation), 0, {}, 0)
    job = ClientJob(0, federation.clients[0], start, seed=0)
    options = {"steps": 1, "batch_size": 4, "learning_rate": 1e-2}
    with pytest.raises(ValueError, match="jobs"):
        train_clients_batched(model, [], **options)
    with pytest.raises(ValueError, match="steps"):
        train_clients_batched(model, [job], **{**options, "steps": 0})
    with pytest.raises(ValueError, match="batch_size"):
        train_clients_batched(model, [job], **{**options, "batch_size": 0})
    with pytest.raises(ValueError, match="learning_rate"):
        train_clients_batched(model, [job], **{**options, "learning_rate": 0.0})
    bad = ClientJob(0, federation.clients[0], copy.deepcopy(start), seed=0)
    bad.start.trainable = frozenset({"C"})
    with pytest.raises(ValueError, match="trainable"):
        train_clients_batched(model, [bad], **options)
    headless = ClientJob(0, federation.clients[0], copy.deepcopy(start), seed=0)
    headless.start.head = {}
    with pytest.raises(ValueError, match="head"):
        train_clients_batched(model, [headless], **options)


# ----- the embedded decoder (SmolLM2-135M, Llama architecture) --------------------------------------
def test_decoder_clients_match_the_sequential_loop():
    """The engine on a causal decoder: rotary attention, causal masks and last-token pooling of
    LlamaForSequenceClassification (right padding) see each client's rows as the sequential loop does."""
    decoder = build_federation("bbc_news", scheme="iid", profile=TINY, model="embedded-decoder", seed=0)
    disable_dropout(decoder.base_model)
    assert unsupported_reason(decoder.fresh_model()) is None
    replayed = replay(decoder, helpers.recording(FedIT)(), rounds=1)
    assert_same_client_results(replayed)
    assert {name.rsplit(".", 1)[-1] for name in next(iter(replayed.values()))[2].adapters} == {"q_proj", "v_proj"}


def test_a_thousand_clients_hold_optimiser_state_only_for_the_sampled_ten(federation, monkeypatch):
    """Issue 3's memory rule: with 1,000 clients and 10 sampled a round, the one optimiser of a round
    holds stacks of exactly 10 clients, and no optimiser outlives its round."""
    import gc
    import weakref

    import fedlora_edu.simulation.engine as engine

    pool = federation.clients[0]
    clients = [pool.subset([i % len(pool)]) for i in range(1000)]
    many = Federation(federation.base_model, clients, federation.test, profile=TINY)
    made = []
    real_adamw = engine.adamw

    def recording_adamw(parameters, learning_rate):
        optimizer = real_adamw(parameters, learning_rate)
        made.append((weakref.ref(optimizer), [tuple(p.shape) for p in parameters]))
        return optimizer

    monkeypatch.setattr(engine, "adamw", recording_adamw)
    history = many.run(FedIT(), rounds=2, clients_per_round=10, local_steps=1, progress=False, engine="batched")
    assert (history["clients"] == 10).all()
    assert len(made) == 2  # one optimiser per round, none per client
    for _, shapes in made:
        assert shapes and all(shape[0] == 10 for shape in shapes)
    gc.collect()
    assert all(reference() is None for reference, _ in made)
