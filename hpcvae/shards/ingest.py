"""The build: sources' rows -> shard jobs (in worker processes) -> shards + manifest.

Training on a cluster reads tens of thousands of galaxies per second; random access
into hundreds of multi-extension FITS files on a parallel file system cannot keep up,
sequential tar shards can.  Shards hold the *physical* float32 pixels so the
normalisation stays a choice of the training run (``hpcvae.transforms``), and the
manifest carries the per-shard counts the loader needs for exact epochs.

Crash safety: every shard is written under a temporary name and renamed only after the
whole set is written; the manifest is written last, atomically.  A folder with a
``manifest.json`` therefore always holds a complete shard set.

A source (a module named in :data:`SOURCES`) turns its input into :class:`Row` records and a
:class:`Source`, and reads stamps for a :class:`Job` with ``iter_images``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import os
import re
import sys
import time
import uuid
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hpcvae.errors import ConfigError, HpcvaeError, ShardError
from hpcvae.safe_io import signals_as_interrupt
from hpcvae.shards.format import PSF_MEAN, WIDS_SUFFIX, ShardWriter, sample_key
from hpcvae.shards.manifest import (
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    PixelStats,
    manifest_record,
    shard_name,
    write_manifest,
)
from hpcvae.shards.physics import add_psf, pad_psf, physics_record, rounding

MAX_STATS_PIXELS = 4_000_000
MAX_SIZE = 4096
"""Largest stamp side: 4096^2 float32 is 64 MB a stamp (--size 2000000 would ask for 16 TB)."""
SENTINELS = (-9999.0, -999.0, -99.0, 99.0, 999.0, 9999.0)
PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
"""Percentiles of each condition's train values recorded in the manifest (and model.json)."""

MIN_STATS_PIXELS_PER_GALAXY = 16

F16_MAX = 65504.0

SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")

TMP_PREFIX = ".tmp-"


SOURCES: dict[str, str] = {
    "rgc": "hpcvae.shards.rgc",
    "h5": "hpcvae.shards.h5",
}
"""Data sources: kind -> module.  A source module has ``iter_images(job)``, ``header_info(job)``,
``close_readers()`` (the worker side) and ``SELECT``, ``add_arguments(parser, select)``,
``from_args(args, cfg)`` (``python -m hpcvae.shard``); a new source is one file plus its line here."""


def source_module(kind: str) -> Any:
    """The module of source ``kind`` (imported on first use, in whichever process reads)."""
    if kind not in SOURCES:
        raise ShardError(f"unknown shard source {kind!r} (known: {', '.join(SOURCES)})")
    return importlib.import_module(SOURCES[kind])


@dataclass(kw_only=True)
class ShardConfig:
    """Options shared by the FITS and h5 ingest paths."""

    size: int = 158
    """Output stamp side; stamps are centre-cropped or padded to it."""
    val_fraction: float = 0.1
    """Share of galaxies in the val split (by a hash of each galaxy's identity: stable when rows are added)."""
    shard_size: int = 1000
    """Samples per shard; 1000 x 158^2 float32 is ~100 MB, WebDataset's sweet spot."""
    workers: int = 1
    """Worker processes (0 = all cores)."""
    pad: Literal["zeros", "noise"] = "zeros"
    """Fill for stamps smaller than ``size``: zeros, or noise of the galaxy's NOISE_VARIANCE."""
    skip_bad: bool = False
    """Skip (and record in the manifest) unreadable, non-finite or duplicate rows instead of stopping."""
    overwrite: bool = False
    """Replace a shard set already in the output folder."""
    verbose: bool = False
    """Progress per shard on stderr."""
    band: str | None = None
    """Filter band (e.g. F814W) for model.json; default: the catalog's BAND column, else the FITS FILTER."""
    instrument: str | None = None
    """Telescope/instrument (e.g. HST/ACS); default: the stamps' TELESCOP/INSTRUME header keywords."""
    bunit: str | None = None
    """Flux unit of the pixels; default: the stamps' BUNIT header keyword."""
    pixel_scale: float | None = None
    """Arcsec per pixel where the catalog has no PIXEL_SCALE column."""
    psfs: bool = True
    """Copy each galaxy's PSF (PSF_FILENAME/PSF_HDU) into the shards; ``--no-psfs`` ignores those columns."""
    conditions: list[str] = field(default_factory=list)
    """Catalog columns (of the catalog or its ``_fits.fits`` sibling) carried as the galaxies' conditions, e.g.
    ``zphot,mag_auto,flux_radius``; the redshift column is always one of them when the set has redshifts. NaN,
    the usual sentinels (+-99, +-999, +-9999), a negative redshift, a magnitude outside (0, 40) or a radius that
    is not positive are row errors (skipped and recorded with --skip-bad)."""
    zeropoint: float | None = None
    """Magnitude zeropoint of the pixels (mag = zeropoint - 2.5 log10 flux); default: the catalog's ZEROPT header,
    else the median of MAG + 2.5 log10(stamp_flux) when the catalog has both columns."""
    dtype: Literal["float32", "float16"] = "float32"
    """Pixel storage. ``float16`` halves the disk (314k x 158^2: 15.7 GB, the GPU-resident copy's size); the
    rounding error against the noise level is recorded in the manifest (``image.rounding``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"size must be a positive integer, got {self.size!r}")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ConfigError(f"shard_size must be a positive integer, got {self.shard_size!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0 = all cores), got {self.workers!r}")
        if self.workers == 0:
            self.workers = (
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            )
        if self.pad not in ("zeros", "noise"):
            raise ConfigError(f"pad must be 'zeros' or 'noise', got {self.pad!r}")
        if self.size > MAX_SIZE:
            raise ConfigError(f"size must be <= {MAX_SIZE} pixels, got {self.size}")
        bad = [c for c in self.conditions if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", c)]
        if bad:
            raise ConfigError(f"--conditions: {bad[0]!r} is not a column name")
        if len(set(c.lower() for c in self.conditions)) != len(self.conditions):
            raise ConfigError(f"--conditions: a column is named twice in {','.join(self.conditions)}")
        if self.zeropoint is not None and not (math.isfinite(self.zeropoint) and 0 < self.zeropoint < 50):
            raise ConfigError(f"--zeropoint must be a finite magnitude in (0, 50), got {self.zeropoint}")


def identity_digest(ident: str, file: str, hdu: int) -> bytes:
    """The galaxy's identity, independent of its row, so appending rows moves nothing."""
    return hashlib.sha256(f"{ident}:{file}:{hdu}".encode()).digest()


def split_of(digest: bytes, val_fraction: float) -> str:
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "val" if u < val_fraction else "train"


def seed_of(digest: bytes) -> int:
    return int.from_bytes(digest[8:16], "big")


def config_kwargs(cfg: ShardConfig) -> dict[str, Any]:
    """``cfg``'s fields as the keyword arguments every source's ``build_shards*`` takes."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ShardConfig)}


@dataclass(kw_only=True)
class Row:
    row: int
    ident: str
    file: str
    hdu: int
    seed: int
    zphot: float | None
    mag: float | None
    pixel_scale: float | None
    noise_variance: float | None
    band: str | None = None
    psf_file: str | None = None
    psf_hdu: int | None = None
    conditions: dict[str, float] | None = None
    """The row's condition values (``ShardConfig.conditions``), checked by :func:`condition_problem`."""


@dataclass(kw_only=True)
class Job:
    split: str
    index: int
    tmp_path: str
    kind: str
    """The source's name in :data:`SOURCES`: its module reads the stamps (``iter_images``)."""
    source: str
    """Where the source lives (``Source.location``: the catalog folder, the h5 file)."""
    options: dict[str, Any] = field(default_factory=dict)
    """``Source.options``: what the reader needs besides the rows (e.g. h5's image dataset)."""
    rows: list[Row]
    size: int
    pad: str
    skip_bad: bool
    stats_pixels: int
    """Pixels per galaxy sampled for the percentiles; 0 = no stats (val)."""
    dtype: str = "float32"
    """Pixel storage: ``float32``, or ``float16`` (half the disk, rounding error recorded)."""


@dataclass(kw_only=True)
class JobResult:
    split: str
    index: int
    tmp_path: str
    count: int
    sha256: str
    skipped: list[dict[str, Any]]
    stats: PixelStats = field(default_factory=PixelStats)
    """Partial statistics of the train pixels this shard holds (merged by the build)."""
    psf_sum: np.ndarray | None = None
    """Sum of the (unit-sum) PSFs of this shard's galaxies, padded to the largest side among them."""
    psf_n: int = 0
    round_max: float = 0.0
    """float16 shards: the largest and summed squared rounding error of the pixels (physical units)."""
    round_sq: float = 0.0
    round_n: int = 0
    header: dict[str, str] = field(default_factory=dict)
    """BUNIT, TELESCOP, INSTRUME, FILTER of the first stamp's FITS header."""


def condition_problem(name: str, value: float, *, redshift: bool = False) -> str | None:
    """Why ``value`` cannot be a condition of a galaxy, or None; the rules are ShardConfig.conditions' doc."""
    low = name.lower()
    redshift = redshift or low in ("z", "zphot", "zspec", "redshift", "photo_z")
    what = f"{'redshift' if redshift else 'condition'} {name}"
    if not math.isfinite(value):
        return f"{what} is {value} (not finite)"
    if any(abs(value - s) < 1e-6 * abs(s) for s in SENTINELS):
        return f"{what} is {value:g}, a missing-value sentinel"
    if redshift and not 0 <= value < 20:
        return f"{what} is {value:g}, not a redshift (must be in [0, 20))"
    if "mag" in low and not 0 < value < 40:
        return f"{what} is {value:g}, not a magnitude (must be in (0, 40))"
    if any(k in low for k in ("radius", "hlr", "size", "r_e")) and not value > 0:
        return f"{what} is {value:g}, not a radius (must be > 0)"
    return None


def condition_stats(values: np.ndarray) -> dict[str, Any]:
    """min, max, mean, std and :data:`PERCENTILES` of one condition's train values."""
    v = np.asarray(values, dtype=np.float64)
    if not v.size:
        return {}
    return {"n": int(v.size), "min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
            "std": float(v.std()), "percentiles": {str(q): float(np.percentile(v, q)) for q in PERCENTILES}}  # fmt: skip


def row_error(problem: str, r: Row, source: str) -> HpcvaeError:
    err = ShardError(f"{source}, row {r.row}: {problem}")
    err.problem = problem
    return err


def skip_record(r: Row, reason: str) -> dict[str, Any]:
    return {"row": r.row, "ident": r.ident, "file": r.file, "hdu": r.hdu, "reason": reason}


def run_job(job: Job) -> JobResult:
    """Write one shard to its temporary name; returns counts, digest, skips and stats partials."""
    source = source_module(job.kind)
    res = JobResult(split=job.split, index=job.index, tmp_path=job.tmp_path, count=0, sha256="", skipped=[])
    try:
        tar = ShardWriter(job.tmp_path)
        try:
            for r, img, psf in source.iter_images(job):
                write_row(job, tar, res, r, img, psf)
        except BaseException:
            tar.abort()
            raise
        res.sha256 = tar.close()
        res.header = source.header_info(job)
    except BaseException:
        Path(job.tmp_path).unlink(missing_ok=True)
        raise
    return res


def write_row(job: Job, tar: ShardWriter, res: JobResult, r: Row, img: Any, psf: Any = None) -> None:
    for bad in (img, psf):
        if bad is not None and not isinstance(bad, np.ndarray):
            if not job.skip_bad:
                raise bad
            res.skipped.append(skip_record(r, bad.problem))
            return
    if psf is not None:
        total = float(psf.sum(dtype=np.float64))
        if not total > 0:
            problem = f"PSF {r.psf_file} HDU {r.psf_hdu} sums to {total:g}; a PSF must have positive flux"
            if not job.skip_bad:
                raise row_error(problem, r, job.source)
            res.skipped.append(skip_record(r, problem))
            return
        psf = (psf / total).astype(np.float32)
        psf = pad_psf(psf, max(psf.shape))  # square, centre kept; the loader pads to the set's largest side
    if not np.any(img):
        problem = "the stamp is all zeros (no galaxy, a blank cutout)"
        if not job.skip_bad:
            raise row_error(problem, r, job.source)
        res.skipped.append(skip_record(r, problem))
        return
    try:
        out = fit_to_size(img, job.size, pad=job.pad, noise_variance=r.noise_variance, seed=r.seed)
    except ValueError as exc:
        if not job.skip_bad:
            raise row_error(str(exc), r, job.source) from None
        res.skipped.append(skip_record(r, str(exc)))
        return
    if job.dtype == "float16":
        if np.abs(out).max() > F16_MAX:
            problem = f"a pixel of {float(np.abs(out).max()):.6g} exceeds float16's range ({F16_MAX}); use --dtype float32"
            if not job.skip_bad:
                raise row_error(problem, r, job.source)
            res.skipped.append(skip_record(r, problem))
            return
        half = out.astype(np.float16)
        err = half.astype(np.float64) - out
        res.round_max = max(res.round_max, float(np.abs(err).max()))
        res.round_sq += float(np.square(err).sum())
        res.round_n += err.size
        out = half.astype(np.float32)  # what the loader will read: the statistics describe it
    meta = {
        "ident": r.ident,
        "row": r.row,
        "zphot": r.zphot,
        "mag": r.mag,
        "pixel_scale": r.pixel_scale,
        "noise_variance": r.noise_variance,
        "orig_shape": [int(img.shape[0]), int(img.shape[1])],
        "file": r.file,
        "hdu": r.hdu,
        "psf_file": r.psf_file if psf is not None else None,
        "psf_hdu": r.psf_hdu if psf is not None else None,
    }
    if r.conditions is not None:
        meta["conditions"] = r.conditions
    tar.add_sample(sample_key(r.row), half if job.dtype == "float16" else out, meta, psf=psf)
    res.count += 1
    if psf is not None:
        res.psf_sum = add_psf(res.psf_sum, psf)
        res.psf_n += 1
    if job.stats_pixels:
        flat = out.ravel()
        if job.stats_pixels < flat.size:
            flat = flat[np.random.default_rng(r.seed ^ 0x5EED).integers(0, flat.size, job.stats_pixels)]
        res.stats.add(out, sample=flat, noise_variance=r.noise_variance)


@dataclass(kw_only=True)
class Source:
    kind: str
    """Its name in :data:`SOURCES`."""
    location: str
    rows: list[Row]
    n_rows: int
    pre_skipped: list[dict[str, Any]]
    has_redshift: bool
    redshift_column: str | None
    source_info: dict[str, Any]
    """The manifest's ``source`` record (kind, files and their sha256)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Handed to every :class:`Job` (picklable): what ``iter_images`` needs besides the rows."""
    psf_in_images: bool | None = None
    """The stamps are observed, PSF-convolved images (True for a RealGalaxyCatalog); None = unknown."""
    conditions: list[dict[str, Any]] = field(default_factory=list)
    """One record per condition (name, column, table, unit), in the order of each row's ``conditions``."""
    zeropoint: tuple[float, str] | None = None
    """(zeropoint, where it came from), when the source knows one."""


def check_out(out: Path, overwrite: bool) -> list[Path]:
    """Refuse to mix a new shard set into an old one; returns the old files to replace."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: output exists and is not a folder")
    if not out.exists():
        return []
    old = [p for p in out.iterdir() if p.name == MANIFEST_NAME or p.suffix == ".tar"]
    if old and not overwrite:
        n_tar = sum(p.suffix == ".tar" for p in old)
        has_manifest = any(p.name == MANIFEST_NAME for p in old)
        what = ", ".join(
            x for x in (MANIFEST_NAME if has_manifest else "", f"{n_tar} .tar file(s)" if n_tar else "") if x
        )
        raise ShardError(f"{out}: folder already holds shards ({what}); pass --overwrite to replace them")
    extras = [p for p in out.iterdir() if p.name == PSF_MEAN or p.name.endswith(WIDS_SUFFIX)]
    return [
        p for p in old if p.name == MANIFEST_NAME or SHARD_RE.match(p.name) or p.name.startswith(TMP_PREFIX)
    ] + extras


def build(src: Source, out: Path, cfg: ShardConfig) -> Manifest:
    t0 = time.perf_counter()
    out = Path(out).resolve()
    old = check_out(out, cfg.overwrite)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)

    by_split: dict[str, list[Row]] = {s: [] for s in SPLITS}
    for r in src.rows:
        by_split[split_of(identity_digest(r.ident, r.file, r.hdu), cfg.val_fraction)].append(r)
    n_train = len(by_split["train"])
    stats_pixels = max(MIN_STATS_PIXELS_PER_GALAXY, MAX_STATS_PIXELS // max(n_train, 1))

    token = uuid.uuid4().hex[:12]
    jobs: list[Job] = []
    for split in SPLITS:
        rows = by_split[split]
        for i in range(0, len(rows), cfg.shard_size):
            jobs.append(
                Job(
                    split=split,
                    index=i // cfg.shard_size,
                    tmp_path=str(out / f"{TMP_PREFIX}{token}-{split}-{i // cfg.shard_size:06d}.tar"),
                    kind=src.kind,
                    source=src.location,
                    options=src.options,
                    rows=rows[i : i + cfg.shard_size],
                    size=cfg.size,
                    pad=cfg.pad,
                    skip_bad=cfg.skip_bad,
                    stats_pixels=stats_pixels if split == "train" else 0,
                    dtype=cfg.dtype,
                )
            )

    results: list[JobResult] = []
    with signals_as_interrupt(f"hpcvae.shard {out}"):
        try:
            if cfg.workers <= 1 or len(jobs) <= 1:
                try:
                    for job in jobs:
                        results.append(run_job(job))
                        progress(cfg, results, jobs, t0)
                finally:
                    _close_all_readers()
            else:
                with ProcessPoolExecutor(
                    max_workers=min(cfg.workers, len(jobs)), mp_context=get_context("spawn")
                ) as ex:
                    futures: list[Future[JobResult]] = [ex.submit(run_job, j) for j in jobs]
                    try:
                        for fut in futures:
                            results.append(fut.result())
                            progress(cfg, results, jobs, t0)
                    except BaseException:
                        stop_pool(ex, futures)
                        raise
            return _finish(src, out, cfg, results, old, t0)
        finally:
            for p in out.glob(f"{TMP_PREFIX}{token}-*"):
                p.unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()


def stop_pool(ex: ProcessPoolExecutor, futures: list[Future[Any]]) -> None:
    """Cancel what has not started and end the worker processes now (an interrupted build must not leave
    workers writing shards behind it); the caller removes their temp files."""
    import multiprocessing

    for fut in futures:
        fut.cancel()
    ex.shutdown(wait=False, cancel_futures=True)
    for child in multiprocessing.active_children():
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(timeout=10)


def progress(cfg: ShardConfig, results: list[JobResult], jobs: list[Job], t0: float) -> None:
    if cfg.verbose:
        done = sum(len(j.rows) for j in jobs[: len(results)])
        rate = done / max(time.perf_counter() - t0, 1e-9)
        print(
            f"hpcvae.shard: {len(results)}/{len(jobs)} shards, {done} rows, {rate:.0f} rows/s",
            file=sys.stderr,
        )


def _finish(
    src: Source, out: Path, cfg: ShardConfig, results: list[JobResult], old: list[Path], t0: float
) -> Manifest:
    skipped = sorted(src.pre_skipped + [s for r in results for s in r.skipped], key=lambda s: s["row"])
    train = [r for r in results if r.split == "train"]
    if sum(r.count for r in train) == 0:
        reasons: dict[str, int] = {}
        for sk in skipped:
            reasons[sk["reason"]] = reasons.get(sk["reason"], 0) + 1
        summary = "; ".join(f"{n} x {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        first = (
            f" (first: row {skipped[0]['row']}, {skipped[0]['file']}, HDU {skipped[0]['hdu']})"
            if skipped
            else ""
        )
        raise ShardError(
            f"{src.source_info['catalog']}: no usable train galaxies: {src.n_rows} rows, "
            f"{len(skipped)} skipped{': ' + summary if summary else ''}{first}"
        )
    stats = PixelStats()
    for r in train:
        stats.merge(r.stats)

    # Replace the old set only now that the new one is complete: manifest first, so a
    # crash in between leaves "no shard set", never a manifest pointing at wrong shards.
    for name in [p for p in old if p.name == MANIFEST_NAME] + [p for p in old if p.name != MANIFEST_NAME]:
        name.unlink(missing_ok=True)
    splits: dict[str, Any] = {}
    for split in SPLITS:
        shards = []
        for r in (r for r in results if r.split == split):
            if r.count == 0:
                Path(r.tmp_path).unlink(missing_ok=True)
                continue
            name = shard_name(split, len(shards))
            os.replace(r.tmp_path, out / name)
            shards.append({"name": name, "count": r.count, "sha256": r.sha256})
        splits[split] = {"count": sum(s["count"] for s in shards), "shards": shards}

    physics = physics_record(src, cfg, results, stats.to_dict(), out)
    dropped = {sk["row"] for sk in skipped}
    train_rows = [r for r in src.rows if r.row not in dropped
                  and split_of(identity_digest(r.ident, r.file, r.hdu), cfg.val_fraction) == "train"]  # fmt: skip
    conditions = [{**c, "train": condition_stats(np.array([r.conditions[c["name"]] for r in train_rows
                                                             if r.conditions]))} for c in src.conditions]  # fmt: skip
    data = manifest_record(
        size=cfg.size, splits=splits, stats=stats.to_dict(), source=src.source_info,
        has_redshift=src.has_redshift, redshift_column=src.redshift_column, n_rows=src.n_rows,
        skipped=skipped, pad=cfg.pad, val_fraction=cfg.val_fraction, shard_size=cfg.shard_size,
        build_seconds=round(time.perf_counter() - t0, 3), physics=physics, dtype=cfg.dtype, conditions=conditions,
    )  # fmt: skip
    if cfg.dtype == "float16":
        data["image"]["rounding"] = rounding(results, physics.get("noise_std"))
    return write_manifest(out, data)


def _close_all_readers() -> None:
    for kind in SOURCES:
        source_module(kind).close_readers()


def fit_to_size(
    img: np.ndarray,
    size: int,
    *,
    pad: str = "zeros",
    noise_variance: float | None = None,
    seed: int | None = None,
) -> np.ndarray:
    """Centre-crop or pad each axis independently to ``size`` (stamps are often non-square).

    Noise padding draws Gaussian noise of the row's NOISE_VARIANCE from a generator seeded
    by the row, so shards are reproducible; padding with zeros next to a noisy stamp leaves
    a sharp edge the VAE would otherwise learn.
    """
    h, w = img.shape
    out = np.zeros((size, size), dtype=np.float32)
    if pad == "noise":
        if noise_variance is None or not np.isfinite(noise_variance) or noise_variance < 0:
            raise ValueError(
                f"noise padding needs a finite, non-negative NOISE_VARIANCE (got {noise_variance})"
            )
        if h < size or w < size:
            rng = np.random.default_rng(seed)
            out[:] = rng.normal(0.0, np.sqrt(noise_variance), size=(size, size)).astype(np.float32)
    elif pad != "zeros":
        raise ValueError(f"pad must be 'zeros' or 'noise', got {pad!r}")

    def span(n: int) -> tuple[slice, slice]:
        if n >= size:
            s = (n - size) // 2
            return slice(s, s + size), slice(0, size)
        p = (size - n) // 2
        return slice(0, n), slice(p, p + n)

    src_y, dst_y = span(h)
    src_x, dst_x = span(w)
    out[dst_y, dst_x] = img[src_y, src_x]
    return out
