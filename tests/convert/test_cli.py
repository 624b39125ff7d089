"""python -m ldm.convert: inspect, to-diffusers and back, errors."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from testutils import tool_config

from ldm.app.convert import main
from ldm.app.train import train
from ldm.io import read_pickle, read_weights, save_safetensors, weights_digest
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL
from ldm.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from trainutils import compose_train

TINY = dict(
    model_channels=64,
    channel_multipliers=[1, 2],
    blocks_per_level=1,
    attention_levels=[1],
    num_heads=None,
    head_dim=64,
    context_dim=32,
    linear_projection=True,
)


def test_round_trip_through_diffusers_layout(tmp_path, capsys):
    pytest.importorskip("diffusers")
    unet = UNet(**TINY)
    vae = AutoencoderKL(base_channels=32, channel_multipliers=[1, 2], blocks_per_level=1)
    original = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    original.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    save_safetensors(tmp_path / "model.safetensors", original)

    main(tool_config("convert", "action=inspect", f"src={tmp_path / 'model.safetensors'}"))
    printed = capsys.readouterr().out
    assert "unet (model.diffusion_model.*)" in printed and '"context_dim": 32' in printed
    assert 'vae config: {"in_channels": 3' in printed

    main(
        tool_config(
            "convert",
            "action=to-diffusers",
            f"src={tmp_path}/model.safetensors",
            f"out={tmp_path}/d",
        )
    )
    assert (tmp_path / "d" / "unet" / "config.json").is_file()
    vae_config = json.loads((tmp_path / "d" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == 0.18215 and vae_config["block_out_channels"] == [32, 64]
    main(
        tool_config(
            "convert",
            "action=from-diffusers",
            f"src={tmp_path}/d",
            f"out={tmp_path}/back.safetensors",
        )
    )
    back = read_weights(tmp_path / "back.safetensors")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], v) for k, v in original.items())
    with safe_open(str(tmp_path / "back.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["unet_config"]) == unet.config
        assert json.loads(f.metadata()["vae_config"]) == {**vae.config, "scale_factor": 0.18215}


def _fails(capsys, *overrides: str) -> str:
    with pytest.raises(SystemExit) as exit:
        main(tool_config("convert", *overrides))
    assert exit.value.code == 2
    return capsys.readouterr().err


def test_errors_are_one_line(tmp_path, capsys):
    err = _fails(capsys, f"src={tmp_path}/missing.safetensors")
    assert "error: no weights file at" in err
    save_safetensors(tmp_path / "other.safetensors", {"w": torch.zeros(1)})
    other = f"src={tmp_path}/other.safetensors"
    err = _fails(capsys, "action=to-diffusers", other, f"out={tmp_path}/o")
    assert "neither a Stable Diffusion single file nor ours" in err
    assert "writes to out=" in _fails(capsys, "action=to-diffusers", other)
    assert "not one of inspect" in _fails(capsys, "action=convert", other)
    assert "src is required" in _fails(capsys)


def test_prune_keeps_what_sampling_reads(tmp_path, capsys):
    run = tmp_path / "run"
    train(compose_train(run, "task=ldm", "trainer.max_steps=2"), run)
    state = read_pickle(run / "checkpoints" / "last.ckpt")
    for key, value in state["state_dict"].items():  # EMA apart from the trained weights
        if key.startswith("ema.average."):
            value.add_(0.5)
    torch.save(state, tmp_path / "full.ckpt")
    full = state["state_dict"]

    main(tool_config("convert", "action=prune", f"src={tmp_path}/full.ckpt", f"out={tmp_path}/p"))
    assert "(ema weights, VAE, config)" in capsys.readouterr().out
    pruned = read_weights(tmp_path / "p")
    assert not any(k.startswith("ema.") for k in pruned)
    for key, value in pruned.items():  # networks.* hold the EMA copy, vae.* the VAE
        source = "ema.average." + key[len("networks.") :] if key.startswith("networks.") else key
        assert torch.equal(value, full[source]), key
    assert {k for k in full if k.startswith(("networks.", "vae."))} == set(pruned)
    assert (tmp_path / "p").stat().st_size < (tmp_path / "full.ckpt").stat().st_size / 2

    def digest(path, ema=True):  # what evaluate.py checks before resuming runs
        pipeline = Pipeline.from_checkpoint(path, ema=ema)
        return weights_digest({**pipeline.networks(), "vae": pipeline.vae})

    assert digest(tmp_path / "p") == digest(tmp_path / "full.ckpt")
    main(
        tool_config(
            "convert", "action=prune", f"src={tmp_path}/full.ckpt", f"out={tmp_path}/r", "ema=false"
        )
    )
    assert digest(tmp_path / "r") == digest(tmp_path / "full.ckpt", ema=False)
    assert digest(tmp_path / "r") != digest(tmp_path / "p")
    with safe_open(str(tmp_path / "r"), "pt") as f:
        assert json.loads(f.metadata()["ldm_prune"])["weights"] == "trained"
        assert "ldm_config" in f.metadata() and "vae_config" in f.metadata()

    err = _fails(capsys, "action=prune", f"src={tmp_path}/r", f"out={tmp_path}/x")
    assert "holds no EMA weights: pass ema=false" in err
    save_safetensors(tmp_path / "other.safetensors", {"w": torch.zeros(1)})
    err = _fails(capsys, "action=prune", f"src={tmp_path}/other.safetensors", f"out={tmp_path}/x")
    assert "is not a train.py checkpoint" in err
