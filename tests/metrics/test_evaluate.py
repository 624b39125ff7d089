"""evaluate.py end to end on a tiny model: a grid sweep's rows and plot, the same FID and
KID from 1 and 2 processes, and the FID callback during training."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.app.evaluate import evaluate, previous_runs
from ldm.app.sample import load_model
from ldm.app.train import train
from ldm.metrics.results import write_results

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))
from testutils import run_cli  # noqa: E402
from trainutils import compose_train  # noqa: E402

DATA = ["data.dataset.size=16", "data.dataset.num_samples=[64,16,16]"]
BASE = [
    *DATA,
    "extractor=tiny",
    "num_samples=12",
    "batch_size=5",
    "kid_subset_size=6",
    "image_size=16",
]
SMALL_CLASSIFIER = "{train_count:600,held_out_count:100,epochs:1}"  # seconds, not a minute


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("ldm")
    train(compose_train(run, "trainer.max_steps=2"), run)
    return run / "checkpoints" / "last.ckpt"


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_a_sweep_writes_one_row_per_grid_point_and_the_plot(checkpoint, tmp_path, caplog):
    cfg = _compose(
        *BASE,
        f"checkpoint={checkpoint}",
        f"cache_dir={tmp_path / 'cache'}",
        "grid.samplers=[{name:ddim,eta:[0.0,1.0]},ddpm]",
        "grid.steps=[2,3]",
        "repeats=2",
        "attributes=false",
    )
    runs = evaluate(cfg, tmp_path / "out")
    assert len(runs) == 12  # (ddim x 2 eta + ddpm) x 2 step counts, x 2 repeats
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and "fid_spread" in rows[0]
    assert (tmp_path / "out" / "fid_vs_nfe.png").stat().st_size > 1000
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.count("\n") == 2 + 6
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["nfe"] for r in saved["rows"]} == {2.0, 3.0}
    assert "compare FIDs only at equal n" in caplog.text
    assert any(p.name.startswith("reference-") for p in (tmp_path / "cache").iterdir())


def test_a_grid_of_sampler_configurations_sweeps_any_option(checkpoint, tmp_path):
    settings = [
        *BASE,
        f"checkpoint={checkpoint}",
        f"cache_dir={tmp_path / 'cache'}",
        "attributes=false",
        "grid.steps=[3]",
    ]
    samplers = "grid.samplers=[{name:heun,s_churn:[0,40]},{name:ddim,eta:[0,1]},dpmpp_2m]"
    runs = evaluate(_compose(*settings, samplers), tmp_path / "out")
    nfe = {(r["sampler"], r["eta"], r["options"].get("s_churn")): r["nfe"] for r in runs}
    assert nfe == {  # Heun: two evaluations a step, one on the last (Euler onto sigma 0)
        ("heun", None, 0): 5,
        ("heun", None, 40): 5,
        ("ddim", 0, None): 3,
        ("ddim", 1, None): 3,
        ("dpmpp_2m", None, None): 3,
    }
    heun = [r["fid"] for r in runs if r["sampler"] == "heun"]
    assert heun[0] != heun[1]  # the churn reached the sampler
    assert "s_churn=40" in (tmp_path / "out" / "results.md").read_text()
    # Rows of an earlier release (no options column) and the old shorthand for the same
    # points, in another order: every run is found done, none is redone.
    path = tmp_path / "out" / "results.json"
    saved = json.loads(path.read_text())
    for run in saved["runs"]:
        if run["sampler"] == "ddim":
            del run["options"]
    path.write_text(json.dumps(saved))
    again = evaluate(
        _compose(*settings, "grid.sampler=[dpmpp_2m,ddim]", "grid.eta=[1.0,0.0]"), tmp_path / "out"
    )
    assert len(again) == 5
    with pytest.raises(ValueError, match=r"takes no option.*s_chrn"):
        evaluate(_compose(*settings, "grid.samplers=[{name:heun,s_chrn:1}]"), tmp_path / "typo")


def _evaluate_cli(tmp_path, checkpoint, name, *extra):
    # One thread per process in both runs: Lightning otherwise gives each of N processes
    # cores / N threads, and sums split over another thread count round differently.
    env = {
        **os.environ,
        "LDM_OUTPUT_DIR": str(tmp_path),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    args = [
        *BASE,
        f"checkpoint={checkpoint}",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / name}",
    ]
    args += ["grid.samplers=[ddpm,ddim]", "grid.steps=[3]", "attributes=true", *extra]
    args += [f"attribute_classifier={SMALL_CLASSIFIER}"]
    fork = not any(a.startswith("fabric.devices=") for a in extra)
    command = [str(ROOT / "evaluate.py"), *args]
    done = run_cli(command, cwd=tmp_path, env=env, timeout=300, fork=fork)
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        r["sampler"]: r for r in json.loads((tmp_path / name / "results.json").read_text())["rows"]
    }


def test_one_and_two_processes_give_the_same_fid_and_kid(checkpoint, tmp_path):
    uneven = "num_samples=11"  # ranks make 6 and 5 samples: no hang, the same numbers
    one = _evaluate_cli(tmp_path, checkpoint, "one", uneven)
    two = _evaluate_cli(
        tmp_path, checkpoint, "two", uneven, "fabric.devices=2", "fabric.strategy=ddp"
    )
    assert one["ddim"]["n"] == two["ddim"]["n"] == 11
    for sampler in ("ddpm", "ddim"):  # ddpm: per-sample step noise, whatever the rank
        for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "is_mean", "attr_joint"):
            assert two[sampler][key] == pytest.approx(one[sampler][key], rel=1e-6, abs=1e-9), (
                sampler,
                key,
            )


def test_fid_callback_logs_during_training(tmp_path):
    cfg = compose_train(
        tmp_path,
        "callbacks=with_fid",
        "callbacks.fid.every_n_steps=2",
        "callbacks.fid.num_samples=8",
        "callbacks.fid.extractor=tiny",
        "callbacks.fid.attributes=false",
        "callbacks.fid.steps=2",
        "callbacks.fid.batch_size=4",
    )
    train(cfg, tmp_path)
    lines = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    fids = [row.split(",")[header.index("val/fid")] for row in lines[1:]]
    assert len([f for f in fids if f]) == 2  # steps 2 and 4
    assert "val/fd_tiny" in header  # each network's headline column too
    # evaluate.py on the same split, n and extractor reuses the callback's statistics.
    cache = tmp_path / "reference_stats"
    written = sorted(p.name for p in cache.glob("reference-*"))
    evaluate(
        _compose(
            "data.dataset.size=16",
            "data.dataset.num_samples=[64,8,8]",
            f"checkpoint={tmp_path / 'checkpoints' / 'last.ckpt'}",
            f"cache_dir={cache}",
            "extractor=tiny",
            "num_samples=8",
            "attributes=false",
            "grid.steps=[2]",
        ),
        tmp_path / "eval",
    )
    assert len(written) == 1 and sorted(p.name for p in cache.glob("reference-*")) == written


def test_attributes_alone_need_no_feature_network(checkpoint, tmp_path):
    cfg = _compose(
        *BASE,
        f"checkpoint={checkpoint}",
        f"cache_dir={tmp_path / 'cache'}",
        "extractor=null",
        "attributes=true",
        f"attribute_classifier={SMALL_CLASSIFIER}",
        "grid.steps=[2,3]",
        "repeats=2",
    )
    runs = evaluate(cfg, tmp_path / "out")
    assert len(runs) == 4 and all("fid" not in r for r in runs)
    for run in runs:
        for name in ("shape", "colour", "size", "position", "background", "joint"):
            assert 0 <= run[f"attr_{name}"] <= 1
    summary = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert "attr_joint_spread" in summary[0]
    assert (tmp_path / "out" / "attributes_vs_nfe.png").is_file()
    assert not (tmp_path / "out" / "fid_vs_nfe.png").exists()
    assert "attr_shape" in (tmp_path / "out" / "results.md").read_text()
    assert len(list((tmp_path / "cache").glob("attributes-*.safetensors"))) == 1


def test_fid_callback_logs_prompt_adherence(tmp_path):
    cfg = compose_train(
        tmp_path,
        "callbacks=with_fid",
        "callbacks.fid.every_n_steps=4",
        "callbacks.fid.num_samples=8",
        "callbacks.fid.extractor=null",
        "callbacks.fid.attributes=true",
        f"callbacks.fid.attribute_classifier={SMALL_CLASSIFIER}",
        "callbacks.fid.steps=2",
        "callbacks.fid.batch_size=4",
    )
    train(cfg, tmp_path)
    lines = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert "val/attr_joint" in header and "val/attr_shape" in header and "val/fid" not in header


def test_an_interrupted_sweep_resumes_where_it_stopped(checkpoint, tmp_path):
    settings = [
        *BASE,
        f"checkpoint={checkpoint}",
        f"cache_dir={tmp_path / 'cache'}",
        "attributes=false",
    ]
    full = evaluate(_compose(*settings, "grid.steps=[2,3]", "repeats=2"), tmp_path / "full")
    # the first point alone, as if stopped there; then the whole grid into the same folder
    evaluate(_compose(*settings, "grid.steps=[2]", "repeats=2"), tmp_path / "out")
    cfg = _compose(*settings, "grid.steps=[2,3]", "repeats=2", "batch_size=7")
    resumed = evaluate(cfg, tmp_path / "out")
    assert [(r["steps"], r["repeat"]) for r in resumed] == [(r["steps"], r["repeat"]) for r in full]
    assert [r["fid"] for r in resumed] == pytest.approx([r["fid"] for r in full], rel=1e-6)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["runs"]) == 4 and len(saved["rows"]) == 2
    # speed settings do not change the runs: they resume under another batch size or compile
    assert len(previous_runs(tmp_path / "out", saved["meta"] | {"compile": True})) == 4
    assert load_model(_compose(*settings, "compile=true")).denoiser._compiled_call_impl
    with pytest.raises(ValueError, match="other settings \\(seed\\)"):
        evaluate(_compose(*settings, "grid.steps=[2,3]", "seed=1"), tmp_path / "out")
    # our checkpoint brings its own schedule: the config's diffusion settings are not used
    again = evaluate(_compose(*settings, "grid.steps=[2]", "diffusion=flow"), tmp_path / "out")
    assert len(again) == 4
    fresh = evaluate(
        _compose(*settings, "grid.steps=[2]", "seed=1", "resume=false"), tmp_path / "out"
    )
    assert len(fresh) == 1


def test_resuming_refuses_the_runs_of_other_weights_at_the_same_path(checkpoint, tmp_path):
    """A checkpoint trained again in the same place is another model: its runs are kept apart
    (the weights' digest is part of what a resumed run must match), while a copy of the same
    weights resumes."""
    path = tmp_path / "last.ckpt"
    shutil.copy(checkpoint, path)
    settings = [*BASE, f"checkpoint={path}", f"cache_dir={tmp_path / 'cache'}", "attributes=false"]
    evaluate(_compose(*settings, "grid.steps=[2]"), tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["meta"]["weights_sha256"]) == 64
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["epoch"] = 7  # not a weight: the same digest
    torch.save(state, path)
    assert len(evaluate(_compose(*settings, "grid.steps=[2,3]"), tmp_path / "out")) == 2
    for key, value in state["state_dict"].items():
        if value.is_floating_point():
            state["state_dict"][key] = value + 1e-3
    torch.save(state, path)
    with pytest.raises(ValueError, match="other settings \\(weights_sha256\\)"):
        evaluate(_compose(*settings, "grid.steps=[2]"), tmp_path / "out")


def test_saved_samples_rescore_to_the_same_fid(checkpoint, tmp_path):
    """save_samples=true writes what was scored: compare() on those PNGs against the cached
    reference statistics gives the run's own FID."""
    import numpy as np

    from ldm.metrics.compare import compare
    from ldm.metrics.extractors import make_extractor

    cfg = _compose(
        *BASE,
        f"checkpoint={checkpoint}",
        f"cache_dir={tmp_path / 'cache'}",
        "grid.steps=[2]",
        "attributes=false",
        "save_samples=true",
        "bootstrap=20",
    )
    (run,) = evaluate(cfg, tmp_path / "out")
    folder = tmp_path / "out" / "samples" / "ddim_eta0_trailing_g3_steps2" / "r0"
    assert len(list(folder.glob("*.png"))) == 12
    saved = np.load(folder / "features-rank0.npz")
    assert saved["index"].tolist() == list(range(12)) and saved["features"].shape == (12, 64)
    (reference,) = (tmp_path / "cache").glob("reference-*.safetensors")
    again = compare(reference, folder, make_extractor("tiny"), kid_subset_size=6)
    assert again["fid"] == pytest.approx(run["fid"], rel=1e-5)
    assert run["fid_ci_low"] <= run["fid"] <= run["fid_ci_high"]


def test_several_feature_networks_share_one_generation_pass(checkpoint, tmp_path):
    """extractor=[...]: a column set per network, the first one's also under the old names;
    a CLIP network adds CMMD."""
    import open_clip
    import torch

    torch.manual_seed(0)
    weights = tmp_path / "clip.pt"
    torch.save(open_clip.create_model("ViT-S-32").state_dict(), weights)
    cfg = _compose(
        *BASE,
        f"checkpoint={checkpoint}",
        f"cache_dir={tmp_path / 'cache'}",
        "grid.steps=[2]",
        "attributes=false",
        f"extractor=[tiny,tiny:32,clip-ViT-S-32:{weights}]",
    )
    (run,) = evaluate(cfg, tmp_path / "out")
    assert run["fid"] == run["fd_tiny"] and run["kid_mean"] == run["kid_tiny"]
    assert run["fd_tiny_2"] != run["fd_tiny"]  # another network, other features
    assert {"fd_clip", "cmmd_clip", "precision_clip"} <= set(run) and "cmmd_tiny" not in run
    table = (tmp_path / "out" / "results.md").read_text()
    assert all(c in table for c in ("fd_tiny_2", "fd_clip", "cmmd_clip"))
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert list(provenance["networks"]) == ["tiny", "tiny_2", "clip"]
    assert len(list((tmp_path / "cache").glob("reference-*.safetensors"))) == 3


def test_the_fid_callback_takes_any_sampler_option():
    from ldm.training.sampling_callbacks import FIDCallback

    callback = FIDCallback(every_n_steps=1, sampler="heun", steps=5, options={"s_churn": 10})
    assert callback.point.label == "heun, karras, s_churn 10, guidance 3"
    assert FIDCallback(every_n_steps=1).point.label == "ddim, eta 0, trailing, guidance 3"
    with pytest.raises(ValueError, match=r"'ddpm' takes no option.*eta"):
        FIDCallback(every_n_steps=1, sampler="ddpm", eta=0.5)


def test_results_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A stop while results.json is written leaves the previous file, which resumes."""
    row = {"sampler": "ddim", "steps": 10, "guidance": 1.0, "spacing": "trailing", "eta": 0.0}
    row |= {"options": {}, "repeat": 0, "n": 4, "nfe": 10.0, "seconds_per_image": 0.1}
    write_results([row | {"fid": 12.5}], tmp_path, {"seed": 0})
    before = (tmp_path / "results.json").read_text()
    write_text = Path.write_text

    def killed_midway(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        write_results([row | {"fid": 12.5}, row | {"repeat": 1, "fid": 13.0}], tmp_path, {})
    monkeypatch.undo()
    assert (tmp_path / "results.json").read_text() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # none left
