"""Fixtures shared by the test modules."""

import os

import pytest

# Model libraries build from configs here and must never try a model hub.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def outside_xdist(monkeypatch):
    """Inner pytest runs must not think they are xdist workers when this suite itself runs under -n."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
