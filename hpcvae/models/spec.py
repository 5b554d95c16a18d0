"""What a model is (``ModelSpec``: enough to rebuild it) and what its ``forward`` returns (``VAEOutput``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import torch

from hpcvae.errors import ModelError
from hpcvae.models.likelihoods import LIKELIHOODS, LikelihoodName

Reduction = Literal["sum", "mean"]
Padding = Literal["zeros", "circular", "reflect"]
PADDINGS: tuple[str, ...] = ("zeros", "circular", "reflect")
MIN_IMAGE_SIZE = 16


class VAEOutput(NamedTuple):
    """What ``forward`` returns.  A NamedTuple, so DDP and torch.compile treat it as a pytree."""

    recon: torch.Tensor
    """Reconstruction in normalised [0, 1] space, (B, 1, H, W)."""
    mu: torch.Tensor
    """Posterior means, (B, z_dim)."""
    logvar: torch.Tensor
    """Posterior log-variances, (B, z_dim)."""
    z_pred: torch.Tensor | None = None
    """Predicted redshift, (B,); only ``fancy_cvae`` has one."""


@dataclass(kw_only=True)
class ModelSpec:
    """The resolved hyper-parameters of one model: enough to rebuild it with ``build_model(**spec)``."""

    arch: str
    flavour: str = "default"
    image_size: int
    nf: int
    z_dim: int
    recon_reduction: Reduction = "sum"
    redshift_weight: float = 1000.0
    likelihood: LikelihoodName = "mse"
    psf_forward: bool = False
    """The decoder draws PSF-free galaxies; the loss convolves them with each galaxy's PSF."""
    conditions: tuple[str, ...] = ()
    """Names of the conditions a multi-condition architecture takes, in order (the seed's: redshift only)."""
    margin: int = 0
    """Pixels the decoder draws beyond each edge of the stamp and crops (galaxy_film): the convolutions'
    zero padding then falls outside the stamp, where it printed row and column streaks."""
    padding: Padding = "zeros"
    """How galaxy_film's decoder treats the stamp's edges: ``zeros`` (a convolution's zero padding),
    ``circular`` (the decoder works on a torus, so an edge pixel is computed like every other one; a stamp's
    edges are sky, so wrapping them joins sky to sky) or ``reflect`` (an edge pixel sees the interior mirrored:
    a smooth sky stays smooth up to the edge, and no galaxy light wraps in from the opposite side)."""

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < MIN_IMAGE_SIZE:
            raise ModelError(
                f"model {self.arch}: image_size must be an integer >= {MIN_IMAGE_SIZE}, got {self.image_size!r}"
            )
        if not isinstance(self.nf, int) or self.nf < 1:
            raise ModelError(f"model {self.arch}: nf must be an integer >= 1, got {self.nf!r}")
        if not isinstance(self.z_dim, int) or self.z_dim < 1:
            raise ModelError(f"model {self.arch}: z_dim must be an integer >= 1, got {self.z_dim!r}")
        if self.recon_reduction not in ("sum", "mean"):
            raise ModelError(
                f"model {self.arch}: recon_reduction must be 'sum' or 'mean', got {self.recon_reduction!r}"
            )
        if self.likelihood not in LIKELIHOODS:
            raise ModelError(
                f"model {self.arch}: likelihood must be one of {', '.join(LIKELIHOODS)}, got {self.likelihood!r}"
            )
        if not isinstance(self.conditions, (list, tuple)) or not all(
            isinstance(c, str) for c in self.conditions
        ):
            raise ModelError(
                f"model {self.arch}: conditions must be a list of names, got {self.conditions!r}"
            )
        self.conditions = tuple(self.conditions)
        if not isinstance(self.redshift_weight, (int, float)) or self.redshift_weight < 0:
            raise ModelError(f"model {self.arch}: redshift_weight must be >= 0, got {self.redshift_weight!r}")
        self.redshift_weight = float(self.redshift_weight)
        if (
            not isinstance(self.margin, int)
            or isinstance(self.margin, bool)
            or not 0 <= self.margin <= self.image_size // 4
        ):
            raise ModelError(
                f"model {self.arch}: margin must be an integer in [0, image_size / 4 = {self.image_size // 4}], "
                f"got {self.margin!r}"
            )
        if self.padding not in PADDINGS:
            raise ModelError(
                f"model {self.arch}: padding must be one of {', '.join(PADDINGS)}, got {self.padding!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conditions"] = list(self.conditions)
        if not self.margin:  # models from before margin existed keep their exact model_config
            del d["margin"]
        if self.padding == "zeros":  # likewise for padding
            del d["padding"]
        return d
