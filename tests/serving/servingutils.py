"""Starting the service for real: a subprocess on a free port of 127.0.0.1, ready when
``/readyz`` answers 200."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"  # the bearer token of the tests' servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(
    command: Sequence[str], port: int, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``command`` (a server on ``port``) until the block ends; yields (url, process)."""
    proc = subprocess.Popen(
        list(command), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@contextlib.contextmanager
def ldm_serve(*overrides: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m ldm.serve`` with ``overrides`` (one torch thread)."""
    port = free_port()
    command = [sys.executable, "-m", "ldm.serve", f"port={port}", "threads=1", *overrides]
    with serving(command, port) as running:
        yield running
