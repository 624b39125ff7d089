"""Steps x eta tables from ``evaluate.py`` runs (or ``study.py`` runs, one per seed): each
metric's mean ± sd over the repeats (generation seeds), the paired difference of two eta
values seed by seed, and a plot of the metric against the step count, one line per eta.

    python -m ldm.tools.tables runs=[outputs/ddim_study/network-g1.0-few,\\
        outputs/ddim_study/network-g1.0-many] metrics=[fid,attr_joint] paired=[0,1] out=fid.png
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Runs = list[dict[str, Any]]


def read_runs(paths: Sequence[str | Path]) -> Runs:
    """The per-seed runs of ``results.json`` files (or of the run folders holding them),
    each with ``checkpoint``: the stem of the checkpoint file its evaluation scored."""
    runs: Runs = []
    for path in map(Path, paths):
        file = path / "results.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no results.json at {file} (evaluate.py writes it)")
        saved = json.loads(file.read_text())
        if "settings" in saved:  # a study.py run: one seed, every step count
            runs += _study_runs(saved)
            continue
        checkpoint = Path(str(saved.get("meta", {}).get("checkpoint", ""))).stem
        runs += [{"checkpoint": checkpoint, **run} for run in saved["runs"]]
    return runs


def _study_runs(saved: dict[str, Any]) -> Runs:
    """The rows of a ``study.py`` results.json as runs: its seed the repeat, its sampler
    options' eta (DDIM's default 0), its guidance (None: unconditional)."""
    settings = saved["settings"]
    return [
        {
            **row,
            "eta": float(settings["sampler_options"].get(row["sampler"], {}).get("eta", 0.0)),
            "guidance": settings.get("guidance"),
            "repeat": settings["seed"],
            "checkpoint": "",
        }
        for row in saved["rows"]
        if row["sampler"] != "reference"
    ]


def _values(runs: Runs, metric: str, row: Any, eta: float, by: str = "steps") -> dict[int, float]:
    """``repeat -> value`` at one (row, eta), the row a value of ``by``."""
    return {
        r["repeat"]: float(r[metric])
        for r in runs
        if r[by] == row and r["eta"] == eta and metric in r
    }


def mean_sd(values: Sequence[float], digits: int = 1) -> str:
    """``mean ± sd`` (sample sd over the values), or the value alone when there is one."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(
    runs: Runs,
    metric: str = "fid",
    paired: tuple[float, float] | None = None,
    scale: float = 1.0,
    digits: int = 1,
    by: str = "steps",
) -> str:
    """Markdown: one row per step count, one column per eta, each cell mean ± sd over the
    repeats (times ``scale``: 100 for accuracies in %). ``paired=(a, b)`` adds eta a minus
    eta b, differenced seed by seed (both start from the same noise) before averaging.
    ``by="checkpoint"``: one row per checkpoint scored instead (at one step count), e.g.
    the same sampler along a model's training."""
    if by not in ("steps", "checkpoint"):
        raise ValueError(f"by={by!r}: rows are by steps or by checkpoint")
    etas = sorted({r["eta"] for r in runs})
    for key, what in (("guidance", "guidance scale"), ("sampler", "sampler")):
        if len(values := sorted({str(r.get(key)) for r in runs})) != 1:
            raise ValueError(f"runs of {key} {values}: table one {what} at a time")
    if by == "checkpoint" and len(steps := sorted({r["steps"] for r in runs})) != 1:
        raise ValueError(f"runs at steps {steps}: a table by checkpoint takes one step count")
    head = [f"eta = {eta:g}" for eta in etas]
    if paired:
        head.append(f"eta {paired[0]:g} − eta {paired[1]:g} (paired)")
    lines = [
        f"| {by} | repeats | {' | '.join(head)} |",
        "|---:|---:|" + "---:|" * len(head),
    ]
    for row_value in sorted({r[by] for r in runs}):
        cells = {eta: _values(runs, metric, row_value, eta, by) for eta in etas}
        repeats = max(len(c) for c in cells.values())
        row = [mean_sd([v * scale for v in cells[eta].values()], digits) for eta in etas]
        if paired:
            a, b = (cells.get(float(e), {}) for e in paired)
            row.append(
                mean_sd([(a[k] - b[k]) * scale for k in sorted(a.keys() & b.keys())], digits)
            )
        lines.append(f"| {row_value} | {repeats} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(panels: dict[str, Runs], metric: str, out: Path, floors: dict[str, float]) -> None:
    """One panel per entry of ``panels``: ``metric`` against steps (log), a line per eta
    with its sd over repeats as error bars; ``floors`` as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False, sharey=True
    )
    for ax, (title, runs) in zip(axes.flat, panels.items(), strict=True):
        for eta in sorted({r["eta"] for r in runs}):
            points = []
            for steps in sorted({r["steps"] for r in runs}):
                values = list(_values(runs, metric, steps, eta).values())
                if values:
                    sd = statistics.stdev(values) if len(values) > 1 else 0.0
                    points.append((steps, statistics.fmean(values), sd))
            if points:
                x, y, err = zip(*points, strict=True)
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"eta {eta:g}")
        ax.set_xscale("log")
        for name, value in floors.items():
            ax.axhline(value, ls="--", lw=1, color="grey")
            ax.text(0.01, value, name, transform=ax.get_yaxis_transform(), fontsize=7, va="bottom")
        ax.set_xlabel("steps (NFE per guidance branch)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes.flat[0].set_ylabel(metric)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def report(
    runs: Sequence[str | Path],
    metrics: Sequence[str],
    paired: Sequence[float] | None = None,
    panels: Sequence[str] | None = None,
    floors: dict[str, float] | None = None,
    out: str | Path | None = None,
    by: str = "steps",
    scale: dict[str, float] | None = None,
    digits: int = 1,
) -> None:
    """Print each panel's table per metric (rows ``by`` steps or checkpoint; a metric's
    values times its ``scale``, attr_* in %) with ``digits`` decimals; plot the first
    metric against steps to ``out``."""
    if out and by != "steps":
        raise ValueError(f"out= plots against steps; leave it out for a table by {by}")
    names = list(panels or ["all"] * len(runs))
    if len(names) != len(runs):
        raise ValueError(f"panels names {len(names)} panels for {len(runs)} runs; give one each")
    grouped: dict[str, Runs] = {}
    for name, run in zip(names, runs, strict=True):
        grouped.setdefault(name, []).extend(read_runs([run]))
    pair = tuple(paired) if paired else None
    if pair is not None and len(pair) != 2:
        raise ValueError(f"paired={list(pair)} must name two eta values, e.g. paired=[0,1]")
    for name, panel in grouped.items():
        for metric in metrics:
            percent = metric.startswith("attr_")
            factor = (scale or {}).get(metric, 100.0 if percent else 1.0)
            unit = (
                ""
                if factor == 1
                else " (%)"
                if percent and factor == 100
                else f" (x {1 / factor:.0e})"
            )
            print(f"\n{name}: {metric}{unit}, mean ± sd over repeats\n")
            print(table(panel, metric, pair, scale=factor, digits=digits, by=by))
    if out:
        plot(grouped, metrics[0], Path(out), {k: float(v) for k, v in (floors or {}).items()})
        print(f"\nwrote {out}")


if __name__ == "__main__":  # the command line lives with the other tools' (ldm.app)
    from ldm.app.tables import main

    main()
