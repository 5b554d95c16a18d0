"""``python -m hpcvae.shard``: RealGalaxyCatalog FITS (or the seed's h5) -> WebDataset shards.

Training on a cluster reads tens of thousands of galaxies per second; random access
into hundreds of multi-extension FITS files on a parallel file system cannot keep up,
sequential tar shards can.  Shards hold the *physical* float32 pixels so the
normalisation stays a choice of the training run (``hpcvae.transforms``), and the
manifest carries the per-shard counts the loader needs for exact epochs.

Crash safety: every shard is written under a temporary name and renamed only after the
whole set is written; the manifest is written last, atomically.  A folder with a
``manifest.json`` therefore always holds a complete shard set.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np

import hpcvae
from hpcvae.errors import CatalogError, ConfigError, FitsReadError, HpcvaeError, ShardError
from hpcvae.fitsio_io import RGCCatalog, StampReader, fit_to_size, read_catalog
from hpcvae.manifest import FORMAT, MANIFEST_NAME, Manifest, sha256_file

SPLITS = ("train", "val")
MAX_STATS_PIXELS = 4_000_000
"""Bound on the pixel subsample behind the manifest's percentiles (16 MB), whatever N is."""
MIN_STATS_PIXELS_PER_GALAXY = 16
SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")
TMP_PREFIX = ".tmp-"
PERCENTILES = (0.1, 1.0, 5.0, 50.0, 95.0, 99.0, 99.9)


@dataclass(kw_only=True)
class ShardConfig:
    """Options shared by the FITS and h5 ingest paths."""

    size: int = 158
    val_fraction: float = 0.1
    shard_size: int = 1000
    """Samples per shard; 1000 x 158^2 float32 is ~100 MB, WebDataset's sweet spot."""
    workers: int = 1
    pad: Literal["zeros", "noise"] = "zeros"
    skip_bad: bool = False
    overwrite: bool = False
    verbose: bool = False

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


# -- identity, split and seeds ---------------------------------------------------------------


def identity_digest(ident: str, file: str, hdu: int) -> bytes:
    """The galaxy's identity, independent of its row, so appending rows moves nothing."""
    return hashlib.sha256(f"{ident}:{file}:{hdu}".encode()).digest()


def split_of(digest: bytes, val_fraction: float) -> str:
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "val" if u < val_fraction else "train"


def seed_of(digest: bytes) -> int:
    return int.from_bytes(digest[8:16], "big")


def sample_key(row: int) -> str:
    return f"g{row:09d}"


# -- jobs (one per output shard; run in worker processes) -------------------------------------


@dataclass(kw_only=True)
class _Row:
    row: int
    ident: str
    file: str
    hdu: int
    seed: int
    zphot: float | None
    mag: float | None
    pixel_scale: float | None
    noise_variance: float | None


@dataclass(kw_only=True)
class _Job:
    split: str
    index: int
    tmp_path: str
    kind: Literal["rgc", "h5"]
    source: str
    """Catalog folder (rgc) or h5 file (h5)."""
    h5_images: str | None
    rows: list[_Row]
    size: int
    pad: str
    skip_bad: bool
    stats_pixels: int
    """Pixels per galaxy sampled for the percentiles; 0 = no stats (val)."""


@dataclass(kw_only=True)
class _JobResult:
    split: str
    index: int
    tmp_path: str
    count: int
    sha256: str
    skipped: list[dict[str, Any]]
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    vmin: float = math.inf
    vmax: float = -math.inf
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    noise_vars: list[float] = field(default_factory=list)


class _TarShardWriter:
    """A plain (ustar) tar writer that hashes while writing.

    ``tarfile``'s stream mode copies every member through 10 kB chunks; writing
    header + data + padding in one call is ~2x faster per galaxy, and computing the
    sha256 on the way out saves re-reading the shard.  Fixed member metadata (mtime 0,
    no owner) makes shards byte-reproducible from the same input.
    """

    def __init__(self, path: str) -> None:
        self.f = open(path, "wb", buffering=1 << 20)  # closed in close() / abort()
        self.h = hashlib.sha256()
        self.size = 0

    def _write(self, b: bytes) -> None:
        self.h.update(b)
        self.f.write(b)
        self.size += len(b)

    def add(self, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mode = 0o444
        header = ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
        self._write(header + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))

    def close(self) -> str:
        """Write the end-of-archive blocks (padded to a whole record, like tarfile) and return the sha256."""
        end = 2 * tarfile.BLOCKSIZE
        end += -(self.size + end) % tarfile.RECORDSIZE
        self._write(b"\0" * end)
        self.f.close()
        return self.h.hexdigest()

    def abort(self) -> None:
        self.f.close()


_NPY_HEADERS: dict[tuple[int, int], bytes] = {}


def _npy_bytes(img: np.ndarray) -> bytes:
    """``.npy`` file bytes; the header is cached per shape because all samples share it."""
    header = _NPY_HEADERS.get(img.shape)
    if header is None:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.zeros(img.shape, "<f4"), allow_pickle=False)
        header = buf.getvalue()[: -img.nbytes]
        _NPY_HEADERS[img.shape] = header
    return header + img.tobytes()


_READER: StampReader | None = None
_H5_FILES: dict[str, Any] = {}


def _reader() -> StampReader:
    global _READER
    if _READER is None:
        _READER = StampReader()
    return _READER


def _close_readers() -> None:
    global _READER
    if _READER is not None:
        _READER.close()
        _READER = None
    for f in _H5_FILES.values():
        f.close()
    _H5_FILES.clear()


def _h5_dataset(path: str, name: str) -> Any:
    import h5py

    f = _H5_FILES.get(path)
    if f is None:
        f = _H5_FILES[path] = h5py.File(path, "r")
    return f[name]


def _row_error(problem: str, r: _Row, source: str) -> HpcvaeError:
    err = ShardError(f"{source}, row {r.row}: {problem}")
    err.problem = problem
    return err


def _iter_images(job: _Job):
    """Yield (row, stamp or exception) in row order."""
    if job.kind == "rgc":
        reader = _reader()
        root = Path(job.source)
        for r in job.rows:
            try:
                yield r, reader.read(root / r.file, r.hdu, row=r.row)
            except FitsReadError as exc:
                yield r, exc
        return
    dset = _h5_dataset(job.source, job.h5_images or "")
    lo, hi = job.rows[0].row, job.rows[-1].row + 1
    block = np.asarray(dset[lo:hi])
    block = block.reshape(block.shape[0], *_h5_image_shape(block.shape))
    for r in job.rows:
        img = np.ascontiguousarray(block[r.row - lo], dtype="<f4")
        finite = np.isfinite(img)
        if not finite.all():
            yield (
                r,
                _row_error(
                    f"{img.size - np.count_nonzero(finite)} NaN/inf pixel(s) of {img.size}", r, job.source
                ),
            )
        else:
            yield r, img


def _h5_image_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """Per-sample 2-D shape of an N x H x W (or N x 1 x H x W / N x H x W x 1) dataset."""
    rest = [d for i, d in enumerate(shape[1:]) if not (d == 1 and len(shape) == 4 and i in (0, 2))]
    return int(rest[0]), int(rest[1])


def _run_job(job: _Job) -> _JobResult:
    """Write one shard to its temporary name; returns counts, digest, skips and stats partials."""
    res = _JobResult(split=job.split, index=job.index, tmp_path=job.tmp_path, count=0, sha256="", skipped=[])
    samples: list[np.ndarray] = []
    try:
        tar = _TarShardWriter(job.tmp_path)
        try:
            for r, img in _iter_images(job):
                _write_row(job, tar, res, samples, r, img)
        except BaseException:
            tar.abort()
            raise
        res.sha256 = tar.close()
    except BaseException:
        Path(job.tmp_path).unlink(missing_ok=True)
        raise
    if samples:
        res.samples = np.concatenate(samples)
    return res


def _write_row(
    job: _Job, tar: _TarShardWriter, res: _JobResult, samples: list[np.ndarray], r: _Row, img: Any
) -> None:
    if not isinstance(img, np.ndarray):
        if not job.skip_bad:
            raise img
        res.skipped.append(_skip_record(r, img.problem))
        return
    try:
        out = fit_to_size(img, job.size, pad=job.pad, noise_variance=r.noise_variance, seed=r.seed)
    except ValueError as exc:
        if not job.skip_bad:
            raise _row_error(str(exc), r, job.source) from None
        res.skipped.append(_skip_record(r, str(exc)))
        return
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
    }
    key = sample_key(r.row)
    tar.add(f"{key}.image.npy", _npy_bytes(out))
    tar.add(f"{key}.meta.json", json.dumps(meta, sort_keys=True).encode())
    res.count += 1
    if job.stats_pixels:
        _accumulate(res, out)
        if r.noise_variance is not None and r.noise_variance >= 0:
            res.noise_vars.append(r.noise_variance)
        npix = out.size
        if job.stats_pixels >= npix:
            samples.append(out.ravel())
        else:
            idx = np.random.default_rng(r.seed ^ 0x5EED).integers(0, npix, job.stats_pixels)
            samples.append(out.ravel()[idx])


def _skip_record(r: _Row, reason: str) -> dict[str, Any]:
    return {"row": r.row, "ident": r.ident, "file": r.file, "hdu": r.hdu, "reason": reason}


def _accumulate(res: _JobResult, img: np.ndarray) -> None:
    """Chan et al. parallel mean/variance merge: exact over all pixels, stable in float64."""
    d = img.ravel().astype(np.float64)
    n_b = d.size
    m_b = float(d.mean())
    d -= m_b
    # einsum, not d @ d: BLAS threads on a busy node turn a 25k-element dot into milliseconds.
    m2_b = float(np.einsum("i,i->", d, d))
    _merge(res, n_b, m_b, m2_b, float(img.min()), float(img.max()))


def _merge(acc: _JobResult, n_b: int, m_b: float, m2_b: float, lo: float, hi: float) -> None:
    n = acc.n + n_b
    if n == 0:
        return
    delta = m_b - acc.mean
    acc.mean += delta * n_b / n
    acc.m2 += m2_b + delta * delta * acc.n * n_b / n
    acc.n = n
    acc.vmin = min(acc.vmin, lo)
    acc.vmax = max(acc.vmax, hi)


# -- the build ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Source:
    kind: Literal["rgc", "h5"]
    location: str
    rows: list[_Row]
    n_rows: int
    pre_skipped: list[dict[str, Any]]
    has_redshift: bool
    redshift_column: str | None
    source_info: dict[str, Any]
    h5_images: str | None = None


def _check_out(out: Path, overwrite: bool) -> list[Path]:
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
    return [
        p for p in old if p.name == MANIFEST_NAME or SHARD_RE.match(p.name) or p.name.startswith(TMP_PREFIX)
    ]


def _build(src: _Source, out: Path, cfg: ShardConfig) -> Manifest:
    t0 = time.perf_counter()
    out = Path(out).resolve()
    old = _check_out(out, cfg.overwrite)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)

    by_split: dict[str, list[_Row]] = {s: [] for s in SPLITS}
    for r in src.rows:
        by_split[split_of(identity_digest(r.ident, r.file, r.hdu), cfg.val_fraction)].append(r)
    n_train = len(by_split["train"])
    stats_pixels = max(MIN_STATS_PIXELS_PER_GALAXY, MAX_STATS_PIXELS // max(n_train, 1))

    token = uuid.uuid4().hex[:12]
    jobs: list[_Job] = []
    for split in SPLITS:
        rows = by_split[split]
        for i in range(0, len(rows), cfg.shard_size):
            jobs.append(
                _Job(
                    split=split,
                    index=i // cfg.shard_size,
                    tmp_path=str(out / f"{TMP_PREFIX}{token}-{split}-{i // cfg.shard_size:06d}.tar"),
                    kind=src.kind,
                    source=src.location,
                    h5_images=src.h5_images,
                    rows=rows[i : i + cfg.shard_size],
                    size=cfg.size,
                    pad=cfg.pad,
                    skip_bad=cfg.skip_bad,
                    stats_pixels=stats_pixels if split == "train" else 0,
                )
            )

    results: list[_JobResult] = []
    try:
        if cfg.workers <= 1 or len(jobs) <= 1:
            try:
                for job in jobs:
                    results.append(_run_job(job))
                    _progress(cfg, results, jobs, t0)
            finally:
                _close_readers()
        else:
            with ProcessPoolExecutor(
                max_workers=min(cfg.workers, len(jobs)), mp_context=get_context("spawn")
            ) as ex:
                futures: list[Future[_JobResult]] = [ex.submit(_run_job, j) for j in jobs]
                try:
                    for fut in futures:
                        results.append(fut.result())
                        _progress(cfg, results, jobs, t0)
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
        return _finish(src, out, cfg, results, old, t0)
    finally:
        for p in out.glob(f"{TMP_PREFIX}{token}-*"):
            p.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()


def _progress(cfg: ShardConfig, results: list[_JobResult], jobs: list[_Job], t0: float) -> None:
    if cfg.verbose:
        done = sum(len(j.rows) for j in jobs[: len(results)])
        rate = done / max(time.perf_counter() - t0, 1e-9)
        print(
            f"hpcvae.shard: {len(results)}/{len(jobs)} shards, {done} rows, {rate:.0f} rows/s",
            file=sys.stderr,
        )


def _finish(
    src: _Source, out: Path, cfg: ShardConfig, results: list[_JobResult], old: list[Path], t0: float
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
    stats = _stats(train)

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
            name = f"{split}-{len(shards):06d}.tar"
            os.replace(r.tmp_path, out / name)
            shards.append({"name": name, "count": r.count, "sha256": r.sha256})
        splits[split] = {"count": sum(s["count"] for s in shards), "shards": shards}

    data = {
        "format": FORMAT,
        "hpcvae_version": hpcvae.__version__,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "image": {"size": cfg.size, "dtype": "float32"},
        "has_redshift": src.has_redshift,
        "redshift_column": src.redshift_column,
        "pad": cfg.pad,
        "val_fraction": cfg.val_fraction,
        "shard_size": cfg.shard_size,
        "source": src.source_info,
        "splits": splits,
        "stats": {"train": stats},
        "n_rows": src.n_rows,
        "n_skipped": len(skipped),
        "n_duplicates": sum(str(x["reason"]).startswith(DUPLICATE) for x in skipped),
        "skipped": skipped,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    tmp = out / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{MANIFEST_NAME}"
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, out / MANIFEST_NAME)
    finally:
        tmp.unlink(missing_ok=True)
    return Manifest.load(out)


def _stats(train: list[_JobResult]) -> dict[str, float]:
    acc = _JobResult(split="train", index=-1, tmp_path="", count=0, sha256="", skipped=[])
    for r in train:
        if r.n:
            _merge(acc, r.n, r.mean, r.m2, r.vmin, r.vmax)
    sample = np.concatenate([r.samples for r in train if r.samples.size])
    pct = np.percentile(sample.astype(np.float64), PERCENTILES)
    med = float(np.median(sample))
    mad = float(np.median(np.abs(sample - med)))
    stats = {
        "min": acc.vmin,
        "max": acc.vmax,
        "mean": acc.mean,
        "std": math.sqrt(acc.m2 / acc.n) if acc.n else 0.0,
        **{f"p{p:g}": float(v) for p, v in zip(PERCENTILES, pct)},
        "mad_std": 1.4826 * mad,
        "n_pixels": acc.n,
        "n_pixels_sampled": int(sample.size),
    }
    noise_vars = [v for r in train for v in r.noise_vars]
    if noise_vars:
        # The typical sky-noise sigma sets the asinh transform's softening scale.
        stats["noise_std"] = math.sqrt(float(np.median(noise_vars)))
    return stats


# -- sources ------------------------------------------------------------------------------


def _finite_or_none(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def build_shards(
    catalog: str | Path,
    out: str | Path,
    *,
    size: int = 158,
    fits_catalog: str | Path | None = None,
    redshift_column: str | None = None,
    use_redshift: bool | None = None,
    val_fraction: float = 0.1,
    shard_size: int = 1000,
    workers: int = 1,
    pad: Literal["zeros", "noise"] = "zeros",
    skip_bad: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
) -> Manifest:
    """Shard a RealGalaxyCatalog; see the module docstring and docs/DESIGN.md for the layout."""
    cfg = ShardConfig(
        size=size,
        val_fraction=val_fraction,
        shard_size=shard_size,
        workers=workers,
        pad=pad,
        skip_bad=skip_bad,
        overwrite=overwrite,
        verbose=verbose,
    )
    cat = read_catalog(
        catalog, fits_catalog=fits_catalog, redshift_column=redshift_column, use_redshift=use_redshift
    )
    if cfg.pad == "noise" and cat.noise_variance is None:
        raise CatalogError(f"{cat.path}: --pad noise needs a NOISE_VARIANCE column, which the catalog lacks")
    rows, pre_skipped = _rgc_rows(cat, cfg)
    info = {
        "kind": "rgc",
        "catalog": str(cat.path),
        "catalog_sha256": sha256_file(cat.path),
        "fits_catalog": str(cat.fits_catalog) if cat.fits_catalog else None,
        "fits_catalog_sha256": sha256_file(cat.fits_catalog) if cat.fits_catalog else None,
    }
    src = _Source(
        kind="rgc",
        location=str(cat.root),
        rows=rows,
        n_rows=len(cat),
        pre_skipped=pre_skipped,
        has_redshift=cat.redshift is not None,
        redshift_column=cat.redshift_column,
        source_info=info,
    )
    return _build(src, Path(out), cfg)


DUPLICATE = "duplicate of row"
"""Start of the skip reason of a row whose galaxy (IDENT, GAL_FILENAME, GAL_HDU) an earlier row already holds."""


def _rgc_rows(cat: RGCCatalog, cfg: ShardConfig) -> tuple[list[_Row], list[dict[str, Any]]]:
    rows: list[_Row] = []
    skipped: list[dict[str, Any]] = []
    first_row: dict[tuple[str, str, int], int] = {}
    for i in range(len(cat)):
        ident, file, hdu = cat.ident[i], cat.gal_filename[i], int(cat.gal_hdu[i])
        r = _Row(
            row=i,
            ident=ident,
            file=file,
            hdu=hdu,
            seed=seed_of(identity_digest(ident, file, hdu)),
            zphot=None if cat.redshift is None else float(cat.redshift[i]),
            mag=None if cat.mag is None else _finite_or_none(cat.mag[i]),
            pixel_scale=None if cat.pixel_scale is None else _finite_or_none(cat.pixel_scale[i]),
            noise_variance=None if cat.noise_variance is None else _finite_or_none(cat.noise_variance[i]),
        )
        if r.zphot is not None and not math.isfinite(r.zphot):
            problem = f"redshift {cat.redshift_column} is {r.zphot} (not finite)"
            if not cfg.skip_bad:
                raise CatalogError(f"{cat.fits_catalog or cat.path}, row {i} (IDENT {ident}): {problem}")
            skipped.append(_skip_record(r, problem))
            continue
        first = first_row.setdefault((ident, file, hdu), i)
        if first != i:  # the same galaxy twice would be trained on twice per epoch
            problem = f"{DUPLICATE} {first} (same IDENT {ident}, GAL_FILENAME {file}, GAL_HDU {hdu})"
            if not cfg.skip_bad:
                raise CatalogError(f"{cat.path}, row {i}: {problem}; remove it or pass --skip-bad")
            skipped.append(_skip_record(r, problem))
            continue
        rows.append(r)
    return rows, skipped


def find_h5_datasets(
    path: str | Path,
    images: str | None = None,
    redshifts: str | None = None,
    use_redshift: bool | None = None,
) -> tuple[str, str | None]:
    """Pick the image dataset (the 3-D one) and the redshift dataset (1-D, same length N).

    Explicit names win; otherwise detection must be unambiguous, and the error lists the
    candidates so the user can pass ``--h5-images`` / ``--h5-redshifts``.
    """
    import h5py

    path = Path(path)
    found: dict[str, tuple[int, ...]] = {}
    try:
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda name, obj: (
                    found.__setitem__(name, obj.shape) if isinstance(obj, h5py.Dataset) else None
                )
            )
    except OSError as exc:
        raise ShardError(f"{path}: cannot open as HDF5: {exc}") from None
    listing = ", ".join(f"{k} {list(v)}" for k, v in found.items()) or "none"

    def image_like(shape: tuple[int, ...]) -> bool:
        return len(shape) == 3 or (len(shape) == 4 and (shape[1] == 1 or shape[3] == 1))

    if images is None:
        cands = [k for k, s in found.items() if image_like(s)]
        if len(cands) != 1:
            raise ShardError(
                f"{path}: {'no' if not cands else 'several'} 3-D image dataset(s) (datasets: {listing}); "
                "choose one with --h5-images NAME"
            )
        images = cands[0]
    elif images not in found:
        raise ShardError(f"{path}: no dataset {images!r} (datasets: {listing})")
    elif not image_like(found[images]):
        raise ShardError(f"{path}: dataset {images!r} has shape {list(found[images])}, expected N x H x W")
    n = found[images][0]
    if use_redshift is False:
        return images, None
    if redshifts is None:
        cands = [k for k, s in found.items() if len(s) == 1 and s[0] == n]
        if len(cands) > 1:
            raise ShardError(
                f"{path}: several 1-D datasets of length {n} could be redshifts ({', '.join(cands)}); "
                "choose one with --h5-redshifts NAME"
            )
        wrong = [f"{k} [{s[0]}]" for k, s in found.items() if len(s) == 1 and s[0] != n]
        if not cands and wrong:
            # A redshift array of another length is a broken file, not "no redshifts".
            raise ShardError(
                f"{path}: 1-D dataset(s) {', '.join(wrong)} do not match the {n} images of {images!r}; "
                "fix the file, name the redshifts with --h5-redshifts NAME, or shard without them (--no-redshift)"
            )
        redshifts = cands[0] if cands else None
    elif redshifts not in found:
        raise ShardError(f"{path}: no dataset {redshifts!r} (datasets: {listing})")
    elif found[redshifts] != (n,):
        raise ShardError(
            f"{path}: redshift dataset {redshifts!r} has shape {list(found[redshifts])}, expected [{n}]"
        )
    return images, redshifts


def build_shards_from_h5(
    h5: str | Path,
    out: str | Path,
    *,
    size: int = 158,
    images: str | None = None,
    redshifts: str | None = None,
    use_redshift: bool | None = None,
    val_fraction: float = 0.1,
    shard_size: int = 1000,
    workers: int = 1,
    skip_bad: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
) -> Manifest:
    """Shard the seed's h5 layout (N x H x W images + N redshifts) into the same format.

    The h5 has no catalog, so a galaxy's identity is its row: ``ident`` is the row
    number, ``file`` the h5 file name and ``hdu`` the row (its position in the file).
    """
    import h5py

    cfg = ShardConfig(
        size=size,
        val_fraction=val_fraction,
        shard_size=shard_size,
        workers=workers,
        pad="zeros",
        skip_bad=skip_bad,
        overwrite=overwrite,
        verbose=verbose,
    )
    path = Path(h5).resolve()
    if not path.is_file():
        raise ShardError(f"{path}: h5 file not found")
    images, redshifts = find_h5_datasets(path, images, redshifts, use_redshift)
    if use_redshift and redshifts is None:
        raise ShardError(f"{path}: redshifts asked for, but no 1-D dataset matches the images' length")
    if use_redshift is False:
        redshifts = None
    with h5py.File(path, "r") as f:
        n = int(f[images].shape[0])
        z = np.asarray(f[redshifts][:], dtype=np.float64) if redshifts else None
    rows: list[_Row] = []
    skipped: list[dict[str, Any]] = []
    for i in range(n):
        r = _Row(
            row=i,
            ident=str(i),
            file=path.name,
            hdu=i,
            seed=seed_of(identity_digest(str(i), path.name, i)),
            zphot=None if z is None else float(z[i]),
            mag=None,
            pixel_scale=None,
            noise_variance=None,
        )
        if r.zphot is not None and not math.isfinite(r.zphot):
            problem = f"redshift ({redshifts}) is {r.zphot} (not finite)"
            if not skip_bad:
                raise ShardError(f"{path}, row {i}: {problem}")
            skipped.append(_skip_record(r, problem))
            continue
        rows.append(r)
    info = {
        "kind": "h5",
        "catalog": str(path),
        "catalog_sha256": sha256_file(path),
        "fits_catalog": None,
        "fits_catalog_sha256": None,
        "h5_images": images,
        "h5_redshifts": redshifts,
    }
    src = _Source(
        kind="h5",
        location=str(path),
        rows=rows,
        n_rows=n,
        pre_skipped=skipped,
        has_redshift=redshifts is not None,
        redshift_column=redshifts,
        source_info=info,
        h5_images=images,
    )
    return _build(src, Path(out), cfg)


# -- CLI --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpcvae.shard",
        description="Convert a RealGalaxyCatalog (FITS) or the seed's h5 file into WebDataset shards.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--catalog", help="RealGalaxyCatalog FITS table (GAL_FILENAME is relative to its folder)"
    )
    src.add_argument("--from-h5", metavar="FILE", help="h5 file with N x H x W images and N redshifts")
    p.add_argument("--out", required=True, help="output folder (shards/NAME)")
    p.add_argument(
        "--size", type=int, default=158, help="output stamp size; stamps are centre-cropped/padded"
    )
    p.add_argument(
        "--fits-catalog", help="redshift catalog (default: <catalog stem>_fits.fits when it exists)"
    )
    p.add_argument(
        "--redshift-column",
        help="redshift column; when given it is required (default: zphot if the fits catalog has it)",
    )
    p.add_argument("--no-redshift", action="store_true", help="do not store redshifts")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="worker processes (0 = all cores)")
    p.add_argument("--pad", choices=("zeros", "noise"), default="zeros")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip (and record in the manifest) unreadable rows"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    p.add_argument("--h5-images", help="image dataset name in --from-h5 (default: the only 3-D dataset)")
    p.add_argument(
        "--h5-redshifts", help="redshift dataset name in --from-h5 (default: the 1-D dataset of length N)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="progress per shard on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    use_redshift = False if args.no_redshift else None
    if args.from_h5:
        if args.fits_catalog or args.redshift_column or args.pad != "zeros":
            raise ConfigError(
                "--fits-catalog, --redshift-column and --pad noise apply to --catalog, not --from-h5"
            )
        m = build_shards_from_h5(
            args.from_h5,
            args.out,
            size=args.size,
            images=args.h5_images,
            redshifts=args.h5_redshifts,
            use_redshift=use_redshift,
            val_fraction=args.val_fraction,
            shard_size=args.shard_size,
            workers=args.workers,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
            verbose=args.verbose,
        )
    else:
        if args.h5_images or args.h5_redshifts:
            raise ConfigError("--h5-images / --h5-redshifts apply to --from-h5, not --catalog")
        if args.no_redshift and (args.redshift_column or args.fits_catalog):
            raise ConfigError("--no-redshift contradicts --redshift-column / --fits-catalog")
        m = build_shards(
            args.catalog,
            args.out,
            size=args.size,
            fits_catalog=args.fits_catalog,
            redshift_column=args.redshift_column,
            use_redshift=use_redshift,
            val_fraction=args.val_fraction,
            shard_size=args.shard_size,
            workers=args.workers,
            pad=args.pad,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
            verbose=args.verbose,
        )
    dt = time.perf_counter() - t0
    d = m.data
    n = d["n_rows"]
    print(
        f"hpcvae.shard: wrote {m.count('train')} train + {m.count('val')} val galaxies "
        f"({len(m.shards('train'))}+{len(m.shards('val'))} shards, {d['n_skipped']} skipped of {n} rows, "
        f"redshift: {d['redshift_column'] if m.has_redshift else 'none'}) to {m.root} in {dt:.1f} s "
        f"({n / max(dt, 1e-9):.0f} rows/s)"
    )
    for s in d["skipped"][:5]:
        print(f"  skipped row {s['row']} ({s['file']}, HDU {s['hdu']}): {s['reason']}", file=sys.stderr)
    if d["n_skipped"] > 5:
        print(f"  ... {d['n_skipped'] - 5} more in {m.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from hpcvae.cli import run_cli

    run_cli(main, "hpcvae.shard")
