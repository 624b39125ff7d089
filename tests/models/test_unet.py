"""Our UNet against diffusers' UNet2DConditionModel (a test-only oracle), presets, switches."""

import pytest
import torch
from testutils import randomize

from ldm.convert.diffusers_unet import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from ldm.models.unet import UNet

diffusers = pytest.importorskip("diffusers")

DIFFUSERS_CONFIGS = {
    # SD 1.x-like: conv projection, heads by count, three levels, two blocks per level.
    "sd1-like": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
        in_channels=4,
        out_channels=4,
    ),
    # SD 2.x-like: linear projection, heads by width (16), depth 2, classes, scale-shift.
    "sd2-like": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=40,
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        transformer_layers_per_block=2,
        num_class_embeds=10,
        resnet_time_scale_shift="scale_shift",
        norm_num_groups=16,
        in_channels=3,
        out_channels=6,
    ),
    # A pooled-vector input (diffusers' "projection" class embedding).
    "pooled": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=8,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=12,
    ),
}


def _inputs(cfg, batch=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.get("in_channels", 4), size, size, generator=g)
    t = torch.tensor([999.0, 12.5])[:batch]
    context = torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g)
    kwargs, theirs = {}, {}
    if "num_class_embeds" in cfg:
        kwargs["y"] = theirs["class_labels"] = torch.tensor([3, 7])[:batch]
    if cfg.get("class_embed_type") == "projection":
        vec = torch.randn(batch, cfg["projection_class_embeddings_input_dim"], generator=g)
        kwargs["pooled"] = theirs["class_labels"] = vec
    return x, t, context, kwargs, theirs


@pytest.mark.parametrize("name", DIFFUSERS_CONFIGS)
def test_converted_diffusers_weights_give_the_same_outputs(name):
    cfg = DIFFUSERS_CONFIGS[name]
    reference = randomize(diffusers.UNet2DConditionModel(sample_size=16, **cfg)).eval()
    ours_config = unet_config_from_diffusers(reference.config)
    ours = UNet(**ours_config).eval()
    ours.load_state_dict(unet_from_diffusers(reference.state_dict(), ours_config), strict=True)
    x, t, context, kwargs, theirs = _inputs(cfg)
    with torch.no_grad():
        want = reference(x, t, encoder_hidden_states=context, **theirs).sample
        got = ours(x, t, context, **kwargs)
    assert want.abs().max() > 0.1, "a trivially small output would prove nothing"
    assert (got - want).abs().max() < 1e-5

    # Ours -> diffusers layout -> ours is exact, and the export runs in diffusers.
    exported = unet_to_diffusers(ours.state_dict(), ours.config)
    assert set(exported) == set(reference.state_dict())
    back = unet_from_diffusers(exported, ours.config)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    rebuilt = diffusers.UNet2DConditionModel(
        sample_size=16, **unet_config_to_diffusers(ours.config)
    )
    rebuilt.load_state_dict(exported, strict=True)
    with torch.no_grad():
        again = rebuilt.eval()(x, t, encoder_hidden_states=context, **theirs).sample
    assert (again - want).abs().max() < 1e-5


def test_sd_parameter_counts():
    """Construction only (on the meta device): the published sizes of SD 1.5 and SD 2.x."""
    with torch.device("meta"):
        sd15 = UNet()
        sd2 = UNet(num_heads=None, head_dim=64, context_dim=1024, linear_projection=True)
    assert sum(p.numel() for p in sd15.parameters()) == 859_520_964
    assert sum(p.numel() for p in sd2.parameters()) == 865_910_724


def _tiny(**overrides):
    config = dict(
        model_channels=32,
        channel_multipliers=(1, 2),
        blocks_per_level=1,
        attention_levels=(1,),
        num_heads=4,
        context_dim=16,
        norm_groups=8,
    )
    return UNet(**{**config, **overrides})


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomize(_tiny()).train()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 16)

    def grads():
        model.zero_grad()
        model(x, t, context).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing = True
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_channels_last_gives_the_same_output():
    model = randomize(_tiny()).eval()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 5, 16)
    with torch.no_grad():
        want = model(x, t, context)
        got = model.to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last), t, context
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("linear_projection", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_every_convolution_sees_the_layout_the_network_is_in(linear_projection, layout):
    # A transformer's output is a channels-last view of its tokens; had it leaked, every
    # later convolution of a plain network would run in NHWC and copy its weights to match.
    model = randomize(_tiny(linear_projection=linear_projection)).to(memory_format=layout)
    seen = []
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.GroupNorm)):
            module.register_forward_pre_hook(
                lambda m, args: seen.append(args[0].is_contiguous(memory_format=layout))
            )
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=layout)
    out = model(x, torch.tensor([1.0, 2.0]), torch.randn(2, 5, 16))
    assert len(seen) > 20 and all(seen)
    assert out.is_contiguous(memory_format=layout)


def test_conditioning_inputs_are_checked():
    model = _tiny(num_classes=3)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match="class labels y are required"):
        model(x, t, context)
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        _tiny(head_dim=8)
    with pytest.raises(ValueError, match="attention_levels"):
        _tiny(attention_levels=(2,))
    with pytest.raises(ValueError, match="does not implement: act_fn='gelu'"):
        unet_config_from_diffusers({"act_fn": "gelu"})
