"""RealGalaxyCatalog reading with fitsio: catalog tables, stamps and their validation.

GalSim's RealGalaxyCatalog layout is a FITS table (one row per galaxy) whose
``GAL_FILENAME`` / ``GAL_HDU`` columns point at one image HDU per galaxy in a few
large multi-extension files.  Opening such a file costs far more than reading one
HDU from it, so :class:`StampReader` keeps the handles open and reads many HDUs per
open.  Every problem becomes a one-line :class:`FitsReadError` / :class:`CatalogError`
that names the file, the HDU or row, and what is wrong; :attr:`FitsReadError.problem`
(set here) holds just the "what" for skip records.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import fitsio
import numpy as np

from hpcvae.errors import CatalogError, FitsReadError

FITS_BLOCK = 2880
"""Every valid FITS file is a whole number of 2880-byte blocks; anything else is truncated."""

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


# -- catalogs ------------------------------------------------------------------------------


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
) -> RGCCatalog:
    """Read a RealGalaxyCatalog and (optionally) its redshifts.

    ``use_redshift``: None = use ``redshift_column`` (default ``zphot``) when the fits
    catalog (given, or the sibling ``<stem>_fits.fits``) has it; True = required (an
    explicit ``redshift_column`` implies this); False = no redshift.
    """
    path = Path(catalog).resolve()
    if redshift_column is not None and use_redshift is None:
        use_redshift = True
    column = redshift_column or "zphot"
    cols, n = read_table(path, ["IDENT", "GAL_FILENAME", "GAL_HDU", "MAG", "PIXEL_SCALE", "NOISE_VARIANCE"])
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
    return RGCCatalog(
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
    )


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


# -- stamps --------------------------------------------------------------------------------


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


# -- crop / pad ----------------------------------------------------------------------------


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
