"""Sentences with measured numbers in them, written by the code that measured them.

A chapter states what its run measured in a sentence that a code cell produces::

    report(f"FedIT ended at **{accuracy:.3f}**, {gap:+.3f} against centralized LoRA.")

so the number on the page is the number of this run, under whatever profile built the book,
in Jupyter, Colab and on the website alike. A markdown cell never holds a hand-typed
measurement: ``tests/test_notebooks_clean.py`` flags the phrases that would introduce one.
"""

from __future__ import annotations


def report(text: str) -> object:
    """``text`` (Markdown, with the run's numbers formatted in) as a displayable Markdown block."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("report needs a non-empty Markdown string")
    from IPython.display import Markdown  # IPython comes with Jupyter and Colab; the package itself does not need it

    return Markdown(text)
