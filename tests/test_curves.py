"""Training curves from the CSV logs of runs (ldm.tools.curves)."""

import pytest
from testutils import tool_config

from ldm.app.curves import main
from ldm.tools.curves import read_metrics, smooth, table

CSV = """epoch,lr-AdamW,step,train/loss,val/loss,val/fid
0,0.001,9,0.5,,
0,,499,,0.30,
0,0.001,19,0.4,,
1,,999,,0.20,41.5
"""


def _run(tmp_path, name="run"):
    path = tmp_path / name / "csv" / "version_0"
    path.mkdir(parents=True)
    (path / "metrics.csv").write_text(CSV)
    return tmp_path / name


def test_metrics_are_read_sorted_by_step_and_sparse_ones_tabled(tmp_path):
    series = read_metrics(_run(tmp_path))
    assert series["train/loss"] == [(9, 0.5), (19, 0.4)]
    assert series["val/loss"] == [(499, 0.3), (999, 0.2)] and series["val/fid"] == [(999, 41.5)]
    assert "epoch" not in series and "step" not in series
    rows = table({"a": series}, ["val/loss", "val/fid"]).splitlines()
    assert rows[2:] == ["| a | 499 | 0.3 |  |", "| a | 999 | 0.2 | 41.5 |"]


def test_smoothing_averages_windows_and_keeps_their_last_step():
    assert smooth([(1, 1.0), (2, 3.0), (3, 5.0)], 2) == [(2, 2.0), (3, 5.0)]
    assert smooth([(1, 1.0)], 1) == [(1, 1.0)]


def test_cli_writes_the_plot_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "curves.png"
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b")
    main(tool_config("curves", f"runs=[{a},{b}]", f"out={out}"))
    assert out.stat().st_size > 5_000
    printed = capsys.readouterr().out
    assert "| val/loss | val/fid | val/attr_shape | val/attr_joint |" in printed
    assert printed.count("| 999 |") == 2


def test_a_run_without_logs_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no metrics\.csv under"):
        read_metrics(tmp_path)
