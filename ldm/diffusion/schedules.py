"""Noise schedules and sampling-timestep spacing, all in float64.

Implements the linear schedule of DDPM (Ho et al. 2020), Stable Diffusion's
``scaled_linear``, the cosine schedule of Nichol & Dhariwal (2021) with its beta
clipping, zero-terminal-SNR rescaling (Lin et al. 2023, Algorithm 1), the
``leading`` / ``trailing`` / ``linspace`` spacings of Lin et al. (2023, Table 2) and the
sigma spacing of Karras et al. (2022, Eq. 5).

Conventions: training timesteps are ``0 .. T-1``; ``alphas_cumprod[t]`` is
``alpha_bar_t``; ``sigmas`` are the variance-exploding noise levels
``sqrt((1 - alpha_bar) / alpha_bar)`` of Karras et al.; a sampling run ends at the
clean data, written as timestep ``-1`` with ``alpha_bar = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SCHEDULES = (*BETA_SCHEDULES, "flow", "edm")  # what make_schedule builds
SPACINGS = ("leading", "trailing", "linspace", "karras")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "log_normal")
FINAL_TIMESTEP = -1  # the "previous timestep" of the last sampling step: clean data

_DEFAULT_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def betas_linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas evenly spaced from ``beta_start`` to ``beta_end`` (DDPM)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def betas_scaled_linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Square roots of the betas evenly spaced (Stable Diffusion's schedule)."""
    root = torch.linspace(
        math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=torch.float64
    )
    return root**2


def betas_cosine(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal (2021) Eq. 17, betas clipped to ``max_beta``."""
    steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. (2023) Algorithm 1: shift and scale sqrt(alpha_bar) so it ends at exactly 0."""
    sqrt_ab = torch.cumprod(1 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return _betas(sqrt_ab**2)


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete diffusion schedule: ``betas`` and ``alphas_cumprod`` in float64, shape (T,)."""

    betas: Tensor
    alphas_cumprod: Tensor

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    @property
    def sigmas(self) -> Tensor:
        """Variance-exploding noise levels ``sqrt((1 - a) / a)``; ``inf`` at zero SNR."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio ``a / (1 - a)``."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    @property
    def log_snr(self) -> Tensor:
        """``log(a) - log(1 - a)``; ``-inf`` at zero SNR."""
        return self.alphas_cumprod.log() - torch.log1p(-self.alphas_cumprod)

    def alphas_cumprod_at(self, t: Tensor) -> Tensor:
        """``alpha_bar`` at real-valued timesteps ``t`` (float64, same shape and device).

        Integer ``t`` in ``[-1, T-1]`` reads the table (``-1`` is the clean data, 1.0);
        fractional ``t`` in ``(0, T-1)`` interpolates ``log sigma`` linearly between its
        neighbours, as k-diffusion's discrete-schedule wrappers do.
        """
        t = torch.as_tensor(t, dtype=torch.float64)
        flat = t.detach().cpu().reshape(-1)
        if len(flat) > 1 and bool((flat == flat[0]).all()):  # a sampler's batch: one timestep
            return self.alphas_cumprod_at(flat[:1]).expand(t.shape).contiguous().to(t.device)
        last = self.num_train_timesteps - 1
        integer = flat == flat.round()
        if bool(((flat < -1) | (flat > last) | (~integer & (flat < 0))).any()):
            raise ValueError(f"timesteps must be -1 or lie in [0, {last}], got {flat.tolist()}")
        out = torch.empty_like(flat)
        ints = flat[integer].long()
        table = self.alphas_cumprod.cpu()
        out[integer] = torch.where(ints < 0, 1.0, table[ints.clamp(min=0)])
        frac_t = flat[~integer]
        lo = frac_t.floor().long()
        weight = frac_t - lo
        log_sigmas = self.sigmas.cpu().log()
        log_sigma = log_sigmas[lo] * (1 - weight) + log_sigmas[lo + 1] * weight
        out[~integer] = torch.sigmoid(-2 * log_sigma)  # 1 / (1 + sigma^2)
        return out.reshape(t.shape).to(t.device)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Real-valued timesteps whose interpolated ``sigma`` is ``sigma`` (inverse of the above).

        ``sigma`` outside the schedule's finite range is clamped to its ends; ``inf``
        maps to ``T-1`` (the zero-SNR end).
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        log_sigmas = self.sigmas.cpu().log()
        log_sigmas = log_sigmas[torch.isfinite(log_sigmas)]  # increasing in t
        target = sigma.log()
        if len(log_sigmas) == 1:  # two-step zero-SNR schedule: one finite level
            t = torch.zeros_like(target)
        else:
            idx = torch.searchsorted(log_sigmas, target).clamp(1, len(log_sigmas) - 1)
            lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
            t = (idx - 1).to(torch.float64) + ((target - lo) / (hi - lo)).clamp(0, 1)
        return torch.where(torch.isinf(sigma), float(self.num_train_timesteps - 1), t)

    def sampling_points(
        self, steps: int, spacing: str, *, offset: int = 0, rho: float = 7.0
    ) -> tuple[Tensor, Tensor]:
        """Timesteps and ``alpha_bar`` of a sampling run.

        Returns ``(t, alpha_bar)``: ``t`` has shape (steps,), float64, strictly
        decreasing; ``alpha_bar`` has shape (steps + 1,): the value at each ``t`` and, last,
        1.0 for the clean data that the final step lands on. Step ``i`` goes from
        ``t[i]`` to ``t[i + 1]`` (``-1`` after the last).
        """
        if spacing == "karras":
            sigmas = karras_sigmas_for(self, steps, rho=rho)
            t = self.sigma_to_t(sigmas)
        else:
            t = sampling_timesteps(self.num_train_timesteps, steps, spacing, offset=offset)
            t = t.to(torch.float64)
        alpha_bar = self.alphas_cumprod_at(torch.cat([t, t.new_tensor([FINAL_TIMESTEP])]))
        return t, alpha_bar


def shift_time(u: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift (Esser et al. 2024, Eq. 23): ``shift u / (1 + (shift - 1) u)``;
    above 1 it spends more of the run at high noise."""
    return shift * u / (1 + (shift - 1) * u)


def resolution_shift(
    resolution: int | Sequence[int], base_resolution: int | Sequence[int]
) -> float:
    """SD3's resolution-dependent shift (Esser et al. 2024, Sec. 5.3.2): ``sqrt(m / n)`` for
    ``m`` and ``n`` pixels at the resolution and at the base resolution it was tuned for."""

    def pixels(size: int | Sequence[int]) -> int:
        return size * size if isinstance(size, int) else math.prod(size)

    return math.sqrt(pixels(resolution) / pixels(base_resolution))


@dataclass(frozen=True, eq=False)
class FlowSchedule(Schedule):
    """Rectified flow (Liu et al. 2023) as in SD3 (Esser et al. 2024): ``x = (1 - tau) x0 +
    tau eps``, in VP terms ``alpha_bar = (1 - tau)^2 / ((1 - tau)^2 + tau^2)``.

    Timestep ``t`` in ``[-1, T-1]`` is real-valued: ``tau = shift_time((t + 1) / T, shift)``,
    so ``t = -1`` is the clean data and ``t = T-1`` pure noise (zero terminal SNR). The
    table (``alphas_cumprod``) holds the integer timesteps; every other method is closed form.
    """

    shift: float = 1.0

    def tau(self, t: Tensor) -> Tensor:
        """The flow time ``tau`` in [0, 1] of timesteps ``t``."""
        u = (torch.as_tensor(t, dtype=torch.float64) + 1) / self.num_train_timesteps
        return shift_time(u, self.shift)

    def alphas_cumprod_at(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        last = self.num_train_timesteps - 1
        if bool(((t < -1) | (t > last)).any()):
            raise ValueError(f"timesteps must lie in [-1, {last}], got {t.flatten().tolist()}")
        return _flow_alpha_bar(t, self.num_train_timesteps, self.shift)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Timesteps at Karras noise level ``sigma = tau / (1 - tau)``, clamped to the table's
        ``[0, T-1]`` as ``Schedule``'s are (``inf``: ``T-1``)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        tau = torch.where(torch.isinf(sigma), 1.0, sigma / (1 + sigma))
        u = tau / (self.shift - (self.shift - 1) * tau)  # the inverse of shift_time
        return (u * self.num_train_timesteps - 1).clamp(0, self.num_train_timesteps - 1)

    def sampling_points(
        self, steps: int, spacing: str, *, offset: int = 0, rho: float = 7.0
    ) -> tuple[Tensor, Tensor]:
        """As ``Schedule``'s, except that ``linspace`` is not rounded: ``tau`` before the
        shift goes evenly from 1 to ``1 / T`` (diffusers' ``FlowMatchEulerDiscreteScheduler``)."""
        if spacing != "linspace" or steps == 1:
            return super().sampling_points(steps, spacing, offset=offset, rho=rho)
        T = self.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer in [1, {T}], got {steps!r}")
        t = torch.linspace(T - 1, 0, steps, dtype=torch.float64)
        alpha_bar = self.alphas_cumprod_at(torch.cat([t, t.new_tensor([FINAL_TIMESTEP])]))
        return t, alpha_bar


def flow_schedule(num_train_timesteps: int = 1000, shift: float = 1.0) -> FlowSchedule:
    """The rectified-flow schedule with ``shift`` (1: none; SD3 uses 3 at 1024 px)."""
    if not shift > 0:
        raise ValueError(f"the flow shift must be positive, got {shift}")
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    alpha_bar = _flow_alpha_bar(t, num_train_timesteps, shift)
    return FlowSchedule(betas=_betas(alpha_bar), alphas_cumprod=alpha_bar, shift=float(shift))


def _flow_alpha_bar(t: Tensor, num_train_timesteps: int, shift: float) -> Tensor:
    tau = shift_time((t + 1) / num_train_timesteps, shift)
    return (1 - tau) ** 2 / ((1 - tau) ** 2 + tau**2)


def _betas(alpha_bar: Tensor) -> Tensor:
    """The betas whose cumulative product of ``1 - beta`` is ``alpha_bar``."""
    return 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])


@dataclass(frozen=True, eq=False)
class EDMSchedule(Schedule):
    """Karras et al. (2022)'s noise levels: ``x_ve = x0 + sigma eps`` for ``sigma`` in
    ``[sigma_min, sigma_max]``, in VP terms ``alpha_bar = 1 / (1 + sigma^2)``.

    Timestep ``t`` in ``[0, T-1]`` is real-valued and affine in ``log sigma`` (``t = 0``:
    ``sigma_min``, ``t = T-1``: ``sigma_max``); ``t = -1`` is the clean data. EDM's network
    input ``c_noise = log(sigma) / 4`` is affine in ``t`` too: the network sees ``t``, at the
    scale its time embedding was made for (``c_noise``).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def sigma(self, t: Tensor) -> Tensor:
        """The noise level of timesteps ``t`` in ``[0, T-1]`` (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return _edm_sigma(t, self.num_train_timesteps, self.sigma_min, self.sigma_max)

    def alphas_cumprod_at(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        last = self.num_train_timesteps - 1
        clean = t == FINAL_TIMESTEP
        if bool((((t < 0) | (t > last)) & ~clean).any()):
            raise ValueError(
                f"timesteps must be -1 or lie in [0, {last}], got {t.flatten().tolist()}"
            )
        return torch.where(clean, 1.0, 1 / (1 + self.sigma(t.clamp(min=0)) ** 2))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Timesteps at noise level ``sigma``, clamped to ``[0, T-1]``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        t = (sigma.log() - lo) / (hi - lo) * (self.num_train_timesteps - 1)
        return t.clamp(0, self.num_train_timesteps - 1)


def c_noise(sigma: Tensor) -> Tensor:
    """EDM's noise conditioning ``log(sigma) / 4`` (Karras et al. 2022, Table 1)."""
    return torch.as_tensor(sigma, dtype=torch.float64).log() / 4


def edm_schedule(
    num_train_timesteps: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0
) -> EDMSchedule:
    """EDM's noise levels between ``sigma_min`` and ``sigma_max`` (the paper's 0.002, 80)."""
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    alpha_bar = 1 / (1 + _edm_sigma(t, num_train_timesteps, sigma_min, sigma_max) ** 2)
    return EDMSchedule(_betas(alpha_bar), alpha_bar, float(sigma_min), float(sigma_max))


def _edm_sigma(t: Tensor, num_train_timesteps: int, sigma_min: float, sigma_max: float) -> Tensor:
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return torch.exp(lo + t / (num_train_timesteps - 1) * (hi - lo))


def make_schedule(
    name: str,
    num_train_timesteps: int = 1000,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    zero_terminal_snr: bool = False,
    shift: float | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Schedule:
    """Build a named schedule: ``linear``, ``scaled_linear``, ``cosine`` or ``flow``.

    ``beta_start`` / ``beta_end`` default to DDPM's (1e-4, 0.02) for ``linear`` and
    Stable Diffusion's (0.00085, 0.012) for ``scaled_linear``; ``cosine`` takes neither.
    ``flow`` (rectified flow, ``FlowSchedule``) takes ``shift`` (default 1) and no betas;
    ``edm`` (``EDMSchedule``) takes ``sigma_min`` / ``sigma_max`` (default 0.002, 80).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
    if name == "flow":
        if beta_start is not None or beta_end is not None or zero_terminal_snr:
            raise ValueError(
                "the flow schedule takes no beta_start / beta_end / zero_terminal_snr (it ends "
                "at pure noise by construction); remove them"
            )
        return flow_schedule(num_train_timesteps, 1.0 if shift is None else shift)
    if shift is not None:
        raise ValueError(f"shift applies to the flow schedule only, not {name!r}; remove it")
    if name == "edm":
        if beta_start is not None or beta_end is not None or zero_terminal_snr:
            raise ValueError("the edm schedule takes sigma_min / sigma_max, not betas; remove them")
        levels = {"sigma_min": sigma_min, "sigma_max": sigma_max}
        return edm_schedule(
            num_train_timesteps, **{k: v for k, v in levels.items() if v is not None}
        )
    if sigma_min is not None or sigma_max is not None:
        raise ValueError(f"sigma_min / sigma_max apply to the edm schedule only, not {name!r}")
    if name == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule takes no beta_start / beta_end; remove them")
        betas = betas_cosine(num_train_timesteps)
    else:
        default_start, default_end = _DEFAULT_BETA_RANGE[name]
        start = default_start if beta_start is None else beta_start
        end = default_end if beta_end is None else beta_end
        if not 0 < start < end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {start} and {end}")
        maker = betas_linear if name == "linear" else betas_scaled_linear
        betas = maker(num_train_timesteps, start, end)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return Schedule(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, dim=0))


def training_timesteps(
    schedule: Schedule,
    generators: Sequence[torch.Generator],
    sampling: str = "uniform",
    loc: float = 0.0,
    scale: float = 1.0,
) -> Tensor:
    """One training timestep per generator (drawn from it), float64 on its device.

    ``uniform``: an integer in ``[0, T)``. ``logit_normal`` (SD3, Esser et al. 2024, Eq. 19):
    ``t = sigmoid(n) T - 1`` for ``n ~ N(loc, scale^2)``, real-valued, which puts ``tau``
    of an unshifted flow schedule at ``sigmoid(n)``; on a VP schedule, whose table starts at
    0, clamped there. ``log_normal`` (EDM, Karras et al. 2022, Table 1): the timestep of
    ``sigma = exp(n)`` (``loc`` -1.2, ``scale`` 1.2 in the paper), clamped to the schedule's
    range.
    """
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(
            f"unknown timestep sampling {sampling!r}; choose one of {TIMESTEP_SAMPLINGS}"
        )
    T = schedule.num_train_timesteps
    if sampling == "uniform":
        draws = [torch.randint(0, T, (), generator=g, device=g.device) for g in generators]
        return torch.stack(draws).double()
    if not scale > 0:
        raise ValueError(f"the logit-normal scale must be positive, got {scale}")
    n = torch.stack(
        [torch.randn((), generator=g, device=g.device, dtype=torch.float64) for g in generators]
    )
    if sampling == "log_normal":
        return schedule.sigma_to_t(torch.exp(loc + scale * n).cpu()).to(n.device)
    t = torch.sigmoid(loc + scale * n) * T - 1
    low = -1.0 if isinstance(schedule, FlowSchedule) else 0.0
    return t.clamp(low, T - 1)


def _round_half_even(value: Fraction) -> int:
    return round(value)  # Python rounds Fractions exactly, ties to even, like numpy


def sampling_timesteps(
    num_train_timesteps: int, steps: int, spacing: str, *, offset: int = 0
) -> Tensor:
    """Integer timesteps for ``leading``, ``trailing`` or ``linspace`` spacing (int64).

    Exact rational arithmetic replaces the float ``arange`` / ``linspace`` of Lin et al.
    (2023, Table 2), so the result never depends on rounding error. ``offset`` shifts
    ``leading`` timesteps (Stable Diffusion uses 1). ``linspace`` with one step gives
    ``[T-1]``: a one-step sampler must start from pure noise.
    """
    T = num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}], got {steps!r}")
    if spacing not in SPACINGS[:3]:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    if offset and spacing != "leading":
        raise ValueError(f"offset applies to 'leading' spacing only, got spacing={spacing!r}")
    if spacing == "leading":
        ratio = T // steps
        last = (steps - 1) * ratio + offset
        if offset < 0 or last > T - 1:
            raise ValueError(
                f"offset={offset} puts leading timesteps outside [0, {T - 1}] at steps={steps}"
            )
        values = [(steps - 1 - i) * ratio + offset for i in range(steps)]
    elif spacing == "trailing":
        values = [_round_half_even(Fraction(T * (steps - i), steps)) - 1 for i in range(steps)]
    elif steps == 1:
        values = [T - 1]
    else:
        values = [
            _round_half_even(Fraction((T - 1) * (steps - 1 - i), steps - 1)) for i in range(steps)
        ]
    return torch.tensor(values, dtype=torch.int64)


def previous_timesteps(timesteps: Tensor) -> Tensor:
    """The timestep each sampling step moves to: the next in the list, ``-1`` after the last."""
    return torch.cat([timesteps[1:], timesteps.new_tensor([FINAL_TIMESTEP])])


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) Eq. 5: ``steps`` sigmas from ``sigma_max`` down to ``sigma_min``."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0 < sigma_min <= sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got {sigma_min}, {sigma_max}")
    if steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def karras_sigmas_for(schedule: Schedule, steps: int, rho: float = 7.0) -> Tensor:
    """Karras sigmas spanning a schedule's range.

    With zero terminal SNR the largest sigma is infinite: the run starts there and the
    remaining ``steps - 1`` sigmas follow Eq. 5 from the largest finite sigma down to the
    smallest (just the smallest when ``steps = 2``).
    """
    T = schedule.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}], got {steps!r}")
    sigmas = schedule.sigmas
    if schedule.zero_terminal_snr:
        head = torch.tensor([math.inf], dtype=torch.float64)
        if steps <= 2:  # a run always ends at the smallest sigma when it has room to
            return torch.cat([head, sigmas[:1]])[:steps]
        tail = karras_sigmas(float(sigmas[0]), float(sigmas[-2]), steps - 1, rho)
        return torch.cat([head, tail])
    return karras_sigmas(float(sigmas[0]), float(sigmas[-1]), steps, rho)
