"""Shared test settings: no network, a deterministic hypothesis profile, GPU tests skipped
without a CUDA device."""

import pytest
import torch
from hypothesis import settings

settings.register_profile("ldm", deadline=None, max_examples=150, derandomize=True)
settings.load_profile("ldm")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
