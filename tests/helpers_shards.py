"""Write a small, valid shard set with exactly the per-shard counts a loader test asks for.

The loader tests need exact control over shard sizes (deliberately uneven), so this writes
shards directly with ``hpcvae.shards.format`` (not through ingest); ``tests/test_shard.py``
reads ingest's output back with webdataset itself, the independent check of the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcvae.shards.format import ShardWriter, sample_key
from hpcvae.shards.manifest import Manifest, manifest_record, write_manifest


@dataclass(kw_only=True)
class ShardSet:
    manifest: Manifest
    images: dict[str, np.ndarray]
    redshifts: dict[str, float]
    train_keys: list[str]
    val_keys: list[str]


def write_shard_set(
    root: str | Path,
    *,
    train_counts: list[int],
    val_counts: list[int] | None = None,
    size: int = 16,
    has_redshift: bool = True,
    seed: int = 0,
) -> ShardSet:
    """Shards ``train-NNNNNN.tar`` / ``val-NNNNNN.tar`` with the given per-shard sample counts."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images: dict[str, np.ndarray] = {}
    redshifts: dict[str, float] = {}
    keys: dict[str, list[str]] = {"train": [], "val": []}
    splits = {}
    row = 0
    for split, counts in (("train", train_counts), ("val", val_counts or [])):
        shards = []
        for i, n in enumerate(counts):
            name = f"{split}-{i:06d}.tar"
            with ShardWriter(str(root / name)) as sink:
                for _ in range(n):
                    key = sample_key(row)
                    img = rng.normal(0.0, 0.01, (size, size)).astype("<f4")
                    z = float(np.round(rng.uniform(0.1, 3.0), 4))
                    meta = {
                        "ident": str(100000 + row),
                        "row": row,
                        "zphot": z if has_redshift else None,
                        "mag": 22.5,
                        "pixel_scale": 0.03,
                        "noise_variance": 1e-4,
                        "orig_shape": [size, size],
                        "file": "synthetic.fits",
                        "hdu": row,
                    }
                    sink.add_sample(key, img, meta)
                    images[key], redshifts[key] = img, z
                    keys[split].append(key)
                    row += 1
            shards.append({"name": name, "count": n, "sha256": sink.sha256})
        splits[split] = {"count": sum(counts), "shards": shards}
    source = {"kind": "rgc", "catalog": "/dev/null", "catalog_sha256": "", "fits_catalog": None}
    stats = {"min": -0.05, "max": 0.05, "mean": 0.0, "std": 0.01}
    write_manifest(root, manifest_record(size=size, splits=splits, stats=stats, source=source,
                                         has_redshift=has_redshift, redshift_column="zphot" if has_redshift else None,
                                         n_rows=row))  # fmt: skip
    return ShardSet(
        manifest=Manifest.load(root),
        images=images,
        redshifts=redshifts,
        train_keys=keys["train"],
        val_keys=keys["val"],
    )
