"""Post-hoc EMA: the power-function profile, the reconstruction of an EMA length that was
also tracked directly, and the callback end to end (snapshots, thinning, exact resume,
evaluate.py grid.ema and sample.py posthoc_ema)."""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from trainutils import CONF, compose_train

from ldm.app.evaluate import evaluate
from ldm.app.sample import load_model
from ldm.app.train import train
from ldm.nn.lora import inject_lora
from ldm.training.posthoc_ema import (
    gamma_to_sigma_rel,
    load_posthoc,
    posthoc_coefficients,
    power_beta,
    read_snapshots,
    reconstruct,
    sigma_rel_to_gamma,
)


def test_the_update_rule_has_the_stated_relative_std():
    for sigma_rel in (0.05, 0.1, 0.2):
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
        # The weight of step tau in the average at step t, from the update rule itself.
        t = 20000
        betas = np.array([power_beta(gamma, k) for k in range(1, t + 1)])
        weights = (1 - betas) * np.concatenate([np.cumprod(betas[::-1])[::-1][1:], [1.0]])
        tau = np.arange(1, t + 1) / t
        mean = (weights * tau).sum()
        assert weights.sum() == pytest.approx(1, abs=1e-9)
        assert np.sqrt((weights * (tau - mean) ** 2).sum()) == pytest.approx(sigma_rel, rel=2e-3)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        sigma_rel_to_gamma(0.3)


def test_a_reconstructed_length_matches_the_same_length_tracked_directly():
    """A random walk with drift stands in for training. The average of sigma_rel 0.075 is
    rebuilt from snapshots of 0.05 and 0.10 every 100 of 4000 steps and compared with the
    same average kept alongside. They differ by 1e-5 of the average's distance from the
    current weights: the saved profiles span the target only approximately (least squares
    in L2) and the discrete update follows the continuous profile only up to O(1/t). The
    two tracked lengths differ from the target by 0.34 of it."""
    generator = torch.Generator().manual_seed(0)
    lengths = (0.05, 0.10, 0.075)
    gammas = [sigma_rel_to_gamma(s) for s in lengths]
    theta = torch.zeros(500, dtype=torch.float64)
    averages = [torch.zeros_like(theta) for _ in lengths]
    steps, saved = [], []
    for t in range(1, 4001):
        theta = theta + 0.01 * torch.randn(500, generator=generator, dtype=torch.float64) + 1e-3
        for i, gamma in enumerate(gammas):
            averages[i].lerp_(theta, 1 - power_beta(gamma, t))
        if t % 100 == 0:
            steps += [t, t]
            saved += [averages[0].clone(), averages[1].clone()]
    weights = posthoc_coefficients(steps, gammas[:2] * (len(steps) // 2), 4000, gammas[2])
    rebuilt = sum(w * v for w, v in zip(weights, saved, strict=True))
    scale = (averages[2] - theta).norm()
    assert (rebuilt - averages[2]).norm() / scale < 1e-3
    assert (averages[0] - averages[2]).norm() / scale > 0.2


POSTHOC = [
    "callbacks=with_posthoc_ema",
    "callbacks.posthoc_ema.every_n_steps=1",
    "callbacks.posthoc_ema.max_snapshots=3",
]


def test_the_callback_saves_thins_resumes_and_feeds_evaluate(tmp_path):
    run = tmp_path / "run"
    trainer = train(compose_train(run, *POSTHOC), run)
    snapshots = read_snapshots(run / "posthoc_ema")
    # steps 1..4, one snapshot each; past 3 the older half was thinned to every second one
    assert [s for s, _, _ in snapshots] == [1, 3, 4]
    assert all(len(gammas) == 2 for _, gammas, _ in snapshots)
    callback = next(c for c in trainer.callbacks if type(c).__name__ == "PostHocEMA")
    final = callback.ema.snapshot()
    # Resumed from the step-2 checkpoint, the averages end where they ended.
    resumed_run = tmp_path / "resumed"
    cfg = compose_train(resumed_run, *POSTHOC, f"resume={run / 'checkpoints' / 'step_000002.ckpt'}")
    again = next(c for c in train(cfg, resumed_run).callbacks if type(c).__name__ == "PostHocEMA")
    for key, value in again.ema.snapshot().items():
        torch.testing.assert_close(value, final[key], rtol=1e-5, atol=1e-7)
    # The reconstruction at a tracked length and the last step is that snapshot itself.
    weights, about = reconstruct(run / "posthoc_ema", 0.10)
    assert about["step"] == 4 and about["fit_error"] < 1e-6
    last = snapshots[-1][2]
    for key, value in weights.items():
        torch.testing.assert_close(value, last[f"1/{key}"], rtol=1e-5, atol=1e-6)
    # evaluate.py sweeps lengths from the one run; sample.py takes one.
    checkpoint = run / "checkpoints" / "last.ckpt"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = ["data.dataset.size=16", "data.dataset.num_samples=[64,16,16]", "image_size=16"]
        overrides += [f"checkpoint={checkpoint}", "extractor=tiny", "num_samples=6"]
        overrides += ["batch_size=6", "grid.steps=[2]", "attributes=false", "kid_subset_size=3"]
        overrides += [f"cache_dir={tmp_path / 'cache'}", "precision_recall_k=null"]
        ecfg = compose("evaluate", overrides=[*overrides, "grid.ema=[null,0.05,0.1]"])
        scfg = compose("sample", overrides=[f"checkpoint={checkpoint}", "posthoc_ema=0.1"])
    rows = evaluate(ecfg, tmp_path / "eval")
    assert [r.get("ema") for r in rows] == [None, 0.05, 0.1]
    assert len({r["fid"] for r in rows}) == 3  # three sets of weights, three scores
    assert "ema" in (tmp_path / "eval" / "results.md").read_text().splitlines()[0]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [r.get("ema") for r in saved["rows"]] == [None, 0.05, 0.1]
    pipeline = load_model(scfg)
    unet = {k: v for k, v in weights.items() if k.startswith("denoiser.")}
    for key, value in unet.items():
        torch.testing.assert_close(
            pipeline.denoiser.state_dict()[key.removeprefix("denoiser.")], value
        )
    # A LoRA adapter added after training is left alone (not "snapshots of another network").
    inject_lora(pipeline.denoiser, "later", rank=2)
    adapter = {k: v.clone() for k, v in pipeline.denoiser.state_dict().items() if ".lora." in k}
    load_posthoc(pipeline.networks(), run / "posthoc_ema", 0.05)
    for key, value in adapter.items():
        assert torch.equal(pipeline.denoiser.state_dict()[key], value)
    with pytest.raises(ValueError, match=r"grid\.ema only"):
        evaluate(OmegaConf.merge(ecfg, {"posthoc_ema": 0.1}), tmp_path / "eval2")
