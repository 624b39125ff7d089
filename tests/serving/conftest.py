"""A tiny trained checkpoint, LoRA files and a token for the service's tests."""

import json
import sys
from pathlib import Path

import pytest
import torch

from ldm.convert.lora import read_adapter, save_adapter
from ldm.io import save_safetensors
from ldm.nn.lora import adapter_parameters, inject_lora
from ldm.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from servingutils import TOKEN
from trainutils import compose_train


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A tiny checkpoint, an adapters folder (a trained-looking LoRA and a corrupt file),
    and a token file."""
    from ldm.app.train import train

    root = tmp_path_factory.mktemp("serve")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(compose_train(root / "run", "task=ldm", "trainer.max_steps=2"), root / "run")
    finally:
        torch.set_num_threads(threads)
    checkpoint = root / "run" / "checkpoints" / "last.ckpt"
    networks = Pipeline.from_checkpoint(checkpoint).networks()
    inject_lora(networks, "style", targets="attn", rank=4, dropout=0.5)  # off when serving
    generator = torch.Generator().manual_seed(0)
    for p in adapter_parameters(networks):  # up starts at zero: make it act
        p.data.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    adapters = root / "adapters"
    adapters.mkdir()
    save_adapter(networks, adapters / "style.safetensors", "style")
    (adapters / "style2.safetensors").write_bytes((adapters / "style.safetensors").read_bytes())
    tensors, info = read_adapter(adapters / "style.safetensors")
    last = sorted(k for k in tensors if k.endswith("lora_down.weight"))[-1]
    tensors[last] = torch.zeros(tensors[last].shape[0], tensors[last].shape[1] + 1)
    metadata = {"ldm_lora": json.dumps(info)}  # an adapter of another model: one layer off
    save_safetensors(adapters / "other_model.safetensors", tensors, metadata)
    (adapters / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (adapters / "notes.txt").write_text("not an adapter")  # never listed, never loaded
    (root / "outside.safetensors").write_bytes((adapters / "style.safetensors").read_bytes())
    (root / "token").write_text(TOKEN + "\n")
    return {"checkpoint": checkpoint, "adapters": adapters, "root": root}
