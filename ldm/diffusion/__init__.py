"""Diffusion math: schedules, objectives, samplers and guidance. Tensors in, tensors out."""

from ldm.diffusion.guidance import cfg
from ldm.diffusion.objective import convert, diffusion_loss, loss_weights, q_sample, target
from ldm.diffusion.samplers import SAMPLERS, get_sampler, make_sampler
from ldm.diffusion.schedules import Schedule, make_schedule, sampling_timesteps

__all__ = [
    "SAMPLERS",
    "Schedule",
    "cfg",
    "convert",
    "diffusion_loss",
    "get_sampler",
    "loss_weights",
    "make_sampler",
    "make_schedule",
    "q_sample",
    "sampling_timesteps",
    "target",
]
