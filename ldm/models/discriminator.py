"""PatchGAN discriminator (Isola et al. 2017) for adversarial VAE training (Esser et al.
2021, as used for Stable Diffusion's autoencoder). Layout of taming-transformers'
``NLayerDiscriminator``: ``main.{i}`` layers."""

from __future__ import annotations

from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """Real/fake logits for overlapping patches: (B, C, H, W) -> (B, 1, H', W').

    With ``layers = 3`` each logit sees a 70 x 70 patch and a 256 x 256 image gives 30 x 30.
    """

    def __init__(
        self,
        in_channels: int = 3,  # image channels
        base_channels: int = 64,  # channels of the first conv; doubled per layer up to x8
        layers: int = 3,  # stride-2 layers (the first included)
        norm: str = "batch",  # batch | group | none: normalisation after each inner conv
    ):
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"unknown norm {norm!r}; choose batch, group or none")

        def normalise(channels: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(channels)
            if norm == "group":
                return nn.GroupNorm(min(32, channels // 4), channels)
            return nn.Identity()

        bias = norm == "none"  # a norm right after makes a conv bias redundant
        seq: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, 2, 1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride, 1, bias=bias),
                normalise(base_channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        seq.append(nn.Conv2d(base_channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DCGAN init (Radford et al. 2016): convs N(0, 0.02), norm scales N(1, 0.02)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)
