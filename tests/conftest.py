"""Shared test settings: no network, deterministic hypothesis profile."""

from hypothesis import settings

settings.register_profile("ldm", deadline=None, max_examples=150, derandomize=True)
settings.load_profile("ldm")
