"""The seed's unconditional VAEs: vae158 (COSMOS stamps) and vae128 (Hubble Deep Field)."""

from __future__ import annotations

import torch
from torch import nn

from hpcvae.models.base import GalaxyVAE, ModelSpec, build_decoder, build_encoder


class VAE158(GalaxyVAE):
    """Five stride-2 convs down to a 1-channel map, two linear heads; the mirror image up.

    Also the trunk the three conditional models share.
    """

    arch = "vae158"
    geometry_rule = "halving"
    seed_image_size = 158
    decoder_head_bias = True
    """The seed's 158 models have a bias on the first decoder TConv; vae128's has none."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        g, nf, zd = self.geometry, spec.nf, spec.z_dim
        self.encoder = build_encoder(1, nf, g)
        self.fc_mu = nn.Linear(g.n_features, zd)
        self.fc_logvar = nn.Linear(g.n_features, zd)
        self.fc_dec = nn.Linear(zd, g.n_features)
        self.decoder = build_decoder(1, 1, nf, g, head_bias=self.decoder_head_bias)

    def _encode(self, x: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.flatten(self.encoder(x), 1)
        return self.fc_mu(h), self.fc_logvar(h)

    def _decode(self, z: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        side = self.geometry.latent_side
        h = self.fc_dec(z).reshape(-1, 1, side, side)
        return self.decoder(h), None


class VAE128(VAE158):
    """vae158's layers with the 128-pixel geometry: four stride-2 convs, then Conv(5,1,0) (8 -> 4)."""

    arch = "vae128"
    geometry_rule = "valid_head"
    seed_image_size = 128
    decoder_head_bias = False  # the seed's code: TConv(5,1,0) with bias=False
