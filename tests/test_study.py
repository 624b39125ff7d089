"""The quickstart job, end to end on tiny settings, through its Hydra entry point."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import torch

from ldm.diffusion.analytic import GaussianMixture
from ldm.studies.analytic import frechet_distance, score, sliced_w1

ROOT = Path(__file__).resolve().parents[1]


def test_study_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "study.py",
        "steps=[2,6]",
        "num_samples=300",
        "samplers=[ddim,heun]",
        "+sampler_options.ddim.eta=0.5",
        "diffusion=zsnr_v",
        f"hydra.run.dir={out}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["sampler"], r["steps"]) for r in rows] == [
        ("reference", "0"), ("ddim", "2"), ("ddim", "6"), ("heun", "2"), ("heun", "6")
    ]  # fmt: skip
    assert [r["nfe"] for r in rows] == ["0", "2", "6", "2", "10"]  # Heun: 2 * steps - 2 here
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["diffusion"]["prediction"] == "v" and settings["num_samples"] == 300
    assert settings["sampler_options"] == {"ddim": {"eta": 0.5}}
    assert (out / "samples.png").stat().st_size > 10_000
    assert (out / "error_vs_nfe.png").stat().st_size > 10_000
    assert "| ddim | 6 |" in (out / "results.md").read_text()


def test_scores_of_the_true_distribution():
    data = GaussianMixture.ring(components=4, radius=3.0, std=0.2)
    g = torch.Generator().manual_seed(0)
    x, y = data.sample(20_000, g), data.sample(20_000, g)
    scores = score(x, data, y)
    assert scores["frechet"] < 0.01 and scores["mode_tv"] < 0.02
    assert abs(scores["spread"] - 1) < 0.03 and scores["sliced_w1"] < 0.05
    # Collapsed samples are caught by every score.
    collapsed = score(data.means[torch.arange(20_000) % 4], data, y)
    assert collapsed["spread"] < 1e-12 and collapsed["sliced_w1"] > scores["sliced_w1"]


def test_frechet_distance_of_gaussians():
    eye = torch.eye(2, dtype=torch.float64)
    # W2^2 between N(0, I) and N(m, 4 I): |m|^2 + 2 (2 - 1)^2
    m = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert abs(frechet_distance(torch.zeros(2), eye, m, 4 * eye) - (25 + 2)) < 1e-12
    a = torch.randn(100, 3, dtype=torch.float64)
    assert sliced_w1(a, a) == 0


def test_class_posteriors_are_their_components_and_minus_one_the_mixture():
    data = GaussianMixture.ring(components=4, radius=3.0, std=0.2)
    x = torch.randn(6, 2, dtype=torch.float64) * 2
    labels = torch.tensor([0, 1, 2, 3, -1, 2])
    got = data.posterior_mean(x, 0.4, labels)
    for i, k in enumerate(labels.tolist()):
        alone = data if k < 0 else GaussianMixture.gaussian(data.means[k], data.stds[k])
        torch.testing.assert_close(got[i], alone.posterior_mean(x[i : i + 1], 0.4)[0])


def test_the_guided_study_samples_classes_and_guidance_moves_them():
    from ldm.diffusion.schedules import make_schedule
    from ldm.studies.analytic import run_study

    data = GaussianMixture.ring(components=4, radius=3.0, std=0.2)
    schedule = make_schedule("scaled_linear")

    def ddim(guidance):
        rows, _ = run_study(data, schedule, "eps", {"ddim": {}}, [100], 4000, guidance=guidance)
        return rows[1]

    plain, conditional, guided = ddim(None), ddim(1.0), ddim(3.0)
    # the conditional denoiser alone: each class its component, the classes in proportion
    assert conditional.mode_tv < 0.03 and conditional.frechet < 0.01
    assert abs(conditional.spread - plain.spread) < 0.05  # as unconditional sampling
    # guidance 3 keeps the classes but moves the samples off the data (the ODE's bias)
    assert guided.mode_tv < 0.03 and guided.frechet > 5 * conditional.frechet


def test_study_py_passes_guidance_on(tmp_path):
    from testutils import tool_config

    from ldm.app.study import study

    def frechet(*overrides):
        out = tmp_path / "-".join(overrides or ("plain",))
        cfg = tool_config("study", "samplers=[ddim]", "steps=[5]", "num_samples=500", *overrides)
        study(cfg, out)
        return [r["frechet"] for r in json.loads((out / "results.json").read_text())["rows"]]

    plain, guided = frechet(), frechet("guidance=3.0")
    assert plain[0] == guided[0] and plain[1] != guided[1]  # same reference, other samples
