"""DiT and MMDiT against diffusers' DiTTransformer2DModel and SD3Transformer2DModel (test-only
oracles): outputs with the same random weights, key maps both ways, parameter counts."""

import pytest
import torch
from testutils import randomize

from ldm.convert.diffusers_dit import (
    dit_config_from_diffusers,
    dit_config_to_diffusers,
    dit_from_diffusers,
    dit_to_diffusers,
    mmdit_config_from_diffusers,
    mmdit_config_to_diffusers,
    mmdit_from_diffusers,
    mmdit_to_diffusers,
)
from ldm.io import WeightsFileError
from ldm.models.dit import DIT_PRESETS, DiT, dit_preset, parameter_count
from ldm.models.mmdit import MMDiT

diffusers = pytest.importorskip("diffusers")

DIT_CONFIGS = {
    "eps": dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8),
    # learned sigma, patch 4, another class count and MLP epsilon
    "learned-sigma": dict(
        num_attention_heads=4,
        attention_head_dim=4,
        num_layers=3,
        sample_size=8,
        patch_size=4,
        in_channels=3,
        out_channels=6,
        num_embeds_ada_norm=7,
        norm_eps=1e-6,
    ),
}


def _tie_embedders(model):
    """diffusers' converted DiT weights carry one embedder copied into every block."""
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return model


@pytest.mark.parametrize("name", DIT_CONFIGS)
def test_dit_equals_diffusers(name):
    cfg = DIT_CONFIGS[name]
    reference = _tie_embedders(randomize(diffusers.DiTTransformer2DModel(**cfg))).eval()
    config = dit_config_from_diffusers(reference.config)
    ours = DiT(**config).eval()
    ours.load_state_dict(dit_from_diffusers(reference.state_dict()), strict=True)
    g = torch.Generator().manual_seed(1)
    channels, size = cfg.get("in_channels", 4), cfg["sample_size"]
    x = torch.randn(3, channels, size, size, generator=g)
    t = torch.tensor([999.0, 12.0, 0.0])
    y = torch.tensor([0, 5, cfg.get("num_embeds_ada_norm", 1000)])  # the last: the null class
    with torch.no_grad():
        want = reference(x, t, class_labels=y).sample
        got = ours(x, t, y=y)
    assert got.shape == want.shape == (3, reference.out_channels, size, size)
    assert want.abs().max() > 0.1, "a trivially small output would prove nothing"
    assert (got - want).abs().max() < 1e-5

    # Ours -> diffusers -> ours is exact, and the export runs in diffusers.
    exported = dit_to_diffusers(ours.state_dict(), ours.config)
    assert set(exported) == set(reference.state_dict())
    back = dit_from_diffusers(exported)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    assert back.keys() == ours.state_dict().keys()
    rebuilt = diffusers.DiTTransformer2DModel.from_config(dit_config_to_diffusers(ours.config))
    rebuilt.load_state_dict(exported, strict=True)
    with torch.no_grad():
        assert (rebuilt.eval()(x, t, class_labels=y).sample - want).abs().max() < 1e-5


def test_dit_refuses_blocks_with_their_own_embedders():
    reference = randomize(diffusers.DiTTransformer2DModel(**DIT_CONFIGS["eps"]))
    with pytest.raises(WeightsFileError, match="shares one timestep and label embedder"):
        dit_from_diffusers(reference.state_dict())


def test_dit_with_text_has_no_diffusers_form():
    with pytest.raises(WeightsFileError, match="context_dim"):
        dit_config_to_diffusers(DiT(hidden_size=32, depth=1, num_heads=2, context_dim=8).config)


MMDIT_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=10,
    out_channels=4,
    pos_embed_max_size=6,
)


@pytest.mark.parametrize("size", [8, 12, 4])  # trained size, the largest, a smaller crop
def test_mmdit_equals_diffusers_sd3(size):
    reference = randomize(diffusers.SD3Transformer2DModel(**MMDIT_CONFIG)).eval()
    config = mmdit_config_from_diffusers(reference.config)
    ours = MMDiT(**config).eval()
    ours.load_state_dict(mmdit_from_diffusers(reference.state_dict()), strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, size, size, generator=g)
    t = torch.tensor([981.5, 3.0])
    context = torch.randn(2, 5, 12, generator=g)
    pooled = torch.randn(2, 10, generator=g)
    with torch.no_grad():
        want = reference(
            x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t
        ).sample
        got = ours(x, t, context, pooled=pooled)
    assert want.abs().max() > 0.1
    assert (got - want).abs().max() < 1e-5

    exported = mmdit_to_diffusers(ours.state_dict(), ours.config)
    assert set(exported) == set(reference.state_dict())
    # the position table diffusers keeps is the one we compute
    torch.testing.assert_close(
        exported["pos_embed.pos_embed"], reference.state_dict()["pos_embed.pos_embed"]
    )
    back = mmdit_from_diffusers(exported)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    rebuilt = diffusers.SD3Transformer2DModel.from_config(mmdit_config_to_diffusers(ours.config))
    rebuilt.load_state_dict(exported, strict=True)
    with torch.no_grad():
        again = rebuilt.eval()(
            x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t
        ).sample
    assert (again - want).abs().max() < 1e-5


def test_mmdit_refuses_a_grid_past_its_positions():
    model = MMDiT(**mmdit_config_from_diffusers(MMDIT_CONFIG))
    with pytest.raises(ValueError, match="max_size=6"):
        model(
            torch.zeros(1, 4, 14, 14),
            torch.zeros(1),
            torch.zeros(1, 2, 12),
            pooled=torch.zeros(1, 10),
        )


# The paper's Table 1 (ImageNet 256: 4 latent channels, learned sigma, 1000 classes + null).
PAPER_MILLIONS = {"S": 33, "B": 130, "L": 458, "XL": 675}


@pytest.mark.parametrize("size", DIT_PRESETS)
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_dit_presets_have_the_papers_parameter_counts(size, patch):
    with torch.device("meta"):
        model = dit_preset(f"DiT-{size}/{patch}", num_classes=1001, learn_sigma=True)
    # Table 1 gives one count per size; the patch changes only the in and out layers (< 1M)
    assert abs(parameter_count(model) / 1e6 - PAPER_MILLIONS[size]) < 1


def test_published_configurations_have_diffusers_parameter_counts():
    """facebook/DiT-XL-2-256 and stabilityai/stable-diffusion-3-medium's transformer, built
    on the meta device from their published configs."""
    dit_xl = dict(  # facebook/DiT-XL-2-256 transformer/config.json
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=28,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )
    sd3_medium = dict(  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )
    with torch.device("meta"):
        dit_theirs = diffusers.DiTTransformer2DModel(**dit_xl)
        dit_ours = DiT(**dit_config_from_diffusers(dit_theirs.config))
        sd3_theirs = diffusers.SD3Transformer2DModel(**sd3_medium)
        sd3_ours = MMDiT(**mmdit_config_from_diffusers(sd3_theirs.config))
    # diffusers' DiT repeats the shared embedders in each of its 28 blocks
    ours = parameter_count(dit_ours)
    embedders = parameter_count(dit_ours) - parameter_count(
        dit_ours, exclude=("time_embed", "label_emb")
    )
    assert parameter_count(dit_theirs) == ours + 27 * embedders
    assert round(ours / 1e6) == 675
    assert parameter_count(sd3_ours) == parameter_count(sd3_theirs)
    assert round(parameter_count(sd3_ours) / 1e9, 1) == 2.0


def test_a_learned_sigma_dit_samples_with_its_mean_and_does_not_train():
    from ldm.diffusion.samplers import make_sampler
    from ldm.diffusion.schedules import make_schedule
    from ldm.models.conditioners import ClassEmbedder
    from ldm.pipeline import Pipeline
    from ldm.training.diffusion import LatentDiffusion

    dit = randomize(DiT(in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=11,
                        learn_sigma=True, sample_size=8))  # fmt: skip
    assert dit.out_channels == 6
    pipeline = Pipeline(dit, ClassEmbedder(10, dim=None), None, make_schedule("linear"),
                        image_size=(8, 8))  # fmt: skip
    images = pipeline.generate(torch.tensor([1, 2]), make_sampler("ddim", steps=2))
    assert images.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="learn_sigma"):
        LatentDiffusion(dit, schedule=make_schedule("linear"))


@pytest.mark.parametrize("kind", [DiT, MMDiT])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    model = randomize(kind(hidden_size=32, depth=2, num_heads=2, context_dim=8, pooled_dim=6))
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, model.in_channels, 4, 4, generator=g), torch.randn(2, 3, 8)
    pooled, t = torch.randn(2, 6, generator=g), torch.tensor([3.0, 700.0])
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = on
        model(x, t, context, pooled=pooled).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
