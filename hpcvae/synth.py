"""``python -m hpcvae.synth``: GalSim galaxies written in the RealGalaxyCatalog layout.

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

import argparse
import math
import os
import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from hpcvae import cosmology as cosmo
from hpcvae.cli import run_cli
from hpcvae.config import add_options, options_from_args
from hpcvae.errors import ConfigError

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

CATALOG_NAME = "real_galaxy_catalog_synth.fits"
FITS_CATALOG_NAME = "real_galaxy_catalog_synth_fits.fits"

CATALOG_DTYPE = [
    ("IDENT", ">i4"),
    ("MAG", ">f8"),
    ("BAND", "U5"),
    ("WEIGHT", ">f8"),
    ("GAL_FILENAME", "U40"),
    ("PSF_FILENAME", "U44"),
    ("GAL_HDU", ">i4"),
    ("PSF_HDU", ">i4"),
    ("PIXEL_SCALE", ">f8"),
    ("NOISE_MEAN", ">f8"),
    ("NOISE_VARIANCE", ">f8"),
    ("stamp_flux", ">f8"),
]
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
]
_TRUTH_NAMES = [name for name, _ in TRUTH_DTYPE]


def image_file_name(k: int) -> str:
    return f"real_galaxy_images_synth_n{k}.fits"


def psf_file_name(k: int) -> str:
    return f"real_galaxy_PSF_images_synth_n{k}.fits"


@dataclass(kw_only=True)
class SynthConfig:
    n: int
    """Number of galaxies."""
    size: int
    """Nominal stamp side S in pixels; stamps scatter around it (0.6 S .. 1.6 S)."""
    out: Path
    """Output folder (created)."""
    seed: int = 0
    """Seeds every galaxy's parameters and noise (the same set for any worker count)."""
    workers: int | None = None
    """Rendering processes; ``None`` uses every core this process may use."""
    per_file: int = 1000
    """HDUs per image file (COSMOS uses 1000)."""
    progress: bool = True
    """A progress bar on stderr."""
    overwrite: bool = False
    """Replace a synthetic set already in ``out`` (its catalogs and image files; nothing else)."""
    psf_blur: float = 0.0
    """Extra Gaussian sigma (arcsec) in every PSF on top of the HST one: a PSF that matters, for tests
    of PSF-free training (0 = HST-like; the catalog header records it as PSFBLUR)."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"--n must be >= 1, got {self.n}")
        if self.size < 16:
            raise ConfigError(f"--size must be >= 16 pixels, got {self.size}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.per_file < 1:
            raise ConfigError(f"--per-file must be >= 1, got {self.per_file}")
        if not 0.0 <= self.psf_blur <= 0.15:
            raise ConfigError(
                f'--psf-blur must be in [0, 0.15] arcsec (the PSF stamp is 1.1"), got {self.psf_blur}'
            )
        self.out = Path(self.out)


@dataclass(kw_only=True)
class SynthResult:
    catalog: Path
    fits_catalog: Path
    n: int
    n_files: int
    seconds: float

    @property
    def galaxies_per_s(self) -> float:
        return self.n / max(self.seconds, 1e-9)


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


def render_range(
    seed: int, start: int, stop: int, size: int, psf_blur: float = 0.0
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Parameters, noisy float32 stamps and PSF stamps of galaxies ``start..stop-1``."""
    params = draw_params(seed, start, stop, size)
    stamps, psfs = [], []
    for j, p in enumerate(params):
        _, noise_rng = _galaxy_rngs(seed, start + j)
        clean = draw_noiseless(p, psf_blur)
        # numpy, not galsim.GaussianNoise: GalSim's deviate costs ~4 µs a pixel, more than the FFTs.
        noise = noise_rng.standard_normal(clean.shape, dtype=np.float32)
        stamps.append(clean + np.float32(math.sqrt(p["noise_variance"])) * noise)
        psfs.append(_psf(int(p["psf_index"]), psf_blur)[1])
    return params, stamps, psfs


def _render_range_job(args: tuple[int, int, int, int, float]):
    return render_range(*args)


class _StampWriter:
    """Appends stamps to ``..._nK.fits`` files, ``per_file`` HDUs each, counting HDUs from 0."""

    def __init__(self, out: Path, per_file: int) -> None:
        self.out, self.per_file = out, per_file
        self.k, self.hdu = 0, per_file
        self.gal = self.psf = None

    def add(self, stamp: np.ndarray, psf: np.ndarray) -> tuple[str, str, int]:
        import fitsio

        if self.hdu == self.per_file:
            self.close()
            self.k, self.hdu = self.k + 1, 0
            self.gal = fitsio.FITS(str(self.out / image_file_name(self.k)), "rw", clobber=True)
            self.psf = fitsio.FITS(str(self.out / psf_file_name(self.k)), "rw", clobber=True)
        self.gal.write(np.ascontiguousarray(stamp, dtype=np.float32), header=STAMP_HEADER)
        self.psf.write(np.ascontiguousarray(psf, dtype=np.float32), header=STAMP_HEADER)
        self.hdu += 1
        return image_file_name(self.k), psf_file_name(self.k), self.hdu - 1

    def close(self) -> None:
        for f in (self.gal, self.psf):
            if f is not None:
                f.close()
        self.gal = self.psf = None


def _existing_set(out: Path) -> list[Path]:
    """The files of a synthetic set already in ``out``."""
    if not out.is_dir():
        return []
    pat = re.compile(r"^real_galaxy_(images|PSF_images)_synth_n\d+\.fits$")
    names = (CATALOG_NAME, FITS_CATALOG_NAME)
    return sorted(p for p in out.iterdir() if p.name in names or pat.match(p.name))


def _prepare_out(out: Path, overwrite: bool = False) -> None:
    old = _existing_set(out)
    if old and not overwrite:
        raise ConfigError(
            f"--out {out}: folder already holds a synthetic set ({len(old)} files, e.g. {old[0].name}); "
            "pass --overwrite to replace it"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".hpcvae-synth-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    # Catalogs first: a crash half-way must not leave an old catalog pointing into new image files.
    for p in sorted(old, key=lambda p: p.name not in (CATALOG_NAME, FITS_CATALOG_NAME)):
        p.unlink(missing_ok=True)


def _write_table(path: Path, rows: np.ndarray, header: list[dict] | None = None) -> None:
    import fitsio

    tmp = path.with_name(path.name + ".tmp")
    fitsio.write(str(tmp), rows, header=header, clobber=True)
    os.replace(tmp, path)


def _header(cfg: SynthConfig) -> list[dict]:
    items = [
        ("H0", cosmo.H0, "km/s/Mpc, FlatLambdaCDM"),
        ("OM0", cosmo.OM0, "matter density"),
        ("ZPEAK", cosmo.Z_PEAK, "mode of the Smail n(z)"),
        ("RE0KPC", cosmo.RE0_KPC, "median R_e at z=0 (kpc)"),
        ("SIZEEVO", cosmo.SIZE_EVOLUTION, "R_e median ~ (1+z)^-SIZEEVO"),
        ("SIGLNRE", cosmo.SIGMA_LN_RE, "ln-scatter of R_e"),
        ("MABSMEAN", cosmo.ABS_MAG_MEAN, "mean absolute magnitude"),
        ("MABSSIG", cosmo.ABS_MAG_SIGMA, "sigma of absolute magnitude"),
        ("MAGLIM", cosmo.MAG_LIMIT, "apparent magnitude limit"),
        ("ZEROPT", cosmo.ZEROPOINT, "mag = ZEROPT - 2.5 log10(flux)"),
        ("PIXSCALE", PIXEL_SCALE, "arcsec/pixel"),
        ("TRUNC", TRUNC, "profile truncation in hlr units"),
        ("SEED", cfg.seed, "hpcvae.synth --seed"),
        ("NOMSIZE", cfg.size, "hpcvae.synth --size"),
        ("PSFBLUR", cfg.psf_blur, "extra Gaussian PSF sigma (arcsec), hpcvae.synth --psf-blur"),
    ]
    return [{"name": k, "value": v, "comment": c} for k, v, c in items]


def _available_cores() -> int:
    """Cores this process may use: under SLURM/cgroups that is fewer than os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run(cfg: SynthConfig) -> SynthResult:
    """Render ``cfg.n`` galaxies into ``cfg.out``; the catalog is written last, atomically."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    _prepare_out(cfg.out, cfg.overwrite)
    workers = cfg.workers or _available_cores()
    chunk = max(1, min(50, math.ceil(cfg.n / (workers * 8))))
    jobs = [(cfg.seed, s, min(s + chunk, cfg.n), cfg.size, cfg.psf_blur) for s in range(0, cfg.n, chunk)]
    workers = min(workers, len(jobs))

    catalog = np.zeros(cfg.n, dtype=CATALOG_DTYPE)
    truth = np.zeros(cfg.n, dtype=TRUTH_DTYPE)
    writer = _StampWriter(cfg.out, cfg.per_file)
    bar = tqdm(total=cfg.n, unit="gal", desc="hpcvae.synth", disable=not cfg.progress)

    def consume(result) -> None:
        params, stamps, psfs = result
        for p, stamp, psf in zip(params, stamps, psfs):
            i = int(p["IDENT"])
            gal_file, psf_file, hdu = writer.add(stamp, psf)
            catalog[i] = (
                i,
                p["mag"],
                BAND,
                1.0,
                gal_file,
                psf_file,
                hdu,
                hdu,
                PIXEL_SCALE,
                0.0,
                p["noise_variance"],
                float(stamp.sum(dtype=np.float64)),
            )
            truth[i] = tuple(p[name] for name in _TRUTH_NAMES)
        bar.update(len(params))

    try:
        if workers == 1:
            for job in jobs:
                consume(render_range(*job))
        else:
            _run_pool(jobs, workers, consume)
    finally:
        writer.close()
        bar.close()

    catalog_path, fits_path = cfg.out / CATALOG_NAME, cfg.out / FITS_CATALOG_NAME
    _write_table(fits_path, truth, _header(cfg))
    _write_table(catalog_path, catalog)
    return SynthResult(
        catalog=catalog_path,
        fits_catalog=fits_path,
        n=cfg.n,
        n_files=writer.k,
        seconds=time.perf_counter() - t0,
    )


def _run_pool(jobs: list[tuple[int, int, int, int, float]], workers: int, consume) -> None:
    """Render in a process pool, writing results in order with a bounded look-ahead."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: callers (the demo, training code) may have torch threads that fork would copy mid-lock.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        todo = iter(jobs)
        pending: deque = deque(
            pool.submit(_render_range_job, job) for _, job in zip(range(3 * workers), todo)
        )
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_render_range_job, nxt))
            consume(result)


def make_synthetic(
    n: int,
    size: int,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    per_file: int = 1000,
    overwrite: bool = False,
    psf_blur: float = 0.0,
) -> Path:
    """Write a synthetic RealGalaxyCatalog set into ``out``; returns the catalog path."""
    cfg = SynthConfig(n=n, size=size, out=Path(out), seed=seed, workers=workers, progress=progress,
                      per_file=per_file, overwrite=overwrite, psf_blur=psf_blur)  # fmt: skip
    return run(cfg).catalog


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hpcvae.synth", description=__doc__.splitlines()[0])
    table = add_options(ap, SynthConfig)
    cfg = options_from_args(SynthConfig, ap.parse_args(argv), table)
    res = run(cfg)
    print(
        f"hpcvae.synth: wrote {res.n} galaxies ({res.n_files} image files) to {cfg.out} "
        f"in {res.seconds:.1f} s ({res.galaxies_per_s:.0f} galaxies/s)"
    )
    print(f"catalog: {res.catalog}")
    return 0


if __name__ == "__main__":
    run_cli(main, "hpcvae.synth")
