"""Callbacks that generate during training: sample grids (with prompt adherence on the
shapes captions) and FID / KID on a held-out split, both through the module's
``Pipeline``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from ldm.nn.lora import disable_adapters, lora_layers, set_adapter_weights

log = logging.getLogger(__name__)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (and at the end), samples fixed prompts with fixed seeds with
    each sampler, and writes one grid (a row per prompt, a column per sampler x seed) to
    ``<run>/samples/step_NNNNNN.png`` (legend in ``grid.json``) and to the logger. Modules
    without ``generate`` (the VAE stage) are skipped."""

    def __init__(
        self,
        prompts: Sequence[str | int],  # captions, or labels for class conditioning
        samplers: Sequence[Callable[..., Tensor]],  # samplers with options bound (make_sampler)
        *,
        every_n_steps: int = 500,
        seeds: Sequence[int] = (0,),
        guidance_scale: float = 3.0,
        folder: str | None = None,  # default: <trainer.default_root_dir>/samples
        attributes: bool | str = "auto",  # judge shapes prompts: grid.json + samples/attr_*
        attribute_classifier: Mapping[str, Any] | None = None,  # its settings (tests: smaller)
        cache_dir: str | None = None,  # of the attribute classifier; default <run>/reference_stats
    ):
        if not prompts or not samplers:
            raise ValueError("SampleGrid needs at least one prompt and one sampler")
        self.prompts, self.seeds = list(prompts), list(seeds)
        self.samplers = {sampler_label(s): s for s in samplers}
        self.every_n_steps, self.guidance_scale, self.folder = every_n_steps, guidance_scale, folder
        self.attributes, self.cache_dir = attributes, cache_dir
        self.attribute_classifier = dict(attribute_classifier or {})
        self._judge: Any = None
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._last_step:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """Sample the grid now; returns its path (on rank 0)."""
        if not hasattr(pl_module, "pipeline"):
            return None
        return self._write(trainer, pl_module)

    def columns(self, pl_module: L.LightningModule) -> list[str]:
        names = [f"{n} seed {s}" for n in self.samplers for s in self.seeds]
        if lora_layers(pl_module.sampling_networks()):
            names += [f"{n}, without the adapters" for n in names]
        return names

    def grid(self, pl_module: L.LightningModule) -> Tensor:
        """(3, H, W) in [0, 1]: rows are prompts, columns are sampler x seed (then the
        same without LoRA adapters, when the model has them)."""
        return self._tile(self.images(pl_module))

    @staticmethod
    def _tile(columns: list[Tensor]) -> Tensor:
        tiles = torch.stack(columns, dim=1).flatten(0, 1)  # (prompts * columns, 3, H, W)
        return make_grid(tiles.float().cpu() * 0.5 + 0.5, nrow=len(columns), padding=1)

    def images(self, pl_module: L.LightningModule) -> list[Tensor]:
        """One (prompts, 3, H, W) batch in [-1, 1] per column of the grid."""
        inputs: Any = self.prompts
        if all(isinstance(p, int) for p in self.prompts):
            inputs = torch.tensor(self.prompts, device=pl_module.device)
        networks = pl_module.sampling_networks()
        pipeline = pl_module.pipeline(networks)
        passes = [None, "off"] if lora_layers(networks) else [None]
        columns = []
        for adapters in passes:
            saved = disable_adapters(networks) if adapters == "off" else None
            try:
                for sampler in self.samplers.values():
                    for seed in self.seeds:
                        images = pipeline.generate(
                            inputs,
                            sampler,
                            guidance_scale=self.guidance_scale,
                            seeds=[seed] * len(self.prompts),
                            generator=torch.Generator(pl_module.device).manual_seed(seed),
                        )
                        columns.append(images)
            finally:
                if saved is not None:
                    set_adapter_weights(networks, saved)
        return columns

    def judge(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        """The shapes attribute judge when ``attributes`` asks for one (trained once)."""
        if self._judge is None:
            from ldm.metrics.attributes import attribute_judge

            prompts = [{"caption": p} for p in self.prompts]
            cache = self.cache_dir or Path(trainer.default_root_dir) / "reference_stats"
            judge = attribute_judge(
                self.attributes,
                prompts,
                pl_module.image_size[0],
                cache,
                pl_module.conditioner,
                self.attribute_classifier,
            )
            self._judge = judge.to(pl_module.device) if judge is not None else False
        return self._judge or None

    def score(self, judge: Any, columns: list[Tensor]) -> dict[str, Any]:
        """Per-attribute and joint accuracy over the grid, and each tile's misses."""
        from ldm.metrics.attributes import rates
        from ldm.metrics.extractors import to_uint8

        prompts = [str(p) for p in self.prompts]
        rows, cols = len(prompts), len(columns)
        right = judge.correct(to_uint8(torch.cat(columns)), prompts * cols)  # column-major tiles
        misses = [  # rows x columns: the attributes each tile gets wrong
            [[n for n, r in right.items() if not r[col * rows + row]] for col in range(cols)]
            for row in range(rows)
        ]
        return {"accuracy": rates(right), "wrong": misses}

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        self._last_step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        try:
            columns = self.images(pl_module)
            judge = self.judge(trainer, pl_module)
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return None
        grid = self._tile(columns)
        folder = Path(self.folder or Path(trainer.default_root_dir) / "samples")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{trainer.global_step:06d}.png"
        save_image(grid, path)
        legend: dict[str, Any] = {"rows": self.prompts, "columns": self.columns(pl_module)}
        if judge is not None:
            legend["attributes"] = self.score(judge, columns)
            values = {f"samples/attr_{k}": v for k, v in legend["attributes"]["accuracy"].items()}
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
        (folder / "grid.json").write_text(json.dumps(legend, indent=2))
        log_image(trainer, "samples", grid, path)
        return path


def sampler_label(sampler: Callable[..., Tensor]) -> str:
    """``"ddim 50 steps, eta 0.5"`` for ``make_sampler("ddim", steps=50, eta=0.5)``."""
    func = getattr(sampler, "func", sampler)
    name = getattr(func, "__name__", type(func).__name__).removeprefix("sample_")
    options = dict(getattr(sampler, "keywords", {}))
    label = f"{name} {options.pop('steps')} steps" if "steps" in options else name
    extra = [f"{k} {v}" for k, v in options.items() if k in ("eta", "spacing") and v is not None]
    return ", ".join([label, *extra])


def log_image(trainer: L.Trainer, key: str, image: Tensor, path: Path) -> None:
    """An image (3, H, W) in [0, 1], already saved at ``path``, to the run's TensorBoard or
    wandb loggers; CSV logs have no images (the file is on disk)."""
    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "TensorBoardLogger":
            logger.experiment.add_image(key, image, trainer.global_step)
        elif name == "WandbLogger":
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)


class FIDCallback(L.Callback):
    """Every ``every_n_steps``: FID (and KID) of ``num_samples`` generated samples against a
    held-out split of the DataModule, logged as ``val/fid`` / ``val/kid``. The reference
    statistics are extracted once (cached in ``cache_dir``); generation and features are
    split over the ranks as in ``evaluate.py``. Keep ``num_samples`` small: a training-time
    signal, comparable only at equal n."""

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 500,
        *,
        extractor: str | None = "torchscript:fid-helper",  # None: no FID / KID
        attributes: bool | str = "auto",  # prompt adherence on shapes captions (val/attr_*)
        attribute_classifier: Mapping[str, Any] | None = None,  # its settings (tests: smaller)
        sampler: str = "ddim",
        steps: int = 50,
        spacing: str | None = None,  # None: the sampler's default (trailing for ddim)
        eta: float | None = None,  # None: the sampler's default (ddim 0, euler_ancestral 1)
        options: Mapping[str, Any] | None = None,  # any other sampler option: {s_churn: 10}
        guidance_scale: float = 3.0,
        split: str = "val",
        batch_size: int = 100,
        seed: int = 0,
        cache_dir: str | None = None,  # default: <run>/reference_stats
    ):
        from ldm.metrics.sweep import GridPoint

        self.every_n_steps, self.num_samples, self.split = every_n_steps, num_samples, split
        self.extractor_spec, self.batch_size, self.seed, self.cache_dir = (
            extractor,
            batch_size,
            seed,
            cache_dir,
        )
        self.attributes, self.attribute_classifier = attributes, dict(attribute_classifier or {})
        given = {"spacing": spacing, "eta": eta}
        options = {k: v for k, v in given.items() if v is not None} | dict(options or {})
        self.point = GridPoint.make(sampler, steps, guidance_scale, **options)
        self.evaluator = None
        self._last_step = -1

    def _setup(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from ldm.metrics.sweep import build_evaluator

        self.evaluator, _ = build_evaluator(
            trainer.datamodule,
            self.split,
            image_size=pl_module.image_size[0],
            conditioner=pl_module.conditioner,
            extractor=self.extractor_spec,
            num_samples=self.num_samples,
            cache_dir=self.cache_dir or Path(trainer.default_root_dir) / "reference_stats",
            attributes=self.attributes,
            attribute_classifier=self.attribute_classifier,
            device=pl_module.device,
            batch_size=self.batch_size,
            seed=self.seed,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            kid_subset_size=min(1000, self.num_samples),
            pr_k=None,  # only FID and KID are logged
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step
        if (
            step % self.every_n_steps
            or step == self._last_step
            or not hasattr(pl_module, "pipeline")
        ):
            return
        self._last_step = step
        if self.evaluator is None:
            self._setup(trainer, pl_module)
        was_training = pl_module.training
        pl_module.eval()
        try:
            result = self.evaluator.score(pl_module.pipeline(), self.point)
        finally:
            pl_module.train(was_training)
        from ldm.metrics.attributes import RESULT_KEYS
        from ldm.metrics.results import network_headlines

        values = {f"val/{k}": v for k, v in result.items() if k in RESULT_KEYS}
        if "fid" in result:
            values["val/fid"] = result["fid"]
        if "kid_mean" in result:
            values["val/kid"] = result["kid_mean"]
        values |= {f"val/{k}": result[k] for k in network_headlines([result])}  # fd_dinov2, ...
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
