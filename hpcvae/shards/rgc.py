"""GalSim's RealGalaxyCatalog layout, read with fitsio: the catalog, its stamps, and shards from them.

RealGalaxyCatalog reading with fitsio: catalog tables, stamps and their validation.

GalSim's RealGalaxyCatalog layout is a FITS table (one row per galaxy) whose
``GAL_FILENAME`` / ``GAL_HDU`` columns point at one image HDU per galaxy in a few
large multi-extension files.  Opening such a file costs far more than reading one
HDU from it, so :class:`StampReader` keeps the handles open and reads many HDUs per
open.  Every problem becomes a one-line :class:`FitsReadError` / :class:`CatalogError`
that names the file, the HDU or row, and what is wrong; :attr:`FitsReadError.problem`
(set here) holds just the "what" for skip records.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fitsio
import numpy as np

from hpcvae.errors import CatalogError, FitsReadError
from hpcvae.hashing import sha256_file
from hpcvae.shards.ingest import (
    Job,
    Row,
    ShardConfig,
    Source,
    build,
    condition_problem,
    identity_digest,
    seed_of,
    skip_record,
)
from hpcvae.shards.manifest import Manifest

FITS_BLOCK = 2880

REQUIRED_COLUMNS = ("GAL_FILENAME", "GAL_HDU")


def _one_line(msg: str) -> str:
    """cfitsio stacks multi-line error traces; the first line is the useful one."""
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return lines[0] if lines else "unknown error"


def fits_error(
    path: str | Path, problem: str, *, hdu: int | None = None, row: int | None = None
) -> FitsReadError:
    where = str(path)
    if hdu is not None:
        where += f", HDU {hdu}"
    if row is not None:
        where += f" (catalog row {row})"
    err = FitsReadError(f"{where}: {problem}")
    err.problem = problem
    return err


def to_float32_le(a: np.ndarray) -> np.ndarray:
    """FITS stores big-endian; shards and torch want native little-endian float32."""
    return np.ascontiguousarray(a, dtype="<f4")


def _table_hdu(fits: fitsio.FITS, path: Path) -> int:
    for i, hdu in enumerate(fits):
        if hdu.get_exttype() in ("BINARY_TBL", "ASCII_TBL"):
            return i
    raise CatalogError(f"{path}: no table HDU (is this a RealGalaxyCatalog?)")


def read_table(path: str | Path, columns: list[str] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Read named columns (case-insensitive) of a FITS table; returns ({UPPER: array}, n_rows)."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: catalog file not found")
    try:
        with fitsio.FITS(str(path)) as f:
            ext = _table_hdu(f, path)
            hdu = f[ext]
            names = {c.upper(): c for c in hdu.get_colnames()}
            nrows = hdu.get_nrows()
            want = list(names) if columns is None else [c.upper() for c in columns if c.upper() in names]
            data = hdu.read(columns=[names[c] for c in want]) if want and nrows else None
    except CatalogError:
        raise
    except (OSError, ValueError) as exc:
        raise CatalogError(f"{path}: cannot read FITS table: {_one_line(exc)}") from None
    out: dict[str, np.ndarray] = {}
    for c in want:
        col = np.asarray(data[names[c]]) if data is not None else np.zeros(0)
        if col.dtype.kind in "SU":
            col = np.char.strip(col.astype(str))
        elif col.dtype.kind in "iuf" and not col.dtype.isnative:
            col = col.astype(col.dtype.newbyteorder("="))
        out[c] = col
    out["__ALL__"] = np.array(sorted(names))
    return out, nrows


@dataclass(kw_only=True)
class RGCCatalog:
    """The columns of a RealGalaxyCatalog that ingest needs, one entry per row."""

    path: Path
    fits_catalog: Path | None
    ident: list[str]
    gal_filename: list[str]
    gal_hdu: np.ndarray
    mag: np.ndarray | None
    pixel_scale: np.ndarray | None
    noise_variance: np.ndarray | None
    redshift: np.ndarray | None
    redshift_column: str | None
    band: list[str] | None = None
    psf_filename: list[str] | None = None
    psf_hdu: np.ndarray | None = None
    conditions: dict[str, tuple[np.ndarray, Path]] = field(default_factory=dict)
    """Condition name -> (values, the table they came from), in the order asked for."""
    zeropoint: tuple[float, str] | None = None

    def __len__(self) -> int:
        return len(self.gal_filename)

    @property
    def root(self) -> Path:
        """GAL_FILENAME is relative to the catalog's folder (GalSim's convention)."""
        return self.path.parent


def default_fits_catalog(catalog: str | Path) -> Path:
    p = Path(catalog)
    return p.with_name(f"{p.stem}_fits{p.suffix or '.fits'}")


def read_catalog(
    catalog: str | Path,
    *,
    fits_catalog: str | Path | None = None,
    redshift_column: str | None = None,
    use_redshift: bool | None = None,
    conditions: list[str] | tuple[str, ...] = (),
) -> RGCCatalog:
    """Read a RealGalaxyCatalog and (optionally) its redshifts and condition columns.

    ``use_redshift``: None = use ``redshift_column`` (default ``zphot``) when the fits
    catalog (given, or the sibling ``<stem>_fits.fits``) has it; True = required (an
    explicit ``redshift_column`` implies this); False = no redshift.
    """
    path = Path(catalog).resolve()
    if redshift_column is not None and use_redshift is None:
        use_redshift = True
    column = redshift_column or "zphot"
    cols, n = read_table(path, ["IDENT", "GAL_FILENAME", "GAL_HDU", "MAG", "PIXEL_SCALE", "NOISE_VARIANCE",
                                "BAND", "PSF_FILENAME", "PSF_HDU"])  # fmt: skip
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        have = ", ".join(cols["__ALL__"])
        raise CatalogError(f"{path}: missing required column(s) {', '.join(missing)} (has: {have})")
    hdu_col = cols["GAL_HDU"]
    if hdu_col.dtype.kind not in "iu":
        if (
            hdu_col.dtype.kind == "f"
            and np.all(np.isfinite(hdu_col))
            and np.all(hdu_col == np.round(hdu_col))
        ):
            hdu_col = hdu_col.astype(np.int64)
        else:
            raise CatalogError(f"{path}: column GAL_HDU must hold integers (got {hdu_col.dtype})")
    ident = [str(v) for v in cols["IDENT"]] if "IDENT" in cols else [str(i) for i in range(n)]

    fpath: Path | None = None
    redshift = None
    if use_redshift is not False:
        if fits_catalog is not None:
            fpath = Path(fits_catalog).resolve()
            if not fpath.is_file():
                raise CatalogError(f"{fpath}: redshift (fits) catalog not found")
        elif default_fits_catalog(path).is_file():
            fpath = default_fits_catalog(path)
        # An explicit fits catalog means the user wants its redshifts.
        required = bool(use_redshift) or (fits_catalog is not None and use_redshift is None)
        redshift = _read_redshift(path, cols, n, fpath, column, required=required)
        if redshift is None:
            fpath = None
    conds = _read_conditions(path, n, fpath or (default_fits_catalog(path) if default_fits_catalog(path).is_file()
                                               else None), conditions)  # fmt: skip
    if redshift is not None and column.lower() not in {c.lower() for c in conds}:
        conds = {column: (redshift, fpath or path), **conds}  # the redshift is always a condition
    return RGCCatalog(
        conditions=conds,
        zeropoint=_zeropoint(path, cols, fpath),
        path=path,
        fits_catalog=fpath,
        ident=ident,
        gal_filename=[str(v) for v in cols["GAL_FILENAME"]],
        gal_hdu=hdu_col.astype(np.int64),
        mag=cols.get("MAG"),
        pixel_scale=cols.get("PIXEL_SCALE"),
        noise_variance=cols.get("NOISE_VARIANCE"),
        redshift=redshift,
        redshift_column=column if redshift is not None else None,
        band=[str(v) for v in cols["BAND"]] if "BAND" in cols else None,
        **_psf_columns(path, cols),
    )


def _read_conditions(
    path: Path, n: int, fpath: Path | None, names: list[str] | tuple[str, ...]
) -> dict[str, tuple[np.ndarray, Path]]:
    """Each named column from the fits catalog (first) or the catalog: numeric, scalar, one value per row."""
    out: dict[str, tuple[np.ndarray, Path]] = {}
    if not names:
        return out
    tables = [(fpath, read_table(fpath, list(names))[0])] if fpath is not None else []
    tables.append((path, read_table(path, list(names))[0]))
    for name in names:
        found = next(((t, cols[name.upper()]) for t, cols in tables if name.upper() in cols), None)
        if found is None:
            where = " or ".join(str(t) for t, _ in tables)
            raise CatalogError(f"{where}: no column {name!r} for --conditions")
        table, col = found
        if col.ndim != 1 or col.dtype.kind not in "iuf" or len(col) != n:
            raise CatalogError(f"{table}: column {name!r} must be a numeric scalar column (got {col.dtype}, "
                               f"shape {col.shape}) to be a condition")  # fmt: skip
        out[name] = (col.astype(np.float64), table)
    return out


def _zeropoint(path: Path, cols: dict[str, np.ndarray], fpath: Path | None) -> tuple[float, str] | None:
    """The catalog's ZEROPT header keyword, else the median MAG + 2.5 log10(stamp_flux) of its rows."""
    for table in (t for t in (fpath, path) if t is not None):
        try:
            header = fitsio.read_header(str(table), ext=1)
        except (OSError, ValueError):
            continue
        if "ZEROPT" in header:
            return float(header["ZEROPT"]), f"{table.name} header ZEROPT"
    extra, _ = read_table(path, ["MAG", "STAMP_FLUX"])
    if "MAG" in extra and "STAMP_FLUX" in extra:
        mag, flux = np.asarray(extra["MAG"], float), np.asarray(extra["STAMP_FLUX"], float)
        ok = np.isfinite(mag) & np.isfinite(flux) & (flux > 0) & (mag > 0) & (mag < 40)
        if ok.sum() >= 3:
            return float(
                np.median(mag[ok] + 2.5 * np.log10(flux[ok]))
            ), f"median MAG + 2.5 log10 stamp_flux of {path.name}"
    return None


def _psf_columns(path: Path, cols: dict[str, np.ndarray]) -> dict[str, Any]:
    """PSF_FILENAME/PSF_HDU when the catalog has both (GalSim's layout): each galaxy's PSF is copied."""
    if "PSF_FILENAME" not in cols or "PSF_HDU" not in cols:
        return {}
    hdu = cols["PSF_HDU"]
    if hdu.dtype.kind not in "iu" and not (hdu.dtype.kind == "f" and np.all(hdu == np.round(hdu))):
        raise CatalogError(f"{path}: column PSF_HDU must hold integers (got {hdu.dtype})")
    return {"psf_filename": [str(v) for v in cols["PSF_FILENAME"]], "psf_hdu": hdu.astype(np.int64)}


def _read_redshift(
    path: Path, cols: dict[str, np.ndarray], n: int, fpath: Path | None, column: str, *, required: bool
) -> np.ndarray | None:
    """The redshift column from the fits catalog (rows checked against the main one), else the main catalog."""
    if fpath is not None:
        fcols, fn = read_table(fpath, ["IDENT", column])
        if fn != n:
            raise CatalogError(
                f"{fpath}: {fn} rows but catalog {path.name} has {n}; rows must match one to one"
            )
        if "IDENT" in fcols and "IDENT" in cols:
            bad = np.flatnonzero(
                np.asarray(fcols["IDENT"]).astype(str) != np.asarray(cols["IDENT"]).astype(str)
            )
            if bad.size:
                r = int(bad[0])
                raise CatalogError(
                    f"{fpath}: row {r} has IDENT {fcols['IDENT'][r]} but catalog {path.name} row {r} has "
                    f"IDENT {cols['IDENT'][r]} ({bad.size} mismatched rows); rows must match one to one"
                )
        if column.upper() in fcols:
            return _as_redshift(fcols[column.upper()], fpath, column)
        if required:
            raise CatalogError(
                f"{fpath}: missing redshift column '{column}' (has: {', '.join(fcols['__ALL__'])})"
            )
        return None
    if required:
        extra, _ = read_table(path, [column])
        if column.upper() in extra:
            return _as_redshift(extra[column.upper()], path, column)
        raise CatalogError(
            f"{path}: redshift column '{column}' asked for, but there is no fits catalog "
            f"({default_fits_catalog(path).name}) and the catalog has no such column"
        )
    return None


def _as_redshift(col: np.ndarray, path: Path, column: str) -> np.ndarray:
    if col.ndim != 1 or col.dtype.kind not in "iuf":
        raise CatalogError(
            f"{path}: redshift column '{column}' must be a numeric scalar column (got {col.dtype})"
        )
    return col.astype(np.float64)


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
                problem = f"corrupt FITS file: {_one_line(exc)}"
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
            raise fits_error(path, f"cannot read pixels: {_one_line(exc)}", hdu=hdu, row=row) from None
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
