"""Shared fixtures: the real HST test data, copies of it to corrupt, and tiny shard sets."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(os.environ.get("HPCVAE_SHARED_DATA") or Path(__file__).resolve().parent / "data")
"""Real AEGIS and COSMOS RealGalaxyCatalog files: ``tests/data`` (shipped with the repository, GalSim's
licence in its README), or another copy of the same layout named by ``HPCVAE_SHARED_DATA``."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real HST files (read-only: copy them with ``aegis_copy`` before damaging one)."""
    if not (SHARED_DATA / "aegis-real").is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA} (HPCVAE_SHARED_DATA points elsewhere?)")
    return SHARED_DATA


def copy_writable(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return dst


@pytest.fixture
def aegis_copy(shared_data: Path, tmp_path: Path) -> Path:
    """A writable copy of aegis-real (catalogs + stamps) to corrupt in a test."""
    return copy_writable(shared_data / "aegis-real", tmp_path / "aegis")


@pytest.fixture(scope="session")
def make_rgc() -> Callable[..., Path]:
    """Factory: ``make_rgc(folder, n, seed=0, min_size=30, max_size=90)`` writes a random RGC-layout set.

    Stamps are random non-square float32 images spread over two image files, with a
    catalog (IDENT, GAL_FILENAME, GAL_HDU, MAG, PIXEL_SCALE, NOISE_VARIANCE) and a
    ``_fits.fits`` sibling with IDENT and zphot.  Returns the catalog path.
    """
    import fitsio

    def make(folder: Path, n: int, *, seed: int = 0, min_size: int = 30, max_size: int = 90) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        files = ["images_01.fits", "images_02.fits"]
        per_file = [0, 0]
        gal_file, gal_hdu = [], []
        handles = [fitsio.FITS(str(folder / f), "rw", clobber=True) for f in files]
        try:
            for i in range(n):
                k = i * 2 // max(n, 1)
                h, w = rng.integers(min_size, max_size + 1, size=2)
                img = (rng.normal(0.0, 0.01, size=(h, w)) + 0.05 * rng.random()).astype(">f4")
                handles[k].write(img)
                gal_file.append(files[k])
                gal_hdu.append(per_file[k])
                per_file[k] += 1
        finally:
            for f in handles:
                f.close()
        cat = np.zeros(
            n,
            dtype=[
                ("IDENT", ">i8"),
                ("GAL_FILENAME", "S32"),
                ("GAL_HDU", ">i4"),
                ("MAG", ">f8"),
                ("PIXEL_SCALE", ">f8"),
                ("NOISE_VARIANCE", ">f8"),
            ],
        )
        cat["IDENT"] = 100000 + np.arange(n) * 7
        cat["GAL_FILENAME"] = gal_file
        cat["GAL_HDU"] = gal_hdu
        cat["MAG"] = rng.uniform(20, 25, n)
        cat["PIXEL_SCALE"] = 0.03
        cat["NOISE_VARIANCE"] = 1e-4
        path = folder / "catalog.fits"
        fitsio.write(str(path), cat, clobber=True)
        fits = np.zeros(n, dtype=[("IDENT", ">i8"), ("zphot", ">f8")])
        fits["IDENT"] = cat["IDENT"]
        fits["zphot"] = rng.uniform(0.1, 2.0, n)
        fitsio.write(str(folder / "catalog_fits.fits"), fits, clobber=True)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed's h5 layout: 64 images of 40x40 ('images') and 64 redshifts ('redshifts')."""
    import h5py

    path = tmp_path_factory.mktemp("h5") / "galaxies.h5"
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        f["images"] = rng.gamma(1.0, 0.02, size=(64, 40, 40)).astype(np.float32)
        f["redshifts"] = rng.uniform(0.1, 2.0, size=64)
    return path


@pytest.fixture(scope="session")
def tiny_shards(tiny_h5: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shard set (32x32, redshifts, ~51 train / ~13 val in shards of 8): for loader/trainer tests."""
    from hpcvae.shards import build_shards_from_h5

    out = tmp_path_factory.mktemp("shards") / "tiny"
    build_shards_from_h5(tiny_h5, out, size=32, val_fraction=0.2, shard_size=8)
    return out


@pytest.fixture(scope="session")
def aegis_shards(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real AEGIS F814W stamps (5 galaxies, non-square) sharded at 64x64, no redshift."""
    from hpcvae.shards import build_shards

    out = tmp_path_factory.mktemp("shards") / "aegis"
    build_shards(
        shared_data / "aegis-real" / "AEGIS_F814w_catalog.fits", out, size=64, val_fraction=0.2, shard_size=2
    )
    return out


@pytest.fixture
def one_rank_group() -> Iterator[Callable[[str], None]]:
    """Join a process group of one in this pytest process, torn down after the test.

    Over TCP on 127.0.0.1 with a 60 s timeout, the rendezvous the two-rank tests use: a FileStore
    rendezvous once hung a CI run past its 90 minutes inside C++ where pytest-timeout's signal cannot reach.
    """
    import datetime

    import torch.distributed as tdist

    from hpcvae.dist import free_port

    def join(backend: str = "gloo") -> None:
        tdist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=60),
        )

    yield join
    if tdist.is_initialized():
        tdist.destroy_process_group()
