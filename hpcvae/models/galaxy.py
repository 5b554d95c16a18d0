"""``galaxy_vae``: a conditional VAE beyond the seed, built to keep galaxy shapes.

What it changes against the seed's cvae2, and why (measured in ``benchmarks/science.py``):

* **A wide bottleneck.**  The encoder ends in an ``8nf x k x k`` feature map (k = 4 or 5)
  that goes whole into Linear -> z, not a 1-channel map: at 64 px the seed's geometry hands
  Linear -> z four numbers, too few to hold an orientation and an axis ratio.
* **A decoder without checkerboards.**  Every upsampling is a nearest-neighbour resize to the
  encoder's side at that depth, then a 3x3 convolution (resize-convolution, Odena et al. 2016),
  instead of a stride-2 transposed convolution whose overlapping kernels print a grid.  The
  decoder's convolutions pad by replication, so no zero padding darkens or brightens the
  border rows of a generated stamp.
* **Stable at the default learning rate.**  Adam moves every weight by about ``lr`` per step
  whatever the layer's fan-in, so a Linear fed 8nf*k*k = 8192 numbers moves its output ~fan-in
  times further per step than a 3x3 convolution does: with the plain layer the KL blew up to
  1e6 in the first epoch unless those two layers got a 100x lower learning rate.  Here they are
  *equalised-learning-rate* layers (Karras et al. 2018: unit-variance weights scaled by
  1/sqrt(fan-in) at run time), which makes Adam's step fan-in free, their input is
  LayerNorm-ed, and log-variances are softly bounded.
* **Conditioned on redshift as in cvae2**: zphot joins the flattened features and z.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpcvae.models.base import MIN_LATENT_SIDE, GalaxyVAE, ModelSpec, down_kernel

LOGVAR_BOUND = 10.0
"""log sigma^2 of the posterior is kept in (-10, 10) by a tanh: sigma in (0.007, 150)."""


class EqualizedLinear(nn.Module):
    """``y = (W / sqrt(fan_in)) x + b`` with ``W ~ N(0, 1)``: the same function class as nn.Linear,
    but an optimizer step changes the output by the same amount whatever the fan-in."""

    def __init__(self, in_features: int, out_features: int, *, zero: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features) if zero else torch.randn(out_features, in_features)
        )
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = 1.0 / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, equalized"


def pyramid(size: int) -> list[int]:
    """Sides of the encoder's maps: halve while the result stays >= 4 (64 -> 32 16 8 4; 158 -> ... 10 5)."""
    sides = [size]
    while math.ceil(sides[-1] / 2) >= MIN_LATENT_SIDE:
        sides.append(math.ceil(sides[-1] / 2))
    return sides


def widths(image_size: int, nf: int) -> tuple[list[int], list[int], int]:
    """(sides, channels, features at the bottom) of the :func:`pyramid`; channels double to at most 8 nf."""
    sides = pyramid(image_size)
    channels = [1] + [min(nf * 2**i, 8 * nf) for i in range(len(sides) - 1)]
    return sides, channels, channels[-1] * sides[-1] ** 2


class GalaxyCVAE(GalaxyVAE):
    """galaxy_vae: wide bottleneck, resize-convolution decoder, equalised Linear -> z, cvae2 conditioning.

    Channels follow the seed's layout (nf, 2nf, 4nf, 8nf, capped at 8nf) at the sides of
    :func:`pyramid`; the full-resolution layers touch one channel only (the first encoder conv
    strides at once, the last decoder conv outputs the image), which keeps the CPU cost near
    the seed models'.
    """

    arch = "galaxy_vae"
    conditional = True

    def _make_geometry(self) -> None:
        """Not the seed's conv stack: the side and width at each depth instead."""
        self.sides, self.channels, self.n_features = widths(self.spec.image_size, self.spec.nf)

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        zd, depth = spec.z_dim, len(self.sides) - 1
        ch, sides = self.channels, self.sides
        enc: list[nn.Module] = []
        for i in range(depth):  # side[i] -> side[i+1], ch[i] -> ch[i+1]
            enc.append(nn.Conv2d(ch[i], ch[i + 1], down_kernel(sides[i]), 2, 1, bias=i == 0))
            if i > 0:
                enc.append(nn.BatchNorm2d(ch[i + 1]))
            enc.append(nn.LeakyReLU(0.2, inplace=True))
        self.encoder = nn.Sequential(*enc)
        self.feature_norm = nn.LayerNorm(self.n_features)
        self.fc_mu = EqualizedLinear(self.n_features + 1, zd)
        self.fc_logvar = EqualizedLinear(self.n_features + 1, zd, zero=True)  # starts at sigma = 1
        self.fc_dec = EqualizedLinear(zd + 1, self.n_features)
        self.dec_norm = nn.BatchNorm2d(ch[-1])
        dec: list[nn.Module] = []
        for i in range(depth, 0, -1):  # side[i] -> side[i-1], ch[i] -> ch[i-1]
            dec.append(nn.Upsample(size=(sides[i - 1], sides[i - 1]), mode="nearest"))
            dec.append(nn.Conv2d(ch[i], ch[i - 1], 3, 1, 1, bias=i == 1, padding_mode="replicate"))
            if i > 1:
                dec += [nn.BatchNorm2d(ch[i - 1]), nn.ReLU(inplace=True)]
        self.decoder = nn.Sequential(*dec)

    @property
    def bottleneck(self) -> int:
        return self.n_features

    def _encode(self, x: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        assert r is not None
        h = self.feature_norm(torch.flatten(self.encoder(x), 1))
        h = torch.cat((h, r.to(h.dtype)[:, None]), dim=1)
        raw = self.fc_logvar(h)
        return self.fc_mu(h), LOGVAR_BOUND * torch.tanh(raw / LOGVAR_BOUND)

    def _decode(self, z: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        assert r is not None
        side, c = self.sides[-1], self.channels[-1]
        h = self.fc_dec(torch.cat((z, r.to(z.dtype)[:, None]), dim=1)).reshape(-1, c, side, side)
        return self.decoder(F.relu(self.dec_norm(h))), None
