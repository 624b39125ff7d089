"""Sampler study on analytic data: every sampler at several step counts, scored exactly.

The data is a 2-D Gaussian mixture whose optimal denoiser is known in closed form
(``ldm.diffusion.analytic``), so every error in the table comes from the sampler and the
schedule, none from a network. Scores against the true distribution:

* ``frechet``: Fréchet distance between the samples' mean / covariance and the mixture's
  exact ones (the formula behind FID, in 2-D);
* ``sliced_w1``: sliced 1-Wasserstein distance to a fresh sample of the true mixture
  (sees the modes, not just two moments); the ``reference`` row is the same distance
  between two true samples: the noise floor for this sample size;
* ``mode_tv``: total variation between the mass each component receives and its weight;
* ``spread``: mean squared distance of samples to their component's mean, over its exact
  value (1 is right; below 1 the sampler under-disperses).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldm.diffusion.analytic import GaussianMixture
from ldm.diffusion.guidance import cfg
from ldm.diffusion.samplers import make_sampler
from ldm.diffusion.schedules import Schedule


@dataclass(frozen=True)
class StudyRow:
    sampler: str
    steps: int
    nfe: int  # network (here: exact denoiser) evaluations
    frechet: float
    sliced_w1: float
    mode_tv: float
    spread: float
    seconds: float


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """``|m1 - m2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)`` in float64."""
    root1 = _sqrtm_psd(cov1.double())
    cross = _sqrtm_psd(root1 @ cov2.double() @ root1)
    value = (mean1 - mean2).double().pow(2).sum() + torch.trace(cov1 + cov2 - 2 * cross)
    return float(value)


def sliced_w1(x: Tensor, y: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Mean over random directions of the 1-D Wasserstein-1 distance (equal sample sizes)."""
    if x.shape != y.shape:
        raise ValueError(f"sliced_w1 needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    px, _ = (x.double() @ directions).sort(dim=0)
    py, _ = (y.double() @ directions).sort(dim=0)
    return float((px - py).abs().mean())


def score(samples: Tensor, data: GaussianMixture, reference: Tensor) -> dict[str, float]:
    """The study's metrics for ``samples`` (N, D) against the mixture and a true sample."""
    x = samples.double()
    resp = data.responsibilities(x)  # (N, K)
    sq_dist = ((x[:, None, :] - data.means[None]) ** 2).sum(-1)  # (N, K)
    expected_sq = (data.stds**2).sum(-1)  # (K,)
    return {
        "frechet": frechet_distance(x.mean(0), torch.cov(x.T), data.mean(), data.covariance()),
        "sliced_w1": sliced_w1(x, reference),
        "mode_tv": float(0.5 * (resp.mean(0) - data.weights).abs().sum()),
        "spread": float((resp * sq_dist).sum() / (resp * expected_sq).sum()),
    }


def run_study(
    data: GaussianMixture,
    schedule: Schedule,
    prediction: str,
    samplers: Mapping[str, Mapping],
    steps: Sequence[int],
    num_samples: int,
    seed: int = 0,
    guidance: float | None = None,
) -> tuple[list[StudyRow], dict[str, Tensor]]:
    """Run every sampler at every step count from the same noise; return rows and samples.
    ``guidance``: class-conditional sampling instead, each sample's class (component)
    drawn with the mixture's weights, under classifier-free guidance at that scale (1: the
    conditional denoiser alone); the scores stay against the whole mixture, as FID of
    prompted samples is against the data the prompts describe."""
    g = torch.Generator().manual_seed(seed)
    reference = data.sample(num_samples, g)
    x_T = torch.randn(num_samples, data.dim, generator=g, dtype=torch.float64)
    exact = data.denoiser(schedule, prediction)
    if guidance is not None:  # classes from their own stream: x_T stays the unguided one's
        classes = torch.Generator().manual_seed(seed + 2)
        labels = torch.multinomial(data.weights, num_samples, replacement=True, generator=classes)
        exact = cfg(exact, labels, torch.tensor([-1]), guidance)
    floor = score(data.sample(num_samples, g), data, reference)
    rows = [StudyRow("reference", 0, 0, seconds=0.0, **floor)]
    samples: dict[str, Tensor] = {}
    for name, options in samplers.items():
        for n in steps:
            calls = 0

            def model(x: Tensor, t: Tensor) -> Tensor:
                nonlocal calls
                calls += 1
                return exact(x, t)

            sampler = make_sampler(name, **{**options, "steps": n})
            start = time.perf_counter()
            out = sampler(
                model,
                x_T,
                schedule,
                prediction=prediction,
                generator=torch.Generator().manual_seed(seed + 1),
            )
            seconds = time.perf_counter() - start
            rows.append(StudyRow(name, n, calls, seconds=seconds, **score(out, data, reference)))
            samples[f"{name}/{n}"] = out
    return rows, samples


def markdown_table(rows: Sequence[StudyRow]) -> str:
    """The rows as a GitHub-flavoured Markdown table."""
    header = "| sampler | steps | NFE | Fréchet | sliced W1 | mode TV | spread | seconds |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.sampler} | {r.steps} | {r.nfe} | {r.frechet:.2e} | {r.sliced_w1:.4f} | "
            f"{r.mode_tv:.4f} | {r.spread:.3f} | {r.seconds:.2f} |"
        )
    return "\n".join(lines)


def write_results(rows: Sequence[StudyRow], out_dir: Path, meta: Mapping) -> dict[str, Path]:
    """Write ``results.csv``, ``results.json`` and ``results.md``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"results.{kind}" for kind in ("csv", "json", "md")}
    records = [asdict(r) for r in rows]
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    paths["json"].write_text(json.dumps({"settings": meta, "rows": records}, indent=2))
    paths["md"].write_text(markdown_table(rows) + "\n")
    return paths


def plot_samples(
    samples: Mapping[str, Tensor], data: GaussianMixture, path: Path, max_points: int = 2000
) -> None:
    """A grid of scatter plots, one row per sampler, one column per step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(key.split("/")[0] for key in samples))
    steps = list(dict.fromkeys(int(key.split("/")[1]) for key in samples))
    fig, axes = plt.subplots(
        len(names), len(steps), figsize=(1.9 * len(steps), 1.9 * len(names)), squeeze=False
    )
    radius = float((data.means.norm(dim=1) + 3 * data.stds.max(dim=1).values).max())
    angles = torch.linspace(0, 2 * math.pi, 64)
    for i, name in enumerate(names):
        for j, n in enumerate(steps):
            ax = axes[i][j]
            pts = samples[f"{name}/{n}"][:max_points].double()
            ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.5, color="tab:blue", rasterized=True)
            for mean, std in zip(data.means, data.stds, strict=True):  # 2-sigma ellipses
                ax.plot(
                    mean[0] + 2 * std[0] * angles.cos(),
                    mean[1] + 2 * std[1] * angles.sin(),
                    color="tab:red",
                    lw=0.6,
                )
            ax.set_xlim(-radius, radius)
            ax.set_ylim(-radius, radius)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{n} steps", fontsize=9)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle("samples (blue) vs true components (red: 2 sigma)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_error_vs_nfe(rows: Sequence[StudyRow], path: Path) -> None:
    """Sliced W1 against network evaluations, one line per sampler, noise floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r.sampler for r in rows if r.sampler != "reference"):
        mine = [r for r in rows if r.sampler == name]
        ax.plot([r.nfe for r in mine], [r.sliced_w1 for r in mine], marker="o", ms=3, label=name)
    floor = [r.sliced_w1 for r in rows if r.sampler == "reference"]
    if floor:
        ax.axhline(floor[0], color="grey", ls="--", lw=1, label="two true samples")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("sliced W1 to the true distribution")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
