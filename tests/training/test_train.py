"""train.py and sample.py end to end on tiny settings: both stages, sampling, exact resume,
the NaN guard, SIGTERM, every config, a multirun, and DDP against one process."""

import json
import os
import signal

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from testutils import run_cli
from trainutils import CONF, ROOT, TINY, TINY_ANY_DATA, compose_train

from ldm.app.sample import load_model, sample
from ldm.app.train import build, train
from ldm.diffusion.samplers import make_sampler
from ldm.diffusion.schedules import make_schedule
from ldm.models.vae import AutoencoderKL
from ldm.pipeline import CONFIG_KEY, Pipeline, open_checkpoint
from ldm.training.checkpoints import load_checkpoint, load_vae

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


# The batch-independence checks of test_ldm_stage_and_sample compare PNG bytes across batch
# sizes. With channels-last-trained tiny VAE weights one pixel of a batch-3 decode rounded
# differently from batch 1 (MKL-DNN picks kernels by batch size; the images differ by at
# most 1/255), so this fixture trains the VAE in NCHW, as before the option existed.
VAE_EXTRA: list[str] = ["task.channels_last=false"]


@pytest.fixture(scope="module")
def vae_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("vae")
    train(compose_train(run, "task=vae", "task.discriminator.base_channels=8", *VAE_EXTRA), run)
    return run / "checkpoints" / "last.ckpt"


def test_vae_stage_runs_and_writes_what_it_should(vae_checkpoint):
    run = vae_checkpoint.parents[1]
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"last.ckpt", "step_000004.ckpt"}
    assert sorted(p.name for p in (run / "reconstructions").iterdir())[-1] == "step_000004.png"
    assert "val/rec_loss" in (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    state = load_checkpoint(vae_checkpoint)  # weights_only: nothing but tensors and values
    assert state["global_step"] == 4 and "task_name: vae" in state[CONFIG_KEY]
    vae = load_vae(vae_checkpoint)
    assert vae.config["base_channels"] == 16 and not vae.training


def test_vae_stage_with_the_discriminator(tmp_path):
    overrides = ["task.disc_start=2", "task.discriminator.base_channels=8"]
    cfg = compose_train(tmp_path, "task=vae", *overrides, "task.discriminator.layers=2")
    trainer = train(cfg, tmp_path)
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert {"train/d_loss", "train/g_loss", "train/d_weight"} <= set(header.split(","))
    assert trainer.global_step == 4  # two steps alone, then the discriminator too: 2 + 2 x 1


def test_vae_fine_tuning_from_a_base_trains_the_decoder_only(vae_checkpoint, tmp_path):
    overrides = [f"base={vae_checkpoint}", "task.train_encoder=false", "task.discriminator=null"]
    cfg = compose_train(tmp_path, "task=vae", *overrides, *VAE_EXTRA)
    base = load_vae(vae_checkpoint).state_dict()
    module, _, _ = build(cfg, tmp_path)
    assert all(torch.equal(v, base[k]) for k, v in module.vae.state_dict().items())
    train(cfg, tmp_path)
    tuned_file = tmp_path / "checkpoints" / "last.ckpt"
    tuned = load_vae(tuned_file).state_dict()
    encoder = [k for k in base if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(tuned[k], base[k]) for k in encoder)
    decoder = [k for k in base if k.startswith("decoder.")]
    assert sum(not torch.equal(tuned[k], base[k]) for k in decoder) > len(decoder) // 2

    # A diffusion model trained on the base VAE's latents decodes them with the new decoder.
    run = tmp_path / "ldm"
    train(compose_train(run, f"vae_checkpoint={vae_checkpoint}"), run)
    overrides = [f"checkpoint={run / 'checkpoints' / 'last.ckpt'}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain = load_model(compose("sample", overrides=overrides))
        swapped = load_model(compose("sample", overrides=[*overrides, f"vae={tuned_file}"]))
    assert swapped.vae.scale_factor == plain.vae.scale_factor is not None
    assert all(torch.equal(v, tuned[k]) for k, v in swapped.vae.state_dict().items())
    ddim = make_sampler("ddim", steps=2)
    latents = [p.generate(["a red circle"], ddim, decode=False) for p in (plain, swapped)]
    assert torch.equal(*latents)  # the same model and latents, decoded differently
    images = [p.generate(["a red circle"], ddim) for p in (plain, swapped)]
    assert not torch.equal(*images)


def test_a_replacement_vae_of_another_latent_space_is_refused():
    def vae(latent_channels):
        return AutoencoderKL(base_channels=32, channel_multipliers=[1, 2], blocks_per_level=1,
                             latent_channels=latent_channels, scale_factor=0.5)  # fmt: skip

    pipeline = Pipeline(torch.nn.Identity(), None, vae(4), make_schedule("linear"))
    with pytest.raises(ValueError, match="8-channel latents at f = 2; this model's are 4"):
        pipeline.swap_vae(vae(8))
    assert pipeline.swap_vae(vae(4)).vae.scale_factor == 0.5
    with pytest.raises(ValueError, match="no VAE to replace"):
        Pipeline(torch.nn.Identity(), None, None, make_schedule("linear")).swap_vae(vae(4))


def test_vae_base_of_another_shape_is_refused_naming_model_vae(vae_checkpoint, tmp_path):
    cfg = compose_train(tmp_path, "task=vae", f"base={vae_checkpoint}", "model.vae.base_channels=8")
    with pytest.raises(ValueError, match=r"shape mismatch.*match model/vae"):
        build(cfg, tmp_path)


def test_sample_from_a_stable_diffusion_single_file(tmp_path):
    from ldm.io import save_safetensors
    from ldm.models.unet import UNet

    unet = UNet(model_channels=32, channel_multipliers=[1], attention_levels=[0], context_dim=128)
    vae = AutoencoderKL(base_channels=32, channel_multipliers=[1, 2], blocks_per_level=1)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    save_safetensors(tmp_path / "sd.safetensors", state)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "sample",
            overrides=[
                f"checkpoint={tmp_path / 'sd.safetensors'}",
                "model/conditioner=text_tiny",
                "prompts=[a photo]",
                "num_per_prompt=1",
                "image_size=16",
                "sampler.steps=2",
            ],
        )
    paths = sample(cfg, tmp_path / "out")
    assert len(paths) == 1 and (tmp_path / "out" / "grid.png").is_file()
    # Without model/conditioner: the file's keys choose the text tower, or the error says how.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        bare = compose("sample", overrides=[f"checkpoint={tmp_path / 'sd.safetensors'}"])
    with pytest.raises(
        ValueError, match=r"holds no text encoder.*model/conditioner=openclip_vit_l"
    ):
        sample(bare, tmp_path / "bare")
    for prefix, preset in [
        ("transformer.text_model.", "openclip_vit_l"),
        ("model.", "openclip_vit_h"),
    ]:
        text = {f"cond_stage_model.{prefix}token_embedding.weight": torch.zeros(2, 2)}
        save_safetensors(tmp_path / "with_text.safetensors", state | text)
        assert open_checkpoint(tmp_path / "with_text.safetensors").text_encoder == preset


def test_ldm_stage_and_sample(vae_checkpoint, tmp_path):
    run = tmp_path / "ldm"
    cfg = compose_train(
        run, f"vae_checkpoint={vae_checkpoint}", "callbacks.samples.every_n_steps=2"
    )
    trainer = train(cfg, run)
    module = trainer.lightning_module
    assert module.vae.scale_factor is not None  # computed from the data
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [
        "step_000002.png",
        "step_000004.png",
    ]
    legend = json.loads((run / "samples" / "grid.json").read_text())
    assert legend["columns"] == [
        "ddpm 2 steps, spacing trailing seed 0",
        "ddim 2 steps, spacing trailing, eta 0.0 seed 0",
    ]

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        scfg = compose(
            "sample",
            overrides=[
                f"checkpoint={run / 'checkpoints' / 'last.ckpt'}",
                "prompts=[a red circle]",
                f"prompts_file={_prompts(tmp_path)}",
                "num_per_prompt=2",
                "sampler=dpmpp_2m",
                "sampler.steps=3",
                "batch_size=3",
            ],
        )
    paths = sample(scfg, tmp_path / "samples")
    assert len(paths) == 4 and (tmp_path / "samples" / "grid.png").is_file()
    settings = json.loads((tmp_path / "samples" / "settings.json").read_text())
    assert [i["seed"] for i in settings["images"]] == [0, 1, 0, 1]
    assert settings["images"][2]["prompt"] == "a blue square"
    # The same seed and prompt give the same image, whatever the batch around it.
    scfg.batch_size = 1
    again = sample(scfg, tmp_path / "again")
    for a, b in zip(paths, again, strict=True):
        assert a.read_bytes() == b.read_bytes()
    # Also with a stochastic sampler: each image's step noise is its own.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        scfg.sampler = compose("sample", overrides=["checkpoint=x", "sampler=ddpm"]).sampler
    scfg.sampler.steps, scfg.batch_size = 3, 3
    noisy = sample(scfg, tmp_path / "noisy")
    scfg.batch_size = 1
    noisy_again = sample(scfg, tmp_path / "noisy_again")
    for a, b in zip(noisy, noisy_again, strict=True):  # up to float rounding: 1 / 255
        pixels = [np.asarray(Image.open(p), dtype=np.int16) for p in (a, b)]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1


def test_flow_matching_trains_and_samples(vae_checkpoint, tmp_path):
    run = tmp_path / "flow"
    cfg = compose_train(
        run,
        f"vae_checkpoint={vae_checkpoint}",
        "diffusion=flow",
        "diffusion.schedule.shift=2.0",
        "sampler=flow_heun",
        "sampler.steps=2",
        "callbacks.samples.every_n_steps=4",
    )
    module = train(cfg, run).lightning_module
    assert module.schedule.shift == 2.0 and module.hparams.timestep_sampling == "logit_normal"
    legend = json.loads((run / "samples" / "grid.json").read_text())
    assert legend["columns"][-1].startswith("flow_heun 2 steps")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        checkpoint = f"checkpoint={run / 'checkpoints' / 'last.ckpt'}"
        overrides = [checkpoint, "prompts=[a red circle]", "sampler=flow_euler", "sampler.steps=3"]
        scfg = compose("sample", overrides=overrides)
        bf16 = compose("sample", overrides=[*overrides, "precision=bf16"])
        compiled = compose("sample", overrides=[*overrides, "compile=true"])
    pipeline = load_model(scfg)
    assert pipeline.prediction == "flow" and pipeline.schedule.shift == 2.0  # from the checkpoint
    fp32 = sample(scfg, tmp_path / "samples")
    assert len(fp32) == scfg.num_per_prompt
    assert load_model(bf16).dtype == torch.bfloat16  # and it samples like fp32, within bf16
    pairs = zip(fp32, sample(bf16, tmp_path / "bf16"), strict=True)
    pixels = [[np.asarray(Image.open(p), dtype=np.int16) for p in pair] for pair in pairs]
    assert np.mean([np.abs(a - b).mean() for a, b in pixels]) < 8
    assert load_model(compiled).denoiser._compiled_call_impl is not None  # compiles at first use


def test_edm_trains_and_samples(vae_checkpoint, tmp_path):
    run = tmp_path / "edm"
    cfg = compose_train(
        run, f"vae_checkpoint={vae_checkpoint}", "diffusion=edm", "sampler=heun", "sampler.steps=2"
    )
    module = train(cfg, run).lightning_module
    assert module.hparams.prediction == "edm" and module.hparams.timestep_sampling == "log_normal"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        checkpoint = f"checkpoint={run / 'checkpoints' / 'last.ckpt'}"
        scfg = compose("sample", overrides=[checkpoint, "prompts=[a red circle]", "sampler=heun"])
    pipeline = load_model(scfg)
    assert pipeline.schedule.sigma_max == 80.0 and pipeline.prediction == "edm"
    assert len(sample(scfg, tmp_path / "samples")) == scfg.num_per_prompt


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a blue square\n\n")
    return path


def test_latent_cache_brings_its_vae(vae_checkpoint, tmp_path):
    from ldm.data.builtin import ShapesDataset
    from ldm.data.latents import cache_latents

    vae = load_vae(vae_checkpoint)
    for split in ("train", "val"):
        data = ShapesDataset(split, size=16, num_samples=[16, 8, 8])
        cache_latents(data, vae, tmp_path / "cache" / split, vae_source=str(vae_checkpoint))
    overrides = ["data=latents", f"data.dataset.root={tmp_path / 'cache'}"]
    cfg = compose_train(tmp_path / "run", *TINY_ANY_DATA, *overrides, tiny=False)
    module, _, _ = build(cfg, tmp_path / "run")
    assert torch.equal(module.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    other = tmp_path / "other.ckpt"
    state = load_checkpoint(vae_checkpoint)
    state["state_dict"]["vae.decoder.conv_out.bias"] += 1
    torch.save(state, other)
    with pytest.raises(ValueError, match="is not the VAE that made the latent cache"):
        overrides.append(f"vae_checkpoint={other}")
        build(compose_train(tmp_path / "run", *TINY_ANY_DATA, *overrides, tiny=False), tmp_path)


def _weights(path):
    state = load_checkpoint(path)
    return state, {
        k: v for k, v in state["state_dict"].items() if k.startswith(("networks.", "ema."))
    }


class _Signal(L.Callback):
    """Sends this process SIGTERM at one step, as a cluster would."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_resume_after_sigterm_is_exact(vae_checkpoint, tmp_path):
    # 64 samples / batch 4 = 16 batches an epoch: 20 steps cross an epoch boundary, and the
    # interruption at step 7 falls mid-epoch.
    common = [
        f"vae_checkpoint={vae_checkpoint}",
        "trainer.max_steps=20",
        "trainer.val_check_interval=5",
        "task.lr_scheduler.total_steps=20",
        "callbacks.checkpoint.every_n_train_steps=5",
    ]
    train(compose_train(tmp_path / "whole", *common), tmp_path / "whole")
    cut = tmp_path / "cut"
    cfg = compose_train(cut, *common)
    module, data, trainer = build(cfg, cut)
    trainer.callbacks.append(_Signal(7))
    with pytest.raises(SIGTERMException):  # Lightning's reaction: stop before step 8
        trainer.fit(module, datamodule=data)
    assert (
        trainer.global_step == 7
        and load_checkpoint(cut / "checkpoints" / "last.ckpt")["global_step"] == 7
    )
    train(compose_train(cut, *common, "resume=auto"), cut)

    whole, whole_weights = _weights(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    resumed, resumed_weights = _weights(cut / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == whole["global_step"] == 20
    assert whole_weights.keys() == resumed_weights.keys() and any(
        k.startswith("ema.") for k in whole_weights
    )
    for key, value in whole_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=0, atol=1e-6, msg=key)
    lr = [s["_last_lr"] for s in (whole["lr_schedulers"][0], resumed["lr_schedulers"][0])]
    assert lr[0] == lr[1]


class _Poison(L.Callback):
    """Turns one batch's images into NaN."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["image"].fill_(float("nan"))


def test_nan_guard_stops_and_leaves_a_resumable_checkpoint(vae_checkpoint, tmp_path):
    cfg = compose_train(tmp_path, f"vae_checkpoint={vae_checkpoint}", "trainer.max_steps=8")
    module, data, trainer = build(cfg, tmp_path)
    trainer.callbacks.append(_Poison(5))
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite loss nan.* at step 5.*last good checkpoint is .*last.ckpt",
    ):
        trainer.fit(module, datamodule=data)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 4
    assert all(
        torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point()
    )
    trainer = train(
        compose_train(tmp_path, f"vae_checkpoint={vae_checkpoint}", "trainer.max_steps=8"), tmp_path
    )
    assert trainer.global_step == 8


# These start from a trained model and the user's images (base=, instance_dir=, prompts):
# tests/training/test_recipes.py builds and trains them with those given.
RECIPES = {"dreambooth", "textual_inversion"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_builds(experiment, tmp_path):
    cfg = compose_train(tmp_path, f"experiment={experiment}", tiny=False)
    if experiment in RECIPES:  # without its inputs a recipe stops, naming what is missing
        with pytest.raises(OmegaConfBaseException, match="Missing mandatory value: "):
            build(cfg, tmp_path)
        return
    module, data, trainer = build(cfg, tmp_path)
    assert isinstance(module, L.LightningModule) and isinstance(trainer, L.Trainer)
    assert data.dataset("train")[0]["image"].ndim == 3


@pytest.mark.parametrize(
    "override",
    [
        "trainer=ddp_cpu",
        "logger=tensorboard",
        "logger=wandb",
        "task=vae",
        "data=digits",
        "data=photos",
    ],
)
def test_config_options_build(override, tmp_path):
    if override.startswith("data="):  # the tiny shapes settings do not apply
        cfg = compose_train(tmp_path, *TINY_ANY_DATA, override, "data.dataset.size=16", tiny=False)
    else:
        cfg = compose_train(tmp_path, override)
    *_, trainer = build(cfg, tmp_path)
    assert trainer.max_steps == 4
    if override == "logger=wandb":
        assert trainer.loggers[1]._offline  # no account here: offline


def test_wandb_runs_offline_without_an_account(tmp_path):
    trainer = train(
        compose_train(tmp_path, "task=vae", "logger=wandb", "trainer.max_steps=2"), tmp_path
    )
    assert trainer.loggers[1]._offline
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").is_file()  # CSV always


def test_slurm_launcher_config_composes(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.signal_delay_s == 90


@pytest.mark.parametrize("trainer", ["gpu", "ddp", "fsdp"], ids=lambda t: f"trainer-{t}")
def test_gpu_trainer_configs_compose(trainer, tmp_path):
    cfg = compose_train(tmp_path, f"trainer={trainer}")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"


def _run_cli(tmp_path, *args, timeout=300):
    env = {
        **os.environ,
        "LDM_OUTPUT_DIR": str(tmp_path),
        "WANDB_MODE": "offline",
        "PYTHONWARNINGS": "ignore",
    }
    flags = [a for a in args if a.startswith("-")]  # -m first: Hydra's flags precede overrides
    overrides = [a for a in args if not a.startswith("-")]
    command = [str(ROOT / "train.py"), *flags, *TINY, *overrides]
    fork = "trainer=ddp_cpu" not in args
    done = run_cli(command, cwd=tmp_path, env=env, timeout=timeout, fork=fork)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_multirun_makes_one_directory_per_run(tmp_path):
    _run_cli(
        tmp_path,
        "-m",
        "name=sweep",
        "task=vae",
        "trainer.max_steps=3",
        "task.optimizer.lr=1e-3,2e-3",
    )
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    for run, lr in zip(runs, ("0.001", "0.002"), strict=True):
        # Saved every 2 steps, and at the end: the final step is never lost.
        assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 3
        assert f"task.optimizer.lr={lr}" in (run / ".hydra" / "overrides.yaml").read_text()
        assert f"lr: {lr}" in (run / ".hydra" / "config.yaml").read_text()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(vae_checkpoint, tmp_path):
    common = [
        f"vae_checkpoint={vae_checkpoint}",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "task.ema_decay=null",
        "trainer.gradient_clip_val=null",
    ]
    _run_cli(tmp_path, "name=single", "data.batch_size=8", *common)
    _run_cli(tmp_path, "name=ddp", "trainer=ddp_cpu", "data.batch_size=4", *common)
    _, single = _weights(tmp_path / "single" / "checkpoints" / "last.ckpt")
    _, ddp = _weights(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-5, msg=key)
