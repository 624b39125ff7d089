"""The latent diffusion model's LightningModule (Rombach et al. 2022).

A frozen VAE maps images to latents, scaled by the VAE's ``scale_factor`` (computed from
the training data when the VAE has none); a conditioner turns captions or labels into the
denoiser's conditioning, dropped to the empty conditioning with probability
``cond_drop_prob`` for classifier-free guidance (Ho & Salimans 2022); the denoiser
backbone (a UNet, DiT or MMDiT: ``ldm.models``) learns the ``prediction`` target of the
noised latents with the configured loss weighting.

Every random draw of a training step (caption dropout, timestep, noise, latent sample)
comes from a generator of its own for each sample, seeded by ``(seed, global_step, sample
key)``: a resumed run repeats exactly what an uninterrupted one does, and a batch split over
N ranks draws exactly what it draws in one process (DDP matches single-process training).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ldm.diffusion.guidance import Conditioning
from ldm.diffusion.objective import check_prediction, diffusion_loss, model_input, q_sample
from ldm.diffusion.schedules import Schedule, training_timesteps
from ldm.io import legacy_names
from ldm.models.vae import DiagonalGaussian
from ldm.pipeline import Pipeline
from ldm.seeding import stable_seed
from ldm.training.ema import EMA
from ldm.training.speed import compile_network, compile_options, to_channels_last

# The frozen VAE and the EMA copy are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class LatentDiffusion(L.LightningModule):
    """Trains ``denoiser`` (and a trainable ``conditioner``) on latents of a frozen ``vae``."""

    def __init__(
        self,
        denoiser: nn.Module,  # UNet, DiT or MMDiT: forward(x, t, context, y, pooled)
        conditioner: nn.Module | None = None,  # captions / labels -> denoiser kwargs; None: none
        vae: nn.Module | None = None,  # frozen; None: diffusion on the images themselves
        *,
        schedule: Schedule,
        prediction: str = "eps",  # eps | x0 | v | flow | edm
        loss_weighting: str = "uniform",  # uniform | min_snr
        min_snr_gamma: float = 5.0,
        timestep_sampling: str = "uniform",  # uniform | logit_normal (SD3) | log_normal (EDM)
        timestep_loc: float = 0.0,
        timestep_scale: float = 1.0,
        optimizer: Callable[[Iterable[nn.Parameter]], Optimizer] | None = None,  # params -> opt
        lr_scheduler: Callable[[Optimizer], Any] | None = None,  # a partial: opt -> scheduler
        cond_drop_prob: float = 0.1,  # classifier-free guidance dropout
        ema_decay: float | None = 0.9999,  # None: no EMA
        image_size: int | Sequence[int] = 32,  # pixels of generated images
        scale_batches: int = 8,  # batches that estimate the latent scale when unset
        channels_last: bool = True,  # channels-last conv weights (ldm.training.speed)
        compile: bool | str | Mapping[str, Any] = False,  # torch.compile the training denoiser
        seed: int = 0,
    ):
        super().__init__()
        check_prediction(prediction)
        if (getattr(denoiser, "config", None) or {}).get("learn_sigma"):
            raise ValueError(
                "learn_sigma: training the variance needs the hybrid VLB loss, which ldm does "
                "not implement; set model.denoiser.learn_sigma=false (sampling from a "
                "pretrained learned-sigma DiT works: its mean half is used)"
            )
        if not 0 <= cond_drop_prob <= 1:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        # Checkpoints keep plain values only (weights_only loading): no modules, no partials.
        self.save_hyperparameters(
            ignore=["denoiser", "conditioner", "vae", "schedule", "optimizer", "lr_scheduler"]
        )
        self.make_optimizer, self.make_lr_scheduler = optimizer, lr_scheduler
        self.networks = nn.ModuleDict({"denoiser": denoiser})
        if conditioner is not None:
            self.networks["conditioner"] = conditioner
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.schedule = schedule
        compile_options(compile)  # a bad value fails here, not at the first step
        self._compiled = False
        if channels_last:
            to_channels_last(denoiser)
        # EMA of the parts that train (a frozen text tower is not copied).
        self.ema = EMA(self._trainable(), ema_decay) if ema_decay is not None else None
        self._ema_step = -1
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size = size

    # ----------------------------------------------------------------- parts

    @property
    def denoiser(self) -> nn.Module:
        return self.networks["denoiser"]

    @property
    def conditioner(self) -> nn.Module | None:
        try:
            return self.networks["conditioner"]
        except KeyError:
            return None

    def _trainable(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {k: m for k, m in self.networks.items() if any(p.requires_grad for p in m.parameters())}
        )

    def sampling_networks(self) -> nn.ModuleDict:
        """The EMA weights of the trained parts when kept, the frozen parts as they are."""
        if self.ema is None:
            return self.networks
        return nn.ModuleDict({**self.networks, **self.ema.average})

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen: no dropout, ever
        return self

    # ----------------------------------------------------------------- latents

    def _vae_latents(
        self, batch: Mapping[str, Any], generators: Sequence[torch.Generator]
    ) -> Tensor:
        """One fresh sample of each VAE posterior (from the cached ``moments`` when present),
        before scaling."""
        if "moments" in batch:
            posterior = DiagonalGaussian(batch["moments"])
        else:
            with torch.no_grad():
                posterior = self.vae.encode(batch["image"])
        noise = _randn(generators, posterior.mean.shape[1:], posterior.mean)
        return posterior.mean + posterior.std * noise

    def latents(self, batch: Mapping[str, Any], generators: Sequence[torch.Generator]) -> Tensor:
        """The batch's latents as the diffusion model sees them: scaled VAE latents, or the
        images themselves without a VAE."""
        if self.vae is None:
            return batch["image"]
        return self.vae.scale_latents(self._vae_latents(batch, generators))

    def on_fit_start(self) -> None:
        """Set the VAE's latent scale from the data when it has none: 1 / std of the
        latents over ``scale_batches`` train batches (summed over ranks)."""
        if self.vae is None or self.vae.scale_factor is not None:
            return
        loader = self.trainer.datamodule.train_dataloader()
        total, square, count = 0.0, 0.0, 0
        for index, batch in enumerate(loader):
            if index == self.hparams.scale_batches:
                break
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            z = self._vae_latents(batch, self._generators(batch["key"], "scale")).double()
            total, square, count = (
                total + z.sum().item(),
                square + z.square().sum().item(),
                count + z.numel(),
            )
        stats = torch.tensor([total, square, count], dtype=torch.float64, device=self.device)
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        mean = stats[0] / stats[2]
        std = (stats[1] / stats[2] - mean * mean).sqrt().item()
        self.vae.scale_factor = 1.0 / std
        self.print(f"latent scale_factor set from the data: 1 / {std:.5f} = {1 / std:.5f}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.vae is not None:
            checkpoint["vae_config"] = dict(self.vae.config)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = legacy_names(checkpoint["state_dict"])
        if self.vae is not None and "vae_config" in checkpoint:
            self.vae.scale_factor = checkpoint["vae_config"]["scale_factor"]
            self.vae.shift_factor = checkpoint["vae_config"]["shift_factor"]

    # ----------------------------------------------------------------- conditioning

    def condition(
        self,
        batch: Mapping[str, Any],
        *,
        networks: nn.ModuleDict | None = None,
        dropped: Tensor | None = None,
    ) -> Conditioning:
        """Denoiser kwargs for the batch; ``dropped`` (B,) bool: samples that get the empty
        conditioning. Cached ``context`` / ``pooled`` are used as they are."""
        conditioner = (networks or self.networks)["conditioner"] if self.conditioner else None
        if conditioner is None:
            return {}
        cached = {k: batch[k] for k in ("context", "pooled") if k in batch}
        if not cached:
            return conditioner(batch[conditioner.input_key], dropped=dropped)
        if dropped is None:
            return cached
        empty = conditioner.empty(1)
        return {
            k: torch.where(dropped.to(v.device).view(-1, *[1] * (v.ndim - 1)), empty[k], v)
            for k, v in cached.items()
        }

    # ----------------------------------------------------------------- training

    def _generators(self, keys: Sequence[str], *tag: object) -> list[torch.Generator]:
        """One generator per sample, seeded by (seed, *tag, its key)."""
        seed = self.hparams.seed
        return [
            torch.Generator(self.device).manual_seed(stable_seed(seed, *tag, key)) for key in keys
        ]

    def loss(
        self,
        batch: Mapping[str, Any],
        generators: Sequence[torch.Generator],
        networks: nn.ModuleDict,
        drop_prob: float,
    ) -> Tensor:
        """The diffusion loss of a batch; each sample's draws come from its generator."""
        device, hp = self.device, self.hparams
        dropped = torch.stack([torch.rand((), generator=g, device=device) for g in generators])
        t = training_timesteps(
            self.schedule,
            generators,
            hp.timestep_sampling,
            hp.timestep_loc,
            hp.timestep_scale,
        )
        x0 = self.latents(batch, generators)
        noise = _randn(generators, x0.shape[1:], x0)
        # the mask stays on the device: only captions (strings) need it on the host
        cond = self.condition(batch, networks=networks, dropped=dropped < drop_prob)
        alpha_bar = self.schedule.alphas_cumprod_at(t).to(device)
        x_t = model_input(q_sample(x0, noise, alpha_bar), alpha_bar, hp.prediction)
        output = networks["denoiser"](x_t, t.to(x0.dtype), **cond)
        return diffusion_loss(
            output,
            x0,
            noise,
            alpha_bar,
            prediction=self.hparams.prediction,
            weighting=self.hparams.loss_weighting,
            gamma=self.hparams.min_snr_gamma,
            sample_weights=batch.get("loss_weight"),
        )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        generators = self._generators(batch["key"], "train", self.global_step)
        loss = self.loss(batch, generators, self.networks, self.hparams.cond_drop_prob)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["key"]))
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """The loss of the sampling weights (EMA when kept), with fixed noise per sample."""
        generators = self._generators(batch["key"], "val")
        loss = self.loss(batch, generators, self.sampling_networks(), 0.0)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["key"]))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """One EMA update per optimizer step (global_step counts those)."""
        if self.ema is not None and self.global_step != self._ema_step:
            self._ema_step = self.global_step
            self.ema.update(self._trainable())

    def configure_model(self) -> None:
        """Compile the denoiser that trains (once; the EMA copy samples eagerly)."""
        if not self._compiled:
            self._compiled = compile_network(self.denoiser, self.hparams.compile)

    def configure_optimizers(self) -> Any:
        if self.make_optimizer is None:
            raise ValueError("LatentDiffusion was built without an optimizer: it cannot train")
        params = [p for p in self.networks.parameters() if p.requires_grad]
        optimizer = self.make_optimizer(params)
        if self.make_lr_scheduler is None:
            return optimizer
        scheduler = self.make_lr_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ----------------------------------------------------------------- sampling

    def pipeline(self, networks: nn.ModuleDict | None = None) -> Pipeline:
        """The ``Pipeline`` over ``networks`` (default: the sampling weights, EMA when
        kept), this module's VAE, schedule, prediction and image size: how it generates."""
        networks = networks or self.sampling_networks()
        return Pipeline(
            networks["denoiser"],
            dict(networks).get("conditioner"),
            self.vae,
            self.schedule,
            self.hparams.prediction,
            self.image_size,
        )


def _randn(generators: Sequence[torch.Generator], shape: Sequence[int], like: Tensor) -> Tensor:
    """(B, *shape) standard normal noise, sample i drawn from generators[i]."""
    return torch.stack(
        [torch.randn(shape, generator=g, device=like.device, dtype=like.dtype) for g in generators]
    )
