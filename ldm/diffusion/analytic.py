"""Gaussian-mixture data whose optimal denoiser is known in closed form.

For ``x0 ~ sum_k w_k N(m_k, diag(S_k))`` and ``x_t = a x0 + s eps``, component ``k``
gives ``x_t ~ N(a m_k, a^2 S_k + s^2)`` and ``E[x0 | x_t, k] = m_k + a S_k (x_t - a m_k) /
(a^2 S_k + s^2)``; the posterior mean mixes these by the responsibilities. That is the
exact (minimum-MSE) ``x0`` predictor, from which the exact ``eps`` and ``v`` follow. For a
single Gaussian the probability-flow ODE maps ``x_t`` to ``m + sqrt(S) z`` with ``z`` the
standardised ``x_t``: a closed-form reference for deterministic samplers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.objective import check_prediction, convert, input_scale, vp_coefficients
from ldm.diffusion.samplers import Denoiser
from ldm.diffusion.schedules import Schedule


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Diagonal Gaussian mixture: ``weights`` (K,), ``means`` (K, D), ``stds`` (K, D)."""

    weights: Tensor
    means: Tensor
    stds: Tensor

    def __post_init__(self) -> None:
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.stds.shape != (k, d):
            raise ValueError(
                f"weights {tuple(self.weights.shape)}, means {tuple(self.means.shape)} and "
                f"stds {tuple(self.stds.shape)} do not describe K components in D dimensions"
            )
        if bool((self.stds <= 0).any()) or bool((self.weights <= 0).any()):
            raise ValueError("component stds and weights must be positive")
        if not math.isclose(float(self.weights.sum()), 1.0, rel_tol=1e-9):
            raise ValueError(f"weights must sum to 1, got {float(self.weights.sum())}")

    @classmethod
    def gaussian(cls, mean: Tensor, std: Tensor) -> GaussianMixture:
        """A single Gaussian ``N(mean, diag(std^2))``."""
        mean, std = torch.as_tensor(mean).double(), torch.as_tensor(std).double()
        return cls(torch.ones(1, dtype=torch.float64), mean[None], std[None])

    @classmethod
    def ring(cls, components: int = 8, radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
        """Equal-weight components on a circle in 2-D: the classic sampler test."""
        angles = torch.arange(components, dtype=torch.float64) * 2 * math.pi / components
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        weights = torch.full((components,), 1 / components, dtype=torch.float64)
        return cls(weights, means, torch.full_like(means, std))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """The mixture's full covariance matrix (D, D)."""
        centred = self.means - self.mean()
        within = torch.diag(self.weights @ self.stds**2)
        return within + centred.T @ (self.weights[:, None] * centred)

    def sample(
        self, n: int, generator: torch.Generator | None = None, *, return_labels: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``n`` samples in float64 (and their component labels)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + self.stds[labels] * noise
        return (x, labels) if return_labels else x

    def _component_log_prob(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        # x (B, D); mean (B or 1, K, D); var (B or 1, K, D) -> (B, K)
        terms = (x[:, None, :] - mean) ** 2 / var + var.log() + math.log(2 * math.pi)
        return -0.5 * (terms @ terms.new_ones(terms.shape[-1]))  # a sum, 7x faster for small D

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of samples ``x`` (B, D)."""
        x = x.double()
        comp = self._component_log_prob(x, self.means[None], self.stds[None] ** 2)
        return torch.logsumexp(comp + self.weights.log(), dim=1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities of clean samples ``x`` (B, D) -> (B, K)."""
        comp = self._component_log_prob(x.double(), self.means[None], self.stds[None] ** 2)
        return torch.softmax(comp + self.weights.log(), dim=1)

    def posterior_mean(
        self, x_t: Tensor, alpha_bar: Tensor | float, labels: Tensor | None = None
    ) -> Tensor:
        """``E[x0 | x_t]`` for ``x_t`` (B, D) at ``alpha_bar`` (scalar or (B,)); with
        ``labels`` (B,), ``E[x0 | x_t, k]`` for component (class) ``k``, and the whole
        mixture where the label is -1."""
        x = x_t.double()
        weights, means, stds = (p.to(x.device) for p in (self.weights, self.means, self.stds))
        uniform = torch.is_tensor(alpha_bar) and alpha_bar.ndim == 1 and len(alpha_bar) > 1
        if uniform and bool((alpha_bar == alpha_bar[0]).all()):  # one timestep: (K, D) only
            alpha_bar = alpha_bar[:1]
        a, s = vp_coefficients(alpha_bar, x)  # (B or 1, 1)
        a, s = a.reshape(-1, 1, 1), s.reshape(-1, 1, 1)  # (B or 1, 1, 1)
        var0 = stds[None] ** 2  # (1, K, D)
        var_t = a**2 * var0 + s**2  # (B or 1, K, D)
        if len(weights) == 1 and labels is None:  # one Gaussian: no responsibilities
            return (means + a[:, 0] * var0[0] / var_t[:, 0] * (x - a[:, 0] * means)).to(x_t.dtype)
        log_r = self._component_log_prob(x, a * means[None], var_t) + weights.log()
        if labels is not None:  # a class's posterior: its own component only
            labels = labels.to(x.device)[:, None]
            keep = (labels < 0) | (torch.arange(len(weights), device=x.device) == labels)
            log_r = log_r.masked_fill(~keep, -math.inf)
        r = torch.softmax(log_r, dim=1)  # (B, K)
        per_component = means[None] + a * var0 / var_t * (x[:, None, :] - a * means)
        return torch.einsum("bk,bkd->bd", r, per_component).to(x_t.dtype)

    def denoiser(self, schedule: Schedule, prediction: str) -> Denoiser:
        """The exact ``prediction`` model ``(network input, t[, labels]) -> output`` under
        ``schedule`` (the input is the VP state, or the flow state for ``flow``:
        ``model_input``); ``labels`` (B,) condition on components as ``posterior_mean``'s do,
        so ``ldm.diffusion.guidance.cfg`` can guide it with -1 as the unconditional label."""
        check_prediction(prediction)

        def model(x_in: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
            alpha_bar = schedule.alphas_cumprod_at(t).to(x_in.device)
            x_t = x_in / input_scale(alpha_bar, prediction, x_in)  # the VP state
            x0 = self.posterior_mean(x_t, alpha_bar, labels)
            return convert(x0, x_t, alpha_bar, src="x0", dst=prediction)

        return model

    def flow_map(self, x_t: Tensor, alpha_bar: float) -> Tensor:
        """Where the probability-flow ODE takes ``x_t`` at time 0 (single Gaussian only)."""
        if self.means.shape[0] != 1:
            raise ValueError("the closed-form ODE solution exists for a single Gaussian only")
        mean, std = self.means[0], self.stds[0]
        a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
        z = (x_t.double() - a * mean) / (a**2 * std**2 + s**2).sqrt()
        return (mean + std * z).to(x_t.dtype)


@dataclass(frozen=True, eq=False)
class EmpiricalMixture:
    """Equal-weight isotropic Gaussians ``N(m_k, std^2 I)`` around ``points`` (K, D), each
    in group ``groups[k]``: a data set as a mixture whose exact denoiser is two matrix
    products per step (``GaussianMixture`` would hold a (B, K, D) tensor). A sample may be
    restricted to one group's components (its caption): the exact conditional denoiser."""

    points: Tensor
    std: float
    groups: Tensor | None = None

    def __post_init__(self) -> None:
        if self.points.ndim != 2 or not self.std > 0:
            raise ValueError(
                f"need points (K, D) and std > 0, got {tuple(self.points.shape)}, {self.std}"
            )
        if self.groups is not None and self.groups.shape != self.points.shape[:1]:
            raise ValueError(f"groups {tuple(self.groups.shape)} must be ({len(self.points)},)")

    def posterior_mean(
        self, x_t: Tensor, alpha_bar: Tensor | float, group: Tensor | None = None
    ) -> Tensor:
        """``E[x0 | x_t]`` for ``x_t`` (B, D) at ``alpha_bar`` (scalar or (B,)); with
        ``group`` (B,), sample i mixes only the components of group ``group[i]`` (-1: all)."""
        points = self.points.to(x_t.device, x_t.dtype)
        a, s = (c.reshape(-1, 1) for c in vp_coefficients(alpha_bar, x_t))  # (B or 1, 1)
        var0 = self.std**2
        var_t = a**2 * var0 + s**2  # (B or 1, 1): the same for every component
        # log N(x_t; a m_k, var_t I) up to terms equal for all k:
        # (a x.m_k - a^2 |m_k|^2 / 2) / var_t
        logits = (a * (x_t @ points.T) - 0.5 * a**2 * points.square().sum(1)) / var_t
        if group is not None and self.groups is not None:
            groups = self.groups.to(x_t.device)
            foreign = (group[:, None] >= 0) & (groups[None] != group[:, None])
            logits = logits.masked_fill(foreign, float("-inf"))
        mixed = torch.softmax(logits, dim=1) @ points  # sum_k r_k m_k
        shrink = a * var0 / var_t
        return (1 - a * shrink) * mixed + shrink * x_t

    def denoiser(self, schedule: Schedule, prediction: str) -> Denoiser:
        """The exact ``prediction`` model ``(x_t, t) -> output`` under ``schedule`` (any
        trailing shape: samples are flattened to D)."""
        check_prediction(prediction)

        def model(x_in: Tensor, t: Tensor, group: Tensor | None = None) -> Tensor:
            alpha_bar = schedule.alphas_cumprod_at(t).to(x_in.device)
            x_t = x_in / input_scale(alpha_bar, prediction, x_in)  # the VP state
            flat = x_t.reshape(len(x_t), -1)
            x0 = self.posterior_mean(flat, alpha_bar, group).reshape(x_t.shape)
            return convert(x0, x_t, alpha_bar, src="x0", dst=prediction)

        return model
