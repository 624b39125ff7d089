"""Checkpoints in, images out: ``open_checkpoint`` reads what any weight file this
framework knows holds; ``Pipeline`` makes images from it."""

from ldm.pipeline.checkpoint import CONFIG_KEY, Checkpoint, open_checkpoint
from ldm.pipeline.pipeline import Pipeline, step_generators

__all__ = ["CONFIG_KEY", "Checkpoint", "Pipeline", "open_checkpoint", "step_generators"]
