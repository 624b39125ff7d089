"""Latent cache round trip: what is read back is exactly what the VAE (and the text
encoder) gave for the images."""

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from ldm.data.builtin import ShapesDataset
from ldm.data.latents import LatentShards, cache_latents, latent_cache
from ldm.models.conditioners import TransformerTextEncoder
from ldm.models.vae import AutoencoderKL


def test_cache_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        base_channels=16, channel_multipliers=[1, 2, 2], blocks_per_level=1, norm_groups=8
    )
    text = TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, pooled=True)
    data = Subset(ShapesDataset("val"), range(10))
    info = cache_latents(
        data, vae, tmp_path / "cache" / "val", text_encoder=text, batch_size=4, shard_size=4
    )
    assert info["count"] == 10 and info["shards"] == 3
    assert info["fields"] == ["moments", "context", "pooled"]
    assert info["vae_config"] == vae.config

    cached = {s["key"]: s for s in latent_cache("val", root=tmp_path / "cache")}
    assert len(cached) == 10
    images = next(iter(DataLoader(data, batch_size=10)))
    with torch.no_grad():
        posterior = vae.eval().encode(images["image"])
        cond = text.eval()(images["caption"])
    for i, key in enumerate(images["key"]):
        sample = cached[key]
        assert torch.equal(sample["moments"], torch.cat([posterior.mean, posterior.logvar], 1)[i])
        assert torch.equal(sample["context"], cond["context"][i])
        assert torch.equal(sample["pooled"], cond["pooled"][i])
        assert sample["caption"] == images["caption"][i]
        assert sample["label"] == images["label"][i]
    in_memory = latent_cache("val", root=tmp_path / "cache", in_memory=True)  # map-style
    assert len(in_memory) == 10
    for index in range(10):
        sample, streamed = in_memory[index], cached[in_memory[index]["key"]]
        assert sample.keys() == streamed.keys()
        for name, value in sample.items():
            assert (
                torch.equal(value, streamed[name])
                if torch.is_tensor(value)
                else value == streamed[name]
            )
    # The scale factor that gives unit variance follows from the recorded statistics.
    z = posterior.mean + posterior.std * torch.randn(100, *posterior.mean.shape)  # 100 draws
    assert info["latent_std"] == pytest.approx(z.std().item(), rel=0.02)

    with pytest.raises(FileExistsError, match="is not empty"):
        cache_latents(data, vae, tmp_path / "cache" / "val")
    with pytest.raises(FileNotFoundError, match="not a latent cache"):
        LatentShards(tmp_path)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
