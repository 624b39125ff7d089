"""The body of ``study.py`` / ``python -m ldm.study``: every sampler against the exact
denoiser of analytic data (ldm.studies.analytic)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm.app import CONFIG_PATH, reported
from ldm.studies.analytic import (
    markdown_table,
    plot_error_vs_nfe,
    plot_samples,
    run_study,
    write_results,
)


def study(cfg: DictConfig, out_dir: str | Path) -> None:
    """Run every sampler x step count on the analytic data; write tables and plots."""
    out_dir = Path(out_dir)
    unused = sorted(set(cfg.sampler_options) - set(cfg.samplers))
    if unused:
        raise ValueError(
            f"sampler_options given for {unused}, which samplers={list(cfg.samplers)} does not "
            "run; add them to samplers or drop their options"
        )
    data = instantiate(cfg.data)
    schedule = instantiate(cfg.diffusion.schedule)
    rows, samples = run_study(
        data,
        schedule,
        cfg.diffusion.prediction,
        {name: dict(cfg.sampler_options.get(name, {})) for name in cfg.samplers},
        list(cfg.steps),
        cfg.num_samples,
        cfg.seed,
        cfg.get("guidance"),
    )
    paths = write_results(rows, out_dir, meta=OmegaConf.to_container(cfg, resolve=True))
    plot_samples(samples, data, out_dir / "samples.png")
    plot_error_vs_nfe(rows, out_dir / "error_vs_nfe.png")
    print(markdown_table(rows))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    print(f"plots {out_dir / 'samples.png'}, {out_dir / 'error_vs_nfe.png'}")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="study")
@reported()  # a bad weights file: one line naming it, no traceback
def main(cfg: DictConfig) -> None:
    """``python -m ldm.study``: the sampler study on analytic data (conf/study.yaml)."""
    study(cfg, HydraConfig.get().runtime.output_dir)
