"""Metrics: feature extractors, FID / KID / IS / CLIP score, reference statistics, sweeps."""
