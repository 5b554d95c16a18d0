"""``galaxy_film``: a conditional VAE whose decoder cannot ignore its conditions, and draws no grid.

What it changes against ``galaxy_vae`` (``hpcvae.models.galaxy``), and why:

* **A vector of conditions.**  It takes every condition the shard set carries (``hpcvae.shard
  --conditions zphot,mag_auto,flux_radius``; the redshift at least), standardised by the training
  statistics, not one raw redshift.
* **FiLM on every decoder block** (Perez et al. 2018).  The conditions go through a small MLP whose
  output scales and shifts the normalised features of every block (gamma, beta per channel).
  Concatenating a redshift to a 16-dimensional latent, as cvae2 and galaxy_vae do, lets the decoder
  learn to ignore it: with latents fixed, their sizes barely changed from z = 0.3 to 2.5.
* **Bilinear resize-convolutions and zero padding.**  Each upsampling is a bilinear resize then a 3x3
  convolution: no transposed-convolution checkerboard and none of nearest-neighbour's blocks;
  ``galaxy_vae``'s replicate padding copied each layer's edge rows outward, which printed row and
  column streaks along the stamp's border.
* **A margin** (``model.margin``, off by default): the decoder draws a canvas ``margin`` pixels wider
  on every side, at every depth, and the head's output is cropped to the stamp, so the zero padding's
  edge falls outside it; on generated COSMOS-like stamps most of the row/column streak measure sat in
  the outermost 1-2 pixels.
* **Circular padding** (``model.padding = "circular"``, off by default): every decoder convolution wraps
  around the canvas and each upsampling is a periodic bilinear resize, so the decoder is the same operation
  at every pixel; with zero padding an edge pixel is computed from zeros beyond it, and on generated
  COSMOS-like stamps the outermost pixel carried most of the row/column streak measure.  A margin's
  unconstrained pixels showed why a margin alone does not fix that: they take wild values that leak into
  the stamp's first row.
* **Reflection padding** (``model.padding = "reflect"``, off by default): an edge pixel sees the interior
  mirrored, so a flat sky stays flat up to the edge (zero padding gives the outermost row a value of its
  own) and, unlike the torus, no galaxy light wraps in from the opposite side.
* **Residual blocks at the coarse sides** (where they are cheap), so the first resolutions, which
  set a galaxy's size and shape, have the capacity to keep every size.
* The encoder is ``galaxy_vae``'s (stride-2 convolutions to an 8nf x k x k map, equalised Linear ->
  z, bounded log-variances), with the standardised conditions joined to its features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcvae.errors import ModelError
from hpcvae.models.base import GalaxyVAE, ModelSpec, down_kernel
from hpcvae.models.galaxy import LOGVAR_BOUND, EqualizedLinear, widths

EMBED = 64
"""Width of the conditions' embedding shared by every FiLM layer."""
RES_MAX_SIDE = 16
"""Decoder sides up to this one get a residual block (the coarse ones: cheap, and they set the shape)."""


class FiLM(nn.Module):
    """Per-channel scale and shift from the conditions' embedding; starts as the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(EMBED, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(e).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        return h * (1 + gamma) + beta


def periodic_resize(n: int, side: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(side, n) matrix of a bilinear resize (align_corners=False) whose neighbours wrap around the edges."""
    u = (torch.arange(side, dtype=torch.float64) + 0.5) * n / side - 0.5
    i0 = torch.floor(u)
    frac = u - i0
    w = torch.zeros(side, n, dtype=torch.float64)
    rows = torch.arange(side)
    w.index_put_((rows, i0.long() % n), 1 - frac, accumulate=True)
    w.index_put_((rows, (i0.long() + 1) % n), frac, accumulate=True)
    return w.to(dtype)


class UpBlock(nn.Module):
    """resize (bilinear) -> conv 3x3 -> BN -> FiLM -> ReLU [-> residual block with FiLM]."""

    def __init__(
        self, c_in: int, c_out: int, side: int, residual: bool, *, from_side: int, padding: str = "zeros"
    ) -> None:
        super().__init__()
        self.side = side
        self.circular = padding == "circular"
        if self.circular:
            self.register_buffer("resize", periodic_resize(from_side, side), persistent=False)

        def conv(a: int, b: int) -> nn.Conv2d:
            return nn.Conv2d(a, b, 3, 1, 1, bias=False, padding_mode=padding)

        self.conv = conv(c_in, c_out)
        self.norm = nn.BatchNorm2d(c_out)
        self.film = FiLM(c_out)
        self.res = nn.ModuleList()
        if residual:
            self.res = nn.ModuleList([conv(c_out, c_out), nn.BatchNorm2d(c_out), conv(c_out, c_out), nn.BatchNorm2d(c_out)])  # fmt: skip
            self.res_film = FiLM(c_out)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.circular:
            r = self.resize.to(h.dtype)
            h = torch.einsum("ij,bcjk,lk->bcil", r, h, r)
        else:
            h = F.interpolate(h, size=(self.side, self.side), mode="bilinear", align_corners=False)
        h = F.relu(self.film(self.norm(self.conv(h)), e))
        if len(self.res):
            c1, n1, c2, n2 = self.res
            r = F.relu(self.res_film(n1(c1(h)), e))
            h = F.relu(h + n2(c2(r)))
        return h


class GalaxyFiLM(GalaxyVAE):
    """galaxy_film: galaxy_vae's encoder, a FiLM-conditioned residual decoder, a vector of conditions."""

    arch = "galaxy_film"
    conditional = True
    multi_condition = True
    has_margin = True

    def _make_geometry(self) -> None:
        self.sides, self.channels, self.n_features = widths(self.spec.image_size, self.spec.nf)

    def __init__(self, spec: ModelSpec) -> None:
        if not spec.conditions:
            spec.conditions = ("zphot",)
        super().__init__(spec)
        k, zd, depth = len(spec.conditions), spec.z_dim, len(self.sides) - 1
        ch, sides = self.channels, self.sides
        enc: list[nn.Module] = []
        for i in range(depth):
            enc.append(nn.Conv2d(ch[i], ch[i + 1], down_kernel(sides[i]), 2, 1, bias=i == 0))
            if i > 0:
                enc.append(nn.BatchNorm2d(ch[i + 1]))
            enc.append(nn.LeakyReLU(0.2, inplace=True))
        self.encoder = nn.Sequential(*enc)
        self.feature_norm = nn.LayerNorm(self.n_features)
        self.fc_mu = EqualizedLinear(self.n_features + k, zd)
        self.fc_logvar = EqualizedLinear(self.n_features + k, zd, zero=True)
        self.embed = nn.Sequential(nn.Linear(k, EMBED), nn.SiLU(), nn.Linear(EMBED, EMBED), nn.SiLU())
        self.dec_sides = self._canvas(spec.margin, depth)
        self.fc_dec = EqualizedLinear(zd + k, ch[-1] * self.dec_sides[-1] ** 2)
        self.dec_norm = nn.BatchNorm2d(ch[-1])
        self.dec_film = FiLM(ch[-1])
        self.up = nn.ModuleList()
        for i in range(depth, 0, -1):  # side[i] -> side[i-1], on the canvas (the stamp plus the margin)
            c_out = ch[i - 1] if i > 1 else ch[1]  # full resolution: nf channels, then the 1-channel head
            self.up.append(
                UpBlock(ch[i], c_out, self.dec_sides[i - 1], residual=sides[i - 1] <= RES_MAX_SIDE,
                        from_side=self.dec_sides[i], padding=spec.padding)
            )  # fmt: skip
        self.head = nn.Conv2d(self.up[-1].conv.out_channels, 1, 3, 1, 1, padding_mode=spec.padding)
        self.register_buffer("cond_loc", torch.zeros(k), persistent=False)
        self.register_buffer("cond_scale", torch.ones(k), persistent=False)

    @property
    def bottleneck(self) -> int:
        return self.n_features

    def _canvas(self, margin: int, depth: int) -> list[int]:
        """The decoder's sides: the stamp's, or with a margin a canvas that halves exactly at every depth.

        Each level is then the next one upsampled by exactly 2, so the stamp is not stretched when the
        margin is cropped (a canvas wider only at full resolution magnified every galaxy by (S + 2m) / S).
        """
        size = self.spec.image_size
        if not margin:
            return list(self.sides)
        step = 2**depth
        if (size + 2 * margin) % step:
            ok = [m for m in range(1, size // 4 + 1) if (size + 2 * m) % step == 0][:3]
            raise ModelError(
                f"model {self.arch}: margin {margin} makes a {size + 2 * margin}-pixel canvas, which must be "
                f"divisible by {step} to halve exactly {depth} times; try margin = {ok or 'none at this size'}"
            )
        return [(size + 2 * margin) // 2**i for i in range(depth + 1)]

    def _conditioning_changed(self) -> None:
        mean, std = self.conditioning.mean_std()
        self.cond_loc.copy_(torch.tensor(mean))
        self.cond_scale.copy_(torch.tensor(std))

    def _standard(self, r: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        assert r is not None
        if r.dim() == 1:
            r = r[:, None]
        return ((r.float() - self.cond_loc) / self.cond_scale).to(dtype)

    def _encode(self, x: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.feature_norm(torch.flatten(self.encoder(x), 1))
        h = torch.cat((h, self._standard(r, h.dtype)), dim=1)
        raw = self.fc_logvar(h)
        return self.fc_mu(h), LOGVAR_BOUND * torch.tanh(raw / LOGVAR_BOUND)

    def _decode(self, z: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        c = self._standard(r, z.dtype)
        e = self.embed(c)
        side, ch = self.dec_sides[-1], self.channels[-1]
        h = self.fc_dec(torch.cat((z, c), dim=1)).reshape(-1, ch, side, side)
        h = F.relu(self.dec_film(self.dec_norm(h), e))
        for block in self.up:
            h = block(h, e)
        out, m = self.head(h), self.spec.margin
        return (out[:, :, m:-m, m:-m] if m else out), None
