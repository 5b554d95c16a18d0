"""Write a small, valid shard set per the DESIGN.md contract, independent of hpcvae.shard.

The loader tests need exact control over shard sizes (deliberately uneven) and must not
depend on the ingest module, so this writes the tars with WebDataset's own TarWriter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from hpcvae.manifest import FORMAT, MANIFEST_NAME, Manifest, sha256_file


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
            with wds.TarWriter(str(root / name)) as sink:
                for _ in range(n):
                    key = f"g{row:09d}"
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
                    sink.write({"__key__": key, "image.npy": img, "meta.json": meta})
                    images[key], redshifts[key] = img, z
                    keys[split].append(key)
                    row += 1
            shards.append({"name": name, "count": n, "sha256": sha256_file(root / name)})
        splits[split] = {"count": sum(counts), "shards": shards}
    data = {
        "format": FORMAT,
        "hpcvae_version": "0.1.0",
        "created": "2026-11-24T12:00:00Z",
        "image": {"size": size, "dtype": "float32"},
        "has_redshift": has_redshift,
        "redshift_column": "zphot" if has_redshift else None,
        "pad": "zeros",
        "val_fraction": 0.1,
        "source": {"kind": "rgc", "catalog": "/dev/null", "catalog_sha256": "", "fits_catalog": None},
        "splits": splits,
        "stats": {"train": {"min": -0.05, "max": 0.05, "mean": 0.0, "std": 0.01}},
        "n_rows": row,
        "n_skipped": 0,
        "skipped": [],
    }
    (root / MANIFEST_NAME).write_text(json.dumps(data, indent=1))
    return ShardSet(
        manifest=Manifest.load(root),
        images=images,
        redshifts=redshifts,
        train_keys=keys["train"],
        val_keys=keys["val"],
    )
