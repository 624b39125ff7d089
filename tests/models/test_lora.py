"""LoRA layers: a fresh adapter is a no-op, merge == unmerged, unmerge restores, disable is
exact, adapters compose linearly, save / load, presets and errors."""

import pytest
import torch
from testutils import TINY_SD_UNET, randomize
from torch import nn

from ldm.convert.lora import read_adapter, save_adapter
from ldm.models.unet import UNet
from ldm.nn.lora import (
    LoRASettings,
    adapter_parameters,
    adapter_state_dict,
    disable_adapters,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_adapters,
    remove_adapter,
    set_adapter_weights,
    unmerge_adapters,
)


def _unet():
    torch.manual_seed(0)
    return randomize(UNet(**TINY_SD_UNET)).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10.0, 700.0]),
        torch.randn(2, 5, 16, generator=g),
    )


def _train_adapter(model, name):
    """Give an adapter non-zero weights, as training would."""
    g = torch.Generator().manual_seed(hash(name) % 1000)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_fresh_adapter_changes_nothing_bit_for_bit():
    model = _unet()
    x, t, c = _inputs()
    with torch.no_grad():
        base = model(x, t, c)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        chosen = inject_lora(model, "a", targets="attn+ff", rank=4, alpha=8, conv_rank=2)
        assert torch.equal(model(x, t, c), base)
    assert any(p.endswith("attn1.to_q") for p in chosen)
    assert any(p.endswith("ff.net.2") for p in chosen)
    # The base parameters keep their names: a base checkpoint still loads into the model.
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_state.items())
    assert all(".lora." in k for k in set(model.state_dict()) - set(base_state))


def test_merge_unmerge_disable():
    model = _unet()
    x, t, c = _inputs()
    base_weights = {k: v.clone() for k, v in model.state_dict().items() if ".lora." not in k}
    with torch.no_grad():
        base = model(x, t, c)
        inject_lora(model, "a", targets="attn", rank=4, alpha=4, conv_rank=2)
        _train_adapter(model, "a")
        set_adapter_weights(model, {"a": 0.7})
        adapted = model(x, t, c)
        assert (adapted - base).abs().max() > 1e-3
        before = disable_adapters(model)
        assert before == {"a": 0.7} and torch.equal(model(x, t, c), base)  # exactly the base
        set_adapter_weights(model, before)
        merge_adapters(model)
        torch.testing.assert_close(model(x, t, c), adapted, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="merged into"):
            set_adapter_weights(model, {"a": 0.5})
        unmerge_adapters(model)
        for key, value in base_weights.items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(model(x, t, c), adapted, rtol=0, atol=1e-5)


def test_two_adapters_compose_linearly():
    layer = nn.Linear(12, 7)
    inject_lora(layer, "a", targets=("*",), rank=3, alpha=6)
    inject_lora(layer, "b", targets=("*",), rank=2, alpha=1)
    _train_adapter(layer, "a")
    _train_adapter(layer, "b")
    x = torch.randn(5, 12)
    with torch.no_grad():
        set_adapter_weights(layer, {"a": 0.0, "b": 0.0})
        base = layer(x)
        set_adapter_weights(layer, {"a": 1.0})
        delta_a = layer(x) - base
        set_adapter_weights(layer, {"a": 0.0, "b": 1.0})
        delta_b = layer(x) - base
        set_adapter_weights(layer, {"a": 0.8, "b": -0.5})
        torch.testing.assert_close(
            layer(x) - base, 0.8 * delta_a - 0.5 * delta_b, rtol=0, atol=1e-6
        )
        merge_adapters(layer)
        torch.testing.assert_close(
            layer(x) - base, 0.8 * delta_a - 0.5 * delta_b, rtol=0, atol=1e-5
        )


def test_save_load_and_settings(tmp_path):
    model = _unet()
    x, t, c = _inputs()
    inject_lora(model, "style", targets="attn", rank=4, alpha=2, conv_rank=2, conv_alpha=1)
    _train_adapter(model, "style")
    with torch.no_grad():
        want = model(x, t, c)
    path = save_adapter(model, tmp_path / "style.safetensors", "style")
    tensors, info = read_adapter(path)
    assert tensors.keys() == adapter_state_dict(model, "style").keys()
    assert info["settings"]["alpha"] == 2 and info["settings"]["conv_alpha"] == 1
    fresh = _unet()
    load_adapter(fresh, tensors, "style", info["settings"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, c), want, rtol=0, atol=1e-6)
    remove_adapter(fresh, "style")
    assert not any(layer.lora for layer in lora_layers(fresh).values())


def test_presets_counts_and_errors():
    model = _unet()
    attn = len(inject_lora(model, "a", targets="attn", rank=2))
    n_transformers = sum(1 for n, _ in model.named_modules() if n.endswith("attn1"))
    assert attn == 8 * n_transformers  # q, k, v, out of self- and cross-attention
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        inject_lora(model, "a", targets="attn", rank=2)
    with pytest.raises(ValueError, match="unknown LoRA preset"):
        inject_lora(model, "b", targets="attention")
    with pytest.raises(ValueError, match="no layer"):
        inject_lora(model, "b", targets=("*.nothing",))
    assert LoRASettings(rank=8, alpha=16).scale == 2.0


def test_openclip_attention_adapters_take_effect(tmp_path):
    """open_clip's nn.MultiheadAttention reads out_proj.weight without calling out_proj:
    its adapters still change the output, merge to the same result, disable exactly, train
    and reload."""
    from test_conditioners import CAPTIONS, small_clip

    encoder = small_clip(layer="last")  # every block runs
    with torch.no_grad():
        base = encoder(CAPTIONS)["context"]
    layers = inject_lora(encoder, "style", targets="attn", rank=4)
    assert layers and all(p.endswith("attn.out_proj") for p in layers)
    _train_adapter(encoder, "style")
    calls = []
    encoder.model.transformer.resblocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        adapted = encoder(CAPTIONS)["context"]
        assert (adapted - base).abs().max() > 1e-3  # the adapter acts
        assert len(calls) == 1  # the attention (and its hooks) ran once
        saved = disable_adapters(encoder)
        assert torch.equal(encoder(CAPTIONS)["context"], base)
        set_adapter_weights(encoder, saved)
        merge_adapters(encoder)
        torch.testing.assert_close(encoder(CAPTIONS)["context"], adapted, rtol=0, atol=1e-5)
        unmerge_adapters(encoder)
    loss = encoder(CAPTIONS)["context"].square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_parameters(encoder))
    save_adapter(encoder, tmp_path / "text.safetensors", "style")
    fresh = small_clip(layer="last")
    tensors, info = read_adapter(tmp_path / "text.safetensors")
    load_adapter(fresh, tensors, "style", info["settings"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(CAPTIONS)["context"], adapted, rtol=0, atol=1e-6)


def test_load_adapter_checks_every_layer_first_and_follows_eval_mode():
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {"0.lora_down.weight": torch.ones(2, 4), "0.lora_up.weight": torch.ones(6, 2)}
    wrong_shape = {
        **good,
        "2.lora_down.weight": torch.ones(2, 5),
        "2.lora_up.weight": torch.ones(3, 2),
    }
    not_linear = {
        **good,
        "1.lora_down.weight": torch.ones(2, 6),
        "1.lora_up.weight": torch.ones(6, 2),
    }
    for bad, match in ((wrong_shape, "do not fit the layer"), (not_linear, "is a LayerNorm")):
        with pytest.raises(ValueError, match=match):
            load_adapter(model, bad, "x", {"dropout": 0.5})
        assert not lora_layers(model) and model.state_dict().keys() == before.keys()
    load_adapter(model, good, "x", {"dropout": 0.5})
    adapter = lora_layers(model)["0"].lora["x"]
    assert not adapter.training  # the model is in eval mode: no dropout
