"""Model registry: the seed's five architectures and ``galaxy_vae``, each with a ``default`` and a ``debug`` flavour.

``default`` reproduces the seed layer for layer (nf=64, z_dim=32, 128 or 158 pixels);
``debug`` (nf=8, z_dim=8, 64 pixels) is small enough to train on a laptop CPU in seconds,
for tests and the demo.  Any flavour takes overrides of ``image_size``, ``nf``, ``z_dim``,
``recon_reduction`` and ``redshift_weight``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hpcvae.config import ModelConfig
from hpcvae.errors import ModelError
from hpcvae.models.base import GalaxyVAE, ModelSpec, VAEOutput
from hpcvae.models.cvae import CVAE, CVAE2, FancyCVAE
from hpcvae.models.film import GalaxyFiLM
from hpcvae.models.galaxy import GalaxyCVAE
from hpcvae.models.likelihoods import get_likelihood
from hpcvae.models.vae import VAE128, VAE158

__all__ = [
    "MODEL_REGISTRY",
    "ArchSpec",
    "GalaxyVAE",
    "ModelSpec",
    "VAEOutput",
    "build_model",
    "get_arch",
    "list_models",
    "model_from_config",
]

OVERRIDABLE = tuple(f.name for f in dataclasses.fields(ModelSpec) if f.name not in ("arch", "flavour"))
"""A model's hyperparameters: declared once, as ``ModelSpec``'s fields (``ModelConfig`` has each, a test checks)."""
_SPEC_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelSpec)
                  if f.name in OVERRIDABLE and f.default is not dataclasses.MISSING}  # fmt: skip


@dataclass(kw_only=True, frozen=True)
class ArchSpec:
    """One registry entry: the constructor and each flavour's defaults."""

    name: str
    cls: type[GalaxyVAE]
    description: str
    flavours: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        return self.cls.conditional

    def resolve(self, flavour: str = "default", **overrides: Any) -> ModelSpec:
        """Flavour defaults with ``overrides`` on top (``None`` values keep the default)."""
        if flavour not in self.flavours:
            raise ModelError(
                f"model {self.name}: unknown flavour {flavour!r} (choices: {', '.join(self.flavours)})"
            )
        unknown = sorted(set(overrides) - set(OVERRIDABLE))
        if unknown:
            raise ModelError(
                f"model {self.name}: unknown option {unknown[0]!r} (choices: {', '.join(OVERRIDABLE)})"
            )
        values = {**_SPEC_DEFAULTS, **self.flavours[flavour]}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return ModelSpec(arch=self.name, flavour=flavour, **values)

    def default_likelihood(self, flavour: str) -> str | None:
        """The flavour's own likelihood (``None``: the spec's default, mse)."""
        return self.flavours.get(flavour, {}).get("likelihood")

    def build(self, flavour: str = "default", **overrides: Any) -> GalaxyVAE:
        return self.cls(self.resolve(flavour, **overrides))


def _entry(name: str, cls: type[GalaxyVAE], description: str, image_size: int) -> ArchSpec:
    return ArchSpec(
        name=name,
        cls=cls,
        description=description,
        flavours={
            "default": {"image_size": image_size, "nf": 64, "z_dim": 32},
            "debug": {"image_size": 64, "nf": 8, "z_dim": 8},
        },
    )


MODEL_REGISTRY: dict[str, ArchSpec] = {
    s.name: s
    for s in (
        _entry("vae128", VAE128, "unconditional, Hubble Deep Field 128x128", 128),
        _entry("vae158", VAE158, "unconditional, COSMOS 158x158", 158),
        _entry("cvae", CVAE, "redshift as 2nd image channel and 2nd latent row", 158),
        _entry("cvae2", CVAE2, "redshift joined to encoder features and z (seed's pick)", 158),
        _entry("fancy_cvae", FancyCVAE, "cvae that also predicts the redshift", 158),
        ArchSpec(
            name="galaxy_vae",
            cls=GalaxyCVAE,
            description="beyond the seed: wide bottleneck, resize-convolution decoder, cvae2 conditioning",
            flavours={
                "default": {"image_size": 158, "nf": 32, "z_dim": 32},
                "debug": {"image_size": 64, "nf": 8, "z_dim": 16},
            },
        ),
        ArchSpec(
            name="galaxy_film",
            cls=GalaxyFiLM,
            description="beyond the seed: a vector of conditions, FiLM on every decoder block, bilinear "
            "resize-convolutions, residual blocks; the calibrated_noise likelihood (calibrated where the data carry "
            "no noise variance)",
            flavours={
                "default": {"image_size": 158, "nf": 32, "z_dim": 32, "likelihood": "calibrated_noise"},
                "debug": {"image_size": 64, "nf": 8, "z_dim": 16, "likelihood": "calibrated_noise"},
            },
        ),
    )
}
SEED_ARCHS = ("vae128", "vae158", "cvae", "cvae2", "fancy_cvae")
"""The seed's five architectures, kept exactly as the seed built them."""


def list_models() -> list[str]:
    """Registered architecture names."""
    return list(MODEL_REGISTRY)


def get_arch(arch: str) -> ArchSpec:
    if arch not in MODEL_REGISTRY:
        raise ModelError(f"unknown model {arch!r} (choices: {', '.join(MODEL_REGISTRY)})")
    return MODEL_REGISTRY[arch]


def build_model(
    arch: str | None = None, flavour: str = "default", *, name: str | None = None, **overrides: Any
) -> GalaxyVAE:
    """A freshly initialised model; ``build_model(**model.config)`` rebuilds ``model``'s architecture."""
    if arch is None:
        arch = name
    elif name is not None and name != arch:
        raise ModelError(f"build_model: got both arch={arch!r} and name={name!r}")
    if arch is None:
        raise ModelError(f"build_model needs a model name (choices: {', '.join(MODEL_REGISTRY)})")
    return get_arch(arch).build(flavour, **overrides)


def model_from_config(
    model_cfg: ModelConfig,
    image_size: int | None = None,
    conditions: tuple[str, ...] | None = None,
    *,
    noise_known: bool = True,
) -> GalaxyVAE:
    """The model a training config asks for; ``image_size`` is the shard set's side.

    ``None`` fields of the config take the flavour's defaults; an explicit
    ``model.image_size`` must agree with the data, since a mismatch would only surface
    as a shape error in the first step.  ``noise_known=False`` (a shard set without noise
    variances): a default likelihood that needs them gives way to its ``without_noise``.
    """
    size = model_cfg.image_size
    if size is not None and image_size is not None and size != image_size:
        raise ModelError(
            f"model.image_size = {size} but the data holds {image_size}x{image_size} images; "
            "drop model.image_size or re-shard at that size"
        )
    given = {k: getattr(model_cfg, k) for k in OVERRIDABLE if k not in ("image_size", "conditions")}
    arch = get_arch(model_cfg.arch)
    default = arch.default_likelihood(model_cfg.flavour)
    if given.get("likelihood") is None and default and not noise_known:
        lk = get_likelihood(default)
        if "noise_var" in lk.needs and lk.without_noise:
            given["likelihood"] = lk.without_noise
    multi = arch.cls.multi_condition
    return build_model(model_cfg.arch, model_cfg.flavour, image_size=size if size is not None else image_size,
                       conditions=tuple(model_cfg.conditions or conditions or ()) or None if multi else None,
                       **given)  # fmt: skip
