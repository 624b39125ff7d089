"""Training tests run offline: wandb never reaches the network."""

import pytest


@pytest.fixture(autouse=True)
def _quiet_and_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
