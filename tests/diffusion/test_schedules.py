"""Schedules and timestep spacing: properties over every schedule x spacing x steps."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ldm.diffusion.schedules import (
    BETA_SCHEDULES,
    SCHEDULES,
    SPACINGS,
    karras_sigmas,
    make_schedule,
    previous_timesteps,
    sampling_timesteps,
)


@st.composite
def schedule_and_steps(draw, spacings=SPACINGS):
    name = draw(st.sampled_from(SCHEDULES))
    zero_snr = draw(st.booleans()) if name in BETA_SCHEDULES else False
    T = draw(st.integers(2, 1000) | st.sampled_from([1000, 999, 7]))
    steps = draw(st.integers(1, T) | st.sampled_from([1, T]).filter(lambda s: s <= T))
    spacing = draw(st.sampled_from(spacings))
    return make_schedule(name, T, zero_terminal_snr=zero_snr), steps, spacing


@given(schedule_and_steps())
def test_sampling_timesteps_properties(case):
    schedule, steps, spacing = case
    T = schedule.num_train_timesteps
    t, alpha_bar = schedule.sampling_points(steps, spacing)
    assert t.dtype == alpha_bar.dtype == torch.float64
    assert t.shape == (steps,) and alpha_bar.shape == (steps + 1,)
    assert bool((t[1:] < t[:-1]).all()), "strictly decreasing, hence unique"
    assert bool((t >= 0).all()) and bool((t <= T - 1).all())
    # First and last as each spacing defines them.
    if spacing == "leading":
        assert t[0] == (steps - 1) * (T // steps) and t[-1] == 0
    elif spacing == "trailing":
        assert t[0] == T - 1 and t[-1] == round(T / steps) - 1
    elif spacing == "linspace":
        assert t[0] == T - 1 and t[-1] == (0 if steps > 1 else T - 1)
    else:  # karras: from the largest noise level to the smallest
        assert t[0] == pytest.approx(T - 1, abs=1e-6)
        if steps > 1:
            assert t[-1] == pytest.approx(0, abs=1e-6)
    if spacing != "karras" and not (spacing == "linspace" and schedule.zero_terminal_snr):
        assert bool((t == t.round()).all())
        assert torch.equal(alpha_bar[:-1], schedule.alphas_cumprod[t.long()])
    # Each step moves to the next listed timestep; the last one to the clean data.
    prev = previous_timesteps(t)
    assert torch.equal(prev[:-1], t[1:]) and prev[-1] == -1
    assert torch.equal(alpha_bar, schedule.alphas_cumprod_at(torch.cat([t, prev[-1:]])))
    assert alpha_bar[-1] == 1
    assert bool((alpha_bar[1:] > alpha_bar[:-1]).all())


@given(schedule_and_steps(spacings=("leading",)), st.integers(0, 3))
def test_leading_offset(case, offset):
    schedule, steps, _ = case
    T = schedule.num_train_timesteps
    if (steps - 1) * (T // steps) + offset > T - 1:
        with pytest.raises(ValueError, match="offset"):
            sampling_timesteps(T, steps, "leading", offset=offset)
        return
    t = sampling_timesteps(T, steps, "leading", offset=offset)
    assert torch.equal(t, sampling_timesteps(T, steps, "leading") + offset)


@given(st.sampled_from(SCHEDULES), st.integers(2, 2000), st.booleans(), st.integers(0, 10))
def test_alphas_cumprod_properties(name, T, zero_snr, _):
    if name not in BETA_SCHEDULES:  # flow ends at pure noise by construction, edm never does
        zero_snr = name == "flow"
        schedule = make_schedule(name, T)
    else:
        schedule = make_schedule(name, T, zero_terminal_snr=zero_snr)
    ab, betas = schedule.alphas_cumprod, schedule.betas
    assert ab.dtype == betas.dtype == torch.float64 and ab.shape == (T,)
    assert bool((ab[1:] < ab[:-1]).all()), "strictly decreasing"
    assert bool((ab[:-1] > 0).all()) and bool((ab <= 1).all())
    assert (ab[-1] == 0) == zero_snr, "exactly 0 at the end only with zero-terminal SNR"
    assert bool((betas > 0).all()) and bool((betas <= 1).all())
    assert (betas[-1] == 1) == zero_snr
    torch.testing.assert_close(ab, torch.cumprod(1 - betas, 0), rtol=1e-12, atol=0)
    finite = ab > 0
    torch.testing.assert_close(schedule.snr[finite], 1 / schedule.sigmas[finite] ** 2)
    torch.testing.assert_close(schedule.log_snr[finite], schedule.snr[finite].log())
    if zero_snr:
        assert schedule.sigmas[-1] == math.inf and schedule.log_snr[-1] == -math.inf


def test_lin_et_al_table_2():
    """The worked example of Lin et al. (2023), Table 2: T = 1000, 10 steps."""
    assert sampling_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert sampling_timesteps(1000, 10, "linspace").tolist() == [
        999, 888, 777, 666, 555, 444, 333, 222, 111, 0
    ]  # fmt: skip
    assert sampling_timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))


def test_known_schedule_values():
    linear = make_schedule("linear")
    assert linear.betas[0] == 1e-4 and linear.betas[-1] == 0.02
    sd = make_schedule("scaled_linear")
    assert sd.betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert sd.betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    # Nichol & Dhariwal: alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi / 2)^2
    cosine = make_schedule("cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cosine.alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-12)
    assert cosine.betas.max() == 0.999  # the clipping
    ztsnr = make_schedule("scaled_linear", zero_terminal_snr=True)
    # Lin et al. keep the first sqrt(alpha_bar) and shift-scale the rest to end at 0.
    assert ztsnr.alphas_cumprod[0].item() == pytest.approx(sd.alphas_cumprod[0].item(), rel=1e-12)


def test_fractional_timesteps_interpolate_log_sigma():
    schedule = make_schedule("linear")
    sigmas = schedule.sigmas
    t = torch.tensor([10.25, 500.5, 998.75], dtype=torch.float64)
    ab = schedule.alphas_cumprod_at(t)
    lo = t.floor().long()
    w = t - lo
    expected_log_sigma = sigmas[lo].log() * (1 - w) + sigmas[lo + 1].log() * w
    torch.testing.assert_close(((1 - ab) / ab).sqrt().log(), expected_log_sigma)
    torch.testing.assert_close(schedule.sigma_to_t(((1 - ab) / ab).sqrt()), t)
    with pytest.raises(ValueError, match="timesteps"):
        schedule.alphas_cumprod_at(torch.tensor([1000.0]))


def test_karras_sigmas_follow_eq_5():
    sigmas = karras_sigmas(0.002, 80.0, 5, rho=7.0)
    i = torch.arange(5, dtype=torch.float64)
    expected = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(sigmas, expected)
    zero_snr = make_schedule("linear", zero_terminal_snr=True)
    t, ab = zero_snr.sampling_points(5, "karras")
    assert t[0] == 999 and ab[0] == 0  # the run starts at infinite sigma ...
    assert t[1] == pytest.approx(998)  # ... then the largest finite one


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_schedule("quadratic"), "unknown schedule 'quadratic'"),
        (lambda: make_schedule("cosine", beta_start=0.1), "cosine schedule takes no"),
        (lambda: make_schedule("linear", beta_start=0.5, beta_end=0.1), "beta_start < beta_end"),
        (
            lambda: sampling_timesteps(1000, 0, "leading"),
            r"steps must be an integer in \[1, 1000\]",
        ),
        (lambda: sampling_timesteps(1000, 1001, "trailing"), "got 1001"),
        (lambda: sampling_timesteps(1000, 10, "uniform"), "unknown timestep spacing 'uniform'"),
        (lambda: sampling_timesteps(1000, 10, "trailing", offset=1), "offset applies"),
    ],
)
def test_bad_input_names_the_culprit(call, match):
    with pytest.raises(ValueError, match=match):
        call()
