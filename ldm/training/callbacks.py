"""Training callbacks: sample grids, the NaN / Inf guard, graceful stop on SIGTERM, the
data epoch, and atomic checkpoint writes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torch.nn.utils import get_total_norm
from torchvision.utils import make_grid, save_image

from ldm.io import atomic_write
from ldm.nn.lora import (
    adapter_parameters,
    disable_adapters,
    lora_layers,
    save_adapter,
    set_adapter_weights,
)

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, then ``os.replace``: a crash
    mid-write never leaves a truncated checkpoint where a good one was."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (``last.ckpt`` + top-k), which also writes
    ``last.ckpt`` when training ends between two periodic saves, so the final steps are
    never lost."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self.save_last or self.dirpath is None or trainer.sanity_checking:
            return
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        if self._last_global_step_saved != trainer.global_step or not path.exists():
            trainer.save_checkpoint(path, weights_only=False)
            self.last_model_path = str(path)
            self._last_global_step_saved = trainer.global_step


class SavedConfig(L.Callback):
    """The run's resolved config (YAML) inside every checkpoint, under ``CONFIG_KEY``: what
    ``open_checkpoint`` rebuilds the model from."""

    def __init__(self, config_yaml: str):
        self.config_yaml = config_yaml

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from ldm.pipeline import CONFIG_KEY

        checkpoint[CONFIG_KEY] = self.config_yaml


class AdapterExport(L.Callback):
    """At the end of training, the LoRA adapter alone (EMA weights when kept) as
    ``<run>/<filename>``, in our format with its settings; logs its size."""

    def __init__(self, name: str = "default", filename: str = "adapter.safetensors"):
        self.name, self.filename = name, filename

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        networks = pl_module.sampling_networks()
        networks.lora_settings = pl_module.networks.lora_settings
        trainable = sum(p.numel() for p in adapter_parameters(networks, self.name))
        report = {"trainable_parameters": trainable}
        path = save_adapter(
            networks,
            Path(trainer.default_root_dir) / self.filename,
            self.name,
            {"step": trainer.global_step, **report},
        )
        size = path.stat().st_size
        log.warning(
            "LoRA adapter %r: %s trainable parameters, %s, %.2f MiB",
            self.name,
            f"{trainable:,}",
            path,
            size / 2**20,
        )


class EmbeddingExport(L.Callback):
    """At the end of training, the textual-inversion tokens' vectors as
    ``<run>/<filename>`` (safetensors keyed by token)."""

    def __init__(self, filename: str = "embeddings.safetensors"):
        self.filename = filename

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            from ldm.models.textual_inversion import save_embeddings

            conditioner = pl_module.sampling_networks()["conditioner"]
            path = save_embeddings(conditioner, Path(trainer.default_root_dir) / self.filename)
            log.warning("textual inversion embeddings: %s", path)


class DataEpoch(L.Callback):
    """Tells the DataModule the epoch before each train epoch (reshuffles streaming sources
    and bucket batches)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(trainer.current_epoch)


class NaNGuard(L.Callback):
    """Stops training at the first non-finite loss or gradient, before the optimizer step
    applies it, with a message naming the step and the last good checkpoint."""

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        bad = []
        if loss is not None and not torch.isfinite(loss).all():
            bad.append(f"loss {loss.item()}")
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        # One reduction (one device sync): the total norm is finite iff every gradient is.
        if named and not torch.isfinite(get_total_norm([g for _, g in named])):
            name = next(n for n, g in named if not torch.isfinite(g).all())
            bad.append(f"gradient of {name}")
        if bad:
            raise FloatingPointError(self.message(trainer, ", ".join(bad)))

    @staticmethod
    def message(trainer: L.Trainer, what: str) -> str:
        callback = trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or ""
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return (
            f"non-finite {what} at step {trainer.global_step}: training stopped before the "
            f"optimizer applied it; {where}. Resume from it with a lower learning rate, "
            "gradient clipping (trainer.gradient_clip_val) or bf16 instead of fp16."
        )


class StopOnSignal(L.Callback):
    """Save ``last.ckpt`` and stop when the job is told to end, so ``resume=auto``
    continues exactly there; under SLURM (``requeue``) the job is requeued too.

    SIGTERM (preemption, ``scancel``, SLURM's time limit): Lightning notices it on every
    rank and raises ``SIGTERMException`` before the next step; this callback then saves.
    ``signals`` (default SIGUSR1, what ``sbatch --signal=USR1@90`` sends before the time
    limit): the current step finishes, every rank agrees, the checkpoint is written and
    training stops cleanly.
    """

    def __init__(self, signals: Sequence[str] = ("SIGUSR1",), requeue: bool = True):
        self.signals = [getattr(signal, name) for name in signals]
        self.requeue = requeue
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sig in self.signals:  # on every rank: all must stop at the same step
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                log.warning("cannot install a %s handler outside the main thread", sig)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        flag = torch.tensor(float(self.received is not None), device=trainer.strategy.root_device)
        if trainer.strategy.reduce(flag, reduce_op="max").item() > 0:
            self._save_and_stop(trainer, signal.Signals(self.received or signal.SIGUSR1).name)
            trainer.should_stop = True

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):  # the last step finished: a clean state
            self._save_and_stop(trainer, "SIGTERM")

    def _save_and_stop(self, trainer: L.Trainer, name: str) -> None:
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else None
        path = (folder or Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        log.warning("%s received: saved %s at step %d", name, path, trainer.global_step)
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue and job and trainer.is_global_zero:
            subprocess.run(["scontrol", "requeue", job], check=False)


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
        spacing: str = "trailing",
        eta: float | None = 0.0,
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
        self.point = GridPoint(
            sampler, steps, guidance_scale, spacing, eta if sampler == "ddim" else None
        )
        self.evaluator = None
        self._last_step = -1

    def _setup(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from ldm.metrics.attributes import attribute_judge
        from ldm.metrics.extractors import make_extractor
        from ldm.metrics.reference import reference_features, source_config
        from ldm.metrics.sweep import Evaluator

        datamodule = trainer.datamodule
        split = datamodule.dataset(self.split)
        cache_dir = self.cache_dir or Path(trainer.default_root_dir) / "reference_stats"
        extractor, reference = None, None
        if self.extractor_spec:
            extractor = make_extractor(self.extractor_spec).to(pl_module.device)
            count = min(self.num_samples, len(split))
            reference, _, _ = reference_features(
                split,
                extractor,
                dataset_config=source_config(datamodule.factory),  # as evaluate.py does
                split=self.split,
                count=count,
                cache_dir=cache_dir,
                batch_size=self.batch_size,
                device=pl_module.device,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
            )
            reference = reference.to(pl_module.device)
        judge = attribute_judge(
            self.attributes,
            split,
            pl_module.image_size[0],
            cache_dir,
            pl_module.conditioner,
            self.attribute_classifier,
        )
        self.evaluator = Evaluator(
            reference,
            split,
            extractor,
            num_samples=self.num_samples,
            batch_size=self.batch_size,
            seed=self.seed,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            kid_subset_size=min(1000, self.num_samples),
            pr_k=None,  # only FID and KID are logged
            attributes=judge.to(pl_module.device) if judge is not None else None,
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
        values = {f"val/{k}": v for k, v in result.items() if k.startswith("attr_")}
        if "fid" in result:
            values["val/fid"] = result["fid"]
        if "kid_mean" in result:
            values["val/kid"] = result["kid_mean"]
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
