"""Shared test settings: no network, a deterministic hypothesis profile, GPU tests skipped
without a CUDA device."""

import os
import socket

import pytest
import torch
from hypothesis import settings

settings.register_profile("ldm", deadline=None, max_examples=150, derandomize=True)
settings.load_profile("ldm")

# Under pytest-xdist, share the cores between workers: oversubscribed OpenMP threads spin
# and can make small tensor ops orders of magnitude slower.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # the tests' subprocesses too


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
