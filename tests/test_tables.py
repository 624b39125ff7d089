"""Steps x eta tables from evaluate.py runs (ldm.tools.tables)."""

import json

import pytest
from testutils import tool_config

from ldm.app.tables import main
from ldm.tools.tables import mean_sd, read_runs, table


def _run(tmp_path, name, guidance=1.0):
    runs = [
        {"steps": s, "eta": e, "guidance": guidance, "repeat": k, "fid": fid, "attr_joint": 0.5}
        for s, e, k, fid in [
            (10, 0.0, 0, 20.0), (10, 0.0, 1, 22.0), (10, 1.0, 0, 25.0), (10, 1.0, 1, 26.0),
            (100, 0.0, 0, 15.0), (100, 1.0, 0, 14.0),
        ]
    ]  # fmt: skip
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"meta": {}, "rows": [], "runs": runs}))
    return folder


def test_cells_are_mean_and_sd_over_repeats_and_pairs_are_differenced_by_seed(tmp_path):
    runs = read_runs([_run(tmp_path, "a")])
    lines = table(runs, "fid", paired=(0.0, 1.0)).splitlines()
    assert lines[0] == "| steps | repeats | eta = 0 | eta = 1 | eta 0 − eta 1 (paired) |"
    # seed 0: 20 - 25 = -5, seed 1: 22 - 26 = -4
    assert lines[2] == "| 10 | 2 | 21.0 ± 1.4 | 25.5 ± 0.7 | -4.5 ± 0.7 |"
    assert lines[3] == "| 100 | 1 | 15.0 | 14.0 | 1.0 |"
    assert mean_sd([]) == "" and mean_sd([0.5, 0.5], 2) == "0.50 ± 0.00"


def test_one_guidance_per_table_and_missing_results_are_named(tmp_path):
    runs = read_runs([_run(tmp_path, "a"), _run(tmp_path, "b", guidance=3.0)])
    with pytest.raises(ValueError, match="one guidance scale at a time"):
        table(runs)
    with pytest.raises(FileNotFoundError, match=r"no results\.json"):
        read_runs([tmp_path / "missing"])


def test_cli_prints_percent_tables_and_plots_panels(tmp_path, capsys):
    out = tmp_path / "fid.png"
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b", guidance=3.0)
    main(
        tool_config(
            "tables", f"runs=[{a},{b}]", "panels=[g1,g3]", "metrics=[fid,attr_joint]",
            "floors={recon: 12}", f"out={out}",
        )
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "g3: attr_joint (%)" in printed and "| 10 | 2 | 50.0 ± 0.0 | 50.0 ± 0.0 |" in printed
    assert out.stat().st_size > 5_000


def test_summaries_give_mean_sd_and_min_over_repeats():
    from ldm.metrics.results import summarize

    base = {"sampler": "ddim", "steps": 10, "guidance": 1.0, "spacing": "trailing", "eta": 0.0}
    runs = [
        {**base, "n": 100, "nfe": 10, "seconds_per_image": 0.1, "fid": f, "repeat": i,
         "fid_ci_low": f - 1, "fid_ci_high": f + 1}
        for i, f in enumerate((30.0, 32.0, 34.0))
    ]  # fmt: skip
    (row,) = summarize(runs)
    assert row["fid"] == 32.0 and row["fid_spread"] == 2.0 and row["fid_min"] == 30.0
    assert "fid_ci_low" not in row  # per run only, with several repeats
    (one,) = summarize(runs[:1])
    assert one["fid_ci_low"] == 29.0 and one["fid_ci_high"] == 31.0


def test_tables_by_checkpoint_follow_a_model_through_training(tmp_path, capsys):
    runs = []
    for step, fids in [(2000, (60.0, 50.0)), (10000, (34.0, 31.0))]:
        folder = tmp_path / f"step_{step:06d}"
        folder.mkdir()
        rows = [
            {"steps": 10, "eta": eta, "guidance": 1.0, "repeat": 0, "fid": fid}
            for eta, fid in zip((0.0, 1.0), fids, strict=True)
        ]
        meta = {"checkpoint": f"/runs/ckpts/step_{step:06d}.ckpt"}
        (folder / "results.json").write_text(json.dumps({"meta": meta, "runs": rows}))
        runs.append(folder)
    lines = table(read_runs(runs), "fid", paired=(0.0, 1.0), by="checkpoint").splitlines()
    assert lines[0].startswith("| checkpoint | repeats | eta = 0 | eta = 1 |")
    assert lines[2:] == [
        "| step_002000 | 1 | 60.0 | 50.0 | 10.0 |",
        "| step_010000 | 1 | 34.0 | 31.0 | 3.0 |",
    ]
    with pytest.raises(ValueError, match="one step count"):
        table(read_runs([_run(tmp_path, "a")]), by="checkpoint")
    with pytest.raises(SystemExit):
        main(tool_config("tables", f"runs=[{runs[0]}]", "by=checkpoint", f"out={tmp_path}/x.png"))
    assert "leave it out" in capsys.readouterr().err


def test_study_runs_table_by_seed_with_scaled_metrics(tmp_path, capsys):
    folders = []
    for eta, seed, frechet in [(0.0, 0, 0.002), (0.0, 1, 0.004), (1.0, 0, 0.003), (1.0, 1, 0.006)]:
        rows = [
            {"sampler": "reference", "steps": 0, "frechet": 1e-5},
            {"sampler": "ddim", "steps": 5, "frechet": frechet},
        ]
        settings = {"sampler_options": {"ddim": {"eta": eta}}, "seed": seed, "guidance": 3.0}
        folder = tmp_path / f"g3.0-eta{eta}-seed{seed}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}))
        folders.append(folder)
    runs = read_runs(folders)
    assert {(r["eta"], r["repeat"], r["guidance"]) for r in runs} == {
        (0.0, 0, 3.0), (0.0, 1, 3.0), (1.0, 0, 3.0), (1.0, 1, 3.0)
    }  # fmt: skip
    main(
        tool_config(
            "tables", f"runs=[{','.join(map(str, folders))}]", "metrics=[frechet]",
            "paired=[0,1]", "scale={frechet: 1000}", "digits=2",
        )
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "frechet (x 1e-03)" in printed
    assert "| 5 | 2 | 3.00 ± 1.41 | 4.50 ± 2.12 | -1.50 ± 0.71 |" in printed
    with pytest.raises(ValueError, match="one sampler at a time"):
        table([{**runs[0], "sampler": "heun"}, *runs[1:]])
