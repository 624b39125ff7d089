"""Data: built-in datasets, captioned folders, WebDataset shards, transforms, the prepare
tool, one DataModule and the latent cache."""
