"""The PNGs of a fixed tiny checkpoint, prompts, seeds and settings, pinned by hash: the
generation path may be reorganised, never changed. One thread, so that the arithmetic
is the same under pytest-xdist and alone."""

import hashlib

import pytest
import torch
from hydra import compose, initialize_config_dir
from trainutils import CONF, compose_train

from ldm.app.sample import sample
from ldm.app.train import train

# sha256[:16] of each PNG, in sample.py's order (prompt-major, then seed).
PINNED = {
    "ddim": ["e6ca49317ad456f7", "fb90265e2c14cd87", "a194c8ca1edc80d6", "c523871f62af3889"],
    "ddpm": ["c23b2794d7e77df7", "95e6c650864de2a4", "23a66bcc4a0afada", "45e4ae79782295bd"],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("pinned")
        cfg = compose_train(run, "task=ldm", "trainer.max_steps=2", "task.channels_last=false")
        train(cfg, run)
    finally:
        torch.set_num_threads(threads)
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("sampler", sorted(PINNED))
def test_generated_pngs_are_byte_identical_to_the_pinned_ones(checkpoint, tmp_path, sampler):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "sample",
            overrides=[
                f"checkpoint={checkpoint}",
                "prompts=[a red circle,a large blue square on a white background]",
                "num_per_prompt=2",
                f"sampler={sampler}",
                "sampler.steps=3",
                "guidance_scale=3.0",
                "batch_size=4",
                "device=cpu",
            ],
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        paths = sample(cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in paths]
    assert hashes == PINNED[sampler]
