"""RealGalaxyCatalog tables read with fitsio: the catalog, its ``_fits.fits`` sibling, their columns.

GalSim's RealGalaxyCatalog layout is a FITS table (one row per galaxy) whose
``GAL_FILENAME`` / ``GAL_HDU`` columns point at one image HDU per galaxy; redshifts,
magnitudes and the conditions come from it or its ``_fits.fits`` sibling.  Every problem is
a one-line :class:`CatalogError` / :class:`FitsReadError` naming the file, the row or
column, and what is wrong.  The stamps themselves are read by ``hpcvae.shards.rgc``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fitsio
import numpy as np

from hpcvae.errors import CatalogError, FitsReadError

FITS_BLOCK = 2880

REQUIRED_COLUMNS = ("GAL_FILENAME", "GAL_HDU")


def one_line(msg: str) -> str:
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
        raise CatalogError(f"{path}: cannot read FITS table: {one_line(exc)}") from None
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
