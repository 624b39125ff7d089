"""ldm installed (not editable), run from another folder: the configs ship inside the
package and every command line starts and runs a tiny job.

.ci/run installs the package with ``pip install .`` into a fresh virtual environment and
names its interpreter in LDM_INSTALLED_PYTHON; without it, the package is built into a
wheel and installed into a bare folder that this environment's interpreter runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "training"))
from trainutils import TINY

ROOT = Path(__file__).resolve().parents[1]
# The tiny settings of the training tests, minus what only the in-process compose sets.
TRAIN = [o for o in TINY if not o.startswith("+trainer")] + ["trainer.max_steps=2"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """The interpreter that runs the installed package, and its environment."""
    if os.environ.get("LDM_INSTALLED_PYTHON"):  # a fresh venv with ``pip install .``
        return os.environ["LDM_INSTALLED_PYTHON"], {}
    out = tmp_path_factory.mktemp("installed")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(out)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    wheel = next(out.glob("ldm-*.whl"))
    target = out / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    return sys.executable, {"PYTHONPATH": str(target)}  # its dependencies: this environment's


# Runs each command as ``python -m`` does (testutils.run_as_main) in one interpreter: the
# package starts once instead of once per command, which saves a minute of imports here.
DRIVER = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})  # testutils; not ldm
from testutils import run_as_main
import ldm
print("ldm at", ldm.__file__, ldm.CONF_DIR.is_dir(), flush=True)
for command in json.loads(sys.argv[1]):
    if code := run_as_main(["-m", *command]):
        sys.exit(f"python -m {{' '.join(command)}}: exit {{code}}")
"""


def _run(installed: tuple[str, dict[str, str]], cwd: Path, *commands: list[str]) -> str:
    """``python -m <module> <args>`` for each command, in order, from ``cwd``."""
    python, extra = installed
    env = {**os.environ, **extra, "LDM_OUTPUT_DIR": str(cwd / "outputs")}
    done = subprocess.run(
        [python, "-c", DRIVER, json.dumps(commands)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    return done.stdout + done.stderr


def test_the_installed_package_runs_every_command_line(installed, tmp_path):
    vae = tmp_path / "vae" / "checkpoints" / "last.ckpt"
    ldm = tmp_path / "ldm" / "checkpoints" / "last.ckpt"
    merged = tmp_path / "merged.safetensors"
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (80 * i, 40, 200)).save(photos / f"{i}.png")
    data = ["data.dataset.size=16", "data.dataset.num_samples=[64,8,8]"]
    printed = _run(
        installed,
        tmp_path,
        ["ldm.train", "task=vae", *TRAIN, "hydra.run.dir=vae"],
        ["ldm.train", f"vae_checkpoint={vae}", *TRAIN, "hydra.run.dir=ldm"],
        ["ldm.sample", f"checkpoint={ldm}", "prompts=[a red circle]", "num_per_prompt=1",
         "sampler.steps=2", "hydra.run.dir=samples"],
        ["ldm.evaluate", f"checkpoint={ldm}", "extractor=tiny", "num_samples=4",
         "attributes=false", "grid.steps=[2]", *data, "hydra.run.dir=eval"],
        ["ldm.tools.tables", "runs=[eval]", "out=fid.png"],
        ["ldm.tools.curves", "runs=[ldm]", "out=curves.png", "keys=[train/loss]"],
        ["ldm.tools.merge", "method=weighted", f"inputs=[{ldm},{ldm}]", f"out={merged}"],
        ["ldm.convert", f"src={merged}"],
        ["ldm.data.latents", f"vae={vae}", "out=latents", *data, "splits=[val]"],
        ["ldm.data.prepare", "src=photos", "out=shards", "progress=false",
         "near_duplicate_bits=null"],
    )  # fmt: skip
    where = printed.split("ldm at ", 1)[1].split("\n", 1)[0]
    assert not where.startswith(str(ROOT / "ldm")) and where.endswith(" True"), where
    assert (tmp_path / "samples" / "grid.png").is_file()
    assert (tmp_path / "eval" / "results.md").is_file()
    assert (tmp_path / "fid.png").is_file() and (tmp_path / "curves.png").is_file()
    assert "format: ours; task: ldm; EMA: True" in printed  # ldm.convert read the merge
    assert (tmp_path / "latents" / "val" / "cache.json").is_file()
    assert any((tmp_path / "shards").rglob("*.tar"))
    assert not (tmp_path / ".hydra").exists()  # the tools write only what they are asked to
