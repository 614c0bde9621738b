"""show_source: the package's own code, highlighted, cut where a chapter asks; clear errors otherwise."""

from __future__ import annotations

import inspect

import pytest
from IPython.display import Code

from fedlora_edu import Federation, show_source
from fedlora_edu.core.factors import discordance, ideal_update
from fedlora_edu.distributed.discordance import FedIT
from fedlora_edu.teaching.source import source_text


def test_a_function_is_its_source_highlighted_as_python():
    shown = show_source(ideal_update)
    assert isinstance(shown, Code)
    assert shown.data == inspect.getsource(ideal_update)
    assert "highlight" in shown._repr_html_()  # pygments markup, not a plain text block


def test_a_method_is_dedented_and_several_objects_follow_one_another():
    text = source_text(FedIT.aggregate, discordance)
    assert text.startswith("def aggregate(self")
    assert text.index("def aggregate(") < text.index("def discordance(")


def test_first_and_last_cut_the_lines_between_two_markers():
    text = source_text(Federation.run, first="for t in bar:", last="add_to_base_weights")
    lines = text.splitlines()
    assert lines[0] == "for t in bar:" and "add_to_base_weights" in lines[-1]
    assert "def run(" not in text


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="no line of the source of discordance"):
        source_text(discordance, first="not in the function")
    with pytest.raises(ValueError, match="exactly one"):
        source_text(discordance, ideal_update, first="def")
    with pytest.raises(ValueError, match="at least one"):
        source_text()
    with pytest.raises(TypeError, match="got int"):
        source_text(3)
