"""The shard-set manifest: the one contract between ingest, the loader and training.

Layout of a shard set folder::

    manifest.json
    train-000000.tar  train-000001.tar ...
    val-000000.tar ...

Each tar holds samples ``KEY.image.npy`` (float32 H x W physical pixels, no
normalisation) and ``KEY.meta.json``.  Keys contain no dots (WebDataset splits the key
at the first dot).  The per-shard counts in the manifest are what make exact epochs
possible: every rank can compute the same global sample layout without reading data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcvae.errors import ShardError

MANIFEST_NAME = "manifest.json"
FORMAT = "hpcvae-shards/1"


@dataclass(kw_only=True)
class ShardInfo:
    name: str
    """File name relative to the shard-set folder."""
    count: int
    """Samples in this shard."""
    sha256: str = ""
    """Digest of the tar file."""


@dataclass(kw_only=True)
class Manifest:
    root: Path
    """Folder that holds the manifest and shards."""
    data: dict[str, Any] = field(default_factory=dict)
    """The parsed ``manifest.json``."""

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        root = Path(root)
        path = root / MANIFEST_NAME if root.is_dir() or not root.name.endswith(".json") else root
        if path.name == MANIFEST_NAME:
            root = path.parent
        if not root.exists():
            raise ShardError(f"shard folder {root} does not exist")
        if not path.is_file():
            raise ShardError(f"{path}: no manifest.json (is {root} a shard set made by hpcvae.shard?)")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardError(f"{path}: unreadable manifest: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ShardError(
                f"{path}: not an hpcvae manifest (format {data.get('format')!r}, expected {FORMAT!r})"
            )
        for key in ("image", "splits"):
            if key not in data:
                raise ShardError(f"{path}: manifest lacks '{key}'")
        return cls(root=root, data=data)

    # -- accessors -----------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def image_size(self) -> int:
        return int(self.data["image"]["size"])

    @property
    def has_redshift(self) -> bool:
        return bool(self.data.get("has_redshift", False))

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.data["splits"]:
            raise ShardError(f"{self.path}: no split {split!r} (have {', '.join(self.splits)})")
        return [ShardInfo(**s) for s in self.data["splits"][split]["shards"]]

    def count(self, split: str) -> int:
        return sum(s.count for s in self.shards(split))

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / s.name for s in self.shards(split)]

    def stats(self, split: str = "train") -> dict[str, float]:
        return dict(self.data.get("stats", {}).get(split, {}))

    @property
    def digest(self) -> str:
        """sha256 of the manifest file: identifies the exact data a model was trained on."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def check_files(self, split: str | None = None) -> None:
        """Fail early, with the file's name, when a shard listed in the manifest is missing."""
        for sp in [split] if split else self.splits:
            for s in self.shards(sp):
                p = self.root / s.name
                if not p.is_file():
                    raise ShardError(f"{p}: shard listed in {self.path} is missing")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


VERIFY_CACHE = "shards_verified.json"
"""Per run folder: the shards already checked, by size and mtime (so a resume does not rehash them)."""


def shards_to_verify(manifest: Manifest, cache_file: Path | None) -> tuple[list[ShardInfo], dict[str, Any]]:
    """(shards whose sha256 must be computed, the cache entries still valid for the others)."""
    cached: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text()).get("shards", {})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            cached = {}  # a damaged cache only costs a rehash
    todo, keep = [], {}
    for split in manifest.splits:
        for s in manifest.shards(split):
            if not s.sha256:
                continue
            st = (manifest.root / s.name).stat()
            c = cached.get(s.name) if isinstance(cached, dict) else None
            if isinstance(c, dict) and (c.get("size"), c.get("mtime_ns"), c.get("sha256")) == (
                st.st_size, st.st_mtime_ns, s.sha256):  # fmt: skip
                keep[s.name] = c
            else:
                todo.append(s)
    return todo, keep


def hash_shards(manifest: Manifest, shards: list[ShardInfo], threads: int = 4) -> dict[str, dict[str, Any]]:
    """``{name: {size, mtime_ns, sha256}}`` of ``shards``, hashed on a few threads (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(s: ShardInfo) -> tuple[str, dict[str, Any]]:
        path = manifest.root / s.name
        st = path.stat()
        return s.name, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}

    if not shards:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as ex:
        return dict(ex.map(one, shards))


def check_hashes(manifest: Manifest, hashed: dict[str, dict[str, Any]]) -> None:
    """Raise ShardError naming the first shard whose sha256 differs from the manifest's."""
    want = {s.name: s.sha256 for sp in manifest.splits for s in manifest.shards(sp)}
    for name, rec in sorted(hashed.items()):
        if rec["sha256"] != want.get(name):
            raise ShardError(
                f"{manifest.root / name}: sha256 differs from {manifest.path}: the shard changed after it was "
                "written; re-shard, or train on it anyway with --set data.verify=false",
                collective=True,
            )


def write_verify_cache(cache_file: Path, manifest: Manifest, records: dict[str, dict[str, Any]]) -> None:
    tmp = cache_file.with_name(f".{cache_file.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"manifest": str(manifest.path), "shards": records}, indent=1) + "\n")
    os.replace(tmp, cache_file)
