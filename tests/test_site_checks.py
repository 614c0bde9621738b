"""The site checks of tasks.py: a built site must carry its own MathJax (formulas typeset offline)."""

from __future__ import annotations

from helpers import load_script

tasks = load_script("tasks.py")


def test_offline_math_accepts_a_site_with_its_own_mathjax_and_flags_a_cdn(tmp_path):
    (tmp_path / "_static" / "mathjax").mkdir(parents=True)
    (tmp_path / tasks.MATHJAX).write_text("/* MathJax */")
    (tmp_path / "index.html").write_text('<script defer="defer" src="_static/mathjax/tex-chtml.js"></script>')
    assert tasks.offline_math_problems(tmp_path) == []
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "page.html").write_text(
        '<script async="async" src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>')
    assert tasks.offline_math_problems(tmp_path) == ["part/page.html loads MathJax from the network"]
    (tmp_path / tasks.MATHJAX).unlink()
    assert tasks.offline_math_problems(tmp_path)[0].endswith("is missing from the site")
