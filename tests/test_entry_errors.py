"""Every command-line tool given a bad weights file ends with one line naming the file:
no traceback, no advice to load unsafely, and a code-carrying file never runs."""

import os
import pickle
from pathlib import Path

import pytest
from testutils import run_cli

ROOT = Path(__file__).resolve().parents[1]
PWNED = "/tmp/ldm_entry_pwned"


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def _bad(tmp_path: Path, kind: str) -> Path:
    if kind == "truncated":
        path = tmp_path / "model.safetensors"
        path.write_bytes(b"\x00\x10\x00\x00\x00\x00\x00\x00{" + b'"w": ' * 20)
    elif kind == "code":
        path = tmp_path / "model.ckpt"
        path.write_bytes(pickle.dumps({"state_dict": {"w": _Exploit()}}, protocol=2))
    else:
        path = tmp_path / "model.ckpt"
        path.write_bytes(b"")
    return path


TOOLS = {  # name -> (the command line with {bad} and {tmp}, the kind of bad file)
    "sample": ("sample.py checkpoint={bad} hydra.run.dir={tmp}/run", "truncated"),
    "train base": ("train.py task=ldm base={bad} hydra.run.dir={tmp}/run", "code"),
    "train vae": ("train.py task=ldm vae_checkpoint={bad} hydra.run.dir={tmp}/run", "empty"),
    "train resume": (
        "train.py experiment=shapes_vae resume={bad} hydra.run.dir={tmp}/run",
        "empty",
    ),
    "evaluate": ("evaluate.py checkpoint={bad} extractor=null hydra.run.dir={tmp}/run", "code"),
    "convert": ("-m ldm.convert src={bad}", "truncated"),
    "merge": ("-m ldm.tools.merge inputs=[{bad},{bad}] out={tmp}/m.safetensors", "code"),
    "latents": ("-m ldm.data.latents vae={bad} out={tmp}/latents", "truncated"),
}


@pytest.mark.parametrize("tool", TOOLS)
def test_a_bad_weights_file_is_one_line_naming_it(tool, tmp_path):
    command, kind = TOOLS[tool]
    bad = _bad(tmp_path, kind)
    args = command.format(bad=bad, tmp=tmp_path).split()
    env = {**os.environ, "LDM_OUTPUT_DIR": str(tmp_path / "outputs")}
    done = run_cli(args, cwd=ROOT, env=env)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
    assert str(bad) in lines[0], lines[0]
    assert "Traceback" not in done.stderr and "weights_only=False" not in done.stderr
    assert not os.path.exists(PWNED)
