"""The size-generic conv stacks of the seed's architectures: their geometry for any image size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn


def down_kernel(n: int) -> int:
    """Kernel of a stride-2, padding-1 conv that maps ``n`` to ``ceil(n/2)``.

    Kernel 4 halves an even side exactly; kernel 3 maps an odd side ``n`` to ``(n+1)/2``.
    The matching transposed convs (same kernel, stride 2, padding 1) map back to ``n``:
    TConv(4,2,1) doubles, TConv(3,2,1) gives ``2m - 1``.  This is the rule the seed's
    vae158 follows (158 -> 79 -> 40 -> 20 -> 10 -> 5).
    """
    return 4 if n % 2 == 0 else 3


MIN_LATENT_SIDE = 4
"""The encoder's last map is never smaller than this (the seed's sizes reach 5x5 and 4x4)."""


@dataclass(kw_only=True, frozen=True)
class Geometry:
    """Where the conv stack goes for one image size.

    ``sizes[:5]`` are the sides entering the five encoder convs.  Each of the first four
    halves the side (stride 2, kernel :func:`down_kernel`) unless that would go below
    :data:`MIN_LATENT_SIDE`; then it keeps the side (stride 1, kernel 3, padding 1).  The
    fifth ("head") conv maps ``sizes[4]`` to ``latent_side`` with ``(head_kernel, head_stride,
    head_padding)``; the decoder mirrors every layer with a ConvTranspose2d of the same kernel,
    stride and padding.  At the seed's sizes every layer halves, exactly as in the seed.
    """

    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    """Strides of the four trunk convs."""
    head_kernel: int
    head_stride: int
    head_padding: int
    latent_side: int

    @property
    def n_features(self) -> int:
        """Flattened size of the 1-channel latent map (25 for the seed's 5x5)."""
        return self.latent_side * self.latent_side

    def trunk(self, i: int) -> tuple[int, int, int]:
        """(kernel, stride, padding) of trunk conv ``i``."""
        return (down_kernel(self.sizes[i]), 2, 1) if self.strides[i] == 2 else (3, 1, 1)


def _trunk(size: int) -> tuple[list[int], list[int]]:
    sizes, strides = [size], []
    for _ in range(4):
        halves = math.ceil(sizes[-1] / 2) >= MIN_LATENT_SIDE
        strides.append(2 if halves else 1)
        sizes.append(math.ceil(sizes[-1] / 2) if halves else sizes[-1])
    return sizes, strides


def geometry_halving(size: int) -> Geometry:
    """vae158 style: five stride-2 convs, each ``ceil(n/2)``, none below a 4x4 map."""
    s, strides = _trunk(size)
    m = s[4]
    if math.ceil(m / 2) >= MIN_LATENT_SIDE:
        head = (down_kernel(m), 2, 1, math.ceil(m / 2))
    else:
        head = (3, 1, 1, m)
    return Geometry(sizes=tuple(s), strides=tuple(strides), head_kernel=head[0], head_stride=head[1],
                    head_padding=head[2], latent_side=head[3])  # fmt: skip


def geometry_valid_head(size: int) -> Geometry:
    """vae128 style: four stride-2 convs, then one stride-1 unpadded conv.

    The seed's 128 path ends 8 -> Conv(5,1,0) -> 4.  For any size the head maps the last side
    ``m`` to ``ceil(m/2)`` (kernel ``m - ceil(m/2) + 1``), but never below a 4x4 map:
    64 -> 4 -> 4 (kernel 1), 96 -> 6 -> 4 (kernel 3).
    """
    s, strides = _trunk(size)
    m = s[4]
    out = max(math.ceil(m / 2), min(m, MIN_LATENT_SIDE))
    return Geometry(sizes=tuple(s), strides=tuple(strides), head_kernel=m - out + 1, head_stride=1,
                    head_padding=0, latent_side=out)  # fmt: skip


def build_encoder(in_channels: int, nf: int, geo: Geometry) -> nn.Sequential:
    """Conv trunk: in -> nf -> 2nf -> 4nf -> 8nf -> 1 channel, BN after the middle three (seed)."""
    chans = [in_channels, nf, 2 * nf, 4 * nf, 8 * nf]
    layers: list[nn.Module] = []
    for i in range(4):
        layers.append(nn.Conv2d(chans[i], chans[i + 1], *geo.trunk(i), bias=False))
        if i > 0:
            layers.append(nn.BatchNorm2d(chans[i + 1]))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
    layers.append(nn.Conv2d(8 * nf, 1, geo.head_kernel, geo.head_stride, geo.head_padding, bias=False))
    return nn.Sequential(*layers)


def build_decoder(
    in_channels: int, out_channels: int, nf: int, geo: Geometry, *, head_bias: bool = True
) -> nn.Sequential:
    """Mirror of :func:`build_encoder`; only the first TConv may have a bias (the seed's 158 models).  No final activation."""
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(
            in_channels, 8 * nf, geo.head_kernel, geo.head_stride, geo.head_padding, bias=head_bias
        ),
        nn.BatchNorm2d(8 * nf),
        nn.ReLU(inplace=True),
    ]
    chans = [out_channels, nf, 2 * nf, 4 * nf, 8 * nf]
    for i in range(3, -1, -1):  # 8nf -> 4nf -> 2nf -> nf -> out
        layers.append(nn.ConvTranspose2d(chans[i + 1], chans[i], *geo.trunk(i), bias=False))
        if i > 0:
            layers.append(nn.BatchNorm2d(chans[i]))
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
