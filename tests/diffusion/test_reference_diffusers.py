"""Schedules and samplers against diffusers, used only as a test-time reference oracle."""

import math
from fractions import Fraction

import pytest
import torch

from ldm.diffusion.analytic import GaussianMixture
from ldm.diffusion.samplers import (
    make_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from ldm.diffusion.schedules import (
    karras_sigmas,
    karras_sigmas_for,
    make_schedule,
    previous_timesteps,
    sampling_timesteps,
)

diffusers = pytest.importorskip("diffusers")
# diffusers' set_timesteps feeds torch tensors to numpy, which warns under numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

MIXTURE = GaussianMixture(
    weights=torch.tensor([0.3, 0.7], dtype=torch.float64),
    means=torch.tensor([[-1.5, 1.0], [1.0, -0.5]], dtype=torch.float64),
    stds=torch.tensor([[0.3, 0.5], [0.5, 0.25]], dtype=torch.float64),
)
# Our schedule name -> diffusers' config for the same betas (its defaults are DDPM's range).
BETAS = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
F32_EPS = torch.finfo(torch.float32).eps  # 2^-23: one float32 ulp, relative


def _scheduler(cls, name, prediction="eps", *, T=1000, zero_snr=False, **config):
    if zero_snr:
        config["rescale_betas_zero_snr"] = True
    return cls(
        num_train_timesteps=T,
        prediction_type=PREDICTION_TYPES[prediction],
        **BETAS[name],
        **config,
    )


def _x_T(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, MIXTURE.dim, generator=generator, dtype=torch.float64)


def _oracle(schedule, prediction):
    """Our exact model, called with whatever timestep diffusers picked (int or float)."""
    model = MIXTURE.denoiser(schedule, prediction)

    def call(x, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return model(x, t)

    return call


def _max_err(a, b):
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------------------------------
# 1. Schedules
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1000, 999, 500])
@pytest.mark.parametrize("zero_snr", [False, True], ids=["plain", "zsnr"])
@pytest.mark.parametrize("name", BETAS)
def test_schedule_matches_diffusers(name, zero_snr, T):
    ours = make_schedule(name, T, zero_terminal_snr=zero_snr)
    theirs = _scheduler(diffusers.DDPMScheduler, name, T=T, zero_snr=zero_snr)
    assert theirs.betas.dtype == theirs.alphas_cumprod.dtype == torch.float32
    if not zero_snr:
        # diffusers makes its betas by a float32 linspace (one ulp off ours), squares one
        # (scaled_linear: two ulps), or rounds float64 values to float32 (cosine: half an ulp).
        ulps = 2 if name == "scaled_linear" else 1
        torch.testing.assert_close(theirs.betas.double(), ours.betas, rtol=ulps * F32_EPS, atol=0)
        if name == "cosine":
            assert torch.equal(theirs.betas, ours.betas.float())
    ab_theirs, ab_ours = theirs.alphas_cumprod.double(), ours.alphas_cumprod
    if zero_snr:
        assert float(ab_theirs[-1]) == float(ab_ours[-1]) == 0.0
        # Algorithm 1 shifts sqrt(alpha_bar) by a float32 constant, so the error is absolute
        # there (measured <= 5.1e-7), relative error grows as alpha_bar -> 0.
        torch.testing.assert_close(ab_theirs.sqrt(), ab_ours.sqrt(), rtol=0, atol=1e-6)
        # The algorithm itself, exactly: diffusers' Algorithm 1 run in float64 on our betas.
        from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

        rescaled = rescale_zero_terminal_snr(make_schedule(name, T).betas)
        torch.testing.assert_close(rescaled, ours.betas, rtol=1e-12, atol=1e-15)
    else:
        # A float32 cumprod gathers ~1 ulp per factor: measured relative error <= 9.3e-7 ...
        torch.testing.assert_close(ab_theirs[:-1], ab_ours[:-1], rtol=2e-6, atol=0)
        # ... but cosine's last beta is clipped to 0.999, and 1 - float32(0.999) is off by
        # 1.3e-5 relative (cancellation), which the last alpha_bar inherits.
        torch.testing.assert_close(ab_theirs[-1:], ab_ours[-1:], rtol=2e-5, atol=0)


# ---------------------------------------------------------------------------------------
# 2. Timestep spacing
# ---------------------------------------------------------------------------------------

STEP_COUNTS = [*range(1, 51), 61, 64, 83, 96, 100, 103, 128, 200, 250, 333, 499, 500, 999, 1000]


def _unrounded_timesteps(T, steps, spacing):
    """What Lin et al. (2023, Table 2) round, as exact fractions (trailing then subtracts 1)."""
    if spacing == "trailing":
        return [Fraction(T * (steps - i), steps) for i in range(steps)]
    return [Fraction((T - 1) * (steps - 1 - i), steps - 1) for i in range(steps)]  # linspace


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T", [1000, 999, 500])
def test_timesteps_match_diffusers(T, spacing):
    theirs = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    ties = extra = 0
    for steps in (s for s in STEP_COUNTS if s <= T):
        theirs.set_timesteps(steps)
        got = theirs.timesteps
        ours = sampling_timesteps(T, steps, spacing)
        if spacing == "linspace" and steps == 1:
            # By design: ours starts a one-step run from pure noise, [T-1]; diffusers gives [0].
            assert got.tolist() == [0] and ours.tolist() == [T - 1]
            continue
        if spacing == "leading":  # integer arithmetic on both sides: always identical
            assert torch.equal(got, ours), steps
            continue
        if len(got) == steps + 1:
            # diffusers quirk: np.arange(T, 0, -T / steps) with an inexact float step can
            # yield one value too many (~1e-13), which rounds to 0 and becomes timestep -1.
            assert spacing == "trailing" and got[-1] == -1, steps
            got, extra = got[:-1], extra + 1
        exact = _unrounded_timesteps(T, steps, spacing)
        shift = -1 if spacing == "trailing" else 0
        for i in (got != ours).nonzero().flatten().tolist():
            # diffusers rounds a float value that should be an exact tie (k + 1/2) but came
            # out a hair below or above it; ours rounds the exact tie to even.
            assert exact[i].denominator == 2 and abs(int(got[i]) - int(ours[i])) == 1, (steps, i)
            assert int(ours[i]) - shift == round(exact[i])  # Fraction rounding: ties to even
            ties += 1
    if spacing == "leading":
        return
    # These grids do hit both quirks (so the checks above are not vacuous), except that
    # linspace never yields an extra value.
    assert ties > 0
    assert (extra > 0) == (spacing == "trailing")


@pytest.mark.parametrize(
    ("T", "steps", "spacing", "index", "theirs", "ours"),
    [
        (1000, 48, "trailing", 3, 936, 937),  # 1000 * 45 / 48 = 937.5, float 937.4999...
        (1000, 96, "trailing", 18, 812, 811),  # 1000 * 78 / 96 = 812.5, float 812.5000...1
        (1000, 27, "linspace", 13, 499, 500),  # 999 * 13 / 26 = 499.5, float 499.4999...
        (999, 29, "linspace", 7, 749, 748),  # 998 * 21 / 28 = 748.5, float 748.5000...1
        (1000, 61, "trailing", 61, -1, None),  # extra value: 1000 / (1000 / 61) > 61 in floats
        (999, 13, "trailing", 13, -1, None),
    ],
)
def test_timestep_quirks_of_diffusers_examples(T, steps, spacing, index, theirs, ours):
    """Examples of the two quirks that test_timesteps_match_diffusers finds and checks."""
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    mine = sampling_timesteps(T, steps, spacing)
    assert int(scheduler.timesteps[index]) == theirs
    if ours is None:
        assert len(scheduler.timesteps) == steps + 1 and len(mine) == steps
        assert torch.equal(scheduler.timesteps[:-1], mine)
    else:
        assert int(mine[index]) == ours


@pytest.mark.parametrize("T", [1000, 999, 500])
def test_leading_offset_matches_diffusers_steps_offset(T):
    theirs = diffusers.DDIMScheduler(num_train_timesteps=T, steps_offset=1)
    for steps in (s for s in STEP_COUNTS if s <= T):
        theirs.set_timesteps(steps)
        if int(theirs.timesteps.max()) > T - 1:
            # diffusers returns timestep T, out of the table; we refuse (steps = T only).
            assert steps == T
            with pytest.raises(ValueError, match="offset"):
                sampling_timesteps(T, steps, "leading", offset=1)
            continue
        assert torch.equal(theirs.timesteps, sampling_timesteps(T, steps, "leading", offset=1))


# ---------------------------------------------------------------------------------------
# 3. Full sampling runs: same x_T, same exact model, same noise stream
# ---------------------------------------------------------------------------------------


def _run_discrete(scheduler, schedule, prediction, x_T, steps, tables, seed=None, **step_opts):
    """A diffusers DDIM / DDPM loop. ``tables="float64"`` swaps in our float64 alphas_cumprod.

    Both samplers draw ``torch.randn(shape, generator=g, dtype=float64)`` once per noisy
    step, in the same order, so one seed gives one noise stream on both sides.
    """
    if tables == "float64":
        scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.set_timesteps(steps)
    model = _oracle(schedule, prediction)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, generator=generator, **step_opts).prev_sample
    return x


# With diffusers' own float32 tables its coefficients carry the ~1e-6 relative error of
# its alpha_bar (section 1); over a run that grows to a measured <= 9.2e-6. With our float64
# tables swapped in, the algorithms agree to float64 rounding: measured <= 2.3e-15.
TABLE_TOL = {"float32": 2e-5, "float64": 1e-13}

DDIM_CASES = {  # id -> (schedule, zero terminal SNR, prediction, spacing, steps, offset, eta)
    "linear-eps-leading50": ("linear", False, "eps", "leading", 50, 0, 0.0),
    "sd-eps-leading50-offset1": ("scaled_linear", False, "eps", "leading", 50, 1, 0.0),
    "cosine-x0-leading20": ("cosine", False, "x0", "leading", 20, 0, 0.0),
    "sd-zsnr-v-trailing25": ("scaled_linear", True, "v", "trailing", 25, 0, 0.0),
    "linear-eps-leading50-eta1": ("linear", False, "eps", "leading", 50, 0, 1.0),
    "cosine-v-leading10-eta0.5": ("cosine", False, "v", "leading", 10, 0, 0.5),
}


@pytest.mark.parametrize("tables", TABLE_TOL)
@pytest.mark.parametrize("case", DDIM_CASES)
def test_ddim_matches_diffusers(case, tables):
    name, zero_snr, prediction, spacing, steps, offset, eta = DDIM_CASES[case]
    assert 1000 % steps == 0  # diffusers' DDIM steps to t - T // steps: right only then
    schedule = make_schedule(name, zero_terminal_snr=zero_snr)
    scheduler = _scheduler(
        diffusers.DDIMScheduler,
        name,
        prediction,
        zero_snr=zero_snr,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing=spacing,
        steps_offset=offset,
    )
    x_T = _x_T()
    opts = {"offset": offset} if offset else {}
    generator = torch.Generator().manual_seed(1)
    ours = sample_ddim(
        MIXTURE.denoiser(schedule, prediction),
        x_T,
        schedule,
        steps=steps,
        prediction=prediction,
        spacing=spacing,
        eta=eta,
        generator=generator,
        **opts,
    )
    theirs = _run_discrete(scheduler, schedule, prediction, x_T, steps, tables, seed=1, eta=eta)
    assert _max_err(ours, theirs) < TABLE_TOL[tables]


DDPM_CASES = {  # id -> (schedule, prediction, steps); leading spacing, last timestep 0
    "linear-eps-50": ("linear", "eps", 50),
    "sd-v-100": ("scaled_linear", "v", 100),
    "cosine-x0-20": ("cosine", "x0", 20),
}


@pytest.mark.parametrize("tables", TABLE_TOL)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("case", DDPM_CASES)
def test_ddpm_matches_diffusers(case, variance, tables):
    name, prediction, steps = DDPM_CASES[case]
    schedule = make_schedule(name)
    scheduler = _scheduler(
        diffusers.DDPMScheduler,
        name,
        prediction,
        clip_sample=False,
        variance_type=variance,
        timestep_spacing="leading",
    )
    x_T = _x_T()
    generator = torch.Generator().manual_seed(1)
    ours = sample_ddpm(
        MIXTURE.denoiser(schedule, prediction),
        x_T,
        schedule,
        steps=steps,
        prediction=prediction,
        spacing="leading",
        variance=variance,
        generator=generator,
    )
    theirs = _run_discrete(scheduler, schedule, prediction, x_T, steps, tables, seed=1)
    assert _max_err(ours, theirs) < TABLE_TOL[tables]


def test_diffusers_ddim_misses_trailing_timesteps_when_steps_do_not_divide_T():
    """Known diffusers quirk that our design avoids: DDIMScheduler.step moves from ``t`` to
    ``t - T // steps``, which is the next listed timestep only for ``leading`` spacing or
    when ``steps`` divides ``T``. Ours always moves to the next listed timestep."""
    T, steps = 1000, 30
    schedule = make_schedule("linear")
    scheduler = _scheduler(
        diffusers.DDIMScheduler, "linear", "x0", timestep_spacing="trailing", clip_sample=False
    )
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()  # float64: exact read-back
    scheduler.set_timesteps(steps)
    listed = scheduler.timesteps.tolist()
    assert listed == sampling_timesteps(T, steps, "trailing").tolist()
    ours = previous_timesteps(torch.tensor(listed)).tolist()
    assert ours == [*listed[1:], -1]
    # Read back where one diffusers step lands: with an x0 prediction of 0 and x_t = s_t,
    # the step returns sqrt(1 - alpha_bar_prev).
    ab = schedule.alphas_cumprod
    landed = []
    for t in listed:
        x = (1 - ab[t]).sqrt().reshape(1, 1)
        out = scheduler.step(torch.zeros_like(x), t, x).prev_sample
        landed_ab = 1 - float(out) ** 2
        landed.append(-1 if landed_ab == 1 else int((ab - landed_ab).abs().argmin()))
    assert landed == [t - T // steps if t - T // steps >= 0 else -1 for t in listed]
    wrong = [i for i, (a, b) in enumerate(zip(landed, ours, strict=True)) if a != b]
    assert len(wrong) == 10  # e.g. 966 -> 933, and then the model is called at 932
    assert (listed[1], landed[1], ours[1]) == (966, 933, 932)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize(("spacing", "steps", "offset"), [("trailing", 30, 0), ("leading", 50, 1)])
def test_diffusers_ddpm_adds_noise_on_its_last_step_unless_it_is_timestep_0(
    spacing, steps, offset, variance
):
    """diffusers quirk: DDPMScheduler.step adds noise whenever ``t > 0``, so a run whose last
    timestep is not 0 (trailing spacing, steps_offset=1) gets noise of variance
    ``beta = 1 - alpha_bar_t`` (fixed_large) or ``1e-20`` (fixed_small, clamped from 0) on
    its last step, into the clean data. DDPM (Ho et al. 2020, Alg. 2) adds none there, nor
    do we. Apart from that one draw the runs agree to float64 rounding (with float64 tables),
    which also covers diffusers' list look-up of the previous timestep for trailing spacing.
    """
    name, prediction = "linear", "eps"
    schedule = make_schedule(name)
    scheduler = _scheduler(
        diffusers.DDPMScheduler,
        name,
        prediction,
        clip_sample=False,
        variance_type=variance,
        timestep_spacing=spacing,
        steps_offset=offset,
    )
    x_T = _x_T()
    generator = torch.Generator().manual_seed(1)
    ours = sample_ddpm(
        MIXTURE.denoiser(schedule, prediction),
        x_T,
        schedule,
        steps=steps,
        prediction=prediction,
        spacing=spacing,
        variance=variance,
        generator=generator,
        **({"offset": offset} if offset else {}),
    )
    last_noise = torch.randn(x_T.shape, generator=generator, dtype=torch.float64)  # next draw
    theirs = _run_discrete(scheduler, schedule, prediction, x_T, steps, "float64", seed=1)
    t_last = int(sampling_timesteps(1000, steps, spacing, offset=offset)[-1])
    assert t_last > 0
    var = 1 - float(schedule.alphas_cumprod[t_last]) if variance == "fixed_large" else 1e-20
    assert _max_err(ours + math.sqrt(var) * last_noise, theirs) < TABLE_TOL["float64"]
    if variance == "fixed_large":
        assert _max_err(ours, theirs) > 0.01  # the extra noise is not negligible


def _inject_grid(scheduler, schedule, steps, spacing):
    """Replace diffusers' float32 sigmas and timesteps by ours (float64, sigma 0 at the end)."""
    t, alpha_bar = schedule.sampling_points(steps, spacing)
    sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()
    if isinstance(scheduler, diffusers.HeunDiscreteScheduler):  # each point twice, as it does
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        t = torch.cat([t[:1], t[1:].repeat_interleave(2)])
    assert sigmas.shape == scheduler.sigmas.shape and t.shape == scheduler.timesteps.shape
    scheduler.sigmas, scheduler.timesteps = sigmas, t


def _run_k(scheduler, schedule, prediction, x_T, steps, spacing, *, grid, seed=None, at_sigma=None):
    """A diffusers loop for the k-diffusion-style schedulers (Euler, Heun, DPM-Solver).

    Ours takes ``x_T`` as the variance-preserving state at the first sigma. Euler-type
    schedulers hold the variance-exploding state ``x_T / a = x_T sqrt(sigma^2 + 1)``, which
    their ``scale_model_input`` turns back into ``x_T`` for the model (their
    ``init_noise_sigma`` is ``sigma`` for linspace / trailing spacing: pure noise, ignoring
    the data's own variance, so we scale by hand). DPM-Solver steps the VP state itself.

    ``grid="diffusers"``: its own float32 sigmas; the model is called at its listed
    timesteps, except for DPM-Solver, whose listed timesteps are rounded (see
    ``test_diffusers_dpm_solver_calls_the_model_at_rounded_karras_timesteps``): there (or
    with ``at_sigma=True``) at the timestep, under our schedule, of the sigma it is at.
    ``grid="ours"``: our float64 sigmas and timesteps swapped in, so only the arithmetic is
    compared.
    """
    scheduler.set_timesteps(steps)
    if grid == "ours":
        _inject_grid(scheduler, schedule, steps, spacing)
    scheduler.set_begin_index(0)  # its timestep look-up fails on repeated timesteps
    dpm_solver = isinstance(scheduler, diffusers.DPMSolverMultistepScheduler)
    at_sigma = dpm_solver if at_sigma is None else at_sigma
    model = _oracle(schedule, prediction)
    opts = {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}
    x = x_T if dpm_solver else x_T * (scheduler.sigmas[0].double() ** 2 + 1).sqrt()
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        t_model = schedule.sigma_to_t(scheduler.sigmas[i].double()) if at_sigma else t
        x = scheduler.step(model(x_in, t_model), t, x, **opts).prev_sample
    assert float(scheduler.sigmas[-1]) == 0  # the last state is the clean data: VE = VP
    return x


@pytest.mark.parametrize("steps", [1, 2, 10, 25, 50, 200])
@pytest.mark.parametrize("name", BETAS)
def test_karras_sigmas_and_timesteps_match_diffusers(name, steps):
    schedule = make_schedule(name)
    scheduler = _scheduler(diffusers.EulerDiscreteScheduler, name, use_karras_sigmas=True)
    scheduler.set_timesteps(steps)
    theirs = scheduler.sigmas[:-1].double()
    ours = karras_sigmas_for(schedule, steps)
    if steps == 1:
        # diffusers takes its Karras range from the linspace timesteps, [0] for one step (see
        # test_timesteps_match_diffusers), so it runs from sigma_min; ours from sigma_max.
        assert float(theirs[0]) == pytest.approx(float(schedule.sigmas[0]), rel=1e-3)
        assert float(ours[0]) == float(schedule.sigmas[-1])
        return
    # diffusers' own Karras and sigma -> timestep functions, fed our float64 table, give ours
    # to float64 rounding (measured: 0 and 1.1e-13 timesteps).
    flipped = schedule.sigmas.flip(0)  # largest first, as it passes them
    karras = torch.as_tensor(
        scheduler._convert_to_karras(in_sigmas=flipped, num_inference_steps=steps)
    )
    torch.testing.assert_close(karras, ours, rtol=1e-14, atol=0)
    t_theirs = scheduler._sigma_to_t(ours.numpy(), schedule.sigmas.log().numpy())
    t, _ = schedule.sampling_points(steps, "karras")
    torch.testing.assert_close(torch.as_tensor(t_theirs), t, rtol=0, atol=1e-11)
    # As it runs, from its float32 table. sigma_min = sqrt((1 - a) / a) with a ~ 1: 1 - a
    # cancels, so its relative error is up to ~F32_EPS / (1 - a) (measured 2.6e-4 for
    # cosine); sigma_max inherits half the alpha_bar error of section 1 (measured 6.6e-6).
    bound = F32_EPS / float(1 - schedule.alphas_cumprod[0])
    assert abs(float(theirs[-1] / ours[-1]) - 1) < bound
    assert abs(float(theirs[0] / ours[0]) - 1) < 1e-5
    # Same Karras formula (Eq. 5, rho = 7) between those ends, up to the float32 rounding of
    # its output (measured <= 5.7e-8).
    same_ends = karras_sigmas(float(theirs[-1]), float(theirs[0]), steps)
    torch.testing.assert_close(theirs, same_ends, rtol=F32_EPS, atol=0)
    # Same sigma -> timestep map (log-sigma interpolation), up to its float32 log-sigma table
    # (measured <= 7e-4 timesteps).
    torch.testing.assert_close(
        scheduler.timesteps.double(), schedule.sigma_to_t(theirs), rtol=0, atol=2e-3
    )
    # End to end, the sigma_min error carried through the ramp moves a timestep by up to
    # 0.037 (cosine, whose sigma(t) is steepest at the ends), 0.0056 (linear).
    torch.testing.assert_close(scheduler.timesteps.double(), t, rtol=0, atol=0.05)


KARRAS = {"use_karras_sigmas": True}
TO_ZERO = {"final_sigmas_type": "zero"}
DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True}
K_SAMPLERS = {  # ours -> (our sampler, diffusers' scheduler, its config)
    "euler": (sample_euler, "EulerDiscreteScheduler", {**KARRAS, **TO_ZERO}),
    "heun": (sample_heun, "HeunDiscreteScheduler", KARRAS),  # its last sigma is always 0
    "dpmpp_2m": (sample_dpmpp_2m, "DPMSolverMultistepScheduler", {**KARRAS, **TO_ZERO, **DPMPP_2M}),
    # diffusers' ancestral Euler has no Karras option; trailing spacing lists integer
    # timesteps whose sigmas both read off the table (its linspace ones are fractional,
    # interpolated linearly in sigma: not the same algorithm as our rounded linspace).
    "euler_ancestral": (sample_euler_ancestral, "EulerAncestralDiscreteScheduler", {}),
}
K_CASES = [  # (sampler, spacing, schedule, prediction, steps)
    ("euler", "karras", "linear", "eps", 10),
    ("euler", "karras", "scaled_linear", "v", 25),
    ("euler", "karras", "cosine", "x0", 15),
    ("euler", "trailing", "scaled_linear", "eps", 25),
    ("heun", "karras", "linear", "eps", 10),
    ("heun", "karras", "scaled_linear", "v", 20),
    ("heun", "karras", "cosine", "x0", 10),
    ("dpmpp_2m", "karras", "linear", "eps", 10),
    ("dpmpp_2m", "karras", "scaled_linear", "v", 20),
    ("dpmpp_2m", "karras", "cosine", "x0", 15),
    ("euler_ancestral", "trailing", "linear", "eps", 25),
    ("euler_ancestral", "trailing", "scaled_linear", "v", 50),
]


@pytest.mark.parametrize("grid", ["diffusers", "ours"])
@pytest.mark.parametrize("case", K_CASES, ids=lambda case: "-".join(map(str, case)))
def test_k_sampler_matches_diffusers(case, grid):
    sampler_name, spacing, name, prediction, steps = case
    sampler, cls, config = K_SAMPLERS[sampler_name]
    if spacing != "karras":
        config = {k: v for k, v in config.items() if k != "use_karras_sigmas"}
        config["timestep_spacing"] = spacing
    schedule = make_schedule(name)
    scheduler = _scheduler(getattr(diffusers, cls), name, prediction, **config)
    x_T = _x_T()
    ours = sampler(
        MIXTURE.denoiser(schedule, prediction),
        x_T,
        schedule,
        steps=steps,
        prediction=prediction,
        spacing=spacing,
        generator=torch.Generator().manual_seed(1),
    )
    seed = 1 if sampler is sample_euler_ancestral else None  # same noise stream, as for DDPM
    theirs = _run_k(scheduler, schedule, prediction, x_T, steps, spacing, grid=grid, seed=seed)
    err = _max_err(ours, theirs)
    if grid == "ours":
        # Same points: Heun then agrees to float64 rounding (measured <= 4.7e-14); Euler,
        # ancestral Euler and DPM-Solver cast the state to float32 in every step (measured
        # <= 1.2e-6).
        assert err < (1e-12 if sampler is sample_heun else 5e-6)
    else:
        # diffusers' float32 sigmas (test_karras_sigmas_and_timesteps_match_diffusers) move
        # the points slightly, and a few-step solution moves with them: measured <= 1.3e-5,
        # but for cosine, whose sigma_min is 2.6e-4 off, up to 6.9e-4 (Heun, 10 steps;
        # 7.7e-5 at 20 steps, 7e-6 at 40, as a grid effect should).
        assert err < (2e-3 if name == "cosine" else 5e-5)


@pytest.mark.parametrize("name", BETAS)
def test_diffusers_dpm_solver_calls_the_model_at_rounded_karras_timesteps(name):
    """diffusers quirk: with Karras sigmas, DPMSolverMultistepScheduler keeps the exact
    sigmas for its update but hands the model the timesteps rounded to integers, and for
    ``squaredcos_cap_v2`` (which it exempts from rounding) truncated by an int64 cast, which
    repeats timesteps (998 for the first 7 of 15 steps) and breaks its timestep look-up
    unless ``set_begin_index`` is called. Ours calls the model at the fractional timestep of
    the sigma it is at, as Euler and Heun (both libraries) do."""
    steps = 15
    scheduler = _scheduler(diffusers.DPMSolverMultistepScheduler, name, **KARRAS, **TO_ZERO)
    euler = _scheduler(diffusers.EulerDiscreteScheduler, name, **KARRAS, **TO_ZERO)
    scheduler.set_timesteps(steps)
    euler.set_timesteps(steps)
    assert torch.equal(scheduler.sigmas, euler.sigmas)  # the same Karras sigmas ...
    unrounded = euler.timesteps.double()  # ... at these timesteps
    assert not torch.equal(unrounded, unrounded.round())
    if name == "cosine":
        # The first, just under 999 in float64 (999.0 in Euler's float32), truncates to 998.
        assert scheduler.timesteps[:7].tolist() == [998] * 7
        assert torch.equal(scheduler.timesteps[1:], unrounded[1:].floor().long())
    else:
        assert torch.equal(scheduler.timesteps, unrounded.round().long())
    if name == "linear":  # it matters: 1.9e-3 off ours, against 1.2e-5 at the right timesteps
        schedule, x_T = make_schedule(name), _x_T()
        ours = sample_dpmpp_2m(
            MIXTURE.denoiser(schedule, "eps"), x_T, schedule, steps=10, prediction="eps"
        )
        runs = {}
        for at_sigma in (False, True):
            scheduler = _scheduler(
                diffusers.DPMSolverMultistepScheduler, name, **KARRAS, **TO_ZERO, **DPMPP_2M
            )
            runs[at_sigma] = _run_k(
                scheduler, schedule, "eps", x_T, 10, "karras", grid="diffusers", at_sigma=at_sigma
            )
        assert _max_err(ours, runs[True]) < 5e-5 < 1e-3 < _max_err(ours, runs[False])


def _trajectories(name, options, scheduler, schedule, prediction, steps):
    """Our sampler's state after every step and a diffusers multistep scheduler's (VP state,
    Karras points, ours swapped in so that only the arithmetic is compared)."""
    x_T, ours = _x_T(), []
    make_sampler(name, steps=steps, **options)(
        MIXTURE.denoiser(schedule, prediction),
        x_T,
        schedule,
        prediction=prediction,
        callback=lambda step: ours.append(step.x),
    )
    scheduler.set_timesteps(steps)
    _inject_grid(scheduler, schedule, steps, "karras")
    scheduler.set_begin_index(0)
    model, x, theirs = _oracle(schedule, prediction), x_T, []
    for i, t in enumerate(scheduler.timesteps):
        t_model = schedule.sigma_to_t(scheduler.sigmas[i].double())
        x = scheduler.step(model(x, t_model), t, x).prev_sample
        theirs.append(x)
    return ours, theirs


UNIPC_CASES = [  # (order, variant, schedule, prediction, steps)
    (1, "bh2", "scaled_linear", "eps", 10),
    (2, "bh2", "scaled_linear", "eps", 10),
    (2, "bh1", "linear", "v", 20),
    (3, "bh2", "scaled_linear", "v", 15),
    (3, "bh1", "cosine", "eps", 12),
]


@pytest.mark.parametrize("case", UNIPC_CASES, ids=lambda case: "-".join(map(str, case)))
def test_unipc_matches_diffusers(case):
    order, variant, name, prediction, steps = case
    schedule = make_schedule(name)
    scheduler = _scheduler(
        diffusers.UniPCMultistepScheduler,
        name,
        prediction,
        solver_order=order,
        solver_type=variant,
        **KARRAS,
        **TO_ZERO,
    )
    options = {"order": order, "variant": variant}
    ours, theirs = _trajectories("unipc", options, scheduler, schedule, prediction, steps)
    # Every step agrees up to diffusers' float32 state (measured <= 1e-6). Its bh1 makes NaN
    # on the step into the data: B(h) = -h is -inf there, times a residual of 0 (order 1).
    last = len(ours) - (1 if variant == "bh1" else 0)
    assert max(_max_err(a, b) for a, b in zip(ours[:last], theirs[:last], strict=True)) < 5e-6
    if variant == "bh1":
        assert theirs[-1].isnan().all() and not ours[-1].isnan().any()


DEIS_CASES = [  # (order, schedule, prediction, steps)
    (1, "scaled_linear", "eps", 10),
    (2, "scaled_linear", "eps", 10),
    (3, "linear", "v", 12),
    (2, "cosine", "v", 20),
    (3, "scaled_linear", "eps", 25),
]


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # its log(0), below
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # numpy on its tensors
@pytest.mark.parametrize("case", DEIS_CASES, ids=lambda case: "-".join(map(str, case)))
def test_deis_matches_diffusers(case):
    order, name, prediction, steps = case
    schedule = make_schedule(name)
    scheduler = _scheduler(
        diffusers.DEISMultistepScheduler, name, prediction, solver_order=order, **KARRAS
    )
    ours, theirs = _trajectories("deis", {"order": order}, scheduler, schedule, prediction, steps)
    # diffusers' DEIS ends at the schedule's sigma_min (no final_sigmas_type), so its last
    # sigma is swapped for ours, 0. From 15 steps on it keeps order 2-3 into sigma = 0, where
    # its log-rho integral evaluates 0 * log(0): NaN. The limit is 0, which ours takes.
    quirk = order > 1 and steps >= 15
    last = len(ours) - (1 if quirk else 0)
    assert max(_max_err(a, b) for a, b in zip(ours[:last], theirs[:last], strict=True)) < 5e-6
    if quirk:
        assert theirs[-1].isnan().all() and not ours[-1].isnan().any()
