"""Scoring a diffusion model against a held-out split over a grid of sampler settings.

Sample ``i`` of a configuration starts from noise seeded by ``(seed, repeat, i)`` and, for
stochastic samplers, draws its step noise from a generator of its own, conditioned on the
caption (or label) of held-out sample ``i``: what a sample is never depends on the batch
or the rank it was made on. Each of ``world_size`` ranks makes every ``world_size``-th
sample, and the metric states are synchronised, so 1 and N processes agree.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ldm.diffusion.samplers import make_sampler, sampler_options
from ldm.metrics.attributes import AttributeAccuracy, AttributeJudge, attribute_judge
from ldm.metrics.extractors import FeatureExtractor, make_extractor, network_name, to_uint8
from ldm.metrics.reference import (
    content_digest,
    provenance,
    read_reference,
    reference_features,
    source_config,
)
from ldm.metrics.scores import GenerativeMetrics
from ldm.pipeline import Pipeline
from ldm.seeding import stable_seed

log = logging.getLogger(__name__)
SMALL_N = 5000  # below this, FIDs are biased upward (~1/n) and only comparable at equal n


@dataclass(frozen=True)
class GridPoint:
    """One sampler configuration at one step count and guidance scale."""

    sampler: str
    steps: int
    guidance: float
    options: tuple[tuple[str, Any], ...] = ()  # the sampler's options the grid set, by name
    ema: float | None = None  # a post-hoc EMA length (sigma_rel); None: the checkpoint's

    @classmethod
    def make(
        cls, sampler: str, steps: int, guidance: float, ema: float | None = None, **options: Any
    ) -> GridPoint:
        """A point, its option names checked against the sampler's signature."""
        unknown = sorted(set(options) - set(sampler_options(sampler)))
        if unknown:
            raise ValueError(
                f"sampler {sampler!r} takes no option(s) {unknown}; it takes "
                f"{sorted(sampler_options(sampler))}"
            )
        ema = None if ema is None else float(ema)
        return cls(sampler, int(steps), float(guidance), tuple(sorted(options.items())), ema)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> GridPoint:
        """The point a results row was made at (rows of earlier releases included)."""
        options = {"spacing": row["spacing"]} | dict(row.get("options") or {})
        if row.get("eta") is not None:
            options["eta"] = row["eta"]
        return cls.make(row["sampler"], row["steps"], row["guidance"], row.get("ema"), **options)

    @property
    def settings(self) -> dict[str, Any]:
        """Every option of the sampler: the grid's, else the sampler's default."""
        return sampler_options(self.sampler) | dict(self.options)

    @property
    def spacing(self) -> str:
        return self.settings["spacing"]

    @property
    def eta(self) -> float | None:  # samplers without eta: None
        return self.settings.get("eta")

    @property
    def extra(self) -> dict[str, Any]:
        """The options the grid set besides spacing and eta (``s_churn``, ``rho``, ...)."""
        return {k: v for k, v in self.options if k not in ("spacing", "eta")}

    @property
    def key(self) -> tuple:
        """What the samples depend on: equal for the same settings however they were given."""
        settings = tuple(sorted(self.settings.items()))
        return (self.sampler, self.steps, self.guidance, settings, self.ema)

    @property
    def row(self) -> dict[str, Any]:
        """The columns that name this point in results."""
        columns = {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance}
        columns |= {"spacing": self.spacing, "eta": self.eta, "options": self.extra}
        return columns if self.ema is None else columns | {"ema": self.ema}

    @property
    def label(self) -> str:
        eta = "" if self.eta is None else f", eta {self.eta:g}"
        extra = "".join(f", {k} {_text(v)}" for k, v in self.extra.items())
        ema = "" if self.ema is None else f", ema {self.ema:g}"
        return f"{self.sampler}{eta}, {self.spacing}{extra}, guidance {self.guidance:g}{ema}"

    @property
    def slug(self) -> str:
        """A folder name for this point's samples."""
        eta = "" if self.eta is None else f"_eta{self.eta:g}"
        extra = "".join(f"_{k}{_text(v)}" for k, v in self.extra.items())
        ema = "" if self.ema is None else f"_ema{self.ema:g}"
        return (
            f"{self.sampler}{eta}_{self.spacing}{extra}_g{self.guidance:g}_steps{self.steps}{ema}"
        )

    def make_sampler(self) -> Callable[..., Tensor]:
        return make_sampler(self.sampler, steps=self.steps, **dict(self.options))


def _text(value: Any) -> str:
    return (
        f"{value:g}"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else str(value)
    )


# The shorthand of earlier releases: grid.sampler names the samplers, grid.spacing and grid.eta
# set those options on each of them (eta where the sampler takes it).
SHORTHAND = ("sampler", "spacing", "eta")


def sampler_configs(grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``grid.samplers`` as ``{name: ..., option: value or list}`` mappings (a bare name is
    ``{name: ...}``), with the shorthand keys applied."""
    configs = [
        dict(c) if isinstance(c, Mapping) else {"name": c} for c in grid.get("samplers") or []
    ]
    if grid.get("sampler") is not None:
        configs = [{"name": name} for name in grid["sampler"]]
    for config in configs:
        if "name" not in config:
            raise ValueError(f"grid.samplers entry {config} has no name: add name: ddim (say)")
        takes = sampler_options(config["name"])
        for key in ("spacing", "eta"):
            if grid.get(key) is not None and key in takes:
                config[key] = list(grid[key])
    if not configs:
        raise ValueError("grid.samplers is empty: add one, e.g. grid.samplers=[ddim]")
    return configs


def grid_points(grid: Mapping[str, Any]) -> list[GridPoint]:
    """Every post-hoc EMA length of ``grid.ema`` (when given) x configuration of
    ``grid.samplers`` (an option given as a list is swept) x ``grid.steps`` x
    ``grid.guidance``; a point given twice counts once. Option names are checked here,
    before any sample is made."""
    points: dict[tuple, GridPoint] = {}
    for ema, config in itertools.product(grid.get("ema") or [None], sampler_configs(grid)):
        swept = {
            k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else [v]
            for k, v in config.items()
            if k != "name"
        }
        for steps, guidance in itertools.product(grid["steps"], grid["guidance"]):
            for values in itertools.product(*swept.values()):
                options = dict(zip(swept, values, strict=True))
                point = GridPoint.make(config["name"], steps, guidance, ema, **options)
                points.setdefault(point.key, point)
    return list(points.values())


def _counting(sampler: Callable[..., Tensor], calls: list[int]) -> Callable[..., Tensor]:
    """The sampler, counting its network evaluations (a CFG batch counts once)."""

    def run(model: Callable[[Tensor, Tensor], Tensor], *args: Any, **kwargs: Any) -> Tensor:
        def counted(x: Tensor, t: Tensor) -> Tensor:
            calls[0] += 1
            return model(x, t)

        return sampler(counted, *args, **kwargs)

    return run


@dataclass
class Network:
    """A feature network of an evaluation: its column name, extractor and reference
    features (N, D) in sample order."""

    name: str
    extractor: FeatureExtractor
    reference: Tensor


# GenerativeMetrics' keys -> a network's result columns ({fd}: fid for the Inception
# networks, FID proper, else fd; {name}: the network's name).
COLUMNS = {
    "fid": "{fd}_{name}",
    "kid_mean": "kid_{name}",
    "kid_std": "kid_std_{name}",
    "precision": "precision_{name}",
    "recall": "recall_{name}",
    "is_mean": "is_{name}",
    "is_std": "is_std_{name}",
    "cmmd": "cmmd_{name}",
    "fid_ci_low": "{fd}_{name}_ci_low",
    "fid_ci_high": "{fd}_{name}_ci_high",
}
# The first network's metrics also keep their old names (fid, kid_mean, ...) for a release.
LEGACY = ("fid", "kid_mean", "kid_std", "precision", "recall", "is_mean", "is_std")


def network_columns(name: str, result: Mapping[str, float]) -> dict[str, float]:
    """A network's metrics under its column names (``fid_inception``, ``fd_dinov2``, ...)."""
    fd = "fid" if name.startswith("inception") else "fd"
    return {COLUMNS[k].format(fd=fd, name=name): v for k, v in result.items() if k in COLUMNS}


class Evaluator:
    """FID / FD, KID, precision / recall, IS, CMMD per feature network (one generation pass
    feeds them all), CLIP score and prompt adherence (``attributes``) of generated samples,
    on one rank of ``world_size``."""

    def __init__(
        self,
        networks: Sequence[Network],  # none: no feature metrics
        conditions: Dataset | None,  # captions / labels of generated sample i: conditions[i % len]
        *,
        num_samples: int,
        batch_size: int = 64,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        kid_subset_size: int = 1000,
        pr_k: int | None = 3,  # precision / recall neighbourhood; None: skip
        bootstrap: int | None = None,  # resamples for FID's 95% interval; None: none
        clip: Callable[[Tensor, list[str]], Tensor] | None = None,  # uint8 images, captions -> (B,)
        attributes: AttributeJudge | None = None,  # prompt adherence on shapes captions
        sample_dir: str | Path | None = None,  # save every sample's PNG and features here
    ):
        if not networks and attributes is None and clip is None:
            raise ValueError("nothing to measure: give an extractor, attributes or clip")
        names = [n.name for n in networks]
        if len(set(names)) != len(names):
            raise ValueError(f"two feature networks share a name: {names}")
        self.networks, self.conditions, self.num_samples = list(networks), conditions, num_samples
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.clip, self.attributes = clip, attributes
        self.sample_dir = Path(sample_dir) if sample_dir is not None else None
        self.metrics = [
            GenerativeMetrics(
                n.reference, kid_subset_size=kid_subset_size, seed=seed, pr_k=pr_k,
                bootstrap=bootstrap, cmmd=n.name == "clip",
            )
            for n in networks
        ]  # fmt: skip
        self.clip_metric = GenerativeMetrics(None) if clip is not None else None
        self.attribute_metric = (
            AttributeAccuracy(attributes.attributes) if attributes is not None else None
        )
        if networks and num_samples < SMALL_N:
            log.warning(
                "FID from %d samples: its bias grows like 1/n (and below the feature width, "
                "%d, the covariance is rank-deficient); compare FIDs only at equal n",
                num_samples,
                networks[0].extractor.num_features,
            )

    def _inputs(self, pipeline: Pipeline, indices: Sequence[int]) -> tuple[Any, list[str]]:
        """The conditioning of samples ``indices`` (captions, labels, or a count) and the
        captions (for CLIP score)."""
        if self.conditions is None or pipeline.conditioner is None:
            return len(indices), []
        items = [self.conditions[i % len(self.conditions)] for i in indices]
        captions = [item["caption"] for item in items]
        if pipeline.conditioner.input_key == "label":
            labels = torch.tensor([item["label"] for item in items], device=pipeline.device)
            return labels, captions
        return captions, captions

    def score(self, pipeline: Pipeline, point: GridPoint, repeat: int = 0) -> dict[str, Any]:
        """Generate ``num_samples`` with ``point``'s settings and score them."""
        device = pipeline.device
        metrics = [m.to(device) for m in self.metrics]
        if self.clip_metric is not None:
            metrics.append(self.clip_metric.to(device))
        if self.attribute_metric is not None:
            metrics.append(self.attribute_metric.to(device))
        for metric in metrics:
            metric.reset()
        calls = [0]
        sampler = _counting(point.make_sampler(), calls)
        mine = list(range(self.rank, self.num_samples, self.world_size))
        batches, start = 0, time.perf_counter()
        saved = SampleWriter(self.sample_dir, point, repeat, self.rank) if self.sample_dir else None
        for first in range(0, len(mine), self.batch_size):
            indices = mine[first : first + self.batch_size]
            inputs, captions = self._inputs(pipeline, indices)
            generators = [
                torch.Generator(device).manual_seed(stable_seed(self.seed, repeat, i, "steps"))
                for i in indices
            ]
            with torch.no_grad():
                images = pipeline.generate(
                    inputs,
                    sampler,
                    guidance_scale=point.guidance,
                    seeds=[stable_seed(self.seed, repeat, i) for i in indices],
                    generator=generators,
                )
                pixels = to_uint8(images)
                index = torch.tensor(indices, device=device)
                first = None  # the first network's features: what SampleWriter keeps
                for network, metric in zip(self.networks, self.metrics, strict=True):
                    features, logits = network.extractor.features_and_logits(pixels)
                    metric.update(features, index, logits)
                    first = features if first is None else first
                if self.clip_metric is not None and captions:
                    self.clip_metric.update(None, index, clip_scores=self.clip(pixels, captions))
                if self.attribute_metric is not None:
                    self.attribute_metric.update(self.attributes.correct(pixels, captions))
            if saved is not None:
                saved.add(indices, pixels, first)
            batches += 1
        seconds = time.perf_counter() - start
        if saved is not None:
            saved.close()
        result = self._results()
        nfe = calls[0] / batches if batches else float("nan")
        return {
            **point.row,
            "repeat": repeat,
            "n": self.num_samples,
            "nfe": nfe,
            "seconds_per_image": seconds / max(1, len(mine)),  # this rank's share
            **result,
        }

    def _results(self) -> dict[str, float]:
        """Every metric's value: each network's columns (the first's under the old names
        too), CLIP score, attributes."""
        result: dict[str, float] = {}
        for position, (network, metric) in enumerate(zip(self.networks, self.metrics, strict=True)):
            scores = metric.compute()
            if position == 0:
                kept = (*LEGACY, "fid_ci_low", "fid_ci_high", "n_real", "n_fake")
                result |= {k: v for k, v in scores.items() if k in kept}
            result |= network_columns(network.name, scores)
        if self.clip_metric is not None:
            result |= self.clip_metric.compute()
        if self.attribute_metric is not None:
            result |= self.attribute_metric.compute()
        return result


class SampleWriter:
    """One run's samples as ``<dir>/<point>/r<repeat>/<index>.png``, and the first feature
    network's features as ``features-rank<r>.npz`` (``index``, ``features``), for other
    tools to rescore."""

    def __init__(self, root: Path, point: GridPoint, repeat: int, rank: int):
        self.folder = root / point.slug / f"r{repeat}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank, self.indices, self.features = rank, [], []

    def add(self, indices: Sequence[int], pixels: Tensor, features: Tensor | None) -> None:
        from PIL import Image

        for index, image in zip(indices, pixels.cpu(), strict=True):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(self.folder / f"{index:06d}.png")
        self.indices += list(indices)
        if features is not None:
            self.features.append(features.float().cpu())

    def close(self) -> None:
        import numpy as np

        arrays = {"index": np.asarray(self.indices)}
        if self.features:
            arrays["features"] = torch.cat(self.features).numpy()
        np.savez(self.folder / f"features-rank{self.rank}.npz", **arrays)


def build_evaluator(
    data: Any,  # a DataModule: .dataset(split), and .factory for the reference's provenance
    split: str,
    *,
    image_size: int,
    conditioner: Any,  # the model's (attributes are judged for caption-conditioned models)
    extractor: str | Sequence[str] | None,  # make_extractor spec(s); None: no feature metrics
    num_samples: int,
    cache_dir: str | Path,
    reference_count: int | None = None,  # default num_samples (at most the split's size)
    reference_stats: str | Path | None = None,  # given statistics (first network; must match)
    attributes: bool | str | None = "auto",
    attribute_classifier: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    **settings: Any,  # the Evaluator's: batch_size, seed, rank, world_size, kid_subset_size, ...
) -> tuple[Evaluator, dict[str, Any]]:
    """The Evaluator that evaluate.py and the FID callback both use, and what its reference
    is: ``{"dataset_config", "split", "count", "networks": {name: {"spec", "extracted"}}}``.
    Reference statistics are shared through ``cache_dir`` (one provenance per network,
    ``source_config(data.factory)``); "extracted" is absent for ``reference_stats``."""
    conditions = data.dataset(split)
    count = min(reference_count or num_samples, len(conditions))
    about = {"dataset_config": source_config(data.factory), "split": split, "count": count}
    specs = (
        [] if extractor is None else [extractor] if isinstance(extractor, str) else list(extractor)
    )
    networks, described = [], {}
    for position, spec in enumerate(specs):
        features = make_extractor(spec).to(device)
        name, k = network_name(spec), 2
        while name in described:  # tiny and tiny:32: tiny, tiny_2
            name, k = f"{network_name(spec)}_{k}", k + 1
        described[name] = {"spec": spec}
        if reference_stats and position == 0:
            digest = content_digest(conditions, count)
            expected = provenance(about["dataset_config"], split, count, features, digest)
            reference, _ = read_reference(reference_stats, expected)
        else:
            rank_settings = {k: settings[k] for k in ("rank", "world_size") if k in settings}
            reference, _, described[name]["extracted"] = reference_features(
                conditions,
                features,
                **about,
                cache_dir=cache_dir,
                batch_size=settings.get("batch_size", 64),
                device=device,
                **rank_settings,
            )
        networks.append(Network(name, features, reference.to(device)))
    judge = attribute_judge(
        attributes, conditions, image_size, cache_dir, conditioner, attribute_classifier
    )
    if judge is not None:
        judge = judge.to(device)
    evaluator = Evaluator(
        networks, conditions, num_samples=num_samples, attributes=judge, **settings
    )
    return evaluator, about | {"networks": described}
