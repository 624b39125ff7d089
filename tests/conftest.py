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


# The modules with the longest tests or groups (a minute or more on a slow core), longest
# first. pytest-xdist hands tests out in collection order, so one of these collected last
# (tests/training/ comes last) keeps one worker busy while the other idles; first, they
# overlap with the many short tests.
LONGEST_FIRST = (
    "tests/training/test_recipes.py",  # the recipes group: a base model, DreamBooth x 2
    "tests/test_tutorial.py",
    "tests/serving/",  # the server group: three servers
    "tests/metrics/test_evaluate.py",
    "tests/training/test_train.py",
    "tests/test_installed.py",
    "tests/metrics/test_attributes.py",
)


def _longest_first(item) -> int:
    return next(
        (i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)),
        len(LONGEST_FIRST),
    )


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own tagging
def pytest_collection_modifyitems(config, items):
    _tag_xdist_groups(config, items)
    items.sort(key=_longest_first)  # stable: the order within each module is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _tag_xdist_groups(config, items) -> None:
    """``--dist loadgroup`` sends a group's tests to one worker by reading "@<group>" at the
    end of their node ids, which pytest-xdist (3.8) writes into ``item._nodeid``; pytest 9
    derives node ids from ``item._id`` instead, so the groups were silently ignored (each
    worker started its own servers and trained its own judge). Write the tag where pytest
    reads it."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = {
            str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            for mark in item.iter_markers("xdist_group")
        }
        tag = "@" + "_".join(sorted(names))
        if names and not item.nodeid.endswith(tag):
            from _pytest.nodeid import coerce_node_id  # pytest >= 9 only

            item._id = coerce_node_id(item.nodeid + tag)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
