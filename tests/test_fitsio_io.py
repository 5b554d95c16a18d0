"""fitsio reading: dtypes, catalogs (real AEGIS/COSMOS), stamp validation, crop/pad."""

from __future__ import annotations

from pathlib import Path

import fitsio
import numpy as np
import numpy.lib.recfunctions as rfn
import pytest

from hpcvae.errors import CatalogError, FitsReadError
from hpcvae.shards.fits_catalog import read_catalog, to_float32_le
from hpcvae.shards.ingest import fit_to_size
from hpcvae.shards.rgc import StampReader

COSMOS = "cosmos-23.5-example/real_galaxy_catalog_23.5_example.fits"
COSMOS_FITS = "cosmos-23.5-example/real_galaxy_catalog_23.5_example_fits.fits"


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i2", ">i4"])
def test_big_endian_dtypes_round_trip_to_float32_le(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    vals = rng.integers(-3000, 3000, size=(7, 11)).astype(dtype)
    if dtype.startswith(">f"):
        vals = (vals / 8.0).astype(dtype)  # exactly representable in float32
    path = tmp_path / "img.fits"
    with fitsio.FITS(str(path), "rw", clobber=True) as f:
        f.write(vals)
        f.write(vals[::-1].copy())
    with StampReader() as r:
        a = r.read(path, 0)
        b = r.read(path, 1)
    for got, want in ((a, vals), (b, vals[::-1])):
        assert got.dtype == np.dtype("<f4") and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want.astype("<f4"))
    assert to_float32_le(np.arange(3, dtype=">f8")).dtype.str == "<f4"


def test_real_aegis_catalog_columns(shared_data: Path) -> None:
    for band in ("F814w", "F606w"):
        cat = read_catalog(shared_data / "aegis-real" / f"AEGIS_{band}_catalog.fits")
        assert len(cat) == 5
        assert cat.gal_filename[:3] == [f"AEGIS_{band}_images_01.fits"] * 3
        assert cat.gal_hdu.tolist() == [0, 1, 2, 0, 1]
        assert cat.ident[0] == "23409"
        assert cat.redshift is None and cat.fits_catalog is None  # no _fits sibling
        assert cat.noise_variance is not None and np.all(cat.noise_variance > 0)


def test_cosmos_redshift_from_sibling_fits_catalog(shared_data: Path) -> None:
    cat = read_catalog(shared_data / COSMOS)
    want = fitsio.read(str(shared_data / COSMOS_FITS), ext=1)
    assert cat.fits_catalog == (shared_data / COSMOS_FITS).resolve()
    assert cat.redshift_column == "zphot"
    np.testing.assert_array_equal(cat.redshift, want["zphot"].astype(np.float64))
    assert read_catalog(shared_data / COSMOS, use_redshift=False).redshift is None


def test_explicit_redshift_column_is_required(shared_data: Path) -> None:
    with pytest.raises(CatalogError, match=r"_fits\.fits: missing redshift column 'zspec'"):
        read_catalog(shared_data / COSMOS, redshift_column="zspec")
    with pytest.raises(CatalogError, match=r"AEGIS_F814w_catalog\.fits: redshift column 'zphot' asked for"):
        read_catalog(shared_data / "aegis-real/AEGIS_F814w_catalog.fits", redshift_column="zphot")


def _write_copy(src: Path, dst: Path, edit) -> Path:
    t = fitsio.read(str(src), ext=1)
    fitsio.write(str(dst), edit(t), clobber=True)
    return dst


def test_redshift_catalog_rows_must_match(shared_data: Path, tmp_path: Path) -> None:
    short = _write_copy(shared_data / COSMOS_FITS, tmp_path / "short.fits", lambda t: t[:99])
    with pytest.raises(CatalogError, match=r"short\.fits: 99 rows but catalog .* has 100"):
        read_catalog(shared_data / COSMOS, fits_catalog=short)

    def swap(t):
        t["IDENT"][[3, 4]] = t["IDENT"][[4, 3]]
        return t

    swapped = _write_copy(shared_data / COSMOS_FITS, tmp_path / "swapped.fits", swap)
    with pytest.raises(CatalogError, match=r"swapped\.fits: row 3 has IDENT .* \(2 mismatched rows\)"):
        read_catalog(shared_data / COSMOS, fits_catalog=swapped)


def test_missing_required_column(aegis_copy: Path) -> None:
    cat = _write_copy(
        aegis_copy / "AEGIS_F814w_catalog.fits",
        aegis_copy / "nohdu.fits",
        lambda t: rfn.drop_fields(t, ["GAL_HDU"]),
    )
    with pytest.raises(CatalogError, match=r"nohdu\.fits: missing required column\(s\) GAL_HDU"):
        read_catalog(cat)
    with pytest.raises(CatalogError, match="catalog file not found"):
        read_catalog(aegis_copy / "nope.fits")


def test_stamp_reader_errors_name_file_hdu_and_row(aegis_copy: Path) -> None:
    img = aegis_copy / "AEGIS_F814w_images_02.fits"
    with fitsio.FITS(str(img), "rw", ignore_empty=True) as f:
        f.write(None)  # HDU 2: empty
        f.write(np.zeros((2, 3, 4), ">f4"))  # HDU 3: 3-D
        bad = np.ones((5, 6), ">f4")
        bad[2, 3] = np.nan
        bad[0, 0] = np.inf
        f.write(bad)  # HDU 4: NaN + inf
        f.write(np.zeros(3, dtype=[("a", "f4")]))  # HDU 5: a table
    cases = {
        2: "HDU is empty",
        3: r"HDU is 3-D \[2, 3, 4\], expected a 2-D image",
        4: r"2 NaN/inf pixel\(s\) of 30",
        5: "not an image HDU",
        9: r"HDU index out of range \(file has 6 HDUs",
    }
    with StampReader() as r:
        assert r.read(img, 1).shape == (104, 103)
        for hdu, msg in cases.items():
            with pytest.raises(
                FitsReadError, match=rf"images_02\.fits, HDU {hdu} \(catalog row 7\): {msg}"
            ) as ei:
                r.read(img, hdu, row=7)
            assert "\n" not in str(ei.value) and ei.value.problem in str(ei.value)
        with pytest.raises(
            FitsReadError, match=r"missing\.fits, HDU 0 \(catalog row 1\): image file not found"
        ):
            r.read(aegis_copy / "missing.fits", 0, row=1)


def test_truncated_and_garbage_fits(aegis_copy: Path) -> None:
    img = aegis_copy / "AEGIS_F814w_images_01.fits"
    raw = img.read_bytes()
    img.write_bytes(raw[: len(raw) // 2 + 100])
    garbage = aegis_copy / "garbage.fits"
    garbage.write_bytes(b"SIMPLE  =  nonsense" * 2880)
    half_block = aegis_copy / "half.fits"
    half_block.write_bytes(raw[: 2880 * 3])  # whole blocks, but the data of HDU 0 is cut
    with StampReader() as r:
        with pytest.raises(FitsReadError, match=r"images_01\.fits, HDU 1: truncated or corrupt FITS file"):
            r.read(img, 1)
        with pytest.raises(FitsReadError, match=r"garbage\.fits, HDU 0: corrupt FITS file: "):
            r.read(garbage, 0)
        with pytest.raises(FitsReadError, match=r"half\.fits, HDU 0: cannot read pixels: .*end of file"):
            r.read(half_block, 0)


def test_handle_cache_opens_each_file_once(shared_data: Path) -> None:
    cat = read_catalog(shared_data / "aegis-real/AEGIS_F814w_catalog.fits")
    with StampReader(max_open=1) as r:
        for f, h in zip(cat.gal_filename, cat.gal_hdu):
            r.read(cat.root / f, int(h))
            assert list(r._open) == [str(cat.root / f)]


def test_fit_to_size_crops_and_pads_about_the_centre() -> None:
    img = np.arange(46 * 70, dtype=np.float32).reshape(46, 70)
    out = fit_to_size(img, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32
    # rows: 46 -> pad 9 above, 9 below; cols: 70 -> crop 3 left, 3 right
    np.testing.assert_array_equal(out[9:55], img[:, 3:67])
    assert not out[:9].any() and not out[55:].any()
    odd = fit_to_size(np.ones((5, 8), np.float32), 4)
    assert odd.shape == (4, 4) and odd.all()
    a = fit_to_size(img, 80, pad="noise", noise_variance=4.0, seed=3)
    b = fit_to_size(img, 80, pad="noise", noise_variance=4.0, seed=3)
    np.testing.assert_array_equal(a, b)
    assert 1.5 < a[:17].std() < 2.5  # the padding has the row's noise sigma
    np.testing.assert_array_equal(a[17:63, 5:75], img)
    with pytest.raises(ValueError, match="NOISE_VARIANCE"):
        fit_to_size(img, 80, pad="noise", noise_variance=float("nan"), seed=0)
