"""The results of a sweep: one summary row per grid point (mean, sd and min over repeats
for every metric column), the markdown table, the plots, and the files evaluate.py writes."""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ldm.io import atomic_write
from ldm.metrics.attributes import RESULT_KEYS as ATTRIBUTE_KEYS
from ldm.metrics.sweep import GridPoint

# Not metrics: what a run was, not what it scored.
RUN_KEYS = {"sampler", "steps", "guidance", "spacing", "eta", "options", "ema", "repeat", "n"}
RUN_KEYS |= {"nfe"}
RUN_KEYS |= {"seconds_per_image", "n_real", "n_fake"}
# Spreads already: no spread or min over repeats of these.
NO_SPREAD = re.compile(r"^(kid_std|is_std)")
# A run's own 95% interval: kept per run, and in the summary only with one repeat.
INTERVAL = re.compile(r"_ci_(low|high)$")


def metric_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metric columns the runs carry, in first-seen order (legacy names, then each
    network's, then CLIP score and attributes)."""
    keys = dict.fromkeys(k for row in rows for k in row if k not in RUN_KEYS)
    return [k for k in keys if all(isinstance(r.get(k, 0.0), int | float) for r in rows)]


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per grid point: metrics averaged over repeats, with their spread."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(GridPoint.from_row(row).key, []).append(row)
    out = []
    for members in groups.values():
        row = GridPoint.from_row(members[0]).row | {k: members[0][k] for k in ("n", "nfe")}
        row["repeats"] = len(members)
        row["seconds_per_image"] = statistics.fmean(m["seconds_per_image"] for m in members)
        for key in metric_keys(members):
            if INTERVAL.search(key):
                if len(members) == 1:
                    row[key] = members[0][key]
                continue
            values = [m[key] for m in members if key in m]
            row[key] = statistics.fmean(values)
            if len(values) > 1 and not NO_SPREAD.search(key):
                row[f"{key}_spread"] = statistics.stdev(values)
                row[f"{key}_min"] = min(values)
        out.append(row)
    return out


def network_headlines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each feature network's distance columns (fid_inception, fd_dinov2, cmmd_clip, ...)."""
    pattern = re.compile(
        r"^(fid|fd|cmmd)_(?!spread$|min$|ci_)[a-z0-9_]+?(?<!_spread)(?<!_min)(?<!_ci_low)(?<!_ci_high)$"
    )
    return [k for k in dict.fromkeys(k for r in rows for k in r) if pattern.match(k)]


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = ["sampler", "eta", "spacing", "options", "ema", "guidance", "steps", "nfe", "n"]
    for optional in ("options", "ema"):
        if not any(row.get(optional) for row in rows):
            columns.remove(optional)
    columns += [
        c
        for c in (
            "fid",
            "fid_spread",
            "fid_min",
            "fid_ci_low",
            "fid_ci_high",
            "kid_mean",
            "precision",
            "recall",
            "is_mean",
            *network_headlines(rows),
            "clip_score",
            *ATTRIBUTE_KEYS,
            "attr_joint_spread",
            "seconds_per_image",
        )
        if any(c in r for r in rows)
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            if column == "options":
                value = ", ".join(f"{k}={v}" for k, v in (value or {}).items())
            elif isinstance(value, float):
                value = f"{value:.4g}" if column != "nfe" else f"{value:.0f}"
            cells.append("" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_fid_vs_nfe(
    rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "fid"
) -> Path:
    """``metric`` (FID) against NFE (log scale), one line per sampler / eta / spacing /
    guidance, with the spread over repeats as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        label = GridPoint.from_row(row).label
        lines.setdefault(label, []).append(
            (row["nfe"], row[metric], row.get(f"{metric}_spread", 0.0))
        )
    for label, points in sorted(lines.items()):
        points.sort()
        x, y, err = zip(*points, strict=True)
        axis.errorbar(x, y, yerr=err if any(err) else None, marker="o", label=label, capsize=2)
    axis.set_xscale("log")
    axis.set_xlabel("network evaluations per sample (NFE)")
    names = {"fid": "FID", "attr_joint": "joint attribute accuracy"}
    axis.set_ylabel(f"{names.get(metric, metric)} (n = {rows[0]['n']})")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_results(
    rows: Sequence[Mapping[str, Any]], out_dir: str | Path, meta: Mapping[str, Any]
) -> dict[str, Path]:
    """results.csv / .json / .md, fid_vs_nfe.png and attributes_vs_nfe.png in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    paths = {name: out_dir / f"results.{name}" for name in ("csv", "json", "md")}
    columns = list(dict.fromkeys(k for row in summary for k in row))
    # Atomic: a run killed while writing leaves the previous, resumable results.json.
    with atomic_write(paths["csv"]) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(summary)
    with atomic_write(paths["json"]) as tmp:
        document = {"meta": meta, "rows": summary, "runs": list(rows)}
        tmp.write_text(json.dumps(document, indent=2, default=str))
    with atomic_write(paths["md"]) as tmp:
        tmp.write_text(markdown_table(summary) + "\n")
    if all("fid" in row for row in summary):
        paths["png"] = plot_fid_vs_nfe(summary, out_dir / "fid_vs_nfe.png")
    if all("attr_joint" in row for row in summary):
        paths["attributes_png"] = plot_fid_vs_nfe(
            summary, out_dir / "attributes_vs_nfe.png", metric="attr_joint"
        )
    return paths
