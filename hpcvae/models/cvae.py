"""The seed's three redshift-conditional VAEs (COSMOS, condition = photometric redshift)."""

from __future__ import annotations

import torch
from torch import nn

from hpcvae.models.base import GalaxyVAE, ModelSpec, build_decoder, build_encoder


def _redshift_plane(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The redshift broadcast to a constant image, stacked as a second channel."""
    plane = r.to(x.dtype)[:, None, None, None].expand(-1, 1, x.shape[2], x.shape[3])
    return torch.cat((x, plane), dim=1)


class CVAE(GalaxyVAE):
    """cvae: redshift as a 2nd input channel and as a 2nd latent row.

    The latent z (B, z_dim) is stacked with a constant redshift row to (B, 2, z_dim); the
    decoder's Linear(z_dim, n) maps each row, giving a 2-channel latent map.
    """

    arch = "cvae"
    conditional = True
    out_channels = 1
    seed_image_size = 158

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        g, nf, zd = self.geometry, spec.nf, spec.z_dim
        self.encoder = build_encoder(2, nf, g)
        self.fc_mu = nn.Linear(g.n_features, zd)
        self.fc_logvar = nn.Linear(g.n_features, zd)
        self.fc_dec = nn.Linear(zd, g.n_features)
        self.decoder = build_decoder(2, self.out_channels, nf, g)

    def _encode(self, x: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        assert r is not None
        h = torch.flatten(self.encoder(_redshift_plane(x, r)), 1)
        return self.fc_mu(h), self.fc_logvar(h)

    def _decoder_output(self, z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        side = self.geometry.latent_side
        rows = torch.stack((z, r.to(z.dtype)[:, None].expand_as(z)), dim=1)  # (B, 2, z_dim)
        h = self.fc_dec(rows).reshape(-1, 2, side, side)
        return self.decoder(h)

    def _decode(self, z: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert r is not None
        return self._decoder_output(z, r), None


class FancyCVAE(CVAE):
    """fancy_cvae: cvae whose decoder also outputs a 2nd channel; its pixel (0, 0) predicts the redshift.

    As in the seed, the Sigmoid applies to the image channel only, so the redshift
    prediction is unbounded; the loss adds k * (z_pred - z)^2 with k = ``redshift_weight``.
    """

    arch = "fancy_cvae"
    predicts_redshift = True
    out_channels = 2

    def _decode(self, z: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert r is not None
        out = self._decoder_output(z, r)
        return out[:, :1], out[:, 1, 0, 0]


class CVAE2(GalaxyVAE):
    """cvae2: the redshift joins the flattened encoder features and z (the seed's recommended, cheapest one)."""

    arch = "cvae2"
    conditional = True
    seed_image_size = 158

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        g, nf, zd = self.geometry, spec.nf, spec.z_dim
        self.encoder = build_encoder(1, nf, g)
        self.fc_mu = nn.Linear(g.n_features + 1, zd)
        self.fc_logvar = nn.Linear(g.n_features + 1, zd)
        self.fc_dec = nn.Linear(zd + 1, g.n_features)
        self.decoder = build_decoder(1, 1, nf, g)

    def _encode(self, x: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        assert r is not None
        h = torch.flatten(self.encoder(x), 1)
        h = torch.cat((h, r.to(h.dtype)[:, None]), dim=1)
        return self.fc_mu(h), self.fc_logvar(h)

    def _decode(self, z: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        assert r is not None
        side = self.geometry.latent_side
        h = self.fc_dec(torch.cat((z, r.to(z.dtype)[:, None]), dim=1)).reshape(-1, 1, side, side)
        return self.decoder(h), None
