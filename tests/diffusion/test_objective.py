"""Forward process, targets, conversions and loss weights."""

import itertools

import pytest
import torch

from ldm.diffusion.objective import (
    PREDICTIONS,
    convert,
    diffusion_loss,
    loss_weights,
    q_sample,
    target,
    vp_to_ve,
    x0_and_eps,
)
from ldm.diffusion.schedules import make_schedule

SCHEDULES = [
    make_schedule(name, zero_terminal_snr=zero_snr)
    for name in ("linear", "scaled_linear", "cosine")
    for zero_snr in (False, True)
]


def _batch(schedule, seed=0):
    """Clean data, noise and x_t at every training timestep, one sample each."""
    g = torch.Generator().manual_seed(seed)
    T = schedule.num_train_timesteps
    x0 = torch.randn(T, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(T, 3, 4, 4, generator=g, dtype=torch.float64)
    alpha_bar = schedule.alphas_cumprod
    return x0, noise, alpha_bar, q_sample(x0, noise, alpha_bar)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"zsnr={s.zero_terminal_snr}")
@pytest.mark.parametrize(("src", "dst"), list(itertools.product(PREDICTIONS, PREDICTIONS)))
def test_conversions_round_trip_at_every_t(schedule, src, dst):
    x0, noise, alpha_bar, x_t = _batch(schedule)
    everywhere = torch.ones_like(alpha_bar, dtype=torch.bool)
    # From eps nothing else is defined at zero SNR: x_t is the noise itself there.
    keep = everywhere
    if "eps" in (src, dst) and src != dst:
        keep = alpha_bar > 0
    src_out = target(src, x0, noise, alpha_bar)[keep]
    got = convert(src_out, x_t[keep], alpha_bar[keep], src=src, dst=dst)
    back = convert(got, x_t[keep], alpha_bar[keep], src=dst, dst=src)
    # float64 precision, relative to the size of the terms involved (|x0| ~ |x_t| / a)
    a = alpha_bar[keep].sqrt().clamp(min=1e-3).reshape(-1, 1, 1, 1)
    assert ((got - target(dst, x0, noise, alpha_bar)[keep]).abs() * a).max() < 1e-12
    assert ((back - src_out).abs() * a).max() < 1e-12
    if schedule.zero_terminal_snr and src != "eps":  # the endpoint itself, one way
        end = slice(-1, None)
        got = convert(
            target(src, x0, noise, alpha_bar)[end], x_t[end], alpha_bar[end], src=src, dst=dst
        )
        assert (got - target(dst, x0, noise, alpha_bar)[end]).abs().max() < 1e-12


def test_eps_at_zero_snr_is_refused_with_the_fix():
    schedule = make_schedule("linear", zero_terminal_snr=True)
    x0, noise, alpha_bar, x_t = _batch(schedule)
    # At zero SNR x_t is the noise itself, so every other target is still defined.
    assert torch.equal(x_t[-1], noise[-1])
    torch.testing.assert_close(
        convert(
            target("v", x0, noise, alpha_bar)[-1:], x_t[-1:], alpha_bar[-1:], src="v", dst="x0"
        ),
        x0[-1:],
    )
    with pytest.raises(ValueError, match="prediction='v' or 'x0'"):
        convert(noise[-1:], x_t[-1:], alpha_bar[-1:], src="eps", dst="x0")


def test_x0_and_eps_and_karras_form():
    schedule = make_schedule("cosine")
    x0, noise, alpha_bar, x_t = _batch(schedule)
    for prediction in PREDICTIONS:
        got_x0, got_eps = x0_and_eps(
            target(prediction, x0, noise, alpha_bar), x_t, alpha_bar, prediction
        )
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-9)
        torch.testing.assert_close(got_eps, noise, rtol=0, atol=1e-9)
    # Karras: x_ve = x0 + sigma eps, so the "denoised" D is x0 and (x_ve - D) / sigma is eps.
    x_ve, sigma = vp_to_ve(x_t, alpha_bar)
    torch.testing.assert_close(sigma.flatten(), schedule.sigmas)
    torch.testing.assert_close((x_ve - x0) / sigma, noise)


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_weights_match_the_paper(gamma):
    """Hang et al. (2023): w = min(SNR, g) / SNR on eps, min(SNR, g) / (SNR + 1) on v,
    min(SNR, g) on x0 -- each the same weight min(SNR, g) on the x0 error."""
    schedule = make_schedule("linear", zero_terminal_snr=True)
    snr = schedule.snr
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    torch.testing.assert_close(loss_weights(snr, "x0", "min_snr", gamma), clipped)
    finite = snr > 0
    torch.testing.assert_close(
        loss_weights(snr, "eps", "min_snr", gamma)[finite], clipped[finite] / snr[finite]
    )
    assert loss_weights(snr, "eps", "min_snr", gamma)[-1] == 1  # its limit at SNR -> 0
    torch.testing.assert_close(loss_weights(snr, "v", "min_snr", gamma), clipped / (snr + 1))
    assert bool((loss_weights(snr, "eps", "uniform") == 1).all())

    # The identity behind the formula: every parameterisation gives min(SNR, g) |x0 - x0_hat|^2.
    x0, noise, alpha_bar, x_t = _batch(schedule)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    want = clipped[finite] * (x0 - x0_hat)[finite].pow(2).flatten(1).mean(1)
    for prediction in PREDICTIONS:
        out = convert(x0_hat[finite], x_t[finite], alpha_bar[finite], src="x0", dst=prediction)
        err = (out - target(prediction, x0, noise, alpha_bar)[finite]).pow(2).flatten(1).mean(1)
        got = loss_weights(snr[finite], prediction, "min_snr", gamma) * err
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_diffusion_loss_is_weighted_mse():
    schedule = make_schedule("scaled_linear")
    x0, noise, alpha_bar, _ = _batch(schedule)
    output = torch.randn_like(x0)
    loss = diffusion_loss(
        output, x0, noise, alpha_bar, prediction="v", weighting="min_snr", gamma=5
    )
    per_sample = (output - target("v", x0, noise, alpha_bar)).pow(2).flatten(1).mean(1)
    w = loss_weights(schedule.snr, "v", "min_snr", 5)
    torch.testing.assert_close(loss.double(), (w * per_sample).mean(), rtol=1e-6, atol=0)


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="unknown prediction type 'sample'"):
        target("sample", torch.zeros(1), torch.zeros(1), 0.5)
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'"):
        loss_weights(torch.ones(1), "eps", "snr")
