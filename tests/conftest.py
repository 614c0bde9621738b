"""Fixtures shared by the test files (a module may define its own fixture of the same name instead)."""

from __future__ import annotations

import os

import pytest
from helpers import tiny_federation
from hypothesis import settings

# Under CI (the CI variable set) the property tests run a fixed sequence of examples, so that a
# submission lands or fails on its code and not on the draw; everywhere else every run draws new
# examples, which is how round-off cases get found (the nested-update rank check failed at one).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "waits: the test starts processes and waits on them (Flower deployments, timeouts); "
                   "`python3 tasks.py test` runs these in a pytest run of their own beside the others")


@pytest.fixture(scope="module")
def federation():
    """The tiny profile's federation with IID clients (:func:`helpers.tiny_federation`)."""
    return tiny_federation("iid")


@pytest.fixture(scope="module")
def shards_federation():
    """The tiny profile's federation with two BBC topics per client."""
    return tiny_federation("shards")
