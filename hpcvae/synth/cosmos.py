"""The ``cosmos`` family of ``hpcvae.synth``: COSMOS-like galaxies from real COSMOS ingredients.

Every ingredient is real HST data shipped in ``hpcvae/resources/cosmos`` (GalSim's 100-galaxy
I < 23.5 COSMOS example, GalSim's licence):

* **Profiles.** Each galaxy is drawn from a density fitted to the 100 real parametric fits
  (Lackner & Gunn 2012, as GalSim's ``COSMOSCatalog(use_real=False)`` builds them): a smoothed
  bootstrap, i.e. sampling a Gaussian kernel density estimate.  A real galaxy is picked, then
  its parameters are moved by kernel noise N(0, h^2 Sigma) in a transformed space, Sigma being
  the covariance of that space over the galaxies of its kind and h Scott's factor n^(-1/(d+4)).
  Single-Sérsic galaxies (64 of 100) vary (mag, log hlr, log(1+zphot), logit n, logit q);
  bulge + disk ones (36) vary (mag, log hlr, log(1+zphot), logit B/T, log hlr_bulge/hlr_disk,
  logit q_bulge, logit q_disk).  So magnitude, size, Sérsic index, axis ratio, bulge fraction and
  zphot keep their correlations.  Position angles are uniform (bulge and disk share one).  Magnitudes become fluxes with the
  catalog's own zeropoint (median of mag_auto + 2.5 log10 flux: 26.02).
* **PSF.** The real ACS PSF image of a randomly picked real galaxy (each stamp its own), as an
  ``InterpolatedImage``; PSF images include the pixel, so stamps are drawn with ``no_pixel``.
* **Noise.** COSMOS correlated noise (``galsim.getCOSMOSNoise``, which ships with GalSim) at the
  NOISE_VARIANCE of the galaxy whose PSF was picked.
* **Stamps.** S + 0..4 pixels on each side (so sharding at S crops, never pads the correlated noise),
  centres offset by U(-0.5, 0.5) pixels.
* **Truth** (``_fits.fits``): the drawn parameters, the real galaxy each came from, its best
  single-Sérsic parameters (for the Sérsic baseline the science benchmark compares against), and the
  HSM size and shape of the galaxy before the PSF (``*_intrinsic``, sampled at pixel centres) and
  after it without noise (``*_observed``; NaN where HSM fails, e.g. a galaxy larger than its stamp), plus ``mag_auto`` and ``flux_radius`` (pixels enclosing half the noise-free
  observed flux), the columns a survey catalog would give.

Every random number of galaxy i comes from ``SeedSequence([seed, i])``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from hpcvae.synth.simple import flux_radius

NAME = "cosmos"
PIXEL_SCALE = 0.03
BAND = "F814W"
STAMP_HEADER = {"BUNIT": "ELECTRONS/S", "TELESCOP": "HST", "INSTRUME": "ACS", "FILTER": BAND}
RESOURCE = "cosmos"
FITS_FILE = "real_galaxy_catalog_23.5_example_fits.fits"
CATALOG_FILE = "real_galaxy_catalog_23.5_example.fits"
PSF_FILE = "real_galaxy_PSF_images.fits"
N_BOUNDS = (0.3, 6.0)
Q_MIN = 0.05
TRUNC = 6.0
"""Profiles are truncated at this many half-light radii (bounds the FFTs of n = 6 wings)."""

TRUTH_DTYPE = [
    ("IDENT", ">i4"), ("zphot", ">f8"), ("mag", ">f8"), ("mag_auto", ">f8"), ("flux", ">f8"), ("hlr", ">f8"),
    ("flux_radius", ">f8"), ("n", ">f8"), ("q", ">f8"), ("beta", ">f8"), ("use_bulgefit", ">i4"),
    ("bulge_frac", ">f8"), ("hlr_bulge", ">f8"), ("hlr_disk", ">f8"), ("q_bulge", ">f8"), ("q_disk", ">f8"),
    ("sersic_n", ">f8"), ("sersic_hlr", ">f8"), ("sersic_q", ">f8"), ("source_ident", ">i4"),
    ("psf_index", ">i4"), ("noise_variance", ">f8"), ("dx", ">f8"), ("dy", ">f8"), ("nx", ">i4"), ("ny", ">i4"),
    ("hsm_sigma_intrinsic", ">f8"), ("hsm_g1_intrinsic", ">f8"), ("hsm_g2_intrinsic", ">f8"),
    ("hsm_sigma_observed", ">f8"), ("hsm_g1_observed", ">f8"), ("hsm_g2_observed", ">f8"),
]  # fmt: skip


def _logit(x: np.ndarray) -> np.ndarray:
    return np.log(x / (1 - x))


def _expit(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


@lru_cache(maxsize=1)
def ingredients() -> dict[str, Any]:
    """The real fits, noise levels and PSFs, and the kernel density behind the draws (once per process)."""
    import fitsio

    root = resources.files("hpcvae.resources") / RESOURCE
    fits = fitsio.read(str(root / FITS_FILE), ext=1)
    cat = fitsio.read(str(root / CATALOG_FILE), ext=1)
    with fitsio.FITS(str(root / PSF_FILE)) as f:
        psfs = [np.asarray(f[i].read(), dtype=np.float64) for i in range(len(f))]
    psfs = [p / p.sum() for p in psfs]
    s, b, hlr, flux = fits["sersicfit"], fits["bulgefit"], fits["hlr"], fits["flux"]
    zp = float(np.median(fits["mag_auto"] + 2.5 * np.log10(flux[:, 0])))
    n = np.clip(s[:, 2], *N_BOUNDS)
    common = np.stack([fits["mag_auto"], np.log(hlr[:, 0]), np.log1p(fits["zphot"])], axis=1)
    bd = fits["use_bulgefit"].astype(bool)
    btt = np.clip(flux[:, 1] / np.maximum(flux[:, 1] + flux[:, 2], 1e-30), 0.02, 0.98)
    sersic_x = np.concatenate(
        [common, np.stack([_logit((n - 0.29) / 5.72), _logit(np.clip(s[:, 3], 0.06, 0.99))], 1)], 1
    )
    bd_x = np.concatenate([common, np.stack([_logit(btt), np.log(np.maximum(hlr[:, 1], 1e-3) / np.maximum(hlr[:, 2], 1e-3)),
                                             _logit(np.clip(b[:, 11], 0.06, 0.99)), _logit(np.clip(b[:, 3], 0.06, 0.99))], 1)], 1)  # fmt: skip

    def kernel(x: np.ndarray) -> np.ndarray:
        d = x.shape[1]
        h = x.shape[0] ** (-1.0 / (d + 4))  # Scott's factor
        return np.linalg.cholesky(h * h * np.cov(x, rowvar=False) + 1e-9 * np.eye(d))

    return {"fits": fits, "noise_var": np.asarray(cat["NOISE_VARIANCE"], dtype=np.float64), "psfs": psfs,
            "zeropoint": zp, "bd": bd, "x_sersic": sersic_x, "x_bd": bd_x, "L_sersic": kernel(sersic_x[~bd]),
            "L_bd": kernel(bd_x[bd]), "n": len(fits)}  # fmt: skip


def _rng(seed: int, i: int) -> tuple[np.random.Generator, int]:
    params, noise = np.random.SeedSequence([seed, i]).spawn(2)
    return np.random.default_rng(params), int(noise.generate_state(1)[0])


def draw_params(seed: int, start: int, stop: int, size: int) -> np.ndarray:
    """Parameters of galaxies ``start..stop-1`` (truth columns; the HSM ones are filled when rendering)."""
    ing = ingredients()
    out = np.zeros(stop - start, dtype=TRUTH_DTYPE + [("noise_seed", "u8")])
    fits = ing["fits"]
    for j in range(stop - start):
        rng, noise_seed = _rng(seed, start + j)
        src = int(rng.integers(ing["n"]))
        bd = bool(ing["bd"][src])
        x = ing["x_bd" if bd else "x_sersic"][src] + ing["L_bd" if bd else "L_sersic"] @ rng.standard_normal(
            ing["L_bd" if bd else "L_sersic"].shape[0]
        )
        mag, hlr, z = float(x[0]), float(np.exp(x[1])), float(max(np.expm1(x[2]), 0.01))
        scale = hlr / float(fits["hlr"][src, 0])  # the kernel's size change, applied to every radius
        row = out[j]
        row["IDENT"], row["source_ident"], row["zphot"], row["mag"], row["mag_auto"] = (
            start + j,
            fits["IDENT"][src],
            z,
            mag,
            mag,
        )
        row["flux"], row["hlr"], row["use_bulgefit"] = 10 ** (-0.4 * (mag - ing["zeropoint"])), hlr, int(bd)
        row["beta"] = rng.uniform(0.0, math.pi)
        s = fits["sersicfit"][src]
        row["sersic_n"] = round(float(np.clip(s[2], *N_BOUNDS)), 1)
        row["sersic_q"], row["sersic_hlr"] = float(np.clip(s[3], Q_MIN, 1.0)), hlr
        if bd:
            btt, ratio = float(_expit(x[3])), float(np.exp(x[4]))
            row["bulge_frac"], row["q_bulge"], row["q_disk"] = (
                round(btt, 3),
                float(_expit(x[5])),
                float(_expit(x[6])),
            )
            hd = fits["hlr"][src, 2] * scale
            row["hlr_disk"], row["hlr_bulge"] = hd, hd * ratio
            row["n"], row["q"] = 1.0, row["q_disk"]
        else:
            n_val = 0.29 + 5.72 * float(_expit(x[3]))
            row["n"], row["q"] = (
                round(float(np.clip(n_val, *N_BOUNDS)), 1),
                float(np.clip(_expit(x[4]), Q_MIN, 1.0)),
            )
        psf = int(rng.integers(ing["n"]))
        row["psf_index"], row["noise_variance"] = psf, ing["noise_var"][psf]
        row["dx"], row["dy"] = rng.uniform(-0.5, 0.5, 2)
        row["nx"], row["ny"] = size + rng.integers(0, 5, 2)
        row["noise_seed"] = noise_seed
    return out


@lru_cache(maxsize=128)
def _psf_object(index: int) -> Any:
    import galsim

    return galsim.InterpolatedImage(galsim.Image(ingredients()["psfs"][index], scale=PIXEL_SCALE), flux=1.0)


@lru_cache(maxsize=256)
def _unit_sersic(n: float) -> Any:
    import galsim

    return galsim.Sersic(n=n, half_light_radius=1.0, trunc=TRUNC)


def profile(p: np.void, sersic_only: bool = False) -> Any:
    """The galaxy before the PSF; ``sersic_only`` gives its best single-Sérsic stand-in (the baseline)."""
    import galsim

    beta = float(p["beta"]) * galsim.radians
    if sersic_only:
        return (_unit_sersic(float(p["sersic_n"])).dilate(float(p["sersic_hlr"])).shear(q=float(p["sersic_q"]), beta=beta)
                .withFlux(float(p["flux"])))  # fmt: skip
    if p["use_bulgefit"]:
        b = float(p["bulge_frac"])
        bulge = (
            _unit_sersic(4.0)
            .dilate(float(p["hlr_bulge"]))
            .shear(q=float(p["q_bulge"]), beta=beta)
            .withFlux(b)
        )
        disk = (
            _unit_sersic(1.0)
            .dilate(float(p["hlr_disk"]))
            .shear(q=float(p["q_disk"]), beta=beta)
            .withFlux(1 - b)
        )
        return galsim.Add(bulge, disk).withFlux(float(p["flux"]))
    gal = _unit_sersic(float(p["n"])).dilate(float(p["hlr"])).shear(q=float(p["q"]), beta=beta)
    return gal.withFlux(float(p["flux"]))


def draw_noiseless(p: np.void, psf_blur: float = 0.0, sersic_only: bool = False) -> np.ndarray:
    """One galaxy convolved with its real PSF (and ``psf_blur`` arcsec of extra Gaussian), float32, no noise."""
    import galsim

    psf = _psf_object(int(p["psf_index"]))
    if psf_blur > 0:
        psf = galsim.Convolve(psf, galsim.Gaussian(sigma=psf_blur))
    img = galsim.ImageF(int(p["nx"]), int(p["ny"]), scale=PIXEL_SCALE)
    galsim.Convolve(profile(p, sersic_only), psf).drawImage(image=img, method="no_pixel",
                                                            offset=(float(p["dx"]), float(p["dy"])))  # fmt: skip
    return img.array


@lru_cache(maxsize=1)
def _unit_noise() -> Any:
    import galsim

    return galsim.getCOSMOSNoise(variance=1.0)


def _hsm(img: np.ndarray) -> tuple[float, float, float]:
    import galsim

    res = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(img, dtype=np.float64)), strict=False)
    if res.moments_status != 0:
        return math.nan, math.nan, math.nan
    return res.moments_sigma * PIXEL_SCALE, res.observed_shape.g1, res.observed_shape.g2


def render_range(
    seed: int, start: int, stop: int, size: int, psf_blur: float = 0.0
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Parameters (with the HSM truth filled in), noisy float32 stamps and PSF stamps of ``start..stop-1``."""
    import galsim

    params = draw_params(seed, start, stop, size)
    stamps, psfs = [], []
    for p in params:
        clean = draw_noiseless(p, psf_blur)
        intrinsic = galsim.ImageF(int(p["nx"]), int(p["ny"]), scale=PIXEL_SCALE)
        profile(p).drawImage(image=intrinsic, method="no_pixel", offset=(float(p["dx"]), float(p["dy"])))
        p["hsm_sigma_intrinsic"], p["hsm_g1_intrinsic"], p["hsm_g2_intrinsic"] = _hsm(intrinsic.array)
        p["hsm_sigma_observed"], p["hsm_g1_observed"], p["hsm_g2_observed"] = _hsm(clean)
        p["flux_radius"] = flux_radius(clean)
        noisy = galsim.ImageF(clean.copy(), scale=PIXEL_SCALE)
        noise = _unit_noise().copy(rng=galsim.BaseDeviate(int(p["noise_seed"]) % (1 << 31)))
        noisy.addNoise(noise.withVariance(float(p["noise_variance"])))
        stamps.append(noisy.array.astype(np.float32))
        psf = ingredients()["psfs"][int(p["psf_index"])]
        psfs.append(psf.astype(np.float32))
    return params, stamps, psfs


def noiseless(header: dict[str, Any], ident: int) -> np.ndarray:
    """Galaxy ``ident`` of a set written with ``header`` (its _fits.fits header), without noise."""
    p = draw_params(int(header["SEED"]), ident, ident + 1, int(header["NOMSIZE"]))[0]
    return draw_noiseless(p, float(header.get("PSFBLUR", 0.0)))


def baseline(header: dict[str, Any], ident: int) -> np.ndarray:
    """Galaxy ``ident``'s best-fit single Sérsic profile (the real fit's), as observed, without noise."""
    p = draw_params(int(header["SEED"]), ident, ident + 1, int(header["NOMSIZE"]))[0]
    return draw_noiseless(p, float(header.get("PSFBLUR", 0.0)), sersic_only=True)


def header_items(cfg: Any) -> list[tuple[str, Any, str]]:
    ing = ingredients()
    return [("NSOURCE", ing["n"], "real COSMOS galaxies the density is fitted to"),
            ("NBULGE", int(ing["bd"].sum()), "of them bulge + disk fits"),
            ("KERNEL", "scott", "smoothed bootstrap: Gaussian KDE, Scott's bandwidth"),
            ("PSFBLUR", cfg.psf_blur, "extra Gaussian PSF sigma (arcsec)"),
            ("TRUNC", TRUNC, "profile truncation in hlr units")]  # fmt: skip


def zeropoint() -> float:
    return float(ingredients()["zeropoint"])
