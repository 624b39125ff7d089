"""A list of generators, one per sample: a sample's noise no longer depends on its batch."""

import torch

from ldm.diffusion.analytic import GaussianMixture
from ldm.diffusion.samplers import sample_ddpm, sample_euler_ancestral
from ldm.diffusion.schedules import make_schedule


def test_per_sample_generators_make_samples_batch_independent():
    schedule = make_schedule("linear")
    denoiser = GaussianMixture.ring().denoiser(schedule, "eps")
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    for sampler in (sample_ddpm, sample_euler_ancestral):

        def run(rows, sampler=sampler):
            generators = [torch.Generator().manual_seed(100 + r) for r in rows]
            return sampler(denoiser, x_T[rows], schedule, steps=10, generator=generators)

        whole = run([0, 1, 2, 3, 4, 5])
        torch.testing.assert_close(run([4, 1]), whole[[4, 1]])
        torch.testing.assert_close(run([3]), whole[[3]])
