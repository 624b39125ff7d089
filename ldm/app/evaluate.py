"""The body of ``evaluate.py``: a checkpoint, a held-out split and a grid of sampler
settings in; FID / KID / IS (/ CLIP score) per grid point out, on 1 or N processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm.app import CONFIG_PATH, reported
from ldm.app.sample import load_model, use_posthoc_ema
from ldm.io import weights_digest
from ldm.metrics.attributes import headline
from ldm.metrics.results import markdown_table, summarize, write_results
from ldm.metrics.sweep import GridPoint, build_evaluator, grid_points
from ldm.pipeline import open_checkpoint


def evaluate(cfg: DictConfig, out_dir: str | Path) -> list[dict[str, Any]]:
    """Score every grid point x repeat; rank 0 writes results.{csv,json,md} and
    fid_vs_nfe.png into ``out_dir``. Returns the per-run rows."""
    fabric = L.Fabric(**cfg.fabric)
    fabric.launch()
    checkpoint = open_checkpoint(cfg.checkpoint)
    pipeline = load_model(cfg, checkpoint).to(fabric.device)
    evaluator, reference = build_evaluator(
        instantiate(cfg.data),
        cfg.split,
        image_size=pipeline.image_size[0],
        conditioner=pipeline.conditioner,
        extractor=cfg.extractor,
        num_samples=cfg.num_samples,
        cache_dir=cfg.cache_dir,
        reference_count=cfg.reference_count,
        reference_stats=cfg.reference_stats,
        attributes=cfg.attributes,
        attribute_classifier=cfg.get("attribute_classifier"),
        device=fabric.device,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        kid_subset_size=cfg.kid_subset_size,
        pr_k=cfg.get("precision_recall_k"),
        bootstrap=cfg.get("bootstrap"),
        sample_dir=Path(out_dir) / "samples" if cfg.get("save_samples") else None,
        clip=instantiate(cfg.clip, _convert_="all").to(fabric.device) if cfg.clip else None,
    )
    if fabric.global_rank == 0:  # what the scores are against, before any is made
        for name, network in reference["networks"].items():
            if "extracted" in network:
                how = "extracted" if network.pop("extracted") else "reused from the cache"
                print(f"reference statistics ({name}): {how} ({reference['count']} samples)")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "provenance.json").write_text(json.dumps(reference, indent=2, default=str))
    # The weights scored, not only their path: a checkpoint trained again in the same place
    # must not be resumed into another's results.
    vae = {"vae": pipeline.vae} if pipeline.vae is not None else {}
    weights = weights_digest({**pipeline.networks(), **vae})
    meta = OmegaConf.to_container(cfg, resolve=True) | {
        "world_size": fabric.world_size,
        "weights_sha256": weights,
    }
    # Our checkpoints carry their own diffusion settings: the config's are not used.
    unused = {"diffusion"} if checkpoint.format == "ours" else set()
    rows = previous_runs(out_dir, meta, unused) if cfg.get("resume", True) else []
    done = {(GridPoint.from_row(row).key, row["repeat"]) for row in rows}
    if rows and fabric.global_rank == 0:
        print(f"resuming: {len(rows)} runs already in {out_dir}/results.json", flush=True)
    points = grid_points(OmegaConf.to_container(cfg.grid, resolve=True))
    checkpoint_weights = None
    if any(p.ema is not None for p in points):
        if cfg.get("posthoc_ema") is not None:  # its rows would be labelled as the checkpoint's
            raise ValueError(
                f"posthoc_ema={cfg.posthoc_ema} and grid.ema both choose post-hoc EMA lengths: "
                "give them in grid.ema only (null there: the checkpoint's own weights)"
            )
        if cfg.get("adapters") and cfg.get("adapters_merge"):  # the merge would be overwritten
            raise ValueError("grid.ema needs the adapters unmerged: set adapters_merge=false")
        checkpoint_weights = _weights(pipeline)
    loaded = None  # the post-hoc EMA length in the networks; None: the checkpoint's
    for point in points:
        for repeat in range(cfg.repeats):
            if (point.key, repeat) in done:
                continue
            if point.ema != loaded:
                if point.ema is None:
                    for name, network in pipeline.networks().items():
                        network.load_state_dict(checkpoint_weights[name])
                else:
                    use_posthoc_ema(pipeline, cfg, point.ema)
                loaded = point.ema
            row = evaluator.score(pipeline, point, repeat)
            rows.append(row)
            if fabric.global_rank == 0:
                what = f"{point.label}, {point.steps} steps, repeat {repeat}"
                print(f"{what}: {headline(row)} (NFE {row['nfe']:.0f})", flush=True)
                write_results(rows, out_dir, meta)  # after every row: nothing lost
    if fabric.global_rank == 0:
        paths = write_results(rows, out_dir, meta)
        print(markdown_table(summarize(rows)))
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return rows


def _weights(pipeline: Any) -> dict[str, dict[str, Any]]:
    return {
        name: {k: v.detach().clone() for k, v in network.state_dict().items()}
        for name, network in pipeline.networks().items()
    }


# What a run's scores depend on besides its grid point and repeat; the grid, the repeats and
# where and how fast the work is done may change between a run and its resumption.
_FREE_KEYS = {
    "grid",
    "repeats",
    "resume",
    "fabric",
    "world_size",
    "device",
    "batch_size",
    "compile",
}


def previous_runs(
    out_dir: str | Path, meta: dict[str, Any], unused: set[str] = frozenset()
) -> list[dict[str, Any]]:
    """The runs an earlier evaluation left in ``out_dir/results.json``, when its settings
    (but the ``unused`` ones) match ``meta`` (every sample's noise follows from the seed, so
    they are the runs this one would make); none when there is no such file. Refuses a file
    made with other settings."""
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    old, new = saved.get("meta", {}), json.loads(json.dumps(meta, default=str))
    keys = (old.keys() | new.keys()) - _FREE_KEYS - unused
    differ = sorted(k for k in keys if old.get(k) != new.get(k))
    if differ:
        raise ValueError(
            f"{path} was written with other settings ({', '.join(differ)}): its runs are not "
            "this evaluation's. Evaluate into another hydra.run.dir, or pass resume=false to "
            "start over there."
        )
    return list(saved.get("runs", []))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
@reported(ValueError)  # bad settings or weights file: one line naming it, no traceback
def main(cfg: DictConfig) -> None:
    """``python -m ldm.evaluate``: score a checkpoint over a sampler grid (conf/evaluate.yaml),
    or audit it for bias (``audit=shapes|clip``)."""
    if cfg.get("audit"):
        from ldm.app.audit import audit

        audit(cfg, HydraConfig.get().runtime.output_dir)
    else:
        evaluate(cfg, HydraConfig.get().runtime.output_dir)
