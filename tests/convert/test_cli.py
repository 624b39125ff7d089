"""python -m ldm.convert: inspect, to-diffusers and back, errors."""

import json

import pytest
import torch
from safetensors import safe_open
from testutils import tool_config

from ldm.app.convert import main
from ldm.io import read_weights, save_safetensors
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL

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
