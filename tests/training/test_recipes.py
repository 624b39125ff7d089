"""Niche-adaptation recipes on the tiny model: DreamBooth (with and without prior
preservation), Textual Inversion, and checkpoint merging."""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors import safe_open
from testutils import save_random_adapter, tool_config
from trainutils import CONF, TINY_ANY_DATA, compose_train

from ldm.app.merge import main as merge_main
from ldm.app.sample import load_model, sample
from ldm.app.train import build, train
from ldm.diffusion.samplers import make_sampler
from ldm.io import save_safetensors
from ldm.nn.lora import set_adapter_weights
from ldm.tools.merge import merge, read_checkpoint
from ldm.training.finetune import ensure_class_images

# The class prompt is a caption the base model knows; the instance prompt shares its words,
# so fine-tuning on the instance without prior preservation drifts the class too.
CLASS = "a large red circle in the center on a white background"
INSTANCE = "a large sks circle in the center on a white background"
# v prediction: a briefly trained tiny model samples far more sensibly with few steps.
DIFFUSION = "diffusion.prediction=v"
pytestmark = pytest.mark.xdist_group("recipes")  # one worker: the base model is trained once


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model trained briefly on the shapes, on a VAE with a near-deterministic
    posterior (an untrained one's unit posterior noise would swamp the images)."""
    vae = tmp_path_factory.mktemp("vae")
    train(compose_train(vae, "task=vae", "task.posterior_logvar_init=-8.0"), vae)
    run = tmp_path_factory.mktemp("base")
    train(
        compose_train(
            run,
            f"vae_checkpoint={vae / 'checkpoints' / 'last.ckpt'}",
            "trainer.max_steps=300",
            "trainer.val_check_interval=300",
            "callbacks.checkpoint.every_n_train_steps=300",
            DIFFUSION,
            "task.optimizer.lr=2e-3",
        ),
        run,
    )
    return run / "checkpoints" / "last.ckpt"


def _sample_cfg(checkpoint, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "sample", overrides=[f"checkpoint={checkpoint}", "image_size=16", *overrides]
        )


def _latents(checkpoint, prompt, seeds=range(8)):
    """Sampled latents (the model's own feature space; x0 clipped for the tiny model)."""
    module = load_model(_sample_cfg(checkpoint))
    sampler = make_sampler("ddim", steps=10, clip_x0=3.0)
    with torch.no_grad():
        return module.generate(
            [prompt] * len(seeds), sampler, seeds=list(seeds), decode=False
        ), module


def _instance_dir(tmp_path):
    folder = tmp_path / "instance"
    folder.mkdir()
    for i in range(4):  # a subject the shapes never show: a magenta ring with a green dot
        image = Image.new("RGB", (16, 16), (255, 255, 255))
        for x in range(16):
            for y in range(16):
                r = ((x - 7.5) ** 2 + (y - 7.5) ** 2) ** 0.5
                if 4 + (i % 2) * 0.5 < r < 7:
                    image.putpixel((x, y), (230, 0, 230))
                elif r < 2:
                    image.putpixel((x, y), (0, 230, 0))
        image.save(folder / f"{i}.png")
    return folder


def _recipe(tmp_path, base, experiment, prompt):
    """A recipe's overrides: the base, the instance images and prompt, 16 px."""
    return [
        *TINY_ANY_DATA,
        f"experiment={experiment}",
        f"base={base}",
        f"data.dataset.instance_dir={tmp_path / 'instance'}",
        f"data.dataset.instance_prompt='{prompt}'",
        "data.dataset.size=16",
    ]


def _dreambooth(tmp_path, base, name, *overrides):
    run = tmp_path / name
    cfg = compose_train(
        run,
        *_recipe(tmp_path, base, "dreambooth", INSTANCE),
        "data.batch_size=4",
        "trainer.max_steps=100",
        "trainer.val_check_interval=100",
        "callbacks.checkpoint.every_n_train_steps=100",
        "callbacks.samples.every_n_steps=1000",
        "task.optimizer.lr=3e-3",
        "dreambooth.class_images=8",
        "dreambooth.class_steps=10",
        DIFFUSION,
        *overrides,
        tiny=False,
    )
    train(cfg, run)
    return run


def test_dreambooth_learns_the_subject_and_prior_preservation_keeps_the_class(tmp_path, base):
    pixels = [np.asarray(Image.open(p)) for p in sorted(_instance_dir(tmp_path).iterdir())]
    instance = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    before, module = _latents(base, INSTANCE)
    with torch.no_grad():
        target = module.vae.scale_latents(module.vae.encode(instance).mean).mean(0)

    def distance(latents, reference):
        return float((latents - reference).square().mean())

    plain = _dreambooth(
        tmp_path,
        base,
        "plain",
        "data.dataset.class_prompt=null",
    )
    prior = _dreambooth(tmp_path, base, "prior", f"data.dataset.class_prompt='{CLASS}'")
    assert len(list((prior / "class_images").glob("class_*.png"))) == 8  # made by the base model
    after, _ = _latents(plain / "checkpoints" / "last.ckpt", INSTANCE)
    learnt = distance(after, target), distance(before, target)
    assert learnt[0] < 0.7 * learnt[1], learnt  # the subject is learnt (0.41x measured)

    reference, _ = _latents(base, CLASS)  # what the base model draws for the class
    drift_plain = distance(_latents(plain / "checkpoints" / "last.ckpt", CLASS)[0], reference)
    drift_prior = distance(_latents(prior / "checkpoints" / "last.ckpt", CLASS)[0], reference)
    assert drift_prior < drift_plain, (drift_prior, drift_plain)  # 0.085 < 0.175 measured


def test_textual_inversion_trains_only_the_new_rows_and_round_trips(tmp_path, base):
    _instance_dir(tmp_path)
    run = tmp_path / "ti"
    overrides = [
        *_recipe(tmp_path, base, "textual_inversion", "a photo of <ring>"),
        "textual_inversion.tokens=['<ring>']",
        "textual_inversion.init_words=[circle]",
        "task.ema_decay=0.9",  # the EMA copy gets the tokens too
        "trainer.max_steps=20",
        "trainer.val_check_interval=20",
        "callbacks.checkpoint.every_n_train_steps=20",
        "callbacks.samples.every_n_steps=1000",
    ]
    with pytest.raises(ValueError, match=r"diffusion\.prediction=v"):  # the base's, not eps
        build(compose_train(run, *overrides, tiny=False), run)
    cfg = compose_train(run, *overrides, DIFFUSION, tiny=False)
    module, data, trainer = build(cfg, run)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module, datamodule=data)
    end = module.state_dict()
    changed = [k for k, v in start.items() if not torch.equal(end[k], v)]
    assert sorted(changed) == [  # only the new row (and its average)
        "ema.average.conditioner.token_embedding.extra",
        "ema.updates",
        "networks.conditioner.token_embedding.extra",
    ]
    assert module.conditioner.token_embedding.extra.shape == (1, 32)
    with safe_open(str(run / "embeddings.safetensors"), "pt") as handle:
        assert list(handle.keys()) == ["<ring>"]
    # The trained checkpoint, and the base plus the embeddings file, draw the same images.
    prompt = ["prompts=['a photo of <ring>']", "num_per_prompt=2", "sampler.steps=5"]
    ours = sample(_sample_cfg(run / "checkpoints" / "last.ckpt", *prompt), tmp_path / "a")
    loaded = sample(
        _sample_cfg(base, *prompt, f"embeddings=[{run / 'embeddings.safetensors'}]"), tmp_path / "b"
    )
    assert [p.read_bytes() for p in ours] == [p.read_bytes() for p in loaded]


def test_merging(tmp_path, base):
    other = tmp_path / "other"
    train(compose_train(other, "trainer.max_steps=2", "seed=1"), other)
    third = tmp_path / "third"
    train(compose_train(third, "trainer.max_steps=2", "seed=2"), third)
    a, b, c = base, other / "checkpoints" / "last.ckpt", third / "checkpoints" / "last.ckpt"
    first = read_checkpoint(a)[0]

    out = merge("weighted", [a, b], tmp_path / "w.safetensors", weights=[1.0, 0.0])
    merged, carried = read_checkpoint(out)
    assert all(torch.equal(merged[k], v) for k, v in first.items())
    assert "ldm_config" in carried  # sample.py and base= can read the result
    merge_main(
        tool_config(
            "merge", "method=add_difference", f"inputs=[{a},{b},{c}]", "alpha=0.0",
            f"out={tmp_path / 'd.safetensors'}",
        )
    )  # fmt: skip
    merged, _ = read_checkpoint(tmp_path / "d.safetensors")
    assert all(torch.equal(merged[k], v) for k, v in first.items())
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as handle:
        provenance = json.loads(handle.metadata()["ldm_merge"])
    assert provenance["method"] == "add_difference" and len(provenance["inputs"]) == 3
    assert all(len(i["sha256"]) == 64 for i in provenance["inputs"])

    # Baking an adapter in gives what running with the adapter gives.
    module = load_model(_sample_cfg(a))
    networks = module.networks()
    save_random_adapter(networks, tmp_path / "style.safetensors", "attn", rank=4, alpha=8)
    baked = merge(
        "bake",
        [a],
        tmp_path / "baked.safetensors",
        adapters=[f"{tmp_path / 'style.safetensors'}:0.5"],
    )
    set_adapter_weights(networks, {"style": 0.5})
    plain = load_model(_sample_cfg(baked))
    x, t, context = torch.randn(2, 4, 4, 4), torch.tensor([5.0, 500.0]), torch.randn(2, 16, 32)
    with torch.no_grad():
        want = networks["denoiser"](x, t, context)
        got = plain.denoiser(x, t, context)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # Different architectures are refused, naming what differs.
    small = tmp_path / "small"
    train(
        compose_train(
            small,
            "trainer.max_steps=1",
            "model.backbone.model_channels=8",
            "model.backbone.head_dim=8",
        ),
        small,
    )
    with pytest.raises(ValueError, match=r"different architectures.*different shapes"):
        merge("weighted", [a, small / "checkpoints" / "last.ckpt"], tmp_path / "x.safetensors")


def test_full_fine_tuning_starts_its_ema_from_the_base(tmp_path, base):
    run = tmp_path / "ft"
    module, _, _ = build(compose_train(run, f"base={base}", DIFFUSION), run)
    assert module.ema is not None  # the default task keeps one
    average = module.ema.average.state_dict()
    for name, value in module.networks.state_dict().items():
        assert torch.equal(average[name], value), name  # not the random initialisation


def test_dreambooth_lora_trains_only_the_adapter(tmp_path, base):
    _instance_dir(tmp_path)
    run = tmp_path / "db_lora"
    overrides = [
        *_recipe(tmp_path, base, "dreambooth", INSTANCE),
        "data.dataset.class_prompt=null",
        "lora=attn",
        DIFFUSION,
    ]
    module, _, _ = build(compose_train(run, *overrides, tiny=False), run)
    trainable = {n for n, p in module.networks.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    assert module.hparams.cond_drop_prob == 0.0  # the recipe's setting survives lora=


def test_class_images_top_up_the_users_own(tmp_path):
    class Fake(torch.nn.Module):  # a pipeline() whose generate() makes seeded images
        def pipeline(self):
            return self

        def generate(self, prompts, sampler, guidance_scale, seeds):
            return torch.stack([torch.full((3, 8, 8), s / 10 - 0.5) for s in seeds])

    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(3):  # the user's own photos, named as they like
        Image.new("RGB", (8, 8)).save(folder / f"my_dog_{i}.jpg")
    assert ensure_class_images(Fake(), folder, "a dog", 5, steps=1) == 2
    assert sorted(p.name for p in folder.glob("class_*")) == ["class_00000.png", "class_00001.png"]
    assert ensure_class_images(Fake(), folder, "a dog", 5, steps=1) == 0  # a re-run adds none
    assert ensure_class_images(Fake(), folder, "a dog", 6, steps=1) == 1
    assert (folder / "class_00002.png").exists() and len(list(folder.iterdir())) == 6


def test_lora_with_textual_inversion_trains_both(tmp_path, base):
    _instance_dir(tmp_path)
    run = tmp_path / "both"
    overrides = [
        *_recipe(tmp_path, base, "textual_inversion", "a photo of <ring>"),
        "textual_inversion.tokens=['<ring>']",
        "textual_inversion.init_words=[circle]",
        "lora=attn",
        "lora.targets=['*.to_q','*.to_v']",  # patterns from a Hydra list
        DIFFUSION,
    ]
    module, _, _ = build(compose_train(run, *overrides, tiny=False), run)
    trainable = {n for n, p in module.networks.named_parameters() if p.requires_grad}
    assert "conditioner.token_embedding.extra" in trainable
    assert {n for n in trainable if ".lora." in n} and all(
        ".lora." in n or n.endswith("token_embedding.extra") for n in trainable
    )
    assert module.networks.lora_settings["default"].targets == ("*.to_q", "*.to_v")


def test_merging_refuses_lora_checkpoints(tmp_path, base):
    state, carried = read_checkpoint(base)
    lora = {**state, "networks.denoiser.out.2.lora.default.down.weight": torch.zeros(4, 16)}
    save_safetensors(tmp_path / "lora.safetensors", lora, carried)
    with pytest.raises(ValueError, match=r"holds LoRA adapters.*method=bake"):
        merge("weighted", [base, tmp_path / "lora.safetensors"], tmp_path / "out.safetensors")
