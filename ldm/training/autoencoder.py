"""The KL autoencoder's LightningModule: LDM's ``LPIPSWithDiscriminator`` objective
(Rombach et al. 2022, after Esser et al. 2021's VQGAN).

Generator step: ``sum(|x - x'| + w_p LPIPS(x, x')) / exp(logvar) + logvar`` per pixel
(a learned scalar ``logvar``), summed and divided by the batch size, plus ``kl_weight``
times the posterior's KL, plus, from ``disc_start`` on, ``disc_weight * lambda * -D(x')``,
where ``lambda = |grad nll| / |grad g|`` at the decoder's last layer (the adaptive weight).
Discriminator step: the hinge loss ``(relu(1 - D(x)) + relu(1 + D(x'))) / 2``.
Two optimizers, stepped by hand (Lightning's manual optimization).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torchvision.utils import make_grid, save_image

from ldm.seeding import stable_seed
from ldm.training.sampling_callbacks import log_image
from ldm.training.speed import compile_network, compile_options, to_channels_last

RECONSTRUCTION_LOSSES = ("l1", "l2")
# Checkpoints hold the state after each step, which is what resuming needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class AutoencoderTraining(L.LightningModule):
    """Trains an ``AutoencoderKL`` with reconstruction, KL, LPIPS and PatchGAN losses."""

    def __init__(
        self,
        vae: nn.Module,
        discriminator: nn.Module | None = None,  # None: no adversarial loss
        perceptual: nn.Module | None = None,  # LPIPS; None: no perceptual loss
        *,
        optimizer: Callable[[Iterable[nn.Parameter]], Optimizer],  # autoencoder (+ logvar)
        disc_optimizer: Callable[[Iterable[nn.Parameter]], Optimizer] | None = None,
        reconstruction: str = "l1",  # l1 | l2
        perceptual_weight: float = 1.0,
        kl_weight: float = 1e-6,
        disc_weight: float = 0.5,
        disc_start: int = 50001,  # global step from which the adversarial terms count
        adaptive_weight: bool = True,  # VQGAN's gradient-balanced generator weight
        logvar_init: float = 0.0,  # the learned output log-variance of the NLL
        posterior_logvar_init: float | None = None,  # e.g. -8: start nearly deterministic
        gradient_clip_val: float | None = None,  # manual optimization clips here
        lr_scheduler: Callable[[Optimizer], Any] | None = None,  # a partial: opt -> scheduler
        train_encoder: bool = True,  # False: decoder-only fine-tuning, the latents stay
        channels_last: bool = True,  # channels-last VAE weights (ldm.training.speed)
        compile: bool | str | Mapping[str, Any] = False,  # torch.compile encoder and decoder
        seed: int = 0,
    ):
        super().__init__()
        if reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTION_LOSSES}")
        if discriminator is not None and disc_optimizer is None:
            raise ValueError("a discriminator needs disc_optimizer")
        self.automatic_optimization = False
        # Checkpoints keep plain values only (weights_only loading): no modules, no partials.
        self.save_hyperparameters(
            ignore=[
                "vae",
                "discriminator",
                "perceptual",
                "optimizer",
                "disc_optimizer",
                "lr_scheduler",
            ]
        )
        self.make_optimizer, self.make_disc_optimizer = optimizer, disc_optimizer
        self.make_lr_scheduler = lr_scheduler
        compile_options(compile)  # a bad value fails here, not at the first step
        self._compiled = False
        if channels_last:
            to_channels_last(vae)
            if discriminator is not None:
                to_channels_last(discriminator)
        self.vae, self.discriminator, self.perceptual = vae, discriminator, perceptual
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))
        if posterior_logvar_init is not None:
            self._init_posterior_logvar(posterior_logvar_init)
        if not train_encoder:  # SD's ft-MSE decoders: latent models trained on it still fit
            for part in (vae.encoder, vae.quant_conv):
                if part is not None:
                    part.requires_grad_(False)

    @torch.no_grad()
    def _init_posterior_logvar(self, value: float) -> None:
        """Start the encoder's log-variance output at ``value`` (its bias; weights unchanged).

        From scratch, a posterior std near 1 buries the small initial means in noise and the
        decoder learns little but the mean image for the first hundreds of steps; starting
        near-deterministic (the KL term still pulls the variance up) learns several times
        faster on small data.
        """
        last = self.vae.quant_conv if self.vae.quant_conv is not None else self.vae.encoder.conv_out
        last.bias[self.vae.latent_channels :] = value

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vae_config"] = dict(self.vae.config)

    # ----------------------------------------------------------------- losses

    def _nll(self, x: Tensor, recon: Tensor) -> tuple[Tensor, Tensor]:
        """(weighted NLL, plain reconstruction loss), both per-batch scalars."""
        rec = (x - recon).abs() if self.hparams.reconstruction == "l1" else (x - recon).square()
        if self.perceptual is not None and self.hparams.perceptual_weight > 0:
            p = self.perceptual(x.contiguous(), recon.contiguous())  # (B,)
            rec = rec + self.hparams.perceptual_weight * p.view(-1, 1, 1, 1)
        nll = rec / torch.exp(self.logvar) + self.logvar
        return nll.sum() / x.shape[0], rec.mean()

    def _adaptive_weight(self, nll: Tensor, g_loss: Tensor) -> Tensor:
        if not self.hparams.adaptive_weight:
            return torch.tensor(self.hparams.disc_weight, device=self.device)
        last = self.vae.decoder.conv_out.weight
        nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach() * self.hparams.disc_weight

    def losses(
        self, batch: Mapping[str, Any], generator: torch.Generator, *, adversarial: bool
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The generator's loss terms (``loss`` is their total) and the reconstruction."""
        x = batch["image"]
        posterior = self.vae.encode(x)
        recon = self.vae.decode(posterior.sample(generator))
        nll, rec = self._nll(x, recon)
        kl = posterior.kl().sum() / x.shape[0]
        terms = {"rec_loss": rec, "nll": nll, "kl": kl, "logvar": self.logvar.detach()}
        loss = nll + self.hparams.kl_weight * kl
        if adversarial:
            g_loss = -self.discriminator(recon).mean()
            weight = self._adaptive_weight(nll, g_loss) if self.training else torch.zeros(())
            loss = loss + weight * g_loss
            terms.update(g_loss=g_loss.detach(), d_weight=weight)
        terms["loss"] = loss
        return terms, recon

    def _disc_loss(self, x: Tensor, recon: Tensor) -> Tensor:
        real, fake = self.discriminator(x.contiguous()), self.discriminator(recon.detach())
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())

    # ----------------------------------------------------------------- steps

    def _adversarial(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.hparams.disc_start

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        opt_ae, opt_d = optimizers if isinstance(optimizers, list) else (optimizers, None)
        generator = torch.Generator(self.device).manual_seed(
            stable_seed(self.hparams.seed, self.global_step, batch_idx, self.global_rank)
        )
        adversarial = self._adversarial()
        terms, recon = self.losses(batch, generator, adversarial=adversarial)
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=len(batch["image"]))
        opt_ae.zero_grad()
        self.manual_backward(terms["loss"])
        self._clip(opt_ae)
        opt_ae.step()
        if self.make_lr_scheduler is not None:  # manual optimization steps it here
            self.lr_schedulers().step()
        logs = {f"train/{k}": v for k, v in terms.items() if k != "loss"}
        if adversarial:
            d_loss = self._disc_loss(batch["image"], recon)
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            self._clip(opt_d)
            opt_d.step()
            logs["train/d_loss"] = d_loss.detach()
        self.log_dict(logs, batch_size=len(batch["image"]))
        return terms["loss"]

    def _clip(self, optimizer: Any) -> None:
        if self.hparams.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip_val)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        generator = torch.Generator(self.device).manual_seed(
            stable_seed(self.hparams.seed, "val", batch_idx)
        )
        terms, recon = self.losses(batch, generator, adversarial=False)
        size = len(batch["image"])
        values = {f"val/{k}": v for k, v in terms.items() if k != "loss"}
        self.log_dict(values, sync_dist=True, batch_size=size)
        self.log("val/loss", terms["loss"], prog_bar=True, sync_dist=True, batch_size=size)
        if batch_idx == 0:
            self._write_reconstructions(batch["image"], recon)
        return terms["loss"]

    def _write_reconstructions(self, x: Tensor, recon: Tensor) -> None:
        """Originals above reconstructions, to ``<run>/reconstructions/`` and the logger."""
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        count = min(8, x.shape[0])
        grid = make_grid(
            torch.cat([x[:count], recon[:count]]).float().cpu() * 0.5 + 0.5, nrow=count
        )
        folder = Path(self.trainer.default_root_dir) / "reconstructions"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{self.global_step:06d}.png"
        save_image(grid.clamp(0, 1), path)
        log_image(self.trainer, "reconstructions", grid.clamp(0, 1), path)

    def configure_model(self) -> None:
        """Compile the encoder and decoder (once)."""
        if not self._compiled:
            self._compiled = compile_network(self.vae.encoder, self.hparams.compile)
            compile_network(self.vae.decoder, self.hparams.compile)

    def configure_optimizers(self) -> Any:
        params = [*(p for p in self.vae.parameters() if p.requires_grad), self.logvar]
        optimizers = [self.make_optimizer(params)]
        if self.discriminator is not None:
            optimizers.append(self.make_disc_optimizer(self.discriminator.parameters()))
        if self.make_lr_scheduler is None:
            return optimizers
        # The autoencoder's schedule, stepped once per generator step (training_step).
        return optimizers, [self.make_lr_scheduler(optimizers[0])]
