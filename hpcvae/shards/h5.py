"""The seed's h5 layout (one N x H x W image dataset, one N redshifts) as a shard source."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hpcvae.errors import ConfigError, ShardError
from hpcvae.hashing import sha256_file
from hpcvae.shards.ingest import (
    Job,
    Row,
    ShardConfig,
    Source,
    build,
    condition_problem,
    config_kwargs,
    identity_digest,
    row_error,
    seed_of,
    skip_record,
)
from hpcvae.shards.manifest import Manifest

_H5_FILES: dict[str, Any] = {}


def _h5_dataset(path: str, name: str) -> Any:
    import h5py

    f = _H5_FILES.get(path)
    if f is None:
        f = _H5_FILES[path] = h5py.File(path, "r")
    return f[name]


def close_readers() -> None:
    for f in _H5_FILES.values():
        f.close()
    _H5_FILES.clear()


def header_info(job: Job) -> dict[str, str]:
    """The seed's h5 files carry no FITS headers."""
    return {}


def iter_images(job: Job) -> Iterator[tuple[Row, Any, None]]:
    """(row, stamp or ShardError) for every row of ``job``: one block read of the h5 dataset."""
    dset = _h5_dataset(job.source, job.options["images"])
    lo, hi = job.rows[0].row, job.rows[-1].row + 1
    block = np.asarray(dset[lo:hi])
    block = block.reshape(block.shape[0], *_h5_image_shape(block.shape))
    for r in job.rows:
        img = np.ascontiguousarray(block[r.row - lo], dtype="<f4")
        finite = np.isfinite(img)
        if not finite.all():
            bad = img.size - np.count_nonzero(finite)
            yield r, row_error(f"{bad} NaN/inf pixel(s) of {img.size}", r, job.source), None
        else:
            yield r, img, None


def _h5_image_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """Per-sample 2-D shape of an N x H x W (or N x 1 x H x W / N x H x W x 1) dataset."""
    rest = [d for i, d in enumerate(shape[1:]) if not (d == 1 and len(shape) == 4 and i in (0, 2))]
    return int(rest[0]), int(rest[1])


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
    **physics: Any,
) -> Manifest:
    """Shard the seed's h5 layout (N x H x W images + N redshifts) into the same format.

    ``physics``: ``band``, ``instrument``, ``bunit``, ``pixel_scale``: the h5 file records none of them.

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
        **physics,
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
        z = None
        if redshifts:
            raw = f[redshifts][:]
            if raw.dtype.kind not in "iuf":
                raise ShardError(
                    f"{path}: redshift dataset {redshifts!r} holds {raw.dtype} values, not numbers"
                )
            z = np.asarray(raw, dtype=np.float64)
    rows: list[Row] = []
    skipped: list[dict[str, Any]] = []
    for i in range(n):
        r = Row(
            row=i,
            ident=str(i),
            file=path.name,
            hdu=i,
            seed=seed_of(identity_digest(str(i), path.name, i)),
            zphot=None if z is None else float(z[i]),
            mag=None,
            pixel_scale=None,
            noise_variance=None,
            conditions=None if z is None else {redshifts: float(z[i])},
        )
        problem = None if r.zphot is None else condition_problem(str(redshifts), r.zphot, redshift=True)
        if problem:
            if not skip_bad:
                raise ShardError(f"{path}, row {i}: {problem}")
            skipped.append(skip_record(r, problem))
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
    src = Source(
        kind="h5",
        location=str(path),
        rows=rows,
        n_rows=n,
        pre_skipped=skipped,
        has_redshift=redshifts is not None,
        redshift_column=redshifts,
        source_info=info,
        options={"images": images},
        conditions=[{"name": redshifts, "column": redshifts, "table": str(path), "role": "redshift"}] if redshifts else [],
    )  # fmt: skip
    return build(src, Path(out), cfg)


# -- python -m hpcvae.shard ------------------------------------------------------------------------

SELECT = "from_h5"
"""The flag that picks this source: ``--from-h5``."""


def add_arguments(p: argparse.ArgumentParser, select: Any) -> list[str]:
    """This source's flags (``select`` is the group of flags that pick a source); returns its own dests."""
    select.add_argument("--from-h5", metavar="FILE", help="h5 file with N x H x W images and N redshifts")
    p.add_argument("--h5-images", help="image dataset name in --from-h5 (default: the only 3-D dataset)")
    p.add_argument(
        "--h5-redshifts", help="redshift dataset name in --from-h5 (default: the 1-D dataset of length N)"
    )
    return ["h5_images", "h5_redshifts"]


def from_args(args: argparse.Namespace, cfg: ShardConfig) -> Manifest:
    if cfg.pad != "zeros":
        raise ConfigError(
            "--pad noise needs each galaxy's noise variance, which --from-h5 files do not carry"
        )
    opts = config_kwargs(cfg)
    opts.pop("pad")
    return build_shards_from_h5(args.from_h5, args.out, images=args.h5_images, redshifts=args.h5_redshifts,
                                use_redshift=False if args.no_redshift else None, **opts)  # fmt: skip
