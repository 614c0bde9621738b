"""Fixtures shared by the test files (a module may define its own fixture of the same name instead)."""

from __future__ import annotations

import pytest
from helpers import tiny_federation


@pytest.fixture(scope="module")
def federation():
    """The tiny profile's federation with IID clients (:func:`helpers.tiny_federation`)."""
    return tiny_federation("iid")


@pytest.fixture(scope="module")
def shards_federation():
    """The tiny profile's federation with two BBC topics per client."""
    return tiny_federation("shards")
