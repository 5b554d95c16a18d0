"""Shard sets: the format (``format``), the manifest (``manifest``), the build (``ingest``) and its two
sources (``rgc``: GalSim's RealGalaxyCatalog FITS layout; ``h5``: the seed's h5 file).

``python -m hpcvae.shard`` (or ``python -m hpcvae.shards``) is the command line.
"""

from __future__ import annotations

from hpcvae.shards.format import ShardWriter, read_shard, sample_key
from hpcvae.shards.h5 import build_shards_from_h5, find_h5_datasets
from hpcvae.shards.ingest import ShardConfig
from hpcvae.shards.manifest import Manifest, SetWriter, iter_samples, manifest_record, write_manifest
from hpcvae.shards.rgc import build_shards

__all__ = [
    "Manifest",
    "SetWriter",
    "ShardConfig",
    "ShardWriter",
    "build_shards",
    "build_shards_from_h5",
    "find_h5_datasets",
    "iter_samples",
    "manifest_record",
    "read_shard",
    "sample_key",
    "write_manifest",
]
