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
