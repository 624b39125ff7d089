"""Helpers shared by test modules (importable because pyproject puts tests/ on sys.path)."""

import torch
from torch import nn


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (norms too), so zero-initialised layers cannot hide a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.2 if p.ndim == 1 else 1 / max(1, p[0].numel()) ** 0.5
            base = 1.0 if name.endswith("weight") and p.ndim == 1 else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))
    return module


# A tiny SD-layout UNet: conv projections, attention at both levels, context width 16.
TINY_SD_UNET = dict(
    model_channels=32,
    channel_multipliers=(1, 2),
    blocks_per_level=1,
    attention_levels=(0, 1),
    num_heads=4,
    context_dim=16,
    norm_groups=8,
)


def save_random_adapter(networks: nn.ModuleDict, path, targets: str, rank: int, alpha: float):
    """Adapter ``style`` on ``networks["denoiser"]`` at ``targets``, random (seed 0, sd
    0.05), saved to ``path`` in our format; the networks keep it."""
    from ldm.convert.lora import save_adapter
    from ldm.nn.lora import adapter_parameters, inject_lora

    inject_lora(networks["denoiser"], "style", targets=targets, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(networks):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    networks.lora_settings = {"style": networks["denoiser"].lora_settings["style"]}
    save_adapter(networks, path, "style")


def tool_config(name: str, *overrides: str):
    """The config a command-line tool composes from conf/<name>.yaml and ``overrides``
    (pass it to the tool's ``main`` to run it in-process)."""
    from hydra import compose, initialize_config_dir

    from ldm import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))
