"""Training callbacks: the NaN / Inf guard, graceful stop on SIGTERM, the data epoch,
atomic checkpoint writes with the run's config, and the adapter / embedding exports (the
callbacks that generate are in ``sampling_callbacks``)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.nn.utils import get_total_norm

from ldm.convert.lora import save_adapter
from ldm.io import atomic_write
from ldm.nn.lora import adapter_parameters

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
