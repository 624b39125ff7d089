"""LoRA adapters in the formats other tools read: our diffusers / PEFT export loaded by
diffusers' own loader changes its UNet exactly as ours changes; diffusers and kohya files
round-trip; sample.py reads all three."""

import json

import pytest
import torch
from safetensors.torch import save_file
from testutils import TINY_SD_UNET, randomize

from ldm.convert.diffusers_unet import unet_config_to_diffusers, unet_to_diffusers
from ldm.convert.lora import (
    from_diffusers,
    from_kohya,
    read_any,
    save_adapter,
    to_diffusers,
    to_kohya,
)
from ldm.models.unet import UNet
from ldm.nn.lora import adapter_parameters, adapter_state_dict, inject_lora, load_adapter

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")


# Attention projections, the transformers' 1x1 conv projections and resnet convolutions.
WITH_CONV = ("*.to_q", "*.to_k", "*.to_v", "*.to_out.0", "*.proj_in", "*.proj_out", "*.in_layers.2")


def _adapted(seed=0, **lora):
    torch.manual_seed(seed)
    ours = randomize(UNet(**TINY_SD_UNET)).eval()
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    inject_lora(ours, "style", **({"targets": "attn", "rank": 4, "alpha": 8} | lora))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in adapter_parameters(ours):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return ours, base


def _inputs():
    g = torch.Generator().manual_seed(5)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([3.0, 600.0]),
        torch.randn(2, 6, 16, generator=g),
    )


@pytest.mark.parametrize("conv_rank", [None, 2], ids=["linear", "with-conv"])
def test_diffusers_loader_reproduces_our_adapter(tmp_path, conv_rank):
    ours, base = _adapted(conv_rank=conv_rank, targets=WITH_CONV if conv_rank else "attn")
    theirs = diffusers.UNet2DConditionModel(
        sample_size=8, **unet_config_to_diffusers(ours.config)
    ).eval()
    theirs.load_state_dict(unet_to_diffusers(base, ours.config))
    x, t, c = _inputs()
    with torch.no_grad():
        plain = theirs(x, t, encoder_hidden_states=c).sample
        want = ours(x, t, c)
    settings = {"rank": 4, "alpha": 8, "conv_rank": conv_rank, "conv_alpha": None}
    state, metadata = to_diffusers(adapter_state_dict(ours, "style"), settings, ours.config)
    save_file(state, str(tmp_path / "pytorch_lora_weights.safetensors"), metadata)
    theirs.load_lora_adapter(
        str(tmp_path), weight_name="pytorch_lora_weights.safetensors", prefix="unet"
    )
    with torch.no_grad():
        got = theirs(x, t, encoder_hidden_states=c).sample
    assert (want - plain).abs().max() > 1e-3  # the adapter does change the output ...
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # ... and diffusers agrees

    # diffusers -> ours: the same layers, tensors and scale.
    back, _ = from_diffusers(state, metadata, ours.config)
    fresh, _ = _adapted(seed=9, conv_rank=conv_rank, targets=WITH_CONV if conv_rank else "attn")
    fresh.load_state_dict(base, strict=False)
    from ldm.nn.lora import remove_adapter

    remove_adapter(fresh, "style")
    load_adapter(fresh, back, "imported")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, c), want, rtol=0, atol=1e-6)


def test_kohya_round_trip_is_exact():
    ours, _ = _adapted(conv_rank=2, conv_alpha=1, targets=WITH_CONV)
    tensors = adapter_state_dict(ours, "style")
    settings = {"rank": 4, "alpha": 8, "conv_rank": 2, "conv_alpha": 1}
    kohya = to_kohya(tensors, settings, ours.config)
    assert all(
        k.startswith("lora_unet_down_blocks_") or k.startswith(("lora_unet_mid_", "lora_unet_up_"))
        for k in kohya
    )
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in kohya
    back = from_kohya(kohya, ours)
    for key, value in tensors.items():
        assert torch.equal(back[key], value), key
    alphas = {k: float(v) for k, v in back.items() if k.endswith(".alpha")}
    assert set(alphas.values()) == {8.0, 1.0}


def test_sample_reads_every_format(tmp_path):
    ours, _ = _adapted()
    tensors = adapter_state_dict(ours, "style")
    settings = {"rank": 4, "alpha": 8}
    networks = torch.nn.ModuleDict({"denoiser": ours})
    save_adapter(networks, tmp_path / "ours.safetensors", "style")
    state, metadata = to_diffusers(tensors, settings, ours.config)
    save_file(state, str(tmp_path / "diffusers.safetensors"), metadata)
    save_file(to_kohya(tensors, settings, ours.config), str(tmp_path / "kohya.safetensors"))
    for name in ("ours", "diffusers", "kohya"):
        read, _ = read_any(str(tmp_path / f"{name}.safetensors"), ours)
        assert {k.removesuffix(".alpha") for k in read if not k.endswith(".alpha")} == {
            f"denoiser.{k}" for k in tensors
        }
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA file"):
        read_any(str(tmp_path / "other.safetensors"), ours)
    assert json.loads(metadata["lora_adapter_metadata"])["unet.lora_alpha"] == 8.0


def test_adapter_specs_take_a_weight_in_any_float_notation():
    from ldm.convert.lora import split_spec

    assert split_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert split_spec("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert split_spec("style.safetensors:1e-05") == ("style.safetensors", 1e-05)
    assert split_spec("c:/loras/x.safetensors:-.5") == ("c:/loras/x.safetensors", -0.5)
