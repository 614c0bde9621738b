"""FlexLoRA's SVD, factored against dense: the numbers behind ``book/fast/factored_svd.ipynb``.

For each configuration (layer m x n, K clients of rank r, R = K r) both routes start from
the same stacked factors B_stack (m x R) and A_stack (R x n) of ``flora_stack`` and return
the best rank-r factors of their product:

- dense: form B_stack @ A_stack (m x n) and take its full SVD (``truncated_factors``);
- factored: QR of both factors and the SVD of the R x R core (``truncated_factors_factored``).

The two are measured side by side in one process, alternating, in float32. Each timing is
the median of up to ``--repeats`` runs; a route whose first runs already took more than
``--budget`` seconds in total stops early (the JSON records how many runs each median
has). Results, with provenance, go to ``benchmarks/results/svd_<device>.json``.

    python benchmarks/svd.py            # the full grid and the issue's target configuration
    python benchmarks/svd.py --quick    # m = n = 1024 only, plus the target configuration
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout where the package is not installed (a GPU machine)

import torch  # noqa: E402

from fedlora_edu.core.svd import truncated_factors, truncated_factors_factored  # noqa: E402
from fedlora_edu.simulation.profiles import default_device, provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET = {"m": 4096, "n": 4096, "clients": 10, "rank": 16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stacked_factors(m: int, n: int, clients: int, rank: int, device: torch.device, seed: int = 0):
    """Random client adapters of LoRA scale, stacked as FLoRA stacks them (weights folded into A)."""
    g = torch.Generator().manual_seed(seed)
    total = clients * rank
    b_stack = torch.randn(m, total, generator=g) / rank**0.5
    a_stack = torch.randn(total, n, generator=g) / (n**0.5 * clients)
    return b_stack.to(device), a_stack.to(device)


def time_once(function, device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def measure(m: int, n: int, clients: int, rank: int, *, repeats: int, budget: float,
            device: torch.device) -> dict[str, object]:
    b_stack, a_stack = stacked_factors(m, n, clients, rank, device)
    routes = {
        "dense": lambda: truncated_factors(b_stack @ a_stack, rank),
        "factored": lambda: truncated_factors_factored(b_stack, a_stack, rank),
    }
    truncated_factors_factored(b_stack[:64, :8], a_stack[:8, :64], 2)  # warm-up: library initialisation
    times: dict[str, list[float]] = {"dense": [], "factored": []}
    outputs: dict[str, tuple] = {}
    for _ in range(repeats):  # alternate, so both routes see the same load on a shared machine
        for route, function in routes.items():
            if sum(times[route]) < budget:
                seconds, outputs[route] = time_once(function, device)
                times[route].append(seconds)
    (a_d, b_d), (a_f, b_f) = outputs["dense"], outputs["factored"]
    # Both routes must return the same rank-r product (sign conventions aside, the factors too).
    gap = float(torch.linalg.matrix_norm(b_f @ a_f - b_d @ a_d) / torch.linalg.matrix_norm(b_d @ a_d))
    dense, factored = statistics.median(times["dense"]), statistics.median(times["factored"])
    return {
        "m": m, "n": n, "clients": clients, "rank": rank, "R": clients * rank,
        "dense_seconds": dense, "factored_seconds": factored, "speedup": dense / factored,
        "dense_runs": len(times["dense"]), "factored_runs": len(times["factored"]),
        "relative_product_gap": gap,
        "note": "R >= min(m, n): the core is as large as the product" if clients * rank >= min(m, n) else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only m = n = 1024, plus the target configuration")
    parser.add_argument("--repeats", type=int, default=3, help="runs per route (median); default 3")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="stop repeating a route once its runs took this many seconds; default 30")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default results/svd_<device>.json)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    device = default_device()
    sizes = (1024,) if args.quick else (1024, 4096)
    grid = [dict(m=s, n=s, clients=k, rank=r) for s, k, r in itertools.product(sizes, (10, 100), (8, 64))]
    rows = []
    print(f"device: {device}; float32; median of up to {args.repeats} runs (budget {args.budget:g} s per route)")
    header = f"{'m = n':>6} {'K':>4} {'r':>3} {'R':>5} {'dense s':>9} {'factored s':>11} {'speed-up':>9} {'gap':>8}"
    print(header)
    for config in [*grid, TARGET]:
        row = measure(**config, repeats=args.repeats, budget=args.budget, device=device)
        row["target"] = config is TARGET
        rows.append(row)
        print(f"{row['m']:>6} {row['clients']:>4} {row['rank']:>3} {row['R']:>5} {row['dense_seconds']:>9.4f} "
              f"{row['factored_seconds']:>11.5f} {row['speedup']:>8.1f}x {row['relative_product_gap']:>8.1e}"
              f"{'  <- target (>= 100x)' if row['target'] else ''}{'  ' + row['note'] if row['note'] else ''}",
              flush=True)
    output = args.output or RESULTS / f"svd_{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "factored vs dense SVD of sum_k p_k B_k A_k (FlexLoRA)", "dtype": "float32",
              "quick": args.quick, "repeats": args.repeats, "budget_seconds": args.budget,
              "provenance": provenance(), "rows": rows}
    output.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
