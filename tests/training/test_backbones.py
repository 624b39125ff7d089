"""Every denoiser backbone through the whole shell: train.py, sample.py, LoRA fine-tuning
with base=, baking the adapter in (merge), the diffusers export, and the LoRA presets."""

import json

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from testutils import save_random_adapter, tool_config
from trainutils import CONF, TINY, compose_train

from ldm.app.convert import main as convert_main
from ldm.app.sample import load_model, sample
from ldm.app.train import train
from ldm.convert.stable_diffusion import save_diffusers_folder
from ldm.io import WeightsFileError, save_safetensors
from ldm.models.dit import DiT
from ldm.models.mmdit import MMDiT
from ldm.models.unet import UNet
from ldm.nn.lora import inject_lora, set_adapter_weights
from ldm.pipeline import CONFIG_KEY, open_checkpoint
from ldm.tools.merge import merge

# TINY without its UNet sizes; each backbone gets its own (width 32, context 32).
SHARED = [o for o in TINY if not o.startswith("model.backbone.")]
TRANSFORMER = [
    "model.backbone.hidden_size=32",
    "model.backbone.depth=2",
    "model.backbone.num_heads=2",
    "model.backbone.context_dim=32",
]
BACKBONES = {
    "unet": (UNet, [o for o in TINY if o.startswith("model.backbone.")]),
    "dit": (DiT, ["model/backbone=dit_tiny", *TRANSFORMER]),
    "mmdit": (
        MMDiT,
        ["model/backbone=mmdit_tiny", *TRANSFORMER, "diffusion=flow", "sampler=flow_euler"],
    ),
}


def _sample_cfg(checkpoint, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "sample", overrides=[f"checkpoint={checkpoint}", "image_size=16", *overrides]
        )


@pytest.mark.parametrize("name", BACKBONES)
def test_each_backbone_trains_samples_fine_tunes_and_merges(name, tmp_path):
    kind, overrides = BACKBONES[name]
    run = tmp_path / "base"
    module = train(compose_train(run, *SHARED, *overrides, tiny=False), run).lightning_module
    assert type(module.denoiser) is kind
    checkpoint = run / "checkpoints" / "last.ckpt"
    opened = open_checkpoint(checkpoint)
    assert type(opened.denoiser()) is kind and "denoiser" in opened.config["task"]
    paths = sample(_sample_cfg(checkpoint, "prompts=[a red circle]", "sampler.steps=2"), tmp_path)
    assert len(paths) == 4  # num_per_prompt

    # LoRA fine-tuning from it (attention preset), then the adapter baked in by merge.
    tuned = tmp_path / "lora"
    lora = [f"base={checkpoint}", "lora=attn_ff", "lora.rank=2", "trainer.max_steps=2"]
    trainer = train(compose_train(tuned, *SHARED, *overrides, *lora, tiny=False), tuned)
    adapted = [n for n, _ in trainer.lightning_module.denoiser.named_modules() if "lora" in n]
    assert any(".ff." in n for n in adapted) and any("to_q" in n for n in adapted)
    pipeline = load_model(_sample_cfg(checkpoint))
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([5.0, 500.0])
    cond = pipeline.condition(["a red circle", "a blue square"])
    with torch.no_grad():
        before = pipeline.denoiser(x, t, **cond)
    networks = pipeline.networks()
    # every Linear: the adaLN modulations too, so the adapter acts through zero-init gates
    save_random_adapter(networks, tmp_path / "style.safetensors", "all-linear", rank=2, alpha=4)
    adapter = f"{tmp_path / 'style.safetensors'}:0.5"
    baked = merge("bake", [checkpoint], tmp_path / "baked.safetensors", adapters=[adapter])
    set_adapter_weights(networks, {"style": 0.5})
    plain = load_model(_sample_cfg(baked))
    with torch.no_grad():
        want = networks["denoiser"](x, t, **cond)
        got = plain.denoiser(x, t, **cond)
    # (a transformer's outputs are small after 4 steps, its gates starting at zero)
    effect = (want - before).abs().max()
    assert effect > 1e-2 * before.abs().max()  # the adapter acts
    assert (got - want).abs().max() < 1e-3 * effect  # and baked in, it acts the same
    if kind is not UNet:  # a UNet-format (kohya) adapter has nothing to act on here
        kohya = tmp_path / "kohya.safetensors"
        save_safetensors(kohya, {"lora_unet_x.lora_down.weight": torch.zeros(2, 4)})
        with pytest.raises(ValueError, match="the base checkpoint has no UNet"):
            merge("bake", [checkpoint], tmp_path / "no.safetensors", adapters=[str(kohya)])


def test_the_diffusers_export_of_a_trained_mmdit_runs_in_diffusers(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    run = tmp_path / "mmdit"
    pooled = ["model.backbone.pooled_dim=32", "model.conditioner.pooled=true"]
    train(compose_train(run, *SHARED, *BACKBONES["mmdit"][1], *pooled, tiny=False), run)
    checkpoint = run / "checkpoints" / "last.ckpt"
    ours = open_checkpoint(checkpoint).denoiser().eval()
    out = tmp_path / "out"
    convert_main(tool_config("convert", "action=to-diffusers", f"src={checkpoint}", f"out={out}"))
    assert f"wrote {out}/transformer and {out}/vae" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel"
    theirs = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "out" / "transformer")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([5.0, 500.0])
    context, vector = torch.randn(2, 6, 32, generator=g), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        want = ours(x, t, context, pooled=vector)
        got = theirs.eval()(
            x, encoder_hidden_states=context, pooled_projections=vector, timestep=t
        ).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # and the folder reads back as the same network
    back = open_checkpoint(tmp_path / "out").denoiser()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())
    # which has no single-file form
    with pytest.raises(SystemExit):
        convert_main(
            tool_config("convert", "action=from-diffusers", f"src={out}", f"out={tmp_path}/x")
        )
    assert "MMDiT, which has no single-file form" in capsys.readouterr().err


def test_a_text_conditioned_dit_has_no_diffusers_form(tmp_path):
    model = DiT(hidden_size=32, depth=1, num_heads=2, context_dim=8)
    with pytest.raises(WeightsFileError, match="class-conditional only"):
        save_diffusers_folder(tmp_path, denoiser=model)


@pytest.mark.parametrize("kind", [DiT, MMDiT])
def test_lora_presets_reach_every_block(kind):
    model = kind(hidden_size=32, depth=2, num_heads=2, context_dim=8, pooled_dim=None)
    attn = inject_lora(model, "a", targets="attn", rank=2)
    twin = kind(hidden_size=32, depth=2, num_heads=2, context_dim=8, pooled_dim=None)
    both = inject_lora(twin, "b", targets="attn+ff", rank=2)
    projections = ["to_q", "to_k", "to_v", "to_out.0"]
    if kind is MMDiT:  # the text stream's projections too (the last block only reads it)
        projections += ["add_q_proj", "add_k_proj", "add_v_proj"]
    for block in range(2):
        layers = [p for p in attn if p.startswith(f"blocks.{block}.")]
        assert all(any(p.endswith(q) for p in layers) for q in projections), layers
    assert set(attn) < set(both) and any(p.endswith("ff.net.2") for p in both)


def test_checkpoints_from_before_the_backbone_names_load_and_resume(tmp_path):
    """Older checkpoints call the denoiser "unet" (networks.unet.*, model.unet, task.unet)."""
    run = tmp_path / "new"
    train(compose_train(run, "trainer.max_steps=2"), run)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    old = {
        k.replace("networks.denoiser.", "networks.unet.").replace(
            "ema.average.denoiser.", "ema.average.unet."
        ): v
        for k, v in state["state_dict"].items()
    }
    config = yaml.safe_load(state[CONFIG_KEY])
    config["model"]["unet"] = config["model"].pop("backbone")
    config["task"]["unet"] = config["task"].pop("denoiser")
    legacy = tmp_path / "legacy.ckpt"
    torch.save({**state, "state_dict": old, CONFIG_KEY: yaml.safe_dump(config)}, legacy)
    want = open_checkpoint(run / "checkpoints" / "last.ckpt").denoiser().state_dict()
    opened = open_checkpoint(legacy)
    assert "backbone" in opened.config["model"] and "denoiser" in opened.config["task"]
    got = opened.denoiser().state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items()) and got.keys() == want.keys()
    resumed = tmp_path / "resumed"
    trainer = train(compose_train(resumed, "trainer.max_steps=3", f"resume={legacy}"), resumed)
    assert trainer.global_step == 3


def test_a_class_conditional_checkpoint_samples_by_class_number(tmp_path):
    """Class labels on the UNet's y path: a conditioner without weights is still built, and
    sample.py takes class numbers, refusing anything else by name."""
    run = tmp_path / "run"
    classes = ["model/conditioner=class_labels", "model.conditioner.num_classes=5"]
    classes += ["model.backbone.num_classes=6", "model.backbone.context_dim=null"]
    classes += ["callbacks.samples.prompts=[0,4]", "trainer.max_steps=2"]
    tiny = [o for o in TINY if not o.startswith("model.conditioner.")]
    train(compose_train(run, *tiny, *classes, tiny=False), run)
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert open_checkpoint(checkpoint).conditioner() is not None
    out = sample(
        _sample_cfg(checkpoint, "prompts=[0,'4']", "sampler.steps=2", "num_per_prompt=1"),
        tmp_path / "s",
    )
    assert len(out) == 2
    for bad in ("5", "a red circle"):
        with pytest.raises(ValueError, match=f"prompt '{bad}'.*class numbers 0..4"):
            sample(_sample_cfg(checkpoint, f"prompts=['{bad}']"), tmp_path / "bad")
