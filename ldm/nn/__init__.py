"""Building blocks: attention (SDPA), resnet blocks, embeddings."""
