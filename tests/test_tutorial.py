"""docs/tutorial.ipynb runs top to bottom, is stored without outputs, and says what its
jupytext source, docs/tutorial.py, says."""

from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_notebook_is_its_source_without_outputs():
    notebook = nbformat.read(DOCS / "tutorial.ipynb", as_version=4)
    source = jupytext.read(DOCS / "tutorial.py")
    assert [(c.cell_type, c.source) for c in notebook.cells] == [
        (c.cell_type, c.source) for c in source.cells
    ], "regenerate it: jupytext --to ipynb docs/tutorial.py -o docs/tutorial.ipynb"
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)


# Every cell runs as written, with its training and evaluation cut short: a reader's run
# takes 3-5 minutes on two cores, which the suite's 10-minute budget cannot spare.
SHORTER = {
    '"trainer.max_steps=150"': '"trainer.max_steps=10"',  # the autoencoder
    '"trainer.val_check_interval=150"': '"trainer.val_check_interval=10"',
    '"trainer.max_steps=120", "trainer.val_check_interval=120"': (  # the diffusion model
        '"trainer.max_steps=10", "trainer.val_check_interval=10"'
    ),
    '("ddpm", 50)': '("ddpm", 10)',  # sampling steps in the notebook's kernel
    '"num_samples=32"': '"num_samples=8"',  # evaluate.py's samples per grid point
    '"trainer.max_steps=20"': '"trainer.max_steps=5"',  # the LoRA
}


# The notebook's run() helper starts a new interpreter per command line (about 16 s of
# imports each on a slow core); here the same command lines run in a fork of the kernel,
# which imports them once (tests/testutils.py::run_cli). test_installed.py runs them as
# new interpreters.
FORKED_RUN = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from testutils import run_cli
import ldm.app.evaluate, ldm.app.train  # once, in the kernel, for every fork


def run(*args: str) -> None:
    done = run_cli(list(args), cwd=Path.cwd(), env=dict(os.environ), timeout=600)
    if done.returncode:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
"""


def test_the_notebook_runs(tmp_path):
    notebook = nbformat.read(DOCS / "tutorial.ipynb", as_version=4)
    for long, short in SHORTER.items():
        cells = [c for c in notebook.cells if c.cell_type == "code" and long in c.source]
        assert len(cells) == 1 and cells[0].source.count(long) == 1, f"{long} not in the notebook"
        cells[0].source = cells[0].source.replace(long, short)
    helper = [i for i, c in enumerate(notebook.cells) if "def run(*args: str)" in c.source]
    assert len(helper) == 1, "the notebook's run() helper moved: update FORKED_RUN"
    notebook.cells.insert(helper[0] + 1, nbformat.v4.new_code_cell(FORKED_RUN))
    client = NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # a failing cell raises CellExecutionError with its traceback
    printed = "".join(
        out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])
    )
    assert "trained in" in printed and '"adapters": {"style.safetensors": 1.0}' in printed
    images = sum(
        "image/png" in out.get("data", {}) for c in notebook.cells for out in c.get("outputs", [])
    )
    assert images == 5  # DDPM and DDIM grids, the FID plot, the LoRA grid, the served images
