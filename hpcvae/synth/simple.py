"""The ``simple`` family of ``hpcvae.synth``: parametric galaxies with a known redshift -> size/flux relation.

Synthetic sets go through exactly the same ingest as real HST data, so the files
mirror GalSim's COSMOS RealGalaxyCatalog: a catalog table, a ``_fits`` table with
``zphot`` and the truth, image files of up to ``per_file`` HDUs (one float32 stamp per
HDU, counted from 0) and matching PSF files (PSF HDU k belongs to galaxy HDU k, as in
COSMOS).  ``galsim.RealGalaxyCatalog`` opens the result directly.

Each galaxy's redshift, size and flux come from the relations in
:mod:`hpcvae.cosmology` (read its docstring for the model); on top of that:

* **Profile.** 35 % are bulge + disk (de Vaucouleurs + exponential, bulge fraction
  0.1 + 0.8 Beta(2, 2), bulge/disk radius ratio U(0.25, 0.6)); the rest are single
  Sérsic with n log-normal around 1.3 (ln-scatter 0.5) in [0.5, 6], rounded to 0.1 so
  GalSim's per-index tables are built once per worker, not once per galaxy.  Every
  component is truncated at 5 of its own half-light radii, which bounds the FFT size
  (untruncated n = 6 wings need 1000+ pixel FFTs).  The truth ``hlr`` is the
  circularised half-light radius of the whole (truncated) profile before the PSF;
  ``n`` is the Sérsic index (1, the disk's, for bulge + disk rows).
* **Shape.** Axis ratio of a randomly inclined oblate body, q = sqrt(c² + q0²(1-c²))
  with c = cos i uniform, q0 = 0.2 for disks and 0.55 for n ≥ 2 spheroids (median
  ≈ 0.55, like COSMOS); position angle uniform.  Centres are offset by U(-0.5, 0.5) px.
* **PSF.** HST ACS F814W-like: Airy for a 2.4 m mirror at 814 nm with obscuration
  0.33, convolved with a Gaussian jitter of σ in {5, 7, 9, 11, 13, 15} mas.  The
  37x37 effective PSF image (pixel included, as COSMOS PSFs are) is both what is
  written to the PSF file and what the galaxy is convolved with, so the PSF on file
  is exact.
* **Noise.** White Gaussian noise whose variance is log-normal around the COSMOS
  catalog's (median 8.1e-6, ln-scatter 0.42, clipped to [5e-6, 2.5e-5]).
* **Stamps.** Side ≈ S·sqrt(hlr / 11 px) clipped to [0.6 S, 1.6 S], stretched along
  the galaxy's long axis by up to 4/3, ± 2 px: sizes vary around S and are mostly
  not square, as real cutouts are.

Every random number of galaxy i comes from ``SeedSequence([seed, i])``, so the output
is identical for any ``--workers``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

from hpcvae import cosmology as cosmo

NAME = "simple"
PIXEL_SCALE = 0.03
"""arcsec per pixel, as HST ACS COSMOS stamps."""
BAND = "F814W"
TRUNC = 5.0
"""Profile truncation radius in units of each component's half-light radius."""
PSF_STAMP = 37
STAMP_HEADER = {"BUNIT": "ELECTRONS/S", "TELESCOP": "HST", "INSTRUME": "ACS", "FILTER": BAND}
"""What every synthetic stamp says of its pixels, as a real ACS cutout does (flux: mag = 26 - 2.5 log10)."""
PSF_JITTER_GRID = (0.005, 0.007, 0.009, 0.011, 0.013, 0.015)
"""Gaussian jitter σ (arcsec); a grid so each worker draws each PSF once."""
AIRY = {"lam": 814.0, "diam": 2.4, "obscuration": 0.33}
BULGE_DISK_FRACTION = 0.35
HLR_REF_PX = 11.0
"""Median hlr (pixels) at the n(z) peak: the galaxy size a stamp of side S is made for."""
NOISE_VAR_MEDIAN = 8.1e-6
NOISE_VAR_SIGMA_LN = 0.42
NOISE_VAR_RANGE = (5.0e-6, 2.5e-5)


TRUTH_DTYPE = [
    ("IDENT", ">i4"),
    ("zphot", ">f8"),
    ("hlr", ">f8"),
    ("flux", ">f8"),
    ("mag", ">f8"),
    ("q", ">f8"),
    ("beta", ">f8"),
    ("n", ">f8"),
    ("use_bulgefit", ">i4"),
    ("bulge_frac", ">f8"),
    ("hlr_bulge", ">f8"),
    ("hlr_disk", ">f8"),
    ("re_kpc", ">f8"),
    ("abs_mag", ">f8"),
    ("psf_jitter", ">f8"),
    ("dx", ">f8"),
    ("dy", ">f8"),
    ("mag_auto", ">f8"),
    ("flux_radius", ">f8"),
]
_TRUTH_NAMES = [name for name, _ in TRUTH_DTYPE]


# --- profile helpers -------------------------------------------------------------


@lru_cache(maxsize=64)
def _sersic_scale(n: float) -> tuple[float, float]:
    """Scale radius r0 and the truncated-flux norm of a Sérsic with hlr 1 cut at TRUNC.

    GalSim's Sérsic is I ∝ exp(-(r/r0)^(1/n)), whose enclosed flux is the regularised
    lower incomplete gamma P(2n, (r/r0)^(1/n)); with the truncation the hlr condition is
    P(2n, (1/r0)^(1/n)) = P(2n, (T/r0)^(1/n)) / 2.
    """
    from scipy.optimize import brentq
    from scipy.special import gammainc

    def f(log_r0: float) -> float:
        r0 = math.exp(log_r0)
        return gammainc(2 * n, r0 ** (-1 / n)) - 0.5 * gammainc(2 * n, (TRUNC / r0) ** (1 / n))

    r0 = math.exp(brentq(f, -30.0, 5.0, xtol=1e-12))
    return r0, float(gammainc(2 * n, (TRUNC / r0) ** (1 / n)))


def sersic_enclosed(r: np.ndarray | float, n: float, hlr: float) -> np.ndarray:
    """Flux fraction within radius r of a Sérsic (hlr, truncated at TRUNC·hlr)."""
    from scipy.special import gammainc

    r0, norm = _sersic_scale(n)
    x = np.minimum(np.asarray(r, dtype=float) / hlr, TRUNC)
    return gammainc(2 * n, (x / r0) ** (1 / n)) / norm


@lru_cache(maxsize=4096)
def composite_hlr(bulge_frac: float, ratio: float) -> float:
    """Half-light radius of n=4 bulge (hlr ``ratio``) + n=1 disk (hlr 1), fractions by flux."""
    from scipy.optimize import brentq

    def f(r: float) -> float:
        return float(
            bulge_frac * sersic_enclosed(r, 4.0, ratio)
            + (1 - bulge_frac) * sersic_enclosed(r, 1.0, 1.0)
            - 0.5
        )

    return float(brentq(f, 1e-6, TRUNC, xtol=1e-10))


def _q_from_inclination(cos_i: np.ndarray, q0: np.ndarray) -> np.ndarray:
    return np.sqrt(cos_i**2 + q0**2 * (1 - cos_i**2))


# --- drawing the parameters ------------------------------------------------------


def _galaxy_rngs(seed: int, i: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent streams for galaxy i's parameters and its pixel noise."""
    params, noise = np.random.SeedSequence([seed, i]).spawn(2)
    return np.random.default_rng(params), np.random.default_rng(noise)


# One uniform/normal/... per field, drawn in this order from galaxy i's own stream.
_RAW_FIELDS = "z g_re u_m bd btt ratio n cos_i beta psf g_var dx dy jx jy".split()


def draw_params(seed: int, start: int, stop: int, size: int) -> np.ndarray:
    """Truth and stamp geometry of galaxies ``start..stop-1`` (a record array)."""
    m = stop - start
    raw = np.zeros(m, dtype=[(k, "f8") for k in _RAW_FIELDS])
    k_gamma = (cosmo.SMAIL_ALPHA + 1.0) / cosmo.SMAIL_BETA
    for j in range(m):
        rng, _ = _galaxy_rngs(seed, start + j)
        while True:
            z = float(cosmo.redshift_from_gamma(rng.gamma(k_gamma)))
            if cosmo.Z_MIN <= z <= cosmo.Z_MAX:
                break
        raw[j] = (
            z,
            rng.standard_normal(),
            1.0 - rng.random(),
            rng.random() < BULGE_DISK_FRACTION,
            0.1 + 0.8 * rng.beta(2.0, 2.0),
            rng.uniform(0.25, 0.6),
            rng.standard_normal(),
            rng.random(),
            rng.uniform(0.0, math.pi),
            rng.integers(len(PSF_JITTER_GRID)),
            rng.standard_normal(),
            rng.uniform(-0.5, 0.5),
            rng.uniform(-0.5, 0.5),
            rng.integers(-2, 3),
            rng.integers(-2, 3),
        )

    z = raw["z"]
    bd = raw["bd"] > 0.5
    re_kpc = cosmo.median_re_kpc(z) * np.exp(cosmo.SIGMA_LN_RE * raw["g_re"])
    hlr = cosmo.re_kpc_to_arcsec(re_kpc, z)
    abs_mag = cosmo.abs_mag_from_uniform(raw["u_m"], z)
    mag = abs_mag + cosmo.distance_modulus(z)
    n_sersic = np.round(np.clip(1.3 * np.exp(0.5 * raw["n"]), 0.5, 6.0), 1)
    n_sersic = np.where(bd, 1.0, n_sersic)
    btt = np.where(bd, raw["btt"], 0.0)
    ratio = np.round(raw["ratio"], 3)
    btt = np.round(btt, 3)
    total_per_disk = np.array(
        [composite_hlr(float(b), float(r)) if d else 1.0 for b, r, d in zip(btt, ratio, bd)]
    )
    hlr_disk = np.where(bd, hlr / total_per_disk, 0.0)
    hlr_bulge = np.where(bd, hlr_disk * ratio, 0.0)
    q0 = np.where(~bd & (n_sersic >= 2.0), 0.55, 0.2)
    q = _q_from_inclination(raw["cos_i"], q0)
    var = np.clip(NOISE_VAR_MEDIAN * np.exp(NOISE_VAR_SIGMA_LN * raw["g_var"]), *NOISE_VAR_RANGE)

    # Stamp: side from the galaxy's size, stretched along its long axis.
    hlr_px = hlr / PIXEL_SCALE
    side = size * np.clip(np.sqrt(hlr_px / HLR_REF_PX), 0.6, 1.6)
    a2, b2 = 1.0 / q, q
    cb, sb = np.cos(raw["beta"]) ** 2, np.sin(raw["beta"]) ** 2
    aspect = np.clip(((a2 * cb + b2 * sb) / (a2 * sb + b2 * cb)) ** 0.25, 0.75, 4.0 / 3.0)
    nx = np.maximum(16, np.round(side * aspect) + raw["jx"]).astype(int)
    ny = np.maximum(16, np.round(side / aspect) + raw["jy"]).astype(int)

    out = np.zeros(
        m, dtype=TRUTH_DTYPE + [("noise_variance", "f8"), ("psf_index", "i4"), ("nx", "i4"), ("ny", "i4")]
    )
    out["IDENT"] = np.arange(start, stop)
    out["zphot"] = z
    out["hlr"] = hlr
    out["mag"] = mag
    out["flux"] = cosmo.mag_to_flux(mag)
    out["q"] = q
    out["beta"] = raw["beta"]
    out["n"] = n_sersic
    out["use_bulgefit"] = bd
    out["bulge_frac"] = btt
    out["hlr_bulge"] = hlr_bulge
    out["hlr_disk"] = hlr_disk
    out["re_kpc"] = re_kpc
    out["abs_mag"] = abs_mag
    out["psf_index"] = raw["psf"]
    out["psf_jitter"] = np.asarray(PSF_JITTER_GRID)[raw["psf"].astype(int)]
    out["dx"] = raw["dx"]
    out["dy"] = raw["dy"]
    out["noise_variance"] = var
    out["nx"] = nx
    out["ny"] = ny
    return out


# --- rendering ---------------------------------------------------------------------


@lru_cache(maxsize=4 * len(PSF_JITTER_GRID))
def _psf(index: int, blur: float = 0.0):
    """(InterpolatedImage, float32 array) of the effective PSF for one jitter value (plus ``blur``)."""
    import galsim

    psf = galsim.Convolve(
        galsim.Airy(
            lam=AIRY["lam"], diam=AIRY["diam"], obscuration=AIRY["obscuration"], scale_unit=galsim.arcsec
        ),
        galsim.Gaussian(sigma=math.hypot(PSF_JITTER_GRID[index], blur)),
    )
    img = psf.drawImage(nx=PSF_STAMP, ny=PSF_STAMP, scale=PIXEL_SCALE, method="auto")
    arr = img.array / img.array.sum()
    ii = galsim.InterpolatedImage(galsim.Image(arr, scale=PIXEL_SCALE), flux=1.0)
    return ii, arr.astype(np.float32)


@lru_cache(maxsize=128)
def _unit_sersic(n: float):
    """Sérsic with hlr 1 cut at TRUNC, dilated per galaxy.

    GalSim caches its Hankel tables by (n, trunc / r0); building every galaxy at its own
    radius perturbs that ratio in the last bits and rebuilds the tables each time.
    """
    import galsim

    return galsim.Sersic(n=n, half_light_radius=1.0, trunc=TRUNC)


def _profile(p: np.void):
    import galsim

    if p["use_bulgefit"]:
        b = float(p["bulge_frac"])
        gal = galsim.Add(
            _unit_sersic(4.0).dilate(float(p["hlr_bulge"])).withFlux(b),
            _unit_sersic(1.0).dilate(float(p["hlr_disk"])).withFlux(1.0 - b),
        )
    else:
        gal = _unit_sersic(float(p["n"])).dilate(float(p["hlr"]))
    return gal.shear(q=float(p["q"]), beta=float(p["beta"]) * galsim.radians).withFlux(float(p["flux"]))


def draw_noiseless(p: np.void, psf_blur: float = 0.0) -> np.ndarray:
    """One galaxy (a row of :func:`draw_params`) convolved with its PSF, float32, no noise."""
    import galsim

    psf_ii, _ = _psf(int(p["psf_index"]), psf_blur)
    obj = galsim.Convolve(_profile(p), psf_ii)
    img = galsim.ImageF(int(p["nx"]), int(p["ny"]), scale=PIXEL_SCALE)
    # no_pixel: the PSF image already contains the pixel response, as COSMOS PSFs do.
    obj.drawImage(image=img, method="no_pixel", offset=(float(p["dx"]), float(p["dy"])))
    return img.array


def flux_radius(img: np.ndarray) -> float:
    """Radius (pixels) of the circle about the light-weighted centre that holds half the stamp's flux."""
    yy, xx = np.indices(img.shape, dtype=np.float64)
    w = np.clip(img, 0, None)
    tot = w.sum()
    if tot <= 0:
        return math.nan
    cy, cx = (w * yy).sum() / tot, (w * xx).sum() / tot
    r = np.hypot(yy - cy, xx - cx).ravel()
    order = np.argsort(r)
    cum = np.cumsum(w.ravel()[order])
    return float(r[order][np.searchsorted(cum, 0.5 * tot)])


def render_range(
    seed: int, start: int, stop: int, size: int, psf_blur: float = 0.0
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Parameters, noisy float32 stamps and PSF stamps of galaxies ``start..stop-1``."""
    params = draw_params(seed, start, stop, size)
    stamps, psfs = [], []
    for j, p in enumerate(params):
        _, noise_rng = _galaxy_rngs(seed, start + j)
        clean = draw_noiseless(p, psf_blur)
        # What a catalog measures (SExtractor-like, on the noise-free stamp): conditions a model can be given.
        p["mag_auto"] = float(cosmo.flux_to_mag(max(float(clean.sum()), 1e-30)))
        p["flux_radius"] = flux_radius(clean)
        # numpy, not galsim.GaussianNoise: GalSim's deviate costs ~4 µs a pixel, more than the FFTs.
        noise = noise_rng.standard_normal(clean.shape, dtype=np.float32)
        stamps.append(clean + np.float32(math.sqrt(p["noise_variance"])) * noise)
        psfs.append(_psf(int(p["psf_index"]), psf_blur)[1])
    return params, stamps, psfs


def noiseless(header: dict[str, Any], ident: int) -> np.ndarray:
    """Galaxy ``ident`` of a set written with ``header`` (its _fits.fits header), without noise."""
    p = draw_params(int(header["SEED"]), ident, ident + 1, int(header["NOMSIZE"]))[0]
    return draw_noiseless(p, float(header.get("PSFBLUR", 0.0)))


def header_items(cfg: Any) -> list[tuple[str, Any, str]]:
    """The family's keys in the _fits.fits header: the relations behind the truth."""
    return [
        ("H0", cosmo.H0, "km/s/Mpc, FlatLambdaCDM"),
        ("OM0", cosmo.OM0, "matter density"),
        ("ZPEAK", cosmo.Z_PEAK, "mode of the Smail n(z)"),
        ("RE0KPC", cosmo.RE0_KPC, "median R_e at z=0 (kpc)"),
        ("SIZEEVO", cosmo.SIZE_EVOLUTION, "R_e median ~ (1+z)^-SIZEEVO"),
        ("SIGLNRE", cosmo.SIGMA_LN_RE, "ln-scatter of R_e"),
        ("MABSMEAN", cosmo.ABS_MAG_MEAN, "mean absolute magnitude"),
        ("MABSSIG", cosmo.ABS_MAG_SIGMA, "sigma of absolute magnitude"),
        ("MAGLIM", cosmo.MAG_LIMIT, "apparent magnitude limit"),
        ("TRUNC", TRUNC, "profile truncation in hlr units"),
        ("PSFBLUR", cfg.psf_blur, "extra Gaussian PSF sigma (arcsec), hpcvae.synth --psf-blur"),
    ]
