"""What the test files share: a tiny profile, its federations on the embedded MiniLM, a recorder of
what a strategy sees in a run, and random factors in the survey's shapes (A r x n, B m x r)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from fedlora_edu.simulation.federation import Federation, build_federation
from fedlora_edu.simulation.profiles import get_profile

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative: str) -> ModuleType:
    """A Python file of the repository that is not in the package (tasks.py, a study, a solution), as a module.

    Registered in ``sys.modules`` under its file name before it runs: a dataclass defined in it looks
    its module up there (``.ci/browser_check.py`` has some).
    """
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TINY = get_profile("smoke").with_overrides(
    num_clients=3, clients_per_round=3, rounds=1, local_steps=2, batch_size=4, max_length=16,
    train_examples=60, test_examples=20, rank=4,
)
"""Three clients, all sampled, two local steps of 4 x 16 tokens, rank 4: a round takes about a second."""


def tiny_federation(scheme: str = "iid", profile=TINY, **options) -> Federation:
    """BBC News on the embedded MiniLM, split by ``scheme`` (``"shards"``: two topics per client)."""
    if scheme == "shards":
        options.setdefault("classes_per_client", 2)
    return build_federation("bbc_news", scheme=scheme, profile=profile, seed=0, **options)


def recording(cls):
    """A subclass of the strategy class ``cls`` that keeps what it sees in a run.

    - ``starts[t][k]``: a copy of client k's :class:`~fedlora_edu.core.strategy.ClientStart` in round t
      (0-based), taken before training;
    - ``sent``: one ``(t, result, payload, client_state copy)`` per upload, in order;
    - ``rounds[t]``: ``(server adapters before aggregation, uploads)``; ``uploads`` is the last round's.
    """

    class Recording(cls):
        def client_start(self, server, client_id, client_state, round_index):
            start = super().client_start(server, client_id, client_state, round_index)
            self.__dict__.setdefault("starts", {}).setdefault(round_index, {})[client_id] = copy.deepcopy(start)
            return start

        def client_upload(self, result, client_state, round_index):
            payload = super().client_upload(result, client_state, round_index)
            self.__dict__.setdefault("sent", []).append((round_index, result, payload, copy.copy(client_state)))
            return payload

        def aggregate(self, server, uploads, round_index):
            before = {n: (a.clone(), b.clone()) for n, (a, b) in server.adapters.items()}
            self.__dict__.setdefault("rounds", []).append((before, uploads))
            super().aggregate(server, uploads, round_index)

        @property
        def uploads(self):
            return self.rounds[-1][1]

    Recording.name = cls.name
    Recording.__name__ = f"Recording{cls.__name__}"
    return Recording


def random_factors(g: torch.Generator, m: int, n: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x n) and B (m x r), standard normal, float64."""
    return torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(m, r, generator=g, dtype=torch.float64)


def random_weights(g: torch.Generator, count: int) -> list[float]:
    """``count`` positive client weights p_k summing to one."""
    raw = torch.rand(count, generator=g, dtype=torch.float64) + 0.1
    return (raw / raw.sum()).tolist()


def rank_of_change(new: torch.Tensor, old: torch.Tensor) -> int:
    """Numerical rank of ``new - old``: singular values above 1e-9 max|old|.

    The subtraction leaves round-off of the size of old's entries, above ``matrix_rank``'s default
    tolerance (which is relative to the small difference itself).
    """
    return int(torch.linalg.matrix_rank(new - old, atol=1e-9 * float(old.abs().max())))
