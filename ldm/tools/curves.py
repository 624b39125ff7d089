"""Training curves from the CSV logs of runs: a plot per metric against the step, and a
markdown table of the sparse metrics (validation, FID, attributes) at each step they were
logged.

    python -m ldm.tools.curves runs=[outputs/shapes_vae,outputs/shapes_ldm] out=curves.png
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path


def read_metrics(run: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metric -> [(step, value), ...]`` from every ``metrics.csv`` under ``run``."""
    files = sorted(Path(run).glob("**/metrics.csv"))
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run} (train.py writes <run>/csv/...)")
    series: dict[str, list[tuple[int, float]]] = {}
    for file in files:
        with file.open(newline="") as handle:
            for row in csv.DictReader(handle):
                step = int(row["step"])
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None):
                        series.setdefault(key, []).append((step, float(value)))
    return {key: sorted(points) for key, points in series.items()}


def smooth(points: Sequence[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Means over consecutive ``window`` points (the dense train loss is noisy)."""
    if window <= 1:
        return list(points)
    return [
        (points[i + len(chunk) - 1][0], sum(v for _, v in chunk) / len(chunk))
        for i in range(0, len(points), window)
        if (chunk := points[i : i + window])
    ]


def table(runs: dict[str, dict[str, list[tuple[int, float]]]], keys: Sequence[str]) -> str:
    """Markdown: one row per (run, step) where any of ``keys`` was logged."""
    lines = ["| run | step | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for name, series in runs.items():
        values = {key: dict(series.get(key, [])) for key in keys}
        for step in sorted({s for key in keys for s in values[key]}):
            cells = [f"{values[key][step]:.4g}" if step in values[key] else "" for key in keys]
            lines.append(f"| {name} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    runs: dict[str, dict[str, list[tuple[int, float]]]],
    keys: Sequence[str],
    out: Path,
    window: int = 20,
) -> None:
    """One panel per metric that any run logged; the train loss smoothed over ``window``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in series for series in runs.values())]
    if not keys:
        raise ValueError("none of the runs logged any of the metrics asked for")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for name, series in runs.items():
            if key in series:
                points = smooth(series[key], window if key.startswith("train/") else 1)
                ax.plot(*zip(*points, strict=True), marker="" if len(points) > 30 else "o",
                        label=name)  # fmt: skip
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if "loss" in key and all(v > 0 for s in runs.values() for _, v in s.get(key, [])):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def report(
    runs: Sequence[str | Path],
    keys: Sequence[str],
    out: str | Path,
    window: int,
) -> None:
    """Plot ``keys`` of ``runs`` to ``out``; print the table of the sparse ones."""
    series = {str(run): read_metrics(run) for run in runs}
    plot(series, list(keys), Path(out), window)
    print(table(series, [k for k in keys if not k.startswith("train/")]))
    print(f"wrote {out}")


if __name__ == "__main__":  # the command line lives with the other tools' (ldm.app)
    from ldm.app.curves import main

    main()
