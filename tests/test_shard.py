"""hpcvae.shard on real AEGIS / COSMOS files, synthetic RGC sets and the seed's h5 layout."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import fitsio
import h5py
import numpy as np
import pytest
import torch
import webdataset as wds
from train_helpers import cli

from hpcvae.errors import CatalogError, FitsReadError, HpcvaeError, ShardError
from hpcvae.hashing import sha256_file
from hpcvae.shards import build_shards, build_shards_from_h5, find_h5_datasets
from hpcvae.shards.manifest import Manifest

COSMOS = "cosmos-23.5-example/real_galaxy_catalog_23.5_example.fits"
COSMOS_FITS = "cosmos-23.5-example/real_galaxy_catalog_23.5_example_fits.fits"


def read_set(root: Path) -> dict[str, dict]:
    """Every sample of a shard set via plain WebDataset: key -> {image, meta, split}."""
    m = Manifest.load(root)
    out = {}
    for split in m.splits:
        for info in m.shards(split):
            for s in wds.WebDataset(str(root / info.name), shardshuffle=False).decode():
                assert s["__key__"] not in out
                out[s["__key__"]] = {"image": s["image.npy"], "meta": s["meta.json"], "split": split}
    return out


def centre(img: np.ndarray, size: int) -> np.ndarray:
    """Independent reference crop/pad (zeros), written differently from fit_to_size."""
    out = np.zeros((size, size), np.float32)
    h, w = img.shape
    ys = max(0, (h - size) // 2)
    xs = max(0, (w - size) // 2)
    crop = img[ys : ys + size, xs : xs + size]
    py = max(0, (size - h) // 2)
    px = max(0, (size - w) // 2)
    out[py : py + crop.shape[0], px : px + crop.shape[1]] = crop
    return out


def test_real_aegis_round_trip_bit_identical(shared_data: Path, tmp_path: Path) -> None:
    for band in ("F814w", "F606w"):
        cat_path = shared_data / "aegis-real" / f"AEGIS_{band}_catalog.fits"
        out = tmp_path / band
        m = build_shards(cat_path, out, size=64, val_fraction=0.4, shard_size=2)
        cat = fitsio.read(str(cat_path), ext=1)
        samples = read_set(out)
        assert sorted(samples) == [f"g{i:09d}" for i in range(5)]
        for i, row in enumerate(cat):
            s = samples[f"g{i:09d}"]
            stamp = fitsio.read(str(cat_path.parent / row["GAL_FILENAME"].strip()), ext=int(row["GAL_HDU"]))
            assert s["image"].dtype == np.dtype("<f4") and s["image"].shape == (64, 64)
            np.testing.assert_array_equal(s["image"], centre(stamp.astype("<f4"), 64))
            meta = s["meta"]
            assert meta["ident"] == str(row["IDENT"]) and meta["row"] == i and meta["zphot"] is None
            assert meta["orig_shape"] == list(stamp.shape) and meta["hdu"] == int(row["GAL_HDU"])
            assert meta["file"] == row["GAL_FILENAME"].strip()
            assert meta["mag"] == pytest.approx(row["MAG"]) and meta["pixel_scale"] == pytest.approx(0.03)
            assert meta["noise_variance"] == pytest.approx(row["NOISE_VARIANCE"])
        assert m.count("train") + m.count("val") == 5 and not m.has_redshift


def test_manifest_contract(aegis_shards: Path, shared_data: Path) -> None:
    m = Manifest.load(aegis_shards)
    d = m.data
    for key in (
        "format",
        "hpcvae_version",
        "created",
        "image",
        "has_redshift",
        "redshift_column",
        "pad",
        "val_fraction",
        "source",
        "splits",
        "stats",
        "n_rows",
        "n_skipped",
        "skipped",
    ):
        assert key in d, key
    assert d["image"] == {"size": 64, "dtype": "float32"}
    assert d["n_rows"] == 5 and d["n_skipped"] == 0 and d["skipped"] == []
    cat = shared_data / "aegis-real" / "AEGIS_F814w_catalog.fits"
    assert d["source"]["catalog"] == str(cat) and d["source"]["catalog_sha256"] == sha256_file(cat)
    assert d["source"]["kind"] == "rgc" and d["source"]["fits_catalog"] is None
    samples = read_set(aegis_shards)
    for split in ("train", "val"):
        assert d["splits"][split]["count"] == sum(s["count"] for s in d["splits"][split]["shards"])
        for info in m.shards(split):
            assert info.sha256 == sha256_file(aegis_shards / info.name)
            with tarfile.open(aegis_shards / info.name) as tar:
                names = tar.getnames()
            assert len(names) == 3 * info.count  # image, meta and the galaxy's PSF (AEGIS ships them)
            assert all(
                n.count(".") == 2 and n.split(".", 1)[1] in ("image.npy", "meta.json", "psf.npy")
                for n in names
            )
    assert sorted(p.name for p in aegis_shards.iterdir()) == sorted(
        ["manifest.json", "psf_mean.npy"]
        + [f"{sp}.wids.json" for sp in m.splits]
        + [s.name for sp in m.splits for s in m.shards(sp)]
    )  # no temp files left
    phys = m.physics()  # the AEGIS catalog's own pixel scale, band and PSFs
    assert phys["pixel_scale_arcsec"] == pytest.approx(0.03) and phys["band"]
    assert phys["psf"]["per_galaxy"] and np.asarray(phys["psf"]["image"]).sum() == pytest.approx(1, abs=1e-5)
    # stats: exact over all train pixels (5 galaxies: every pixel is in the subsample)
    train = np.stack([s["image"] for s in samples.values() if s["split"] == "train"]).astype(np.float64)
    st = m.stats("train")
    assert st["n_pixels_sampled"] == train.size == st["n_pixels"]
    assert st["mean"] == pytest.approx(train.mean(), rel=1e-9)
    assert st["std"] == pytest.approx(train.std(), rel=1e-9)
    assert st["min"] == train.min() and st["max"] == train.max()
    assert st["p50"] == pytest.approx(np.percentile(train, 50), rel=1e-6)
    pct = [st[k] for k in ("min", "p0.1", "p1", "p5", "p50", "p95", "p99", "p99.9", "max")]
    assert pct == sorted(pct)
    assert st["noise_std"] > 0 and st["mad_std"] > 0


def test_split_is_stable_when_rows_are_appended(make_rgc, tmp_path: Path) -> None:
    big = make_rgc(tmp_path / "big", 200, seed=5)
    small = tmp_path / "big" / "small_catalog.fits"
    fitsio.write(str(small), fitsio.read(str(big), ext=1)[:150])
    a = build_shards(small, tmp_path / "a", size=32, val_fraction=0.3, shard_size=40)
    b = build_shards(big, tmp_path / "b", size=32, val_fraction=0.3, shard_size=40)
    sa, sb = read_set(tmp_path / "a"), read_set(tmp_path / "b")
    assert len(sa) == 150 and len(sb) == 200
    assert 20 < a.count("val") < 80  # both splits really used
    for key, s in sa.items():
        assert sb[key]["split"] == s["split"], key
        np.testing.assert_array_equal(sb[key]["image"], s["image"])
    assert not a.has_redshift  # small_catalog has no _fits sibling
    assert b.has_redshift and b.data["redshift_column"] == "zphot"


def test_workers_give_identical_shards(make_rgc, tmp_path: Path) -> None:
    cat = make_rgc(tmp_path / "rgc", 120, seed=2)
    one = build_shards(cat, tmp_path / "one", size=48, shard_size=25, pad="noise")
    two = build_shards(cat, tmp_path / "two", size=48, shard_size=25, pad="noise", workers=2)
    for split in ("train", "val"):
        assert [s.sha256 for s in one.shards(split)] == [s.sha256 for s in two.shards(split)]
    assert one.stats() == two.stats()
    assert one.data["pad"] == "noise"


def test_cosmos_redshift_handling(shared_data: Path, tmp_path: Path) -> None:
    """The real COSMOS catalog + _fits.fits with stand-in stamps (its image file is not shipped)."""
    folder = tmp_path / "cosmos"
    folder.mkdir()
    cat = folder / Path(COSMOS).name
    cat.write_bytes((shared_data / COSMOS).read_bytes())
    (folder / Path(COSMOS_FITS).name).write_bytes((shared_data / COSMOS_FITS).read_bytes())
    psf_file = Path(COSMOS).with_name("real_galaxy_PSF_images.fits")  # the real PSFs are shipped
    (folder / psf_file.name).write_bytes((shared_data / psf_file).read_bytes())
    rng = np.random.default_rng(0)
    with fitsio.FITS(str(folder / "real_galaxy_images.fits"), "rw", clobber=True) as f:
        for _ in range(100):
            f.write(rng.normal(size=(30, 40)).astype(">f4"))
    m = build_shards(cat, tmp_path / "out", size=32)
    z = fitsio.read(str(shared_data / COSMOS_FITS), ext=1)["zphot"]
    assert m.has_redshift and m.data["redshift_column"] == "zphot"
    assert m.data["source"]["fits_catalog"] == str(folder / Path(COSMOS_FITS).name)
    for s in read_set(tmp_path / "out").values():
        assert s["meta"]["zphot"] == float(z[s["meta"]["row"]])
    m = build_shards(cat, tmp_path / "out2", size=32, use_redshift=False)
    assert not m.has_redshift
    with pytest.raises(CatalogError, match="missing redshift column 'zspec'"):
        build_shards(cat, tmp_path / "out3", size=32, redshift_column="zspec")
    fits = folder / Path(COSMOS_FITS).name
    t = fitsio.read(str(fits), ext=1)
    t["zphot"][5] = np.nan
    fitsio.write(str(fits), t, clobber=True)
    with pytest.raises(CatalogError, match=r"_fits\.fits, row 5 \(IDENT \d+\): redshift zphot is nan"):
        build_shards(cat, tmp_path / "out4", size=32)
    m = build_shards(cat, tmp_path / "out4", size=32, skip_bad=True)
    assert m.data["n_skipped"] == 1 and m.data["skipped"][0]["row"] == 5
    assert m.count("train") + m.count("val") == 99


def test_cosmos_without_images(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(
        FitsReadError, match=r"real_galaxy_images\.fits, HDU 0 \(catalog row 0\): image file not found"
    ):
        build_shards(shared_data / COSMOS, tmp_path / "out", size=64)
    with pytest.raises(ShardError, match=r"100 rows, 100 skipped: 100 x image file not found"):
        build_shards(shared_data / COSMOS, tmp_path / "out", size=64, skip_bad=True)
    assert not (tmp_path / "out").exists()


def _edit_catalog(path: Path, edit) -> None:
    t = fitsio.read(str(path), ext=1)
    edit(t)
    fitsio.write(str(path), t, clobber=True)


def _set_hdu(row: int, hdu: int):
    def edit(t):
        t["GAL_HDU"][row] = hdu

    return edit


def _image_with(path: Path, hdu: int, fn) -> None:
    """Rewrite a multi-HDU image file with one HDU replaced by fn(pixels)."""
    with fitsio.FITS(str(path)) as f:
        hdus = [h.read() for h in f]
    hdus[hdu] = fn(hdus[hdu])
    with fitsio.FITS(str(path), "rw", clobber=True) as f:
        for a in hdus:
            f.write(a)


def _nan(a):
    a = a.copy()
    a[10, 10] = np.nan
    return a


BAD_ROWS = {
    "missing-file": (lambda d: (d / "AEGIS_F814w_images_02.fits").unlink(), [3, 4], "image file not found"),
    "hdu-out-of-range": (
        lambda d: _edit_catalog(d / "AEGIS_F814w_catalog.fits", _set_hdu(2, 7)),
        [2],
        r"HDU index out of range \(file has 3 HDUs",
    ),
    "nan-pixels": (
        lambda d: _image_with(d / "AEGIS_F814w_images_01.fits", 1, _nan),
        [1],
        r"1 NaN/inf pixel\(s\)",
    ),
    "non-2d": (
        lambda d: _image_with(d / "AEGIS_F814w_images_02.fits", 0, lambda a: np.stack([a, a])),
        [3],
        r"HDU is 3-D",
    ),
    "truncated": (
        lambda d: (d / "AEGIS_F814w_images_02.fits").write_bytes(
            (d / "AEGIS_F814w_images_02.fits").read_bytes()[:5000]
        ),
        [3, 4],
        "truncated or corrupt FITS file",
    ),
    "corrupt": (
        lambda d: (d / "AEGIS_F814w_images_01.fits").write_bytes(b"\0" * 2880 * 4),
        [0, 1, 2],
        "corrupt FITS file",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_fail_clearly_or_are_skipped(aegis_copy: Path, tmp_path: Path, case: str) -> None:
    corrupt, rows, reason = BAD_ROWS[case]
    corrupt(aegis_copy)
    cat = aegis_copy / "AEGIS_F814w_catalog.fits"
    with pytest.raises(FitsReadError) as ei:
        build_shards(cat, tmp_path / "out", size=32, val_fraction=0.0)
    msg = str(ei.value)
    assert "\n" not in msg and f"(catalog row {rows[0]})" in msg and "AEGIS_F814w_images_0" in msg
    assert f"HDU {int(fitsio.read(str(cat), ext=1)['GAL_HDU'][rows[0]])}" in msg
    assert not (tmp_path / "out").exists()
    m = build_shards(cat, tmp_path / "out", size=32, val_fraction=0.0, skip_bad=True, shard_size=2)
    assert m.data["n_skipped"] == len(rows) and m.count("train") == 5 - len(rows)
    assert [s["row"] for s in m.data["skipped"]] == rows
    for s in m.data["skipped"]:
        assert set(s) == {"row", "ident", "file", "hdu", "reason"}
        assert re.search(reason, s["reason"]), s
    assert sorted(k for k in read_set(tmp_path / "out")) == [f"g{i:09d}" for i in range(5) if i not in rows]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]


def test_missing_required_column(aegis_copy: Path, tmp_path: Path) -> None:
    import numpy.lib.recfunctions as rfn

    cat = aegis_copy / "AEGIS_F814w_catalog.fits"
    fitsio.write(str(cat), rfn.drop_fields(fitsio.read(str(cat), ext=1), ["GAL_FILENAME"]), clobber=True)
    with pytest.raises(
        CatalogError, match=r"AEGIS_F814w_catalog\.fits: missing required column\(s\) GAL_FILENAME"
    ):
        build_shards(cat, tmp_path / "out", size=32, skip_bad=True)


def test_existing_output_refused_without_overwrite(aegis_copy: Path, tmp_path: Path) -> None:
    cat = aegis_copy / "AEGIS_F814w_catalog.fits"
    out = tmp_path / "out"
    first = build_shards(cat, out, size=32, shard_size=1, val_fraction=0.0)
    assert len(first.shards("train")) == 5
    with pytest.raises(ShardError, match=r"out: folder already holds shards \(manifest.json, 5 .tar file"):
        build_shards(cat, out, size=32)
    again = build_shards(cat, out, size=32, shard_size=10, val_fraction=0.0, overwrite=True)
    assert [s.name for s in again.shards("train")] == ["train-000000.tar"]
    # the old set's five shards are gone; the PSF mean and the wids indexes are the new set's
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "psf_mean.npy", "train-000000.tar", "train.wids.json", "val.wids.json"
    ]  # fmt: skip


def test_h5_ingest(tiny_h5: Path, tmp_path: Path) -> None:
    m = build_shards_from_h5(tiny_h5, tmp_path / "h5", size=32, val_fraction=0.25, shard_size=10)
    with h5py.File(tiny_h5) as f:
        imgs, z = f["images"][:], f["redshifts"][:]
    samples = read_set(tmp_path / "h5")
    assert len(samples) == 64 and m.has_redshift and m.data["source"]["kind"] == "h5"
    assert m.data["source"]["h5_images"] == "images" and m.data["redshift_column"] == "redshifts"
    for s in samples.values():
        r = s["meta"]["row"]
        np.testing.assert_array_equal(s["image"], imgs[r, 4:36, 4:36])
        assert s["meta"]["zphot"] == float(z[r]) and s["meta"]["orig_shape"] == [40, 40]


def test_h5_dataset_detection(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f["grp/imgs"] = np.ones((6, 1, 20, 20), np.float32)
        f["z"] = np.arange(6.0)
        f["other"] = np.zeros(5)
    assert find_h5_datasets(path) == ("grp/imgs", "z")
    with h5py.File(path, "a") as f:
        f["more"] = np.ones((6, 8, 8))
        f["z2"] = np.arange(6.0)
    with pytest.raises(ShardError, match=r"x\.h5: several 3-D image dataset\(s\) .*--h5-images"):
        find_h5_datasets(path)
    with pytest.raises(ShardError, match=r"several 1-D datasets of length 6 .*z, z2"):
        find_h5_datasets(path, images="grp/imgs")
    assert find_h5_datasets(path, images="grp/imgs", redshifts="z2") == ("grp/imgs", "z2")
    m = build_shards_from_h5(
        path, tmp_path / "o", size=16, images="grp/imgs", redshifts="z2", val_fraction=0.0
    )
    assert m.count("train") == 6 and read_set(tmp_path / "o")["g000000003"]["meta"]["zphot"] == 3.0
    with pytest.raises(ShardError, match="no dataset 'nope'"):
        find_h5_datasets(path, images="nope")


def test_tiny_shards_fixture(tiny_shards: Path) -> None:
    m = Manifest.load(tiny_shards)
    assert m.count("train") + m.count("val") == 64 and m.image_size == 32 and m.has_redshift
    assert all(s.count <= 8 for sp in m.splits for s in m.shards(sp))


def test_cli_errors_are_one_line(shared_data: Path, aegis_copy: Path, tmp_path: Path) -> None:
    p = cli(
        "-m",
        "hpcvae.shard",
        "--catalog",
        str(shared_data / COSMOS),
        "--size",
        "64",
        "--out",
        str(tmp_path / "c"),
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0
    assert "real_galaxy_images.fits, HDU 0 (catalog row 0): image file not found" in p.stderr

    _edit_catalog(aegis_copy / "AEGIS_F814w_catalog.fits", _set_hdu(1, 11))
    args = [
        "--catalog",
        str(aegis_copy / "AEGIS_F814w_catalog.fits"),
        "--size",
        "32",
        "--out",
        str(tmp_path / "a"),
    ]
    p = cli("-m", "hpcvae.shard", *args)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "HDU 11 (catalog row 1): HDU index out of range" in p.stderr
    p = cli("-m", "hpcvae.shard", *args, "--skip-bad", "--workers", "2", "--shard-size", "1")
    assert p.returncode == 0, p.stderr
    assert "1 skipped of 5 rows" in p.stdout and "skipped row 1" in p.stderr
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["skipped"][0]["row"] == 1
    p = cli("-m", "hpcvae.shard", *args, "--skip-bad")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--overwrite" in p.stderr


def test_h5_redshifts_of_the_wrong_length_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f["images"] = np.ones((6, 20, 20), np.float32)
        f["redshifts"] = np.arange(5.0)  # one short: used to be ignored, sharding without redshifts
    with pytest.raises(ShardError, match=r"redshifts \[5\] do not match the 6 images.*--no-redshift"):
        build_shards_from_h5(path, tmp_path / "o", size=16)
    m = build_shards_from_h5(path, tmp_path / "o", size=16, use_redshift=False)
    assert not m.has_redshift and m.count("train") + m.count("val") == 6


def test_duplicate_catalog_rows_are_an_error_or_skipped_and_counted(aegis_copy: Path, tmp_path: Path) -> None:
    cat = aegis_copy / "AEGIS_F814w_catalog.fits"

    def duplicate_row_0(t):
        return np.concatenate([t, t[:1]])

    t = fitsio.read(str(cat), ext=1)
    fitsio.write(str(cat), duplicate_row_0(t), clobber=True)
    args = [
        "-m",
        "hpcvae.shard",
        "--catalog",
        str(cat),
        "--size",
        "32",
        "--out",
        str(tmp_path / "a"),
        "--no-redshift",
    ]
    p = cli(*args)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "row 5: duplicate of row 0" in p.stderr and "--skip-bad" in p.stderr, p.stderr
    p = cli(*args, "--skip-bad")
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["n_duplicates"] == 1 and m["n_skipped"] == 1 and m["skipped"][0]["row"] == 5
    assert sum(sp["count"] for sp in m["splits"].values()) == 5  # each galaxy once


def test_float16_shards_halve_the_disk_and_record_their_rounding(make_rgc, tmp_path: Path) -> None:
    """``--dtype float16``: half the bytes, the rounding error against the noise in the manifest, same loader."""
    from hpcvae.config import DataConfig
    from hpcvae.data import ShardData
    from hpcvae.shards.format import decode_npy, read_shard

    cat = make_rgc(tmp_path / "rgc", 40)
    full = build_shards(cat, tmp_path / "f32", size=96, val_fraction=0.0)
    half = build_shards(cat, tmp_path / "f16", size=96, val_fraction=0.0, dtype="float16")
    assert full.data["image"]["dtype"] == "float32" and half.data["image"]["dtype"] == "float16"
    r = half.data["image"]["rounding"]
    assert 0 < r["rms"] <= r["max_abs"] and r["rms_over_noise_std"] < 0.01, r
    size = lambda m: sum((m.root / s.name).stat().st_size for s in m.shards("train"))  # noqa: E731
    assert size(half) < 0.6 * size(full)
    _, files = next(read_shard(half.shard_paths("train")[0]))
    assert decode_npy(files["image.npy"]).dtype == np.float16
    cfg = DataConfig(path=str(tmp_path), batch_size=40, num_workers=0)
    a = next(iter(ShardData(cfg, full, rank=0, world_size=1, seed=0).train_loader(0)))
    b = next(iter(ShardData(cfg, half, rank=0, world_size=1, seed=0).train_loader(0)))
    assert a["key"] == b["key"] and b["image"].dtype == torch.float32
    assert float((a["image"] - b["image"]).abs().max()) <= r["max_abs"] * 1.0001


def test_a_pixel_beyond_float16_is_an_error_or_a_recorded_skip(make_rgc, tmp_path: Path) -> None:
    cat = make_rgc(tmp_path / "rgc", 6)
    rows = fitsio.read(str(cat))
    file, hdu = rows["GAL_FILENAME"][2].strip(), int(rows["GAL_HDU"][2])
    with fitsio.FITS(str(cat.parent / file), "rw") as f:  # a real file whose stamp holds a huge value
        img = f[hdu].read()
        img[5, 5] = 1e6
        f[hdu].write(img)
    with pytest.raises(HpcvaeError, match=r"row 2.*exceeds float16's range"):
        build_shards(cat, tmp_path / "out", size=48, dtype="float16")
    m = build_shards(cat, tmp_path / "out", size=48, dtype="float16", skip_bad=True)
    assert m.data["n_skipped"] == 1 and "float16" in m.data["skipped"][0]["reason"]
