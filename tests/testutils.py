"""Helpers shared by test modules (importable because pyproject puts tests/ on sys.path)."""

import importlib.util
import os
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn


def run_as_main(args: list[str]) -> int:
    """``python *args`` (a script and its arguments, or ``-m module ...``) in this
    interpreter, as the interpreter runs it (``__main__``, a plain module imported afresh):
    its exit code, with a traceback or an exit message on stderr."""
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            if not importlib.util.find_spec(args[1]).submodule_search_locations:
                sys.modules.pop(args[1], None)  # not a package (its __main__ runs afresh)
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            runpy.run_path(args[0], run_name="__main__")
        return 0
    except SystemExit as stop:  # as the interpreter treats it
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120, fork: bool = True
) -> subprocess.CompletedProcess:
    """``python *args`` (a script and its arguments, or ``-m module ...``) in a forked child
    of this test process: the real entry point with its own cwd, environment, argv, exit
    code and output, without a new interpreter's imports (torch, Lightning and torchmetrics
    take about 10 s on a slow core), on one thread. ``fork=False``: a new interpreter, for
    what must start afresh (multi-process launches hang in a fork of a pytest worker)."""
    if not fork:
        return subprocess.run(
            [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                for fd, path in ((1, out), (2, err)):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                os.chdir(cwd)
                os.environ.clear()
                os.environ.update(env)
                torch.set_num_threads(1)  # OpenMP's threads of this process are not forked
                from hydra.core.global_hydra import GlobalHydra

                GlobalHydra.instance().clear()
                code = run_as_main(args)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(args, timeout)
            time.sleep(0.05)
        return subprocess.CompletedProcess(
            args, os.waitstatus_to_exitcode(status), out.read_text(), err.read_text()
        )


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (norms too), so zero-initialised layers cannot hide a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.2 if p.ndim == 1 else 1 / max(1, p[0].numel()) ** 0.5
            base = 1.0 if name.endswith("weight") and p.ndim == 1 else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))
    return module


# A tiny SD-layout UNet: conv projections, attention at both levels, context width 16.
TINY_SD_UNET = dict(
    model_channels=32,
    channel_multipliers=(1, 2),
    blocks_per_level=1,
    attention_levels=(0, 1),
    num_heads=4,
    context_dim=16,
    norm_groups=8,
)


def save_random_adapter(networks: nn.ModuleDict, path, targets: str, rank: int, alpha: float):
    """Adapter ``style`` on ``networks["denoiser"]`` at ``targets``, random (seed 0, sd
    0.05), saved to ``path`` in our format; the networks keep it."""
    from ldm.convert.lora import save_adapter
    from ldm.nn.lora import adapter_parameters, inject_lora

    inject_lora(networks["denoiser"], "style", targets=targets, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(networks):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    networks.lora_settings = {"style": networks["denoiser"].lora_settings["style"]}
    save_adapter(networks, path, "style")


def tool_config(name: str, *overrides: str):
    """The config a command-line tool composes from conf/<name>.yaml and ``overrides``
    (pass it to the tool's ``main`` to run it in-process)."""
    from hydra import compose, initialize_config_dir

    from ldm import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))
