"""``python -m hpcvae.synth``: GalSim galaxies written in the RealGalaxyCatalog layout.

Synthetic sets go through exactly the same ingest as real HST data, so the files mirror
GalSim's COSMOS RealGalaxyCatalog: a catalog table, a ``_fits`` table with ``zphot`` and the
truth, image files of up to ``per_file`` HDUs (one float32 stamp per HDU, counted from 0) and
matching PSF files (PSF HDU k belongs to galaxy HDU k, as in COSMOS).  ``galsim.RealGalaxyCatalog``
opens the result directly.

What the galaxies are is a *family*, one module each (a new family is one module with
``draw_params``, ``render_range``, ``noiseless``, ``header_items`` and its ``TRUTH_DTYPE``, plus a
line in :data:`FAMILIES`):

* ``simple`` (:mod:`hpcvae.synth.simple`): parametric galaxies whose size and flux follow a known
  redshift relation, Airy PSFs, white noise; the truth of the redshift trends.
* ``cosmos`` (:mod:`hpcvae.synth.cosmos`): COSMOS-like galaxies drawn from a density fitted to real
  COSMOS parametric fits, real ACS PSFs, COSMOS correlated noise; a population the models are not
  tuned on.

Every random number of galaxy i comes from ``SeedSequence([seed, i])``, so the output is
identical for any ``--workers``.
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
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

from hpcvae.config import add_options, options_from_args
from hpcvae.errors import ConfigError
from hpcvae.safe_io import signals_as_interrupt
from hpcvae.synth import cosmos, simple
from hpcvae.synth.simple import PIXEL_SCALE, TRUTH_DTYPE, draw_noiseless, draw_params, render_range

__all__ = ["CATALOG_NAME", "FAMILIES", "FITS_CATALOG_NAME", "PIXEL_SCALE", "TRUTH_DTYPE", "SynthConfig",
           "SynthResult", "draw_noiseless", "draw_params", "make_synthetic", "noiseless_stamps", "render_range", "run"]  # fmt: skip

FAMILIES: dict[str, ModuleType] = {"simple": simple, "cosmos": cosmos}
"""Family name -> module (see the module doc for what a family provides)."""
MAX_SIZE = 4096
"""Largest stamp side: a 4096^2 float32 stamp is 64 MB, and --size 200000 would ask for 160 GB."""
MAX_N = 100_000_000
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


def image_file_name(k: int) -> str:
    return f"real_galaxy_images_synth_n{k}.fits"


def psf_file_name(k: int) -> str:
    return f"real_galaxy_PSF_images_synth_n{k}.fits"


@dataclass(kw_only=True)
class SynthConfig:
    n: int
    """Number of galaxies."""
    family: Literal["simple", "cosmos"] = "simple"
    """``simple``: parametric galaxies with a known redshift -> size/flux relation (hpcvae.synth.simple);
    ``cosmos``: COSMOS-like galaxies drawn from a density fitted to 100 real COSMOS fits, with real ACS PSFs
    and COSMOS correlated noise (hpcvae.synth.cosmos)."""
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
        if self.family not in FAMILIES:
            raise ConfigError(f"--family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.size > MAX_SIZE:
            raise ConfigError(f"--size must be <= {MAX_SIZE} pixels, got {self.size}")
        if self.n > MAX_N:
            raise ConfigError(f"--n must be <= {MAX_N}, got {self.n}")
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


class _StampWriter:
    """Appends stamps to ``..._nK.fits`` files, ``per_file`` HDUs each, counting HDUs from 0."""

    def __init__(self, out: Path, per_file: int, header: dict[str, str]) -> None:
        self.out, self.per_file, self.header = out, per_file, header
        self.written: list[Path] = []
        self.k, self.hdu = 0, per_file
        self.gal = self.psf = None

    def add(self, stamp: np.ndarray, psf: np.ndarray) -> tuple[str, str, int]:
        import fitsio

        if self.hdu == self.per_file:
            self.close()
            self.k, self.hdu = self.k + 1, 0
            self.written += [self.out / image_file_name(self.k), self.out / psf_file_name(self.k)]
            self.gal = fitsio.FITS(str(self.out / image_file_name(self.k)), "rw", clobber=True)
            self.psf = fitsio.FITS(str(self.out / psf_file_name(self.k)), "rw", clobber=True)
        self.gal.write(np.ascontiguousarray(stamp, dtype=np.float32), header=self.header)
        self.psf.write(np.ascontiguousarray(psf, dtype=np.float32), header=self.header)
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
    from hpcvae import cosmology

    fam = FAMILIES[cfg.family]
    zp = fam.zeropoint() if hasattr(fam, "zeropoint") else cosmology.ZEROPOINT
    items = [
        ("FAMILY", cfg.family, "hpcvae.synth --family"),
        ("ZEROPT", zp, "mag = ZEROPT - 2.5 log10(flux)"),
        ("PIXSCALE", fam.PIXEL_SCALE, "arcsec/pixel"),
        ("SEED", cfg.seed, "hpcvae.synth --seed"),
        ("NOMSIZE", cfg.size, "hpcvae.synth --size"),
        *fam.header_items(cfg),
    ]
    return [{"name": k, "value": v, "comment": c} for k, v, c in items]


def _available_cores() -> int:
    """Cores this process may use: under SLURM/cgroups that is fewer than os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _render_range_job(args: tuple[str, int, int, int, int, float]):
    family, *rest = args
    return FAMILIES[family].render_range(*rest)


def run(cfg: SynthConfig) -> SynthResult:
    """Render ``cfg.n`` galaxies into ``cfg.out``; the catalog is written last, atomically."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    fam = FAMILIES[cfg.family]
    _prepare_out(cfg.out, cfg.overwrite)
    workers = cfg.workers or _available_cores()
    chunk = max(1, min(50, math.ceil(cfg.n / (workers * 8))))
    jobs = [
        (cfg.family, cfg.seed, s, min(s + chunk, cfg.n), cfg.size, cfg.psf_blur)
        for s in range(0, cfg.n, chunk)
    ]
    workers = min(workers, len(jobs))

    catalog = np.zeros(cfg.n, dtype=CATALOG_DTYPE)
    truth_dtype = fam.TRUTH_DTYPE
    names = [name for name, _ in truth_dtype]
    truth = np.zeros(cfg.n, dtype=truth_dtype)
    writer = _StampWriter(cfg.out, cfg.per_file, fam.STAMP_HEADER)
    bar = tqdm(total=cfg.n, unit="gal", desc="hpcvae.synth", disable=not cfg.progress)

    def consume(result) -> None:
        params, stamps, psfs = result
        for p, stamp, psf in zip(params, stamps, psfs):
            i = int(p["IDENT"])
            gal_file, psf_file, hdu = writer.add(stamp, psf)
            catalog[i] = (i, p["mag"], fam.BAND, 1.0, gal_file, psf_file, hdu, hdu, fam.PIXEL_SCALE, 0.0,
                          p["noise_variance"], float(stamp.sum(dtype=np.float64)))  # fmt: skip
            truth[i] = tuple(p[name] for name in names)
        bar.update(len(params))

    try:
        with signals_as_interrupt(f"hpcvae.synth {cfg.out}"):
            if workers == 1:
                for job in jobs:
                    consume(_render_range_job(job))
            else:
                _run_pool(jobs, workers, consume)
    except BaseException:
        writer.close()
        for p in writer.written:  # an interrupted set is removed: no catalog points at half-written files
            p.unlink(missing_ok=True)
        raise
    finally:
        writer.close()
        bar.close()

    catalog_path, fits_path = cfg.out / CATALOG_NAME, cfg.out / FITS_CATALOG_NAME
    _write_table(fits_path, truth, _header(cfg))
    _write_table(catalog_path, catalog)
    return SynthResult(catalog=catalog_path, fits_catalog=fits_path, n=cfg.n, n_files=writer.k,
                       seconds=time.perf_counter() - t0)  # fmt: skip


def _run_pool(jobs: list[tuple[str, int, int, int, int, float]], workers: int, consume) -> None:
    """Render in a process pool, writing results in order with a bounded look-ahead."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: callers (the demo, training code) may have torch threads that fork would copy mid-lock.
    from hpcvae.shards.ingest import stop_pool

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        todo = iter(jobs)
        pending: deque = deque(
            pool.submit(_render_range_job, job) for _, job in zip(range(3 * workers), todo)
        )
        try:
            while pending:
                result = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(_render_range_job, nxt))
                consume(result)
        except BaseException:
            stop_pool(pool, list(pending))
            raise


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
    family: str = "simple",
) -> Path:
    """Write a synthetic RealGalaxyCatalog set into ``out``; returns the catalog path."""
    cfg = SynthConfig(n=n, size=size, out=Path(out), seed=seed, workers=workers, progress=progress,
                      per_file=per_file, overwrite=overwrite, psf_blur=psf_blur, family=family)  # fmt: skip
    return run(cfg).catalog


def noiseless_stamps(
    manifest: Any, metas: Sequence[dict[str, Any]], baseline: bool = False
) -> np.ndarray | None:
    """The shards' galaxies without noise, redrawn from their synthetic catalog and cut as the shards were.

    ``metas`` are the samples' meta.json; returns (N, S, S) float32 in the shards' pixels, or None
    when the set is not a readable ``hpcvae.synth`` set (its catalog moved, another generator).
    ``baseline``: each galaxy's best-fit single Sérsic profile instead (families with such fits: cosmos).
    """
    import fitsio

    from hpcvae.shards.ingest import fit_to_size

    src = manifest.data.get("source") or {}
    fits_path = src.get("fits_catalog")
    if not fits_path or not Path(fits_path).is_file():
        return None
    header = fitsio.read_header(str(fits_path), ext=1)
    family = FAMILIES.get(str(header.get("FAMILY", "simple")).strip())
    if family is None or "SEED" not in header or "NOMSIZE" not in header:
        return None
    draw = getattr(family, "baseline" if baseline else "noiseless", None)
    if draw is None:
        return None
    size = manifest.image_size
    return np.stack([fit_to_size(draw(header, int(m["ident"])), size) for m in metas])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hpcvae.synth", description=__doc__.splitlines()[0])
    table = add_options(ap, SynthConfig)
    cfg = options_from_args(SynthConfig, ap.parse_args(argv), table)
    res = run(cfg)
    print(
        f"hpcvae.synth: wrote {res.n} {cfg.family} galaxies ({res.n_files} image files) to {cfg.out} "
        f"in {res.seconds:.1f} s ({res.galaxies_per_s:.0f} galaxies/s)"
    )
    print(f"catalog: {res.catalog}")
    return 0
