"""Rectified flow: the schedule against its closed form and SD3's / diffusers' definitions,
the velocity target and its conversions, logit-normal timesteps, and the flow samplers on the
exact denoiser (orders of convergence, diffusers' FlowMatch schedulers as oracles)."""

import itertools
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from ldm.diffusion.analytic import GaussianMixture
from ldm.diffusion.objective import (
    convert,
    diffusion_loss,
    loss_weights,
    model_input,
    q_sample,
    target,
)
from ldm.diffusion.samplers import make_sampler
from ldm.diffusion.schedules import (
    FlowSchedule,
    make_schedule,
    resolution_shift,
    training_timesteps,
)

GAUSSIAN = GaussianMixture.gaussian(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0]))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_schedule_is_sd3s_shifted_flow(shift):
    schedule = make_schedule("flow", shift=shift)
    assert isinstance(schedule, FlowSchedule) and schedule.zero_terminal_snr
    t = torch.arange(1000, dtype=torch.float64)
    # diffusers' training sigmas are tau at timesteps 1 .. 1000: ours are t + 1
    oracle = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    assert torch.allclose(schedule.tau(t).flip(0), oracle.sigmas.double(), atol=1e-6)
    tau = schedule.tau(t)
    assert torch.allclose(schedule.alphas_cumprod, (1 - tau) ** 2 / ((1 - tau) ** 2 + tau**2))
    real = torch.tensor([-1.0, -0.5, 3.25, 998.9], dtype=torch.float64)  # closed form
    ab = schedule.alphas_cumprod_at(real)
    assert ab[0] == 1 and torch.allclose(schedule.sigma_to_t(((1 - ab) / ab).sqrt()), real.clamp(0))
    assert schedule.sigma_to_t(torch.tensor(math.inf)) == 999
    with pytest.raises(ValueError, match="shift applies to the flow schedule only"):
        make_schedule("linear", shift=2.0)
    assert resolution_shift(1024, 256) == 4.0 and resolution_shift([512, 1024], 512) == 2**0.5


def test_the_flow_state_and_velocity_convert_like_every_prediction():
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    alpha_bar = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64)
    x_t = q_sample(x0, noise, alpha_bar)
    a, s = alpha_bar.sqrt()[:, None], (1 - alpha_bar).sqrt()[:, None]
    tau = s / (a + s)
    assert torch.allclose(model_input(x_t, alpha_bar, "flow"), (1 - tau) * x0 + tau * noise)
    assert torch.equal(model_input(x_t, alpha_bar, "v"), x_t)
    u = target("flow", x0, noise, alpha_bar)
    assert torch.equal(u, noise - x0)
    for other in ("x0", "v"):
        want = target(other, x0, noise, alpha_bar)
        assert torch.allclose(convert(u, x_t, alpha_bar, src="flow", dst=other), want)
        assert torch.allclose(convert(want, x_t, alpha_bar, src=other, dst="flow"), u)
    eps = convert(u[1:], x_t[1:], alpha_bar[1:], src="flow", dst="eps")
    assert torch.allclose(eps, noise[1:])


def test_min_snr_on_the_velocity_is_min_snr_on_x0():
    """The flow target's error is the x0 error over tau: the weights carry tau^2."""
    alpha_bar = torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    snr = alpha_bar / (1 - alpha_bar)
    tau = (1 - alpha_bar).sqrt() / (alpha_bar.sqrt() + (1 - alpha_bar).sqrt())
    flow = loss_weights(snr, "flow", "min_snr", gamma=5.0)
    assert torch.allclose(flow, snr.clamp(max=5.0) * tau**2)
    error_u = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x0, noise = torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64)
    got = diffusion_loss(-error_u, x0, noise, alpha_bar, prediction="flow", weighting="min_snr")
    as_x0 = snr.clamp(max=5.0) * (tau[:, None] * error_u).pow(2).mean(1)
    assert got == pytest.approx(float(as_x0.mean()), rel=1e-6)  # the loss is float32


def test_training_timesteps_uniform_integers_or_logit_normal():
    flow, vp = make_schedule("flow"), make_schedule("linear")
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    uniform = training_timesteps(vp, generators)
    again = torch.stack(
        [
            torch.randint(0, 1000, (), generator=torch.Generator().manual_seed(i))
            for i in range(4000)
        ]
    )
    assert torch.equal(uniform, again.double())  # what training drew before this option
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    t = training_timesteps(flow, generators, "logit_normal", loc=0.5, scale=0.8)
    logit = torch.logit(flow.tau(t))
    assert logit.mean() == pytest.approx(0.5, abs=0.05) and logit.std() == pytest.approx(
        0.8, abs=0.05
    )
    assert t.min() >= -1 and t.max() <= 999 and t.frac().abs().sum() > 0
    near_clean = [torch.Generator().manual_seed(i) for i in range(50)]
    assert training_timesteps(vp, near_clean, "logit_normal", loc=-8.0).min() == 0  # VP: clamped
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        training_timesteps(vp, generators, "cosine")


def _errors(name, steps_list, **opts):
    schedule = make_schedule("flow", shift=opts.pop("shift", 1.0))
    x_T = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = GAUSSIAN.flow_map(x_T, 0.0)
    model = GAUSSIAN.denoiser(schedule, "flow")
    errors = []
    for steps in steps_list:
        out = make_sampler(name, steps=steps, **opts)(model, x_T, schedule, prediction="flow")
        errors.append(float((out - want).abs().max()))
    return errors


@pytest.mark.parametrize(("name", "order"), [("flow_euler", 1), ("flow_heun", 2)])
def test_flow_samplers_converge_at_their_order_on_the_exact_velocity(name, order):
    errors = _errors(name, [10, 20, 40, 80])
    rates = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
    assert all(r == pytest.approx(order, abs=0.35) for r in rates), rates
    assert errors[-1] < (0.3 if order == 1 else 1e-3)


def test_flow_euler_is_ddim_on_straight_paths():
    schedule = make_schedule("flow", shift=3.0)
    x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    euler = make_sampler("flow_euler", steps=8)(GAUSSIAN.denoiser(schedule, "flow"), x_T, schedule)
    ddim = make_sampler("ddim", steps=8, spacing="linspace")
    out = ddim(GAUSSIAN.denoiser(schedule, "v"), x_T, schedule, prediction="v")
    assert torch.allclose(euler, out, atol=1e-12)


def _oracle_velocity(x_flow, sigma):
    """The exact velocity for diffusers' convention: flow state, tau = sigma."""
    tau = float(sigma)
    k = math.sqrt((1 - tau) ** 2 + tau**2)
    x0 = GAUSSIAN.posterior_mean(x_flow.double() / k, (1 - tau) ** 2 / k**2)
    eps = x_flow.double() if tau == 1 else (x_flow.double() - (1 - tau) * x0) / tau
    return (eps - x0).float()


@pytest.mark.parametrize(("name", "oracle", "shift"), [
    ("flow_euler", FlowMatchEulerDiscreteScheduler, 3.0),
    ("flow_euler", FlowMatchEulerDiscreteScheduler, 1.0),
    ("flow_heun", FlowMatchHeunDiscreteScheduler, 1.0),
])  # fmt: skip
def test_flow_samplers_match_diffusers(name, oracle, shift):
    steps, T = 12, 1000
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(3))
    scheduler = oracle(num_train_timesteps=T, shift=shift)
    if oracle is FlowMatchEulerDiscreteScheduler:  # our grid: tau before the shift from 1 to 1/T
        scheduler.set_timesteps(sigmas=torch.linspace(1, 1 / T, steps).tolist())
    else:  # shift 1: diffusers' own grid is ours
        scheduler.set_timesteps(steps)
    x, calls = x_T.clone(), 0
    for timestep in scheduler.timesteps:
        x = scheduler.step(_oracle_velocity(x, timestep / T), timestep, x).prev_sample
        calls += 1
    schedule = make_schedule("flow", shift=shift)
    ours = make_sampler(name, steps=steps)(GAUSSIAN.denoiser(schedule, "flow"), x_T, schedule)
    assert calls == (steps if name == "flow_euler" else 2 * steps - 1)
    assert torch.allclose(ours, x, atol=1e-5), float((ours - x).abs().max())
