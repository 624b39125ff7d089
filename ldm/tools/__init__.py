"""Tools that work on checkpoints: merging."""
