"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture
def outside_xdist(monkeypatch):
    """Inner pytest runs must not think they are xdist workers when this suite itself runs under -n."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
