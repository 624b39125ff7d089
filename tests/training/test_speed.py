"""Speed options: channels-last and compile settings, the VAE-stage lr schedule, the
UNet's optional token positions, and what measures speed (FLOPs, MFU)."""

import pytest
import torch
from trainutils import compose_train

from ldm.app.train import train
from ldm.models.unet import UNet
from ldm.nn.embeddings import grid_embedding
from ldm.training.ema import EMA
from ldm.training.speed import compile_options, count_flops, mfu, peak_tflops


def test_compile_settings_are_parsed_and_bad_ones_refused():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options("max-autotune") == {"mode": "max-autotune"}
    assert compile_options({"dynamic": False}) == {"dynamic": False}
    with pytest.raises(ValueError, match="compile='fast'"):
        compile_options("fast")


def test_channels_last_training_and_a_scheduled_vae_stage(tmp_path):
    schedule = (
        "+task.lr_scheduler={_target_: ldm.training.schedules.warmup_schedule, _partial_: true,"
        " warmup_steps: 2, schedule: constant}"
    )
    vae_run = tmp_path / "vae"
    trainer = train(
        compose_train(vae_run, "task=vae", "task.discriminator=null", schedule), vae_run
    )
    module = trainer.lightning_module
    weight = module.vae.encoder.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)  # the VAE default
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)  # warmed up
    ldm_run = tmp_path / "ldm"
    cfg = compose_train(ldm_run, f"vae_checkpoint={vae_run / 'checkpoints' / 'last.ckpt'}")
    module = train(cfg, ldm_run).lightning_module
    assert module.denoiser.input_blocks[0][0].weight.is_contiguous(
        memory_format=torch.channels_last
    )  # the diffusion stage's default too
    assert torch.isfinite(module.denoiser.out[2].weight).all()


def test_token_positions_change_the_output_not_the_parameters():
    config = dict(
        model_channels=16,
        channel_multipliers=[1, 2],
        blocks_per_level=1,
        attention_levels=[0, 1],
        num_heads=None,
        head_dim=16,
        context_dim=8,
        norm_groups=8,
    )
    torch.manual_seed(0)
    plain = UNet(**config)
    placed = UNet(**config, positional_embedding=True)
    placed.load_state_dict(plain.state_dict())  # same parameters, no new ones
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 3, 8)
    assert not torch.allclose(plain(x, t, context), placed(x, t, context))
    codes = grid_embedding(4, 4, 16)
    assert codes.shape == (16, 16) and len(torch.unique(codes, dim=0)) == 16
    with pytest.raises(ValueError, match="dim divisible by 4"):
        grid_embedding(2, 2, 6)
    from ldm.convert.diffusers_unet import unet_config_to_diffusers

    with pytest.raises(ValueError, match="no positional embedding"):
        unet_config_to_diffusers(placed.config)


def test_flops_of_a_step_count_forward_and_backward_matmuls():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    forward = 2 * 8 * 64 * 32
    assert count_flops(lambda: layer(x)) == forward
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * forward  # dx and dW
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    assert count_flops(lambda: conv(torch.randn(2, 4, 5, 5))) == 2 * 2 * 8 * 25 * 4 * 9
    assert mfu(5e14, 1.0, 1000.0) == 0.5 and mfu(1.0, 1.0, None) is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L40S", 362.1),
        ("NVIDIA L4", 121.0),
        ("Tesla T4", None),
    ],
)
def test_peak_tflops_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops("cuda") == peak
    assert peak_tflops("cpu") is None


def test_ema_counts_on_the_host_and_rereads_a_loaded_count():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.99)
    for _ in range(3):
        ema.update(net)
    assert ema.count() == int(ema.updates) == 3
    restored = EMA(net, decay=0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.count() == 3 and restored.current_decay() == 4 / 13
    restored.update(net)
    assert restored.count() == int(restored.updates) == 4
