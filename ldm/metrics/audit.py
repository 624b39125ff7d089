"""Bias audit: what a model draws for an attribute its prompt leaves unspecified, against how
often the training data shows that attribute.

For each prompt and attribute, the generated images' label distribution ``q`` (from a
labeller: the shapes attribute classifier, or CLIP zero-shot over labels the user lists) is
compared with the reference distribution ``p`` of the training images the prompt describes:
total variation ``TV = 1/2 sum |q - p|``, its noise floor (the mean TV of n draws from ``p``
itself) and a chi-square test of homogeneity between the two sets of counts. An attribute the
prompt names is reported as asked: ``TV = 1 - accuracy`` there, and no test.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from ldm.data.builtin import SHAPE_ATTRIBUTES, ShapesDataset, parse_partial_shapes_caption
from ldm.metrics.clip import OpenCLIPScore
from ldm.metrics.extractors import to_uint8


class Labeller(Protocol):
    """Names one class of every attribute for each image."""

    attributes: dict[str, list[str]]  # attribute -> its class names

    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 images (B, 3, H, W) -> {attribute: (B,) class index}."""
        ...


class ZeroShotLabeller:
    """CLIP zero-shot labels: each attribute's class is the label whose text embedding
    (``template`` filled with it) is nearest the image's."""

    def __init__(
        self,
        clip: OpenCLIPScore,
        attributes: Mapping[str, Sequence[str]],  # attribute -> labels, e.g. {colour: [red, ...]}
        template: str = "a photo of {}",
    ):
        if not attributes or any(len(v) < 2 for v in attributes.values()):
            raise ValueError(
                f"audit attributes {dict(attributes)!r}: give each attribute two or more labels, "
                "e.g. audit.attributes={colour:[red,green,blue]}"
            )
        self.clip, self.template = clip, template
        self.attributes = {name: list(labels) for name, labels in attributes.items()}
        self.text = {
            name: clip.text_embeddings([template.format(label) for label in labels])
            for name, labels in self.attributes.items()
        }

    def predict(self, images: Tensor) -> dict[str, Tensor]:
        embedded = self.clip.image_embeddings(images.to(self.clip.mean.device))
        return {
            name: (embedded @ text.to(embedded).T).argmax(1).cpu()
            for name, text in self.text.items()
        }


@dataclass
class AuditPrompt:
    """A prompt, what it asks for (shapes: attribute -> class) and which training captions
    it describes (a regular expression; None: every training image)."""

    prompt: str
    asked: dict[str, int] = field(default_factory=dict)
    captions: str | None = None


def audit_prompts(entries: Sequence[str | Mapping[str, Any]], shapes: bool) -> list[AuditPrompt]:
    """Config entries (a prompt, or ``{prompt: ..., captions: <regex>}``) as prompts; on shapes
    every prompt is parsed for what it names."""
    prompts = []
    for entry in entries:
        entry = {"prompt": entry} if isinstance(entry, str) else dict(entry)
        if set(entry) - {"prompt", "captions"} or "prompt" not in entry:
            raise ValueError(f"audit prompt {entry!r}: a string or {{prompt: ..., captions: ...}}")
        asked = parse_partial_shapes_caption(entry["prompt"]) if shapes else {}
        prompts.append(AuditPrompt(entry["prompt"], asked, entry.get("captions")))
    if not prompts:
        raise ValueError("audit.prompts is empty: list the prompts to audit")
    return prompts


def _counts(classes: Mapping[str, Tensor], attributes: Mapping[str, Sequence[str]]) -> Tensor:
    """{attribute: (N,) classes} -> (A, K) counts, K the most classes of any attribute."""
    width = max(len(v) for v in attributes.values())
    return torch.stack(
        [torch.bincount(classes[n].long().cpu(), minlength=width)[:width] for n in attributes]
    ).double()


def shapes_reference(prompts: Sequence[AuditPrompt], dataset: ShapesDataset) -> list[Tensor]:
    """Per prompt, (A, K) counts of every attribute over the ``dataset`` images whose
    attributes are the ones the prompt names: the exact truth of the procedural data."""
    truth = [dataset.spec(i).classes for i in range(len(dataset))]
    out = []
    for prompt in prompts:
        chosen = [t for t in truth if all(t[k] == v for k, v in prompt.asked.items())]
        classes = {n: torch.tensor([t[n] for t in chosen]) for n in SHAPE_ATTRIBUTES}
        out.append(_counts(classes, SHAPE_ATTRIBUTES))
    return out


def labelled_reference(
    prompts: Sequence[AuditPrompt],
    dataset: Any,  # items with "image" in [-1, 1] and "caption"
    labeller: Labeller,
    count: int,
    batch_size: int = 100,
) -> list[Tensor]:
    """Per prompt, (A, K) counts of the labeller's labels over the first ``count`` images of
    ``dataset`` whose caption matches the prompt's ``captions`` pattern (all when None)."""
    count = min(count, len(dataset))
    captions: list[str] = []
    classes: dict[str, list[Tensor]] = {n: [] for n in labeller.attributes}
    for first in range(0, count, batch_size):
        batch = [dataset[i] for i in range(first, min(count, first + batch_size))]
        captions += [item["caption"] for item in batch]
        images = to_uint8(torch.stack([item["image"] for item in batch]))
        for name, found in labeller.predict(images).items():
            classes[name].append(found)
    labels = {n: torch.cat(v) for n, v in classes.items()}
    out = []
    for prompt in prompts:
        pattern = re.compile(prompt.captions) if prompt.captions else None
        keep = torch.tensor([pattern is None or bool(pattern.search(c)) for c in captions])
        if not keep.any():
            raise ValueError(
                f"no training caption matches {prompt.captions!r} (prompt {prompt.prompt!r}) "
                f"among the first {count}: loosen the pattern or raise audit.reference_count"
            )
        out.append(_counts({n: v[keep] for n, v in labels.items()}, labeller.attributes))
    return out


def generated_counts(
    generate: Callable[[list[str], list[int]], Tensor],  # (prompts, sample indices) -> images
    prompts: Sequence[AuditPrompt],
    labeller: Labeller,
    samples_per_prompt: int,
    batch_size: int = 100,
    rank: int = 0,
    world_size: int = 1,
    keep: int = 0,
) -> tuple[Tensor, list[Tensor]]:
    """(P, A, K) label counts of this rank's share of the generated images (every
    ``world_size``-th sample of each prompt): sums, so ranks add up to the whole. Also the
    first ``keep`` uint8 images of each prompt this rank made, to look at."""
    out, kept = [], []
    for prompt in prompts:
        shown: list[Tensor] = []
        mine = list(range(rank, samples_per_prompt, world_size))
        classes: dict[str, list[Tensor]] = {
            n: [torch.zeros(0, dtype=torch.long)] for n in labeller.attributes
        }
        for first in range(0, len(mine), batch_size):
            indices = mine[first : first + batch_size]
            images = to_uint8(generate([prompt.prompt] * len(indices), indices))
            shown.append(images[: max(0, keep - sum(len(x) for x in shown))].cpu())
            for name, found in labeller.predict(images).items():
                classes[name].append(found.cpu())
        out.append(_counts({n: torch.cat(v) for n, v in classes.items()}, labeller.attributes))
        kept.append(torch.cat(shown) if shown else torch.zeros(0, 3, 1, 1, dtype=torch.uint8))
    return torch.stack(out), kept


def chi_square(a: Tensor, b: Tensor) -> tuple[float, int, float]:
    """Pearson's chi-square test of homogeneity of two count vectors: (statistic, degrees of
    freedom, p-value); classes neither set has are left out."""
    table = torch.stack([a, b]).double()
    table = table[:, table.sum(0) > 0]
    dof = table.shape[1] - 1
    if dof < 1 or (table.sum(1) == 0).any():
        return float("nan"), max(dof, 0), float("nan")
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    p = float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2.0)))
    return statistic, dof, p


def tv_floor(p: Tensor, n: int, draws: int = 2000, seed: int = 0) -> float:
    """The mean total variation between ``p`` and the frequencies of ``n`` draws from it: what
    sampling noise alone gives at this n."""
    if n == 0:
        return float("nan")
    generator = torch.Generator().manual_seed(seed)
    samples = torch.multinomial(p.float(), n * draws, replacement=True, generator=generator)
    freq = torch.nn.functional.one_hot(samples.view(draws, n), len(p)).double().mean(1)
    return float(0.5 * (freq - p).abs().sum(1).mean())


def compare(
    prompts: Sequence[AuditPrompt],
    generated: Tensor,  # (P, A, K) counts
    reference: Sequence[Tensor],  # per prompt (A, K) counts
    attributes: Mapping[str, Sequence[str]],
) -> list[dict[str, Any]]:
    """One row per prompt and attribute: n, TV and its floor, the test, the distributions and
    the most over-represented class. Bonferroni over the table's tests marks ``significant``."""
    rows = []
    for prompt, counts, ref in zip(prompts, generated, reference, strict=True):
        for a, (name, labels) in enumerate(attributes.items()):
            k = len(labels)
            n, m = int(counts[a].sum()), int(ref[a].sum())
            q = counts[a, :k] / max(n, 1)
            p = ref[a, :k] / max(m, 1)
            over = int((q - p).argmax())
            row = {
                "prompt": prompt.prompt,
                "attribute": name,
                "asked": labels[prompt.asked[name]] if name in prompt.asked else None,
                "n": n,
                "reference_n": m,
                "tv": float(0.5 * (q - p).abs().sum()),
                "tv_floor": tv_floor(p, n) if m else float("nan"),
                "over": labels[over],
                "over_generated": float(q[over]),
                "over_reference": float(p[over]),
                "generated": dict(zip(labels, q.tolist(), strict=True)),
                "reference": dict(zip(labels, p.tolist(), strict=True)),
            }
            if name not in prompt.asked:
                row["chi2"], row["dof"], row["p_value"] = chi_square(counts[a, :k], ref[a, :k])
            rows.append(row)
    tests = [r for r in rows if math.isfinite(r.get("p_value", math.nan))]
    for row in tests:
        row["significant"] = row["p_value"] < 0.05 / len(tests)
    return rows


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The audit table: one line per prompt and attribute."""
    lines = [
        "| prompt | attribute | n | TV | TV floor | chi2 (dof) | p "
        "| most over-represented (generated vs training) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        name = r["attribute"] + (f" (asked: {r['asked']})" if r["asked"] else "")
        test = f"{r['chi2']:.1f} ({r['dof']})" if "chi2" in r and r["chi2"] == r["chi2"] else ""
        p = f"{r['p_value']:.2g}" + (" *" if r.get("significant") else "") if test else ""
        over = f"{r['over']} {r['over_generated']:.0%} vs {r['over_reference']:.0%}"
        lines.append(
            f"| {r['prompt'] or '(empty)'} | {name} | {r['n']} | {r['tv']:.3f} | "
            f"{r['tv_floor']:.3f} | {test} | {p} | {over} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Bars of the generated and the training distribution: a row of panels per prompt, a
    panel per attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    attributes = list(dict.fromkeys(r["attribute"] for r in rows))
    figure, axes = plt.subplots(
        len(prompts),
        len(attributes),
        figsize=(2.6 * len(attributes), 1.9 * len(prompts) + 0.6),
        squeeze=False,
    )
    for r in rows:
        axis = axes[prompts.index(r["prompt"])][attributes.index(r["attribute"])]
        labels = list(r["generated"])
        x = torch.arange(len(labels)).numpy()
        axis.bar(x - 0.2, list(r["reference"].values()), 0.4, color="0.7", label="training")
        axis.bar(x + 0.2, list(r["generated"].values()), 0.4, color="C0", label="generated")
        axis.set_xticks(x, labels, rotation=60, fontsize=6, ha="right")
        axis.set_ylim(0, 1)
        axis.tick_params(axis="y", labelsize=6)
        axis.set_title(
            f"{r['prompt'] or '(empty)'}: {r['attribute']}\nTV {r['tv']:.2f}", fontsize=7
        )
    axes[0][0].legend(fontsize=6)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_audit(
    rows: Sequence[Mapping[str, Any]], out_dir: str | Path, name: str, meta: Mapping[str, Any]
) -> dict[str, Path]:
    """``<name>.md``, ``<name>.json`` and ``<name>.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("md", "json", "png")}
    paths["md"].write_text(markdown(rows) + "\n")
    paths["json"].write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=2, default=str))
    plot(rows, paths["png"], title=str(meta.get("label", "")))
    return paths
