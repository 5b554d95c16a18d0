"""GalSim's RealGalaxyCatalog layout as a shard source: its stamps read with fitsio, and shards from them.

GalSim's RealGalaxyCatalog layout is a FITS table (one row per galaxy; read by
``hpcvae.shards.fits_catalog``) whose
``GAL_FILENAME`` / ``GAL_HDU`` columns point at one image HDU per galaxy in a few
large multi-extension files.  Opening such a file costs far more than reading one
HDU from it, so :class:`StampReader` keeps the handles open and reads many HDUs per
open.  Every problem becomes a one-line :class:`FitsReadError` / :class:`CatalogError`
that names the file, the HDU or row, and what is wrong; :attr:`FitsReadError.problem`
(set here) holds just the "what" for skip records.
"""

from __future__ import annotations

import argparse
import math
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import fitsio
import numpy as np

from hpcvae.errors import CatalogError, ConfigError, FitsReadError
from hpcvae.hashing import sha256_file
from hpcvae.shards.fits_catalog import (
    FITS_BLOCK,
    RGCCatalog,
    fits_error,
    one_line,
    read_catalog,
    to_float32_le,
)
from hpcvae.shards.ingest import (
    Job,
    Row,
    ShardConfig,
    Source,
    build,
    condition_problem,
    config_kwargs,
    identity_digest,
    seed_of,
    skip_record,
)
from hpcvae.shards.manifest import Manifest


class StampReader:
    """Reads galaxy stamps, keeping up to ``max_open`` FITS handles open (LRU).

    A real catalog has ~100 image files with thousands of HDUs each; reopening a file per
    row would cost milliseconds, reading an HDU from an open handle costs microseconds.
    """

    def __init__(self, max_open: int = 64) -> None:
        self.max_open = max_open
        self._open: OrderedDict[str, fitsio.FITS] = OrderedDict()
        self._bad: dict[str, str] = {}

    def _handle(self, path: str) -> fitsio.FITS:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        if path in self._bad:
            raise fits_error(path, self._bad[path])
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise fits_error(path, "image file not found") from None
        except OSError as exc:
            raise fits_error(path, f"cannot access image file: {exc.strerror}") from None
        problem = None
        if size == 0:
            problem = "image file is empty"
        elif size % FITS_BLOCK:
            problem = f"truncated or corrupt FITS file ({size} bytes is not a multiple of {FITS_BLOCK})"
        else:
            try:
                fits = fitsio.FITS(path)
            except (OSError, ValueError) as exc:
                problem = f"corrupt FITS file: {one_line(exc)}"
        if problem:
            self._bad[path] = problem
            raise fits_error(path, problem)
        self._open[path] = fits
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return fits

    def read(self, path: str | Path, hdu: int, *, row: int | None = None) -> np.ndarray:
        """The HDU's pixels as native float32; raises FitsReadError for anything unusable."""
        path = str(path)
        try:
            fits = self._handle(path)
        except FitsReadError as exc:
            raise fits_error(path, exc.problem, hdu=hdu, row=row) from None
        n = len(fits)
        if not 0 <= hdu < n:
            raise fits_error(
                path, f"HDU index out of range (file has {n} HDUs: 0..{n - 1})", hdu=hdu, row=row
            )
        h = fits[hdu]
        if h.get_exttype() != "IMAGE_HDU":
            raise fits_error(path, f"not an image HDU ({h.get_exttype()})", hdu=hdu, row=row)
        dims = tuple(h.get_dims())
        if len(dims) == 0 or 0 in dims:
            raise fits_error(path, "HDU is empty (no pixels)", hdu=hdu, row=row)
        if len(dims) != 2:
            raise fits_error(
                path, f"HDU is {len(dims)}-D {list(dims)}, expected a 2-D image", hdu=hdu, row=row
            )
        try:
            data = h.read()
        except (OSError, ValueError) as exc:
            raise fits_error(path, f"cannot read pixels: {one_line(exc)}", hdu=hdu, row=row) from None
        if data is None or data.ndim != 2:
            raise fits_error(path, "HDU holds no 2-D image", hdu=hdu, row=row)
        img = to_float32_le(data)
        finite = np.isfinite(img)
        if not finite.all():
            nbad = int(img.size - np.count_nonzero(finite))
            raise fits_error(path, f"{nbad} NaN/inf pixel(s) of {img.size}", hdu=hdu, row=row)
        return img

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> StampReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_READER: StampReader | None = None
"""One stamp reader per process (it caches open FITS files)."""


def _reader() -> StampReader:
    global _READER
    if _READER is None:
        _READER = StampReader()
    return _READER


def close_readers() -> None:
    global _READER
    if _READER is not None:
        _READER.close()
        _READER = None


def iter_images(job: Job) -> Iterator[tuple[Row, Any, Any]]:
    """(row, stamp or FitsReadError, PSF or FitsReadError or None) for every row of ``job``, in row order."""
    reader = _reader()
    root = Path(job.source)
    for r in job.rows:
        try:
            img: Any = reader.read(root / r.file, r.hdu, row=r.row)
        except FitsReadError as exc:
            img = exc
        psf: Any = None
        if r.psf_file is not None and r.psf_hdu is not None and not isinstance(img, FitsReadError):
            try:
                psf = reader.read(root / r.psf_file, r.psf_hdu, row=r.row)
            except FitsReadError as exc:
                psf = fits_error(root / r.psf_file, f"PSF unusable: {exc.problem} (--no-psfs shards without PSFs)",
                                 hdu=r.psf_hdu, row=r.row)  # fmt: skip
        yield r, img, psf


HEADER_KEYS = ("BUNIT", "TELESCOP", "INSTRUME", "FILTER")


def header_info(job: Job) -> dict[str, str]:
    """BUNIT, TELESCOP, INSTRUME, FILTER of the job's first stamp (its HDU, else the file's primary)."""
    if not job.rows:
        return {}
    r = job.rows[0]
    path = str(Path(job.source) / r.file)
    try:
        fits = _reader()._handle(path)
        hdrs = [fits[r.hdu].read_header(), fits[0].read_header()]
    except (FitsReadError, OSError, ValueError, IndexError):
        return {}
    out: dict[str, str] = {}
    for key in HEADER_KEYS:
        for h in hdrs:
            if key in h and str(h[key]).strip():
                out[key] = str(h[key]).strip()
                break
    return out


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
    **physics: Any,
) -> Manifest:
    """Shard a RealGalaxyCatalog; see the module docstring and docs/DESIGN.md for the layout.

    ``physics``: ``band``, ``instrument``, ``bunit``, ``pixel_scale`` where the catalog lacks them.
    """
    cfg = ShardConfig(
        size=size,
        val_fraction=val_fraction,
        shard_size=shard_size,
        workers=workers,
        pad=pad,
        skip_bad=skip_bad,
        overwrite=overwrite,
        verbose=verbose,
        **physics,
    )
    cat = read_catalog(catalog, fits_catalog=fits_catalog, redshift_column=redshift_column,
                       use_redshift=use_redshift, conditions=cfg.conditions)  # fmt: skip
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
    src = Source(
        kind="rgc",
        location=str(cat.root),
        rows=rows,
        n_rows=len(cat),
        pre_skipped=pre_skipped,
        has_redshift=cat.redshift is not None,
        redshift_column=cat.redshift_column,
        source_info=info,
        conditions=[{"name": name, "column": name, "table": str(table), "role": "redshift"
                     if name == cat.redshift_column else "catalog"} for name, (_, table) in cat.conditions.items()],
        zeropoint=cat.zeropoint,
        psf_in_images=True,
    )  # fmt: skip
    return build(src, Path(out), cfg)


DUPLICATE = "duplicate of row"


def _rgc_rows(cat: RGCCatalog, cfg: ShardConfig) -> tuple[list[Row], list[dict[str, Any]]]:
    rows: list[Row] = []
    skipped: list[dict[str, Any]] = []
    first_row: dict[tuple[str, str, int], int] = {}
    for i in range(len(cat)):
        ident, file, hdu = cat.ident[i], cat.gal_filename[i], int(cat.gal_hdu[i])
        r = Row(
            row=i,
            ident=ident,
            file=file,
            hdu=hdu,
            seed=seed_of(identity_digest(ident, file, hdu)),
            zphot=None if cat.redshift is None else float(cat.redshift[i]),
            mag=None if cat.mag is None else _finite_or_none(cat.mag[i]),
            pixel_scale=None if cat.pixel_scale is None else _finite_or_none(cat.pixel_scale[i]),
            noise_variance=None if cat.noise_variance is None else _finite_or_none(cat.noise_variance[i]),
            band=None if cat.band is None else (cat.band[i] or None),
            psf_file=None if cat.psf_filename is None or not cfg.psfs else cat.psf_filename[i],
            psf_hdu=None if cat.psf_hdu is None or not cfg.psfs else int(cat.psf_hdu[i]),
            conditions={name: float(v[i]) for name, (v, _) in cat.conditions.items()} or None,
        )
        problems = [(table, condition_problem(name, float(v[i]), redshift=name == cat.redshift_column))
                    for name, (v, table) in cat.conditions.items()]  # fmt: skip
        if r.pixel_scale is not None and not r.pixel_scale > 0:
            problems.append(
                (cat.path, f"PIXEL_SCALE is {r.pixel_scale:g}; it must be > 0 (arcsec per pixel)")
            )
        if r.noise_variance is not None and r.noise_variance < 0:
            problems.append(
                (cat.path, f"NOISE_VARIANCE is {r.noise_variance:g}; a variance cannot be negative")
            )
        bad = next(((t, pr) for t, pr in problems if pr), None)
        if bad is None and r.zphot is not None and not math.isfinite(r.zphot):
            bad = (cat.fits_catalog or cat.path, f"redshift {cat.redshift_column} is {r.zphot} (not finite)")
        if bad is not None:
            table, problem = bad
            if not cfg.skip_bad:
                raise CatalogError(
                    f"{table}, row {i} (IDENT {ident}): {problem}; fix the row or pass --skip-bad"
                )
            skipped.append(skip_record(r, problem))
            continue
        first = first_row.setdefault((ident, file, hdu), i)
        if first != i:  # the same galaxy twice would be trained on twice per epoch
            problem = f"{DUPLICATE} {first} (same IDENT {ident}, GAL_FILENAME {file}, GAL_HDU {hdu})"
            if not cfg.skip_bad:
                raise CatalogError(f"{cat.path}, row {i}: {problem}; remove it or pass --skip-bad")
            skipped.append(skip_record(r, problem))
            continue
        rows.append(r)
    return rows, skipped


# -- python -m hpcvae.shard ------------------------------------------------------------------------

SELECT = "catalog"
"""The flag that picks this source: ``--catalog``."""


def add_arguments(p: argparse.ArgumentParser, select: Any) -> list[str]:
    """This source's flags (``select`` is the group of flags that pick a source); returns its own dests."""
    select.add_argument(
        "--catalog", help="RealGalaxyCatalog FITS table (GAL_FILENAME is relative to its folder)"
    )
    p.add_argument(
        "--fits-catalog", help="redshift catalog (default: <catalog stem>_fits.fits when it exists)"
    )
    p.add_argument(
        "--redshift-column",
        help="redshift column; when given it is required (default: zphot if the fits catalog has it)",
    )
    return ["fits_catalog", "redshift_column"]


def from_args(args: argparse.Namespace, cfg: ShardConfig) -> Manifest:
    if args.no_redshift and (args.redshift_column or args.fits_catalog):
        raise ConfigError("--no-redshift contradicts --redshift-column / --fits-catalog")
    return build_shards(args.catalog, args.out, fits_catalog=args.fits_catalog, redshift_column=args.redshift_column,
                        use_redshift=False if args.no_redshift else None, **config_kwargs(cfg))  # fmt: skip
