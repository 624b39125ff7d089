"""The pieces of training on their own: EMA, learning-rate schedules, LPIPS without
downloads, VAE loading from every source, resume resolution, wandb's mode."""

import json
import math

import pytest
import torch
from torch import nn

from ldm.convert.stable_diffusion import save_diffusers_folder
from ldm.io import WeightsFileError, save_safetensors
from ldm.models.unet import UNet
from ldm.models.vae import SD_VAE_SCALE, AutoencoderKL
from ldm.training.checkpoints import load_vae, resolve_resume
from ldm.training.ema import EMA
from ldm.training.loggers import wandb_logged_in
from ldm.training.perceptual import LPIPS, VGG16_FILE
from ldm.training.schedules import warmup_schedule

# 32 GroupNorm groups, SD's, which an SD file's weights cannot say.
TINY_VAE = dict(base_channels=32, channel_multipliers=[1, 2], blocks_per_level=1)


def test_ema_follows_the_warmup_formula():
    net = nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    start = {k: v.clone() for k, v in ema.average.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # n = 0: decay min(0.9, 1 / 10) = 0.1
    torch.testing.assert_close(ema.average.weight, 0.1 * start["weight"] + 0.9 * net.weight)
    for _ in range(200):
        ema.update(net)
    assert ema.current_decay() == 0.9 and int(ema.updates) == 201
    torch.testing.assert_close(ema.average.weight, net.weight, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in ema.parameters())
    ema.train()
    assert not ema.average.training
    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.0)


def test_warmup_then_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_schedule(opt, warmup_steps=4, schedule="cosine", total_steps=14, min_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lrs[14] == lrs[15] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="needs total_steps"):
        warmup_schedule(opt, schedule="cosine")


def test_lpips_reads_local_weights_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(
        FileNotFoundError, match=rf"torch/hub/checkpoints/{VGG16_FILE}.*vgg_weights="
    ):
        LPIPS()
    import torchvision

    features = torchvision.models.vgg16(weights=None).features.state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    lpips = LPIPS(vgg_weights=path)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(lpips(x, x), torch.zeros(2))
    distance = lpips(x, y)
    assert distance.shape == (2,) and (distance > 0).all()
    assert not lpips.train().training and not any(p.requires_grad for p in lpips.parameters())


def test_load_vae_from_every_source(tmp_path):
    vae = AutoencoderKL(**TINY_VAE)
    # An original SD single file: first_stage_model.*, SD's scale.
    unet = UNet(
        model_channels=32, channel_multipliers=[1], attention_levels=[], context_dim=8, num_heads=4
    )
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd |= {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    save_safetensors(tmp_path / "sd.safetensors", sd)
    # Our safetensors export with its config, a diffusers folder, a bare VAE state dict.
    save_safetensors(
        tmp_path / "ours.safetensors",
        vae.state_dict(),
        {"vae_config": json.dumps(vae.config | {"scale_factor": 0.5})},
    )
    vae.scale_factor = 0.3
    save_diffusers_folder(tmp_path / "pipe", denoiser=unet, vae=vae)
    torch.save(vae.state_dict(), tmp_path / "bare.pt")
    expected = {
        "sd.safetensors": SD_VAE_SCALE,
        "ours.safetensors": 0.5,
        "pipe": 0.3,
        "pipe/vae": 0.3,
    }
    for name, scale in expected.items():
        loaded = load_vae(tmp_path / name)
        assert loaded.scale_factor == scale, name
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vae.state_dict().items())
    assert load_vae(tmp_path / "pipe", scale_factor=1.5).scale_factor == 1.5
    with pytest.raises(ValueError, match="holds no VAE"):
        save_safetensors(tmp_path / "unet.safetensors", unet.state_dict())
        load_vae(tmp_path / "unet.safetensors")


def test_resume_resolution(tmp_path):
    assert resolve_resume("auto", tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 3}, tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")  # an interrupted copy
    with pytest.raises(WeightsFileError, match=r"last.ckpt is empty"):
        resolve_resume("auto", tmp_path)
    assert resolve_resume("never", tmp_path) is None
    with pytest.raises(FileNotFoundError, match=r"resume=nope.ckpt"):
        resolve_resume("nope.ckpt", tmp_path)


def test_wandb_login_is_read_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    assert not wandb_logged_in()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_logged_in()


def test_sample_grid_scores_every_tile_against_its_row_prompt():
    from ldm.diffusion.samplers import make_sampler
    from ldm.training.sampling_callbacks import SampleGrid

    prompts = ["a large red circle in the center on a white background",
               "a small blue square in the top left on a black background"]  # fmt: skip
    grid = SampleGrid(prompts, [make_sampler("ddim", steps=2)], seeds=[0, 1])

    class Judge:  # tile (row r, column c) is right unless it is row 1, column 0
        def correct(self, images, captions):
            assert captions == prompts * 2 and len(images) == 4  # column-major tiles
            shape = torch.tensor([True, False, True, True])
            return {"shape": shape, "colour": torch.ones(4, dtype=torch.bool)}

    columns = [torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)]
    scored = grid.score(Judge(), columns)
    assert scored["accuracy"] == {"shape": 0.75, "colour": 1.0, "joint": 0.75}
    assert scored["wrong"] == [[[], []], [["shape"], []]]
