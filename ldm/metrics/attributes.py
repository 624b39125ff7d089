"""Prompt adherence on the built-in ``shapes``: does a generated image show what its caption
says?

The data is procedural, so every real image's shape, colour, size, position and background
are known exactly. A small CNN with one head per attribute is trained on real ``train``
images (deterministic; cached under a digest of its training images and settings); its
accuracy on real held-out images is the ceiling of the score. A generated image is judged
against the caption it was generated from: per-attribute accuracy and joint accuracy (all
five right). ``AttributeAccuracy`` is a torchmetrics ``Metric`` of sums, so 1 and N
processes give the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from ldm.data.builtin import SHAPE_ATTRIBUTES, ShapesDataset, parse_shapes_caption
from ldm.io import read_safetensors, save_safetensors
from ldm.metrics.extractors import to_uint8
from ldm.metrics.scores import wilson_interval

log = logging.getLogger(__name__)
PREFIX = "attr_"  # result keys: attr_shape, ..., attr_joint
JOINT = "joint"
RESULT_KEYS = tuple(f"{PREFIX}{name}" for name in [*SHAPE_ATTRIBUTES, JOINT])
VERSION = 1  # of the network and its training recipe: part of the cache key


class AttributeClassifier(nn.Module):
    """uint8 images (B, 3, size, size) -> logits per attribute (a head each)."""

    def __init__(
        self,
        attributes: Mapping[str, Sequence[str]],  # attribute -> its class names
        size: int = 32,  # input side; other sizes are resized to it
        width: int = 32,  # channels of the first stage (x2, x4 deeper)
    ):
        super().__init__()
        self.attributes = {name: list(values) for name, values in attributes.items()}
        self.size, self.width = size, width

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.trunk = nn.Sequential(
            *stage(3, w), *stage(w, w), nn.MaxPool2d(2),  # size / 2
            *stage(w, 2 * w), *stage(2 * w, 2 * w), nn.MaxPool2d(2),  # size / 4
            *stage(2 * w, 4 * w), nn.AdaptiveAvgPool2d(4),  # (B, 4w, 4, 4): keeps where
            nn.Flatten(),
            nn.Linear(4 * w * 16, 8 * w),
            nn.ReLU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict(
            {name: nn.Linear(8 * w, len(values)) for name, values in self.attributes.items()}
        )

    @property
    def config(self) -> dict[str, Any]:
        return {"attributes": self.attributes, "size": self.size, "width": self.width}

    def prepare(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> float in [-1, 1] at the classifier's size."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"the attribute classifier takes uint8 (B, 3, H, W) images (see "
                f"ldm.metrics.extractors.to_uint8), got {images.dtype} {tuple(images.shape)}"
            )
        x = images.float() / 127.5 - 1.0
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, (self.size, self.size), mode="bilinear", antialias=True)
        return x

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Prepared images (see ``prepare``) -> {attribute: logits (B, classes)}."""
        features = self.trunk(x)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 500) -> dict[str, Tensor]:
        """uint8 images -> {attribute: predicted class (B,)} (eval mode, batched)."""
        was_training = self.training
        self.eval()
        try:
            parts = [self(self.prepare(chunk)) for chunk in images.split(batch_size)]
        finally:
            self.train(was_training)
        return {name: torch.cat([p[name] for p in parts]).argmax(1) for name in self.attributes}


# --------------------------------------------------------------------------- training


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mild blur, noise and a small brightness / contrast change, so the classifier judges
    what an image shows rather than the exact pixels real images have (generated images
    are softer and noisier; their colours must still be named by hue)."""
    b, c, h, w = x.shape
    sigma = torch.rand(b, generator=generator).clamp_min(1e-3)  # blur in pixels, 0..1
    taps = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B * C, 5)
    y = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, 1, 5), groups=b * c)  # along rows, then columns
    y = F.conv2d(y, kernel.view(b * c, 1, 5, 1), groups=b * c).view(b, c, h, w)
    scale = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.1
    noise = torch.randn(x.shape, generator=generator) * torch.rand(b, 1, 1, 1, generator=generator)
    return y * scale + shift + 0.08 * noise


def train_classifier(
    images: Tensor,  # uint8 (N, 3, H, W)
    targets: Mapping[str, Tensor],  # attribute -> (N,) class indices
    attributes: Mapping[str, Sequence[str]],
    *,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 3e-3,
    width: int = 32,
    seed: int = 0,
) -> AttributeClassifier:
    """A classifier trained from a seed (weights, order and augmentation all follow from it)."""
    torch.manual_seed(seed)
    model = AttributeClassifier(attributes, images.shape[-1], width)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(images) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for first in range(0, len(images), batch_size):
            index = order[first : first + batch_size]
            x = _augment(model.prepare(images[index]), generator)
            logits = model(x)
            loss = sum(F.cross_entropy(logits[n], targets[n][index]) for n in model.attributes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def rates(right: Mapping[str, Tensor]) -> dict[str, float]:
    """Per-attribute and joint accuracy of ``{attribute: (B,) bool}``."""
    out = {n: float(r.double().mean()) for n, r in right.items()}
    out[JOINT] = float(torch.stack(list(right.values())).all(0).double().mean())
    return out


def accuracy(predicted: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, float]:
    """Per-attribute and joint accuracy of class predictions."""
    return rates({n: predicted[n].cpu() == targets[n].cpu() for n in predicted})


def shapes_images(
    split: str, count: int, size: int, seed: int = 0
) -> tuple[Tensor, dict[str, Tensor], list[str]]:
    """The first ``count`` images of a shapes split as uint8, their attribute classes and
    captions."""
    dataset = ShapesDataset(split, size=size, seed=seed)
    if count > len(dataset):
        raise ValueError(f"the shapes {split} split has {len(dataset)} images, not {count}")
    images = to_uint8(torch.stack([dataset[i]["image"] for i in range(count)]))
    specs = [dataset.spec(i) for i in range(count)]
    targets = {name: torch.tensor([s.classes[name] for s in specs]) for name in SHAPE_ATTRIBUTES}
    return images, targets, [s.caption for s in specs]


class AttributeJudge:
    """A trained classifier and the caption parser: ``correct(images, captions)``."""

    def __init__(self, classifier: AttributeClassifier, ceiling: Mapping[str, float] | None = None):
        self.classifier = classifier.eval().requires_grad_(False)
        self.ceiling = dict(ceiling or {})  # accuracy on real held-out images

    @property
    def attributes(self) -> list[str]:
        return list(self.classifier.attributes)

    def to(self, device: torch.device | str) -> AttributeJudge:
        self.classifier.to(device)
        return self

    @staticmethod
    def targets(captions: Sequence[str]) -> dict[str, Tensor]:
        """Attribute classes the captions ask for."""
        parsed = [parse_shapes_caption(c) for c in captions]
        return {name: torch.tensor([p[name] for p in parsed]) for name in SHAPE_ATTRIBUTES}

    def correct(self, images: Tensor, captions: Sequence[str]) -> dict[str, Tensor]:
        """{attribute: (B,) bool} whether each uint8 image shows what its caption names."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        predicted = self.classifier.predict(images)
        wanted = self.targets(captions)
        return {n: predicted[n].cpu() == wanted[n] for n in self.attributes}

    def score(self, images: Tensor, captions: Sequence[str]) -> dict[str, float]:
        """Per-attribute and joint accuracy of uint8 ``images`` against ``captions``."""
        return accuracy(self.classifier.predict(images), self.targets(captions))


def is_shapes_caption(caption: Any) -> bool:
    try:
        parse_shapes_caption(caption)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


DEFAULTS = {"train_count": 10000, "held_out_count": 1000, "epochs": 6, "batch_size": 128,
            "lr": 3e-3, "width": 16, "seed": 0}  # fmt: skip


def shapes_judge(
    size: int = 32,  # image side the judge looks at (the generated images' size)
    cache_dir: str | Path = "outputs/reference_stats",
    **settings: Any,  # overrides of DEFAULTS
) -> AttributeJudge:
    """The shapes attribute judge for images of ``size``: loaded from ``cache_dir`` when a
    classifier with the same training images and settings is there, else trained (about
    half a minute on two CPU cores), scored on real ``val`` images and cached."""
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown attribute-classifier settings {sorted(unknown)}: use {DEFAULTS}")
    config = DEFAULTS | settings
    images, targets, _ = shapes_images("train", config["train_count"], size)
    record = {
        "dataset": {"name": "shapes", "split": "train", "size": size, "seed": 0},
        **config,
        "version": VERSION,
        "content_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"attributes-{key}.safetensors"
    if path.is_file():
        tensors, meta = read_safetensors(path)
        classifier = AttributeClassifier(**json.loads(meta["classifier"]))
        classifier.load_state_dict(tensors)
        return AttributeJudge(classifier, json.loads(meta["ceiling"]))
    start = time.perf_counter()
    classifier = train_classifier(
        images,
        targets,
        SHAPE_ATTRIBUTES,
        **{k: config[k] for k in ("epochs", "batch_size", "lr", "width", "seed")},
    )
    held_out, held_targets, _ = shapes_images("val", config["held_out_count"], size)
    ceiling = accuracy(classifier.predict(held_out), held_targets)
    log.warning(
        "attribute classifier trained in %.0f s on %d real images; on %d real held-out images: %s",
        time.perf_counter() - start,
        config["train_count"],
        config["held_out_count"],
        ", ".join(f"{k} {v:.2%}" for k, v in ceiling.items()),
    )
    metadata = {
        "classifier": json.dumps(classifier.config),
        "ceiling": json.dumps(ceiling),
        "provenance": json.dumps(record),
    }
    save_safetensors(path, classifier.state_dict(), metadata)
    return AttributeJudge(classifier, ceiling)


class AttributeAccuracy(Metric):
    """Per-attribute and joint accuracy from ``update(correct)``, where ``correct`` is
    ``AttributeJudge.correct``'s output; ``compute()`` -> ``{"attr_<name>": ..., "attr_joint"}``."""

    full_state_update = False

    def __init__(self, attributes: Sequence[str]):
        super().__init__()
        self.names = list(attributes)
        self.add_state(
            "right",
            default=torch.zeros(len(self.names) + 1, dtype=torch.float64),
            dist_reduce_fx="sum",
        )
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: Mapping[str, Tensor]) -> None:
        stacked = torch.stack([correct[n].to(self.right.device) for n in self.names])  # (A, B)
        self.right += torch.cat([stacked.sum(1), stacked.all(0).sum()[None]]).double()
        self.total += stacked.shape[1]

    def compute(self) -> dict[str, float]:
        """Accuracy per attribute and joint, with the joint's Wilson 95% interval."""
        values = (self.right / self.total.clamp_min(1)).tolist()
        out = {f"{PREFIX}{n}": v for n, v in zip([*self.names, JOINT], values, strict=True)}
        low, high = wilson_interval(float(self.right[-1]), float(self.total))
        return out | {f"{PREFIX}{JOINT}_ci_low": low, f"{PREFIX}{JOINT}_ci_high": high}


def attribute_judge(
    setting: bool | str | None,
    conditions: Any,  # the dataset whose captions condition the generated samples
    image_size: int,
    cache_dir: str | Path,
    conditioner: Any = None,  # the model's conditioner (its input_key must be "caption")
    classifier: Mapping[str, Any] | None = None,  # overrides of the classifier's DEFAULTS
) -> AttributeJudge | None:
    """The judge for a config's ``attributes``: ``auto`` (when the model takes captions and
    the conditioning captions are shapes captions), ``true`` (required: an error names what
    is missing) or ``false``."""
    if setting in (False, None, "false", "off"):
        return None
    if setting not in (True, "auto", "true", "on"):
        raise ValueError(f"attributes={setting!r}: use auto, true or false")
    captions = getattr(conditioner, "input_key", None) == "caption"
    first = conditions[0]["caption"] if conditions is not None and len(conditions) else None
    if captions and is_shapes_caption(first):
        return shapes_judge(image_size, cache_dir, **(classifier or {}))
    if setting == "auto":
        return None
    key = getattr(conditioner, "input_key", None)
    raise ValueError(
        "attributes=true needs a caption-conditioned model evaluated on the built-in shapes "
        f"captions (data=shapes); got conditioner input {key!r} and caption {first!r}"
    )


def headline(row: Mapping[str, Any]) -> str:
    """FID and / or the attribute accuracies of a result row, for progress lines."""
    parts = [f"FID {row['fid']:.3f}"] if "fid" in row else []
    present = [key for key in RESULT_KEYS if key in row]
    if present:
        named = (f"{key.removeprefix(PREFIX)} {row[key]:.1%}" for key in present)
        parts.append("attributes " + ", ".join(named))
    return "; ".join(parts) or "no metrics"
