"""``python -m ldm.serve checkpoint=...``: the HTTP generation service (conf/serve.yaml)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ldm.app import CONFIG_PATH, reported
from ldm.app.sample import load_model

log = logging.getLogger(__name__)


def read_token(cfg: DictConfig) -> str | None:
    """The bearer token from ``token_env`` or ``token_file``; None: no authentication."""
    if cfg.token_env and cfg.token_file:
        raise ValueError("give token_env or token_file, not both")
    if cfg.token_env:
        token = os.environ.get(cfg.token_env)
        if not token:
            raise ValueError(f"token_env={cfg.token_env}, but that environment variable is empty")
        return token
    if cfg.token_file:
        token = Path(cfg.token_file).read_text().strip()
        if not token:
            raise ValueError(f"token_file {cfg.token_file} is empty")
        return token
    return None


def model_overrides(cfg: DictConfig) -> list[str]:
    """The settings that shaped how the model loaded, for the sample.py lines the server
    returns: ``ema=false``, ``vae=``, and the command line's diffusion / model overrides."""
    out = [] if cfg.ema else ["ema=false"]
    if cfg.get("vae"):  # the decoder the server swapped in
        vae = Path(cfg.vae)
        out.append(f"vae={vae.resolve() if vae.exists() else vae}")
    if HydraConfig.initialized():
        for override in HydraConfig.get().overrides.task:
            key = override.lstrip("+~").split("=", 1)[0]
            if key.startswith(("diffusion", "model/", "model.")):
                out.append(override)
    return out


def build(cfg: DictConfig):  # -> FastAPI (imported lazily: the serve extra)
    """The service's app from a composed serve config."""
    from ldm.serving.api import create_app
    from ldm.serving.service import ImageService

    checkpoint = Path(cfg.checkpoint)
    service = ImageService(
        load_model(cfg),
        checkpoint=str(checkpoint.resolve() if checkpoint.exists() else checkpoint),
        adapters_dir=cfg.adapters_dir,
        embeddings=list(cfg.embeddings),
        max_steps=cfg.max_steps,
        max_images=cfg.max_images,
        sizes=list(cfg.sizes) if cfg.sizes else None,
        model_overrides=model_overrides(cfg),
    )
    return create_app(
        service,
        max_batch=cfg.max_batch,
        max_wait=cfg.max_wait_ms / 1000,
        max_queue=cfg.max_queue,
        timeout=cfg.timeout_s,
        token=read_token(cfg),
    )


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="serve")
@reported(ValueError)
def main(cfg: DictConfig) -> None:
    """Load the model, then serve until SIGTERM / Ctrl-C (in-flight requests finish)."""
    import torch
    import uvicorn

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    app = build(cfg)
    if not (cfg.token_env or cfg.token_file) and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: anyone who can reach it can use it", cfg.host)
    # uvicorn shuts down gracefully on SIGTERM / SIGINT, then raises the signal again for
    # the handler it found: a no-op one, so that a graceful stop exits with status 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        timeout_graceful_shutdown=cfg.shutdown_timeout_s,
        log_level="info",
    )
