"""Split learning on Flower: every local step's messages through the real ClientApp equal ``run_split``.

The ServerApp's :func:`~fedlora_edu.flower.split.serve_split` against an in-process Grid (each
message and reply serialised to Flower's wire format, each client's Context serialised between
messages, as a SuperNode keeps it: :mod:`fedlora_edu.flower.inprocess`): two rounds of each split method, two
local steps (so that SplitLoRA's client keeps its AdamW state between messages and rounds, and
recomputes its forward pass for the gradient), seed 1. Round by round, the server's adapter and
head must equal :func:`~fedlora_edu.efficiency.split.run_split`'s to float tolerance, and the
accuracy, losses and every byte count must be run_split's. The real processes (Ray's actors) are
tests/test_flower_simulation.py's.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install fedlora-edu[flower]")

from flower_equality import assert_equals_run_split  # noqa: E402
from helpers import TINY, tiny_federation  # noqa: E402

from fedlora_edu.efficiency.split import SPLIT_COLUMNS, split_classifier  # noqa: E402
from fedlora_edu.flower import split as flower_split  # noqa: E402
from fedlora_edu.flower.apps import RunSettings, check_supported, save_federation, serve  # noqa: E402
from fedlora_edu.flower.inprocess import InProcessGrid, flower_identity, run_in_process  # noqa: E402
from fedlora_edu.flower.records import tensors_to_record  # noqa: E402
from fedlora_edu.registry import make_strategy  # noqa: E402

ROUNDS = 2
SEED = 1
PROFILE = TINY.with_overrides(num_clients=2, clients_per_round=2, local_steps=2, max_length=8, train_examples=32,
                              test_examples=8)
RNG_BYTES = tensors_to_record({"state": torch.get_rng_state()}).count_bytes()
"""The dropout generator's state as a message carries it (torch's CPU generator)."""


@pytest.fixture(autouse=True)
def identity():
    with flower_identity():
        yield


@pytest.fixture(scope="module", params=["cached", "uncached"])
def federation_file(request, tmp_path_factory):
    """The testbed's way (LoRA on the top two blocks, the frozen bottom cached, the probe as a frozen head) and
    every block adapted with a head that trains."""
    cached = request.param == "cached"
    federation = tiny_federation(profile=PROFILE, adapted_layers=2 if cached else None,
                                 head="probe" if cached else "trained")
    path = tmp_path_factory.mktemp("flower_split") / "federation.pt"
    save_federation(federation, path)
    return federation, path


def settings_for(federation, path, tmp_path, method, options=None, **overrides):
    return RunSettings.for_federation(federation, method, federation_file=path, output=tmp_path / "history.json",
                                      aggregates=tmp_path / "aggregates.pt", rounds=ROUNDS, seed=SEED,
                                      round_timeout=60, connect_timeout=5, method_options=options, **overrides)


@pytest.mark.parametrize(("method", "options"), [("SplitFedLoRA", None), ("SplitLoRA", None),
                                                 ("SplitLoRA", {"average_every": 2})],
                         ids=["SplitFedLoRA", "SplitLoRA", "SplitLoRA-twice-a-round"])
def test_split_learning_through_flower_messages_equals_run_split(federation_file, tmp_path, method, options):
    federation, path = federation_file
    cached = split_classifier(federation.fresh_model()).frozen_layers > 0
    assert cached == (federation.clients[0].hidden is not None)
    settings = settings_for(federation, path, tmp_path, method, options)
    history, grid = run_in_process(settings)
    held = torch.load(settings.aggregates, weights_only=True)
    assert list(history.columns[:len(SPLIT_COLUMNS)]) == SPLIT_COLUMNS
    # One query per SuperNode, then every step two messages per client, and SplitLoRA's uploads at each average.
    averages = 2 if options else 1
    steps = ROUNDS * PROFILE.clients_per_round * PROFILE.local_steps
    uploads = ROUNDS * averages * PROFILE.clients_per_round if method == "SplitLoRA" else 0
    assert grid.delivered == federation.num_clients + 2 * steps + uploads
    assert history["messages"].sum() == 2 * steps + uploads
    assert flower_split.split_messages(settings.strategy(), settings, federation.num_clients) == 2 * steps + uploads
    assert_equals_run_split(history, held, federation, method, ROUNDS, SEED, options)
    for _, row in history.iterrows():
        # The generator's state goes down with every message but SplitLoRA's upload requests, and comes back with
        # every reply to a forward or head message (SplitLoRA's gradient and upload replies draw nothing).
        stepping = row["messages"] - uploads // ROUNDS
        assert row["flower_state_bytes_down"] == RNG_BYTES * stepping
        assert row["flower_state_bytes_up"] == RNG_BYTES * (stepping // 2 if method == "SplitLoRA" else stepping)
        assert row["flower_bytes_down"] >= row["cut_bytes_down"] + row["flower_state_bytes_down"]
        assert row["flower_bytes_up"] >= row["cut_bytes_up"]


def test_a_split_client_that_fails_stops_the_run_naming_the_client_step_and_message(federation_file, tmp_path,
                                                                                     monkeypatch):
    federation, path = federation_file
    if federation.clients[0].hidden is None:
        pytest.skip("once is enough: the cached federation")
    settings = settings_for(federation, path, tmp_path, "SplitLoRA")
    backward = flower_split.CLIENT_HANDLERS["split_backward"]

    def failing(federation, strategy, content, client_id, settings, records):
        if client_id == 1 and int(content["split"]["step"]) == 1:
            raise RuntimeError("the client's process died")
        return backward(federation, strategy, content, client_id, settings, records)

    monkeypatch.setitem(flower_split.CLIENT_HANDLERS, "split_backward", failing)
    grid = InProcessGrid(settings, federation.num_clients)
    with pytest.raises(RuntimeError, match=r"client 1's split_backward message of round 1, step 2: "
                                           r"RuntimeError: the client's process died"):
        flower_split.serve_split(grid, federation, settings.strategy(), settings)
    assert not (tmp_path / "aggregates.pt").exists()  # nothing half-written


def test_the_round_adapter_and_client_evaluation_refuse_split_learning_by_name(federation_file, tmp_path):
    federation, path = federation_file
    if federation.clients[0].hidden is None:
        pytest.skip("once is enough: the cached federation")
    for method in ("SplitFedLoRA", "SplitLoRA"):
        strategy = make_strategy(method)
        check_supported(strategy)  # runs on Flower
        with pytest.raises(ValueError, match=f"strategy {method} is split learning.*evaluate_clients=False"):
            check_supported(strategy, evaluate_clients=True)
        settings = settings_for(federation, path, tmp_path, method)
        with pytest.raises(ValueError, match=f"strategy {method} is split learning: serve plays"):
            serve(InProcessGrid(settings, federation.num_clients), federation, strategy, settings)
    with pytest.raises(TypeError, match="serve_split runs a split-learning method"):
        flower_split.serve_split(None, federation, make_strategy("FedIT"), settings)
