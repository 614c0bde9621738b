"""Study: what following the authors' code instead of the package's choice changes, where the two differ.

The package states, in each method's docstring, where it departs from the reference code and
why. Two of those departures can be run on the testbed as they are in the reference code:

- **FlexLoRA, singular values in B.** The reference (alibaba/FederatedScope, branch FlexLoRA,
  commit 4643e1a5) sends client k A_k = V^T and B_k = U S, all singular values in B; the package
  splits them evenly (A_k = S^(1/2) V^T, B_k = U S^(1/2)). With equal ranks and one LoRA
  constant the product B_k A_k is the same; what differs is the start of the next round's
  training. :class:`FlexLoRASingularValuesInB` moves them after the package's aggregation.
- **CoLR, an orthonormal frozen factor with constant 1.** The reference (NNHieu/CoLR-FedRec,
  commit d5ec0766) redraws the frozen factor as an orthonormal matrix times sqrt(m / r) and
  applies the update with constant 1; the package draws it uniform on [-1/sqrt(n), 1/sqrt(n)]
  and applies s = alpha / r. :class:`CoLROrthonormal` orthonormalises the package's draw (QR;
  a deterministic function of the broadcast seed, so clients can still regenerate it) and
  scales it by sqrt(m / r) / s, so that the applied update s B A equals the reference's
  sqrt(m / r) Q A. The reference also multiplies A's gradient by sqrt(r / m); under AdamW, which
  divides each step by its gradient's running scale, a constant factor on a gradient changes
  nothing but AdamW's epsilon term, so the study leaves it out.

Each variant runs on the testbed with the seeds of ``studies/part2.py``; the chapters pair it, seed
by seed, with the package's run of the same method in that study. One JSON line per run in
``fedlora_edu/results/deviations.jsonl``; interrupt and rerun to continue.

    python studies/deviations.py                 # the cpu profile, seeds 0 to 3
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from fedlora_edu import build_testbed  # noqa: E402
from fedlora_edu.distributed.full_size import FlexLoRA  # noqa: E402
from fedlora_edu.distributed.single_matrix import CoLR  # noqa: E402
from fedlora_edu.studies import run_study  # noqa: E402


def singular_values_in_b(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S^(1/2) V^T, U S^(1/2)) -> (V^T, U S): the same product, A's rows of unit length."""
    norms = a.norm(dim=1)  # the rows of S^(1/2) V^T have length sqrt(sigma_i)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return a / safe[:, None], b * safe[None, :]


class FlexLoRASingularValuesInB(FlexLoRA):
    """FlexLoRA as the reference code splits the SVD: A_k = V^T, B_k = U S (equal ranks, one constant)."""

    def aggregate(self, server, uploads, round_index):
        super().aggregate(server, uploads, round_index)
        server.adapters = {name: singular_values_in_b(a, b) for name, (a, b) in server.adapters.items()}


def orthonormal_frozen(b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The frozen m x r factor made orthonormal (QR of the package's draw) times sqrt(m / r) / scaling."""
    q, r_factor = torch.linalg.qr(b)
    q = q * torch.sign(torch.diagonal(r_factor))[None, :]  # a unique Q: positive diagonal in R
    return q * (math.sqrt(b.shape[0] / b.shape[1]) / scaling)


class CoLROrthonormal(CoLR):
    """CoLR with the reference code's frozen factor: orthonormal times sqrt(m / r), applied with constant 1."""

    def _reference_factor(self, server) -> None:
        server.adapters = {name: (a, orthonormal_frozen(b, server.scaling)) for name, (a, b) in server.adapters.items()}

    def init_server(self, server, seed):
        super().init_server(server, seed)
        self._reference_factor(server)

    def aggregate(self, server, uploads, round_index):
        super().aggregate(server, uploads, round_index)
        self._reference_factor(server)


VARIANTS = {"FlexLoRA, singular values in B": (FlexLoRA.name, FlexLoRASingularValuesInB),
            "CoLR, orthonormal factor, constant 1": (CoLR.name, CoLROrthonormal)}
"""Each variant: the registry name of the method it departs from, and the class that runs it."""


@functools.lru_cache(maxsize=1)
def testbed(profile: str, seed: int):
    """The seed's federation, built once for the consecutive runs of that seed (a run never changes it)."""
    return build_testbed(profile=profile, seed=seed)


def run_one(settings: dict) -> dict:
    method, variant = VARIANTS[settings["variant"]]
    federation = testbed(settings["profile"], settings["seed"])
    history = federation.run(variant(), seed=settings["seed"], progress=False)
    measured = {column: history[column].tolist() for column in ("accuracy", "bytes_up", "bytes_down")}
    measured["final_accuracy"] = float(history["accuracy"].iloc[-1])
    return measured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    runs = [{"variant": variant, "method": VARIANTS[variant][0], "seed": seed, "profile": args.profile}
            for seed in args.seeds for variant in args.variants]
    frame = run_study("deviations", runs, run_one, profile=args.profile, depends_on=["testbed"])
    print(frame.groupby("variant")["final_accuracy"].agg(["mean", "std", "count"]).round(3))


if __name__ == "__main__":
    main()
