"""The model side of the server: a ``Pipeline`` plus the request settings it accepts, the
LoRA adapters it may load, and the function that turns a batch of requests into PNGs.

Everything an image depends on is in its request: its prompt (or label), negative prompt,
seed, and the settings its batch shares (``Settings``). Starting noise and step noise come
from the image's seed exactly as in sample.py, so ``regenerate`` gives the sample.py
command line that makes the same image.
"""

from __future__ import annotations

import io
import logging
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm import CONF_DIR
from ldm.convert.lora import read_any
from ldm.diffusion.samplers import SAMPLERS, make_sampler
from ldm.nn.lora import adapter_weights, load_adapter, remove_adapter, set_adapter_weights
from ldm.pipeline import Pipeline, step_generators
from ldm.serving.batcher import Job

log = logging.getLogger(__name__)
ADAPTER_SUFFIXES = (".safetensors",)
MAX_ADAPTER_WEIGHT = 10.0
MAX_PROMPT_CHARS = 4000  # longer is refused before tokenizing


class BadRequest(ValueError):
    """A request the service cannot run: ``field`` names the culprit (HTTP 422)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Settings:
    """What the images of one batch share (the batching key)."""

    sampler: str
    steps: int
    guidance: float
    guidance_rescale: float
    eta: float | None
    size: tuple[int, int]
    adapters: tuple[tuple[str, float], ...]  # (file name, weight), sorted


@dataclass
class Work:
    """One request's images: inputs (captions or labels), negative prompts, seeds."""

    inputs: list[str] | list[int]
    negative: list[str] | None
    seeds: list[int]


def _sampler_config(name: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "sampler" / f"{name}.yaml"))


class ImageService:
    """A pipeline serving requests: checks settings, loads adapters, runs batches."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        checkpoint: str,
        adapters_dir: str | Path | None = None,
        embeddings: Sequence[str] = (),
        max_steps: int = 250,
        max_images: int = 8,
        sizes: Sequence[int] | None = None,  # allowed square sides; None: the model's own
        model_overrides: Sequence[str] = (),  # how the model was loaded (ema=, diffusion=...)
    ):
        self.pipeline, self.checkpoint = pipeline, checkpoint
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir else None
        self.embeddings = list(embeddings)
        self.model_overrides = list(model_overrides)  # repeated in the sample.py lines
        self.max_steps, self.max_images = max_steps, max_images
        height, width = pipeline.image_size
        self.sizes = sorted({(s, s) for s in sizes} if sizes else {(height, width)})
        multiple = self._size_multiple()
        for size in self.sizes:
            if size[0] % multiple or size[1] % multiple:
                raise ValueError(
                    f"size {size} is not a multiple of {multiple}, which the model needs"
                )
        self.loaded: dict[str, str] = {}  # adapter file -> adapter name, in load order
        # The checkpoint's own adapters (a LoRA fine-tune) keep their weights between requests.
        self._own_adapters = adapter_weights(pipeline.networks())
        self._adapter_count = 0
        self._sized: dict[tuple[int, int], Pipeline] = {}  # the pipeline at other sizes
        self.samplers = {name: _sampler_config(name) for name in SAMPLERS}
        self.labels = getattr(pipeline.conditioner, "input_key", None) == "label"

    def _size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the denoiser's
        (a UNet's downsampling, a transformer's patch)."""
        config = getattr(self.pipeline.denoiser, "config", {})
        multiple = config.get("patch_size") or 2 ** (
            len(config.get("channel_multipliers", [1])) - 1
        )
        factor = self.pipeline.vae.downsample_factor if self.pipeline.vae is not None else 1
        return factor * multiple

    @property
    def most_steps(self) -> int:
        """``max_steps``, or the schedule's timesteps where fewer (no sampler takes more)."""
        return min(self.max_steps, self.pipeline.schedule.num_train_timesteps)

    # ------------------------------------------------------------------ describing

    def adapters(self) -> list[str]:
        """The adapter files requests may name (file names in ``adapters_dir``)."""
        if self.adapters_dir is None or not self.adapters_dir.is_dir():
            return []
        return sorted(p.name for p in self.adapters_dir.iterdir() if p.suffix in ADAPTER_SUFFIXES)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` returns."""
        conditioner = self.pipeline.conditioner
        return {
            "checkpoint": self.checkpoint,
            "prediction": self.pipeline.prediction,
            "conditioning": "label" if self.labels else "caption" if conditioner else None,
            "max_prompt_tokens": getattr(conditioner, "max_length", None),
            "samplers": {name: cfg.get("steps") for name, cfg in self.samplers.items()},
            "image_size": list(self.pipeline.image_size),
            "sizes": [list(s) for s in self.sizes],
            "max_steps": self.most_steps,
            "max_images": self.max_images,
            "adapters": self.adapters(),
            "embeddings": self.embeddings,
        }

    # ------------------------------------------------------------------ checking

    def check_prompt(self, field: str, text: str) -> None:
        """A prompt longer than the tokenizer takes is refused (not cut)."""
        if len(text) > MAX_PROMPT_CHARS:
            raise BadRequest(
                field, f"the prompt is {len(text)} characters; at most {MAX_PROMPT_CHARS}"
            )
        conditioner = self.pipeline.conditioner
        if not hasattr(conditioner, "token_count"):
            return
        count = conditioner.token_count(text)
        if count > conditioner.max_length:
            raise BadRequest(
                field,
                f"the prompt is {count} tokens; this model reads at most "
                f"{conditioner.max_length} (start and end included): shorten it",
            )

    def check_size(self, size: int | Sequence[int] | None) -> tuple[int, int]:
        if size is None:
            if tuple(self.pipeline.image_size) not in self.sizes:  # its own size not served
                raise BadRequest("size", f"give size: this server serves {self.sizes}")
            return tuple(self.pipeline.image_size)
        pair = (size, size) if isinstance(size, int) else tuple(size)
        if len(pair) != 2 or pair not in self.sizes:
            raise BadRequest("size", f"size {list(pair)} is not served; use one of {self.sizes}")
        return pair

    def check_sampler(
        self, name: str, steps: int | None, eta: float | None
    ) -> tuple[int, float | None]:
        if name not in self.samplers:
            raise BadRequest(
                "sampler", f"unknown sampler {name!r}; use one of {sorted(self.samplers)}"
            )
        steps = steps if steps is not None else self.samplers[name]["steps"]
        if not 1 <= steps <= self.most_steps:
            raise BadRequest("steps", f"steps={steps} is outside 1..{self.most_steps}")
        if eta is not None and "eta" not in self.samplers[name]:
            takes = sorted(n for n, options in self.samplers.items() if "eta" in options)
            raise BadRequest("eta", f"sampler {name} takes no eta ({', '.join(takes)} do)")
        return steps, eta

    def check_adapters(self, adapters: dict[str, float]) -> tuple[tuple[str, float], ...]:
        """Adapter file names (within ``adapters_dir`` only) with finite weights in
        [-MAX_ADAPTER_WEIGHT, MAX_ADAPTER_WEIGHT]."""
        for name, weight in adapters.items():
            field = f"adapters.{name}"
            if self.adapters_dir is None:
                raise BadRequest(field, "this server has no adapters_dir: it serves no adapters")
            if not (math.isfinite(weight) and abs(weight) <= MAX_ADAPTER_WEIGHT):
                raise BadRequest(field, f"weight {weight} is outside ±{MAX_ADAPTER_WEIGHT}")
            try:
                path = (self.adapters_dir / name).resolve()
                inside = not Path(name).is_absolute() and ".." not in Path(name).parts
                exists = inside and path.parent == self.adapters_dir and path.is_file()
                exists = exists and path.suffix in ADAPTER_SUFFIXES  # what adapters() lists
            except (ValueError, OSError):  # a NUL byte, a name too long
                inside = exists = False
            if not inside or path.parent != self.adapters_dir:
                raise BadRequest(field, f"{name!r}: adapters are file names in adapters_dir")
            if not exists:
                raise BadRequest(field, f"no adapter {name!r}; available: {self.adapters()}")
        return tuple(sorted((name, float(weight)) for name, weight in adapters.items()))

    def check_labels(self, labels: Sequence[int]) -> None:
        classes = getattr(self.pipeline.conditioner, "num_classes", None)
        if not labels:
            raise BadRequest("labels", "give at least one label")
        for i, label in enumerate(labels):
            if classes is not None and not 0 <= label < classes:
                raise BadRequest(f"labels.{i}", f"label {label} is outside 0..{classes - 1}")

    # ------------------------------------------------------------------ running

    def _load_adapter(self, file: str) -> str:
        """Load an adapter file once; one that cannot load is a BadRequest naming it, and
        the model is left as it was (load_adapter checks every layer before it injects)."""
        if file not in self.loaded:
            networks = self.pipeline.networks()
            name = f"serve{self._adapter_count}"
            self._adapter_count += 1  # never reused, even after a failure
            try:
                tensors, settings = read_any(str(self.adapters_dir / file), networks["denoiser"])
                load_adapter(networks, tensors, name, settings, weight=0.0)
            except Exception as err:  # a bad file must not take the server down
                remove_adapter(networks, name)
                raise BadRequest(
                    f"adapters.{file}", f"adapter {file!r} cannot be loaded: {err}"
                ) from err
            self.pipeline.eval()  # the new adapters too (no dropout while serving)
            self.loaded[file] = name
        return self.loaded[file]

    def _apply_adapters(self, adapters: tuple[tuple[str, float], ...]) -> None:
        wanted = {self._load_adapter(file): weight for file, weight in adapters}
        networks = self.pipeline.networks()
        current = adapter_weights(networks)
        own = self._own_adapters
        set_adapter_weights(networks, {n: wanted.get(n, own.get(n, 0.0)) for n in current})

    def sampler(self, settings: Settings) -> Any:
        options = {
            k: v
            for k, v in self.samplers[settings.sampler].items()
            if k not in ("_target_", "name")
        }
        options["steps"] = settings.steps
        if settings.eta is not None:
            options["eta"] = settings.eta
        return make_sampler(settings.sampler, **options)

    def run(self, jobs: Sequence[Job]) -> list[list[bytes]]:
        """The PNGs of each job of one batch (one Settings)."""
        settings: Settings = jobs[0].key
        self._apply_adapters(settings.adapters)
        works: list[Work] = [job.payload for job in jobs]
        seeds = [s for w in works for s in w.seeds]
        inputs: Any = [x for w in works for x in w.inputs]
        if self.labels:
            inputs = torch.tensor(inputs, device=self.pipeline.device)
        elif self.pipeline.conditioner is None:
            inputs = len(seeds)
        negative = None
        if any(w.negative for w in works):
            negative = [n for w in works for n in (w.negative or [""] * len(w.seeds))]
        pipeline = self.pipeline
        if settings.size != tuple(pipeline.image_size):  # a view per size, kept: its fp32
            if settings.size not in self._sized:  # VAE fallback is copied once, not per batch
                self._sized[settings.size] = replace(pipeline, image_size=settings.size)
            pipeline = self._sized[settings.size]
        images = pipeline.generate(
            inputs,
            self.sampler(settings),
            guidance_scale=settings.guidance,
            guidance_rescale=settings.guidance_rescale,
            negative=negative,
            seeds=seeds,
            generator=step_generators(seeds, pipeline.device),
        )
        pngs = [to_png(image) for image in images.cpu()]
        out, start = [], 0
        for work in works:
            out.append(pngs[start : start + len(work.seeds)])
            start += len(work.seeds)
        return out

    def regenerate(
        self, settings: Settings, prompt: str | int, negative: str | None, seed: int
    ) -> str:
        """The sample.py command line that makes the same image."""
        args = [
            f"checkpoint={_quoted(self.checkpoint)}", f"prompts=[{_quoted(str(prompt))}]",
            "num_per_prompt=1", f"seed={seed}", f"sampler={settings.sampler}",
            f"sampler.steps={settings.steps}", f"guidance_scale={settings.guidance}",
            f"guidance_rescale={settings.guidance_rescale}",
            f"image_size=[{settings.size[0]},{settings.size[1]}]",
        ]  # fmt: skip
        if settings.eta is not None:
            args.append(f"sampler.eta={settings.eta}")
        if negative:
            args.append(f"negative_prompt={_quoted(negative)}")
        active = [(f, w) for f, w in settings.adapters if w != 0.0]
        if active:  # in load order: the order their updates are summed in
            order = list(self.loaded)
            active.sort(key=lambda fw: order.index(fw[0]) if fw[0] in order else len(order))
            specs = ",".join(_quoted(f"{self.adapters_dir / f}:{w!r}") for f, w in active)
            args.append(f"adapters=[{specs}]")
        if self.embeddings:
            args.append(f"embeddings=[{','.join(map(_quoted, self.embeddings))}]")
        args += self.model_overrides
        return "python sample.py " + " ".join(shlex.quote(a) for a in args)


def _quoted(text: str) -> str:
    """A string as a double-quoted Hydra override value: a quote is escaped, and so are the
    backslashes before a quote or the closing one (Hydra reads the others literally)."""
    text = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return '"' + text.replace("${", "\\${") + '"'


def to_png(image: torch.Tensor) -> bytes:
    """A (3, H, W) image in [-1, 1] as PNG bytes, written as sample.py writes its files."""
    buffer = io.BytesIO()  # torchvision's save_image rounding, without importing it (3 s)
    pixels = (image * 0.5 + 0.5).mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0)
    Image.fromarray(pixels.to("cpu", torch.uint8).numpy()).save(buffer, format="png")
    return buffer.getvalue()
