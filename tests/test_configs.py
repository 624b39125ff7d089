"""Every config in conf/ composes and instantiates."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.diffusion.analytic import GaussianMixture
from ldm.diffusion.objective import LOSS_WEIGHTINGS, PREDICTIONS
from ldm.diffusion.samplers import SAMPLERS
from ldm.diffusion.schedules import Schedule, make_schedule

CONF = Path(__file__).resolve().parents[1] / "conf"
PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUP_OPTIONS = sorted(
    (str(p.parent.relative_to(CONF)), p.stem)
    for p in CONF.rglob("*/*.yaml")
    # hydra/ plugs into Hydra itself; experiment/ needs train.yaml around it (both are
    # composed and built in tests/training).
    if p.relative_to(CONF).parts[0] not in ("hydra", "experiment")
)


def _compose(name, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_there_is_something_to_test():
    assert PRIMARY and GROUP_OPTIONS
    assert {"diffusion", "sampler"} <= {group for group, _ in GROUP_OPTIONS}


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_config_composes(name):
    cfg = _compose(name)
    if name == "study":
        assert isinstance(instantiate(cfg.data), GaussianMixture)
        assert isinstance(instantiate(cfg.diffusion.schedule), Schedule)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=lambda v: str(v))
def test_group_option_instantiates(group, option):
    cfg = _compose(None, [f"+{group}={option}"])
    node = cfg
    for part in group.split("/"):
        node = node[part]
    if group == "diffusion":
        schedule = instantiate(node.schedule)
        assert isinstance(schedule, Schedule)
        assert node.prediction in PREDICTIONS and node.loss_weighting in LOSS_WEIGHTINGS
    elif group == "sampler":
        sampler = instantiate(node, steps=3)
        schedule = make_schedule("linear")
        data = GaussianMixture.ring()
        out = sampler(data.denoiser(schedule, "eps"), torch.randn(8, 2), schedule, prediction="eps")
        assert out.shape == (8, 2) and bool(torch.isfinite(out).all())
    else:  # groups added later are checked by their own tests; here they must compose
        assert node is not None


def test_every_registered_sampler_has_a_config():
    """sample.py sampler=NAME and the HTTP service read them."""
    assert {p.stem for p in (CONF / "sampler").glob("*.yaml")} == set(SAMPLERS)


@pytest.mark.parametrize("sampler", sorted(p.stem for p in (CONF / "sampler").glob("*.yaml")))
def test_every_sampler_takes_the_spacing_options(sampler):
    # Listed in every file, so plain overrides work (no "+").
    overrides = [f"sampler={sampler}", "sampler.spacing=leading", "sampler.offset=1"]
    cfg = _compose("sample", ["checkpoint=x", *overrides])
    instantiate(cfg.sampler)
    assert cfg.sampler.rho == 7.0


def test_slurm_jobs_ask_for_the_trainers_nodes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            ["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher.nodes == 2
