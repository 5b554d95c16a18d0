"""hpcvae models inside GalSim: ``model.to_galsim()`` and the ``HpcvaeGalaxy`` config type.

Image simulations draw galaxies into scenes at another telescope's PSF and pixel scale, the
way galaxy2galaxy and galsim_hub do: a generated stamp becomes a ``galsim.InterpolatedImage``
at the training data's pixel scale, with the flux of its pixels, and the latents come from
GalSim's own random generator so a simulation is reproducible from its seed.  In YAML::

    modules: [hpcvae.galsim]
    input: {hpcvae_model: {file_name: runs/demo, catalog: cat.fits, batch: 256}}
    gal: {type: HpcvaeGalaxy}        # object k: catalog row k, decoded 256 at a time

or one decode per object, conditions from the config (``gal: {type: HpcvaeGalaxy, model: runs/demo,
redshift: 0.7}``).

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
    **sample_kwargs: Any,
) -> list[galsim.GSObject]:
    """``n`` generated galaxies as GalSim objects with the flux of their pixels and the training pixel scale.

    ``n`` may be a catalog and ``sample_kwargs`` anything ``model.sample`` takes (``conditions``,
    ``extrapolate``, ``seed``, ``batch_size``): one galaxy per row, in batches.

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
        if isinstance(pixel_scale, bool) or not isinstance(pixel_scale, (int, float)) or not pixel_scale > 0:
            raise ModelError(
                f"to_galsim: pixel_scale must be a positive number of arcsec, got {pixel_scale!r}"
            )
        phys = {
            **((getattr(model, "model_info", None) or {}).get("physics") or {}),
            "pixel_scale_arcsec": float(pixel_scale),
        }
    if psf is not None and not isinstance(psf, galsim.GSObject):
        raise ModelError(
            f"to_galsim: psf must be a galsim.GSObject (e.g. galsim.Moffat), got {type(psf).__name__}"
        )
    gen = generator_from(rng, device=next(model.parameters()).device)
    with torch.no_grad():
        imgs = model.sample(n, redshift=redshift, generator=gen, prior=prior, **sample_kwargs)
    return wrap(imgs[:, 0].detach().to("cpu", torch.float64).numpy(), phys, psf=psf, deconvolve=deconvolve,
                gsparams=gsparams)  # fmt: skip


def wrap(
    arr: np.ndarray, phys: dict[str, Any], *, psf: galsim.GSObject | None = None, deconvolve: bool = False,
    gsparams: galsim.GSParams | None = None,
) -> list[galsim.GSObject]:  # fmt: skip
    """Stamps (n, H, W) in flux units as GalSim objects: InterpolatedImages, deconvolved and convolved as asked."""
    scale = float(phys["pixel_scale_arcsec"])
    objs: list[galsim.GSObject] = [
        galsim.InterpolatedImage(galsim.Image(a.copy(), scale=scale), gsparams=gsparams) for a in arr
    ]
    inv = deconvolution(phys, psf, deconvolve, gsparams)
    if inv is not None:
        objs = [galsim.Convolve(o, inv, gsparams=gsparams) for o in objs]
    if psf is not None:
        objs = [galsim.Convolve(o, psf, gsparams=gsparams) for o in objs]
    return objs


def deconvolution(
    phys: dict[str, Any],
    psf: galsim.GSObject | None,
    deconvolve: bool,
    gsparams: galsim.GSParams | None = None,
) -> galsim.GSObject | None:
    """The training PSF's inverse when the pixels hold it and a new PSF is coming; checks the new one is larger."""
    convolved = bool((phys.get("psf") or {}).get("in_images")) and not phys.get("psf_free", False)
    if not convolved or (psf is None and not deconvolve):
        return None
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
    return galsim.Deconvolve(orig)


def _fwhm(obj: galsim.GSObject) -> float:
    try:
        return float(obj.fwhm)
    except (AttributeError, galsim.GalSimError):
        return float(obj.calculateFWHM())


# -- the GalSim config types -----------------------------------------------------------------------

_MODELS: dict[str, Any] = {}
"""Loaded models by path: a config draws thousands of stamps from the same model."""


def _model(path: str) -> Any:
    key = str(Path(path).resolve())
    if key not in _MODELS:
        from hpcvae.model_files import load_model

        _MODELS[key] = load_model(path)
    return _MODELS[key]


class HpcvaeModelInput:
    """``input: {hpcvae_model: {file_name: RUN, batch: 256, catalog: cat.fits, seed: 1}}``.

    Holds the model once per process.  With a ``catalog``, object k takes catalog row k's conditions and
    its latent noise from (``seed``, k): stamps are decoded ``batch`` at a time and served by index, so
    object k's image is the same for any ``nproc`` and any ``batch``.  Without one, each object's
    conditions come from its own config values and its latents from its GalSim rng (one decode each).
    """

    _req_params = {"file_name": str}  # GalSim's InputLoader reads these to parse the YAML block
    _opt_params = {"batch": int, "catalog": str, "seed": int, "prior": str, "extrapolate": bool}
    _single_params: list = []
    _takes_rng = False

    def __init__(self, file_name: str, batch: int = 256, catalog: str | None = None, seed: int = 0,
                 prior: str | None = None, extrapolate: bool = False) -> None:  # fmt: skip
        from hpcvae import catalog as cat

        if batch < 1:
            raise ModelError(f"hpcvae_model: batch must be >= 1, got {batch}")
        self.model, self.batch, self.seed = _model(file_name), int(batch), cat.check_seed(seed)
        self.prior, self.extrapolate = prior, bool(extrapolate)
        self.conditions: dict[str, np.ndarray] | None = None
        self.n = None
        if catalog is not None:
            cols = cat.columns(catalog)
            self.n = len(next(iter(cols.values()))) if cols else 0
            if self.model.conditional:
                self.conditions = cat.pick(cols, self.model.conditioning.names, str(catalog))
                self.model._redshift(None, self.n, torch.device("cpu"), "hpcvae_model", conditions=self.conditions,
                                     extrapolate=self.extrapolate)  # every row checked up front  # fmt: skip
        self._block: tuple[int, np.ndarray] | None = None

    def stamp(self, index: int) -> np.ndarray:
        """Pixels of catalog row ``index`` (flux units), decoded with its block."""
        from hpcvae.catalog import sample_rows

        if self.n is None:
            raise ModelError("hpcvae_model: stamps by index need a catalog (input.hpcvae_model.catalog)")
        if not 0 <= index < self.n:
            raise ModelError(f"hpcvae_model: object {index} is beyond the catalog's {self.n} rows")
        start = index - index % self.batch
        if self._block is None or self._block[0] != start:
            n = min(self.batch, self.n - start)
            _, imgs = next(sample_rows(self.model, self.conditions, n, seed=self.seed, batch_size=n, prior=self.prior,
                                       extrapolate=True, start=start))  # fmt: skip
            self._block = (start, imgs[:, 0].detach().to("cpu", torch.float64).numpy())
        return self._block[1][index - start]


def _target_psf(base: dict, logger: Any) -> galsim.GSObject | None:
    """The config's PSF, built as GalSim builds it, so the deconvolution check sees the same object."""
    if "psf" not in base:
        return None
    try:
        psf, _ = galsim.config.BuildGSObject(base, "psf", logger=logger)
    except (galsim.GalSimError, ValueError, KeyError):
        return None
    return psf


def _build_hpcvae_galaxy(
    config: dict, base: dict, ignore: list, gsparams: dict, logger: Any
) -> tuple[Any, bool]:
    """``type: HpcvaeGalaxy``: a generated galaxy, from ``model`` or the ``hpcvae_model`` input."""
    opt = {"model": str, "redshift": float, "prior": str, "flux": float, "index": int, "extrapolate": bool}
    kwargs, _ = galsim.config.GetAllParams(config, base, opt=opt, ignore=ignore)
    gsp = galsim.GSParams(**gsparams) if gsparams else None
    if "model" in kwargs:
        model, inp = _model(kwargs["model"]), None
    else:
        inp = galsim.config.GetInputObj("hpcvae_model", config, base, "HpcvaeGalaxy")
        model = inp.model
    phys = physics(model)
    inv = deconvolution(phys, _target_psf(base, logger), True, gsp)  # the same check as to_galsim's
    if inp is not None and inp.n is not None:
        arr = inp.stamp(kwargs.get("index", base.get("obj_num", 0)))[None]
    else:
        rng = galsim.config.GetRNG(config, base, logger, "HpcvaeGalaxy")
        extra = {"extrapolate": kwargs.get("extrapolate", inp.extrapolate if inp else False)}
        with torch.no_grad():
            imgs = model.sample(1, redshift=kwargs.get("redshift"), generator=generator_from(rng),
                                prior=kwargs.get("prior", inp.prior if inp else None), **extra)  # fmt: skip
        arr = imgs[:, 0].to("cpu", torch.float64).numpy()
    (obj,) = wrap(arr, phys, gsparams=gsp)
    if inv is not None:
        obj = galsim.Convolve(obj, inv, gsparams=gsp)
    if "flux" in kwargs:
        obj = obj.withFlux(kwargs["flux"])
    return obj, False


galsim.config.RegisterInputType("hpcvae_model", galsim.config.InputLoader(HpcvaeModelInput, file_scope=True))
galsim.config.RegisterObjectType("HpcvaeGalaxy", _build_hpcvae_galaxy, input_type="hpcvae_model")
