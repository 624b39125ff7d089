"""``evaluate.py audit=shapes|clip``: the bias audit of a checkpoint (ldm.metrics.audit) at
each sampler configuration of the grid: a table, a bar chart and sample images per point."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image

from ldm.app.sample import load_model
from ldm.data.builtin import ShapesDataset
from ldm.metrics.attributes import shapes_judge
from ldm.metrics.audit import (
    ZeroShotLabeller,
    audit_prompts,
    compare,
    generated_counts,
    labelled_reference,
    markdown,
    shapes_reference,
    write_audit,
)
from ldm.metrics.sweep import GridPoint, grid_points
from ldm.pipeline import Pipeline, step_generators
from ldm.seeding import stable_seed

KEEP = 8  # sample images per prompt in <name>_samples.png


def audit(cfg: DictConfig, out_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Audit every grid point (repeat 0); rank 0 writes ``audit[_<point>].{md,json,png}`` and
    ``..._samples.png`` into ``out_dir``. Returns the rows per point label."""
    settings = cfg.audit
    shapes = settings.labeller == "shapes"
    prompts = audit_prompts(OmegaConf.to_container(settings.prompts, resolve=True), shapes)
    fabric = L.Fabric(**cfg.fabric)
    fabric.launch()
    pipeline = load_model(cfg).to(fabric.device)
    if getattr(pipeline.conditioner, "input_key", None) != "caption":
        raise ValueError(
            "audit needs a caption-conditioned model: its prompts leave attributes unspecified"
        )
    data = instantiate(cfg.data)
    train = data.dataset(settings.split)
    if shapes:
        if not isinstance(train, ShapesDataset):
            raise ValueError("audit=shapes needs data=shapes; for other data use audit=clip")
        labeller = shapes_judge(
            pipeline.image_size[0], cfg.cache_dir, **(cfg.get("attribute_classifier") or {})
        ).classifier.to(fabric.device)
        reference = shapes_reference(prompts, train)
    elif settings.labeller == "clip":
        clip = instantiate(settings.clip, _convert_="all").to(fabric.device)
        attributes = OmegaConf.to_container(settings.attributes, resolve=True)
        labeller = ZeroShotLabeller(clip, attributes, settings.template)
        reference = labelled_reference(
            prompts, train, labeller, settings.reference_count, cfg.batch_size
        )
    else:
        raise ValueError(f"audit.labeller={settings.labeller!r}: use shapes or clip")
    points = grid_points(OmegaConf.to_container(cfg.grid, resolve=True))
    meta = OmegaConf.to_container(cfg, resolve=True) | {"world_size": fabric.world_size}
    results = {}
    for point in points:
        counts, kept = generated_counts(
            _generator(pipeline, point, cfg.seed),
            prompts,
            labeller,
            settings.samples_per_prompt,
            cfg.batch_size,
            fabric.global_rank,
            fabric.world_size,
            keep=KEEP,
        )
        counts = fabric.all_reduce(counts.to(fabric.device), reduce_op="sum").cpu()
        rows = compare(prompts, counts, reference, labeller.attributes)
        results[point.label] = rows
        if fabric.global_rank == 0:
            name = "audit" if len(points) == 1 else f"audit_{point.slug}"
            about = meta | {"label": f"{point.label}, {point.steps} steps"}
            paths = write_audit(rows, out_dir, name, about)
            grid = make_grid(torch.cat(kept).float() / 255, nrow=max(map(len, kept)), padding=1)
            save_image(grid, Path(out_dir) / f"{name}_samples.png")
            print(f"{about['label']}:\n{markdown(rows)}")
            print(f"wrote {', '.join(str(p) for p in paths.values())} (rows of samples: prompts)")
    return results


def _generator(
    pipeline: Pipeline, point: GridPoint, seed: int
) -> Callable[[list[str], list[int]], torch.Tensor]:
    """``generate(captions, indices)`` at ``point``: sample i of a prompt starts from noise
    seeded by (seed, prompt, i), its step noise from a generator of its own."""
    sampler, device = point.make_sampler(), pipeline.device

    def generate(captions: list[str], indices: list[int]) -> torch.Tensor:
        seeds = [stable_seed(seed, "audit", captions[0], i) for i in indices]
        with torch.no_grad():
            return pipeline.generate(
                captions,
                sampler,
                guidance_scale=point.guidance,
                seeds=seeds,
                generator=step_generators(seeds, device),
            )

    return generate
