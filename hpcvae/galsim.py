"""hpcvae models inside GalSim: ``model.to_galsim()`` and the ``HpcvaeGalaxy`` config type.

Image simulations draw galaxies into scenes at another telescope's PSF and pixel scale, the
way galaxy2galaxy and galsim_hub do: a generated stamp becomes a ``galsim.InterpolatedImage``
at the training data's pixel scale, with the flux of its pixels, and the latents come from
GalSim's own random generator so a simulation is reproducible from its seed.  In YAML::

    modules: [hpcvae.galsim]
    gal: {type: HpcvaeGalaxy, model: runs/demo, redshift: 0.7}

A model trained on PSF-convolved pixels (``physics.psf.in_images`` in model.json) gets the
RealGalaxy treatment: it is deconvolved by the training PSF recorded in model.json, and the
target PSF it is convolved with must be larger, or the deconvolution amplifies noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import galsim
import numpy as np
import torch

from hpcvae.errors import ModelError


def physics(model: Any) -> dict[str, Any]:
    """The ``physics`` block of a loaded model's model.json (pixel scale, band, BUNIT, noise, PSF)."""
    info = getattr(model, "model_info", None) or {}
    phys = info.get("physics")
    if not phys or not phys.get("pixel_scale_arcsec"):
        raise ModelError(
            "model.json records no physics.pixel_scale_arcsec (a model written before hpcvae 0.3, or "
            "trained on shards without a pixel scale); pass pixel_scale= explicitly"
        )
    return phys


def training_psf(phys: dict[str, Any], gsparams: galsim.GSParams | None = None) -> galsim.GSObject | None:
    """The PSF the training images were convolved with, from model.json (None if unrecorded)."""
    psf = phys.get("psf") or {}
    if psf.get("image") is None:
        return None
    img = np.asarray(psf["image"], dtype=np.float64)
    return galsim.InterpolatedImage(galsim.Image(img, scale=phys["pixel_scale_arcsec"]), gsparams=gsparams)


def generator_from(rng: galsim.BaseDeviate | int | None, device: Any = "cpu") -> torch.Generator | None:
    """A torch generator seeded from GalSim's deviate (advancing it), so draws follow the GalSim seed."""
    if rng is None:
        return None
    if isinstance(rng, int):
        rng = galsim.BaseDeviate(rng)
    if not isinstance(rng, galsim.BaseDeviate):
        raise ModelError(
            f"to_galsim: rng must be a galsim.BaseDeviate or an int seed, got {type(rng).__name__}"
        )
    seed = (int(rng.raw()) << 32) | int(rng.raw())
    return torch.Generator(device=device).manual_seed(seed)


def to_galsim(
    model: Any,
    n: int,
    redshift: Any = None,
    rng: galsim.BaseDeviate | int | None = None,
    prior: str | None = None,
    *,
    psf: galsim.GSObject | None = None,
    deconvolve: bool = False,
    pixel_scale: float | None = None,
    gsparams: galsim.GSParams | None = None,
) -> list[galsim.GSObject]:
    """``n`` generated galaxies as GalSim objects with the flux of their pixels and the training pixel scale.

    ``psf``: a target PSF to convolve with.  A PSF-free model is simply convolved; a model of
    PSF-convolved pixels is first deconvolved by its training PSF, and the target must be larger
    (its FWHM), as for ``galsim.RealGalaxy``.  ``deconvolve=True`` without ``psf`` returns the
    deconvolved galaxies, for a GalSim config that applies its own PSF.  Without either, the
    objects are the pixels as trained.
    """
    if pixel_scale is None:
        phys = physics(model)
        pixel_scale = float(phys["pixel_scale_arcsec"])
    else:  # an explicit scale overrides model.json's, the rest of what it records (the PSF) still holds
        phys = {
            **((getattr(model, "model_info", None) or {}).get("physics") or {}),
            "pixel_scale_arcsec": pixel_scale,
        }
    gen = generator_from(rng, device=next(model.parameters()).device)
    with torch.no_grad():
        imgs = model.sample(n, redshift=redshift, generator=gen, prior=prior)
    arr = imgs[:, 0].detach().to("cpu", torch.float64).numpy()
    objs: list[galsim.GSObject] = [
        galsim.InterpolatedImage(galsim.Image(a.copy(), scale=pixel_scale), gsparams=gsparams) for a in arr
    ]
    convolved = bool((phys.get("psf") or {}).get("in_images")) and not phys.get("psf_free", False)
    if convolved and (psf is not None or deconvolve):
        orig = training_psf(phys, gsparams)
        if orig is None:
            raise ModelError("to_galsim: the model's training PSF is not in model.json; cannot deconvolve it")
        if psf is not None:
            fwhm_t, fwhm_o = _fwhm(psf), _fwhm(orig)
            if fwhm_t <= fwhm_o:
                raise ModelError(
                    f'to_galsim: the target PSF (FWHM {fwhm_t:.3f}") must be larger than the training PSF '
                    f'(FWHM {fwhm_o:.3f}"): deconvolving to a sharper PSF amplifies noise'
                )
        inv = galsim.Deconvolve(orig)
        objs = [galsim.Convolve(o, inv, gsparams=gsparams) for o in objs]
    if psf is not None:
        objs = [galsim.Convolve(o, psf, gsparams=gsparams) for o in objs]
    return objs


def _fwhm(obj: galsim.GSObject) -> float:
    try:
        return float(obj.fwhm)
    except (AttributeError, galsim.GalSimError):
        return float(obj.calculateFWHM())


# -- the GalSim config type ------------------------------------------------------------------------

_MODELS: dict[str, Any] = {}
"""Loaded models by path: a config draws thousands of stamps from the same model."""


def _model(path: str) -> Any:
    key = str(Path(path).resolve())
    if key not in _MODELS:
        from hpcvae.model_files import load_model

        _MODELS[key] = load_model(path)
    return _MODELS[key]


def _build_hpcvae_galaxy(
    config: dict, base: dict, ignore: list, gsparams: dict, logger: Any
) -> tuple[Any, bool]:
    """``type: HpcvaeGalaxy``: one generated galaxy, its latents from the stamp's GalSim rng."""
    req = {"model": str}
    opt = {"redshift": float, "prior": str, "flux": float}
    kwargs, _ = galsim.config.GetAllParams(config, base, req=req, opt=opt, ignore=ignore)
    rng = galsim.config.GetRNG(config, base, logger, "HpcvaeGalaxy")
    model = _model(kwargs["model"])
    gsp = galsim.GSParams(**gsparams) if gsparams else None
    (obj,) = to_galsim(model, 1, redshift=kwargs.get("redshift"), rng=rng, prior=kwargs.get("prior"),
                       deconvolve=True, gsparams=gsp)  # fmt: skip
    if "flux" in kwargs:
        obj = obj.withFlux(kwargs["flux"])
    return obj, False


galsim.config.RegisterObjectType("HpcvaeGalaxy", _build_hpcvae_galaxy)
