"""The chapter-times benchmark judges budgets on the reference machine, scaled by the measured matrix-product speed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("chapter_times", ROOT / "benchmarks" / "chapter_times.py")
chapter_times = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chapter_times)


def result(profile: str, seconds: list[float], gflops: float | None) -> dict:
    provenance = {"profile": profile}
    if gflops is not None:
        provenance["matmul_gflops"] = {"1": gflops / 2, "2": gflops}
    return {"provenance": provenance, "chapters": [{"chapter": f"c{i}", "seconds": s} for i, s in enumerate(seconds)],
            "total_seconds": sum(seconds)}


def test_a_faster_machine_scales_its_times_up_to_the_reference():
    twice = 2 * chapter_times.REFERENCE_GFLOPS
    assert chapter_times.reference_scale(result("cpu", [100.0], twice)) == 2.0
    assert "about 200 s" in chapter_times.verdict(result("cpu", [100.0, 60.0], twice))
    assert chapter_times.verdict(result("cpu", [100.0, 60.0], twice)).endswith("MISSED each")
    assert chapter_times.verdict(result("cpu", [80.0], twice)).endswith("met each")

def test_smoke_is_judged_per_chapter_and_gives_the_total():
    twice = 2 * chapter_times.REFERENCE_GFLOPS
    budget = chapter_times.SMOKE_CHAPTER_BUDGET
    over = chapter_times.verdict(result("smoke", [budget * 0.6, 10.0], twice))  # the first one past it there
    assert "MISSED each" in over and f"(all 2 together {budget * 0.6 + 10:.0f} s here)" in over
    many = [budget * 0.45] * 30  # 30 chapters, each inside it there, far more than 10 minutes together
    assert "met each" in chapter_times.verdict(result("smoke", many, twice))


def test_a_run_without_a_speed_is_judged_where_it_ran_and_says_so():
    text = chapter_times.verdict(result("cpu", [170.0], None))
    assert "met here (speed not measured)" in text and chapter_times.reference_scale(result("cpu", [1.0], None)) is None


def test_matmul_speed_is_positive_and_restores_the_thread_count():
    import torch

    before = torch.get_num_threads()
    assert chapter_times.matmul_gflops(1, size=64, repeats=2) > 0
    assert torch.get_num_threads() == before
