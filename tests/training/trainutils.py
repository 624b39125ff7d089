"""Helpers of the training tests: train.py's config composed in-process, tiny settings."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

# Everything small: 64 training shapes at 16 px, batches of 4, few steps, 2 sampling steps.
TINY_SHAPES = ["data.dataset.size=16", "data.dataset.num_samples=[64,8,8]"]
TINY = [
    *TINY_SHAPES,
    "data.batch_size=4",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "callbacks.progress=null",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.samples.every_n_steps=1000",
    "callbacks.samples.prompts=[a red circle,a blue square]",
    "callbacks.samples.seeds=[0]",
    "callbacks.samples.samplers.0.steps=2",
    "sampler.steps=2",
    "model.vae.base_channels=16",
    "model.vae.norm_groups=8",
    "model.backbone.model_channels=16",
    "model.backbone.head_dim=16",
    "model.backbone.norm_groups=8",
    "model.backbone.context_dim=32",
    "model.conditioner.width=32",
    "model.conditioner.depth=1",
    "model.conditioner.heads=2",
    "model.conditioner.max_length=16",
]


def compose_train(run_dir: Path, *overrides: str, tiny: bool = True) -> DictConfig:
    """train.yaml composed as train.py would, with ``${hydra:runtime.output_dir}`` = run_dir."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train", overrides=[*(TINY if tiny else []), *overrides], return_hydra_config=True
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


TINY_ANY_DATA = [o for o in TINY if o not in TINY_SHAPES]  # for data sources other than shapes
