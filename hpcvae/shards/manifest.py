"""The shard-set manifest: the one contract between ingest, the loader and training (read, write, stats).

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
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcvae.errors import ShardError
from hpcvae.hashing import sha256_file
from hpcvae.shards.format import WIDS_SUFFIX, ShardWriter, decode_sample, read_samples, tar_members

MANIFEST_NAME = "manifest.json"
SYNTH_CATALOG_MARK = "synth"
"""``hpcvae.synth`` names its catalogs ``real_galaxy_catalog_synth_*``."""
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
        from hpcvae.jsonfiles import MANIFEST, read_json

        data = read_json(path, MANIFEST, ShardError, "manifest", fmt=FORMAT)
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
    def has_noise_variance(self) -> bool:
        """Each galaxy's NOISE_VARIANCE was carried (the train stats then have its typical ``noise_std``)."""
        return "noise_std" in self.stats("train")

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

    @property
    def conditions(self) -> list[dict[str, Any]]:
        """The galaxies' conditions (name, column, table, role, train stats), in the order batches carry them."""
        return [c for c in self.data.get("conditions") or [] if isinstance(c, dict) and c.get("name")]

    @property
    def condition_names(self) -> tuple[str, ...]:
        return tuple(str(c["name"]) for c in self.conditions)

    def stats(self, split: str = "train") -> dict[str, float]:
        return dict(self.data.get("stats", {}).get(split, {}))

    @property
    def synthetic(self) -> bool:
        """Made by ``hpcvae.synth`` (its catalog name says so): truth tables exist, results are not science."""
        d = self.data
        if d.get("synthetic") or d.get("source", {}).get("synthetic"):
            return True
        return SYNTH_CATALOG_MARK in Path(str(d.get("source", {}).get("catalog") or "")).name

    def physics(self) -> dict[str, Any]:
        """What a pixel means: scale, band, unit, noise and the mean PSF image (as lists), for model.json.

        A set written before ``physics`` existed gets the pixel scale of its first sample, if any.
        """
        phys = dict(self.data.get("physics") or {})
        psf = dict(phys.get("psf") or {})
        if psf.get("mean_file") and (self.root / psf["mean_file"]).is_file():
            psf["image"] = np.load(self.root / psf["mean_file"]).astype(float).round(8).tolist()
        phys["psf"] = psf
        return phys

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
        return s.name, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path),
                        "count": count_samples(path)}  # fmt: skip

    if not shards:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as ex:
        return dict(ex.map(one, shards))


def count_samples(path: Path) -> int | None:
    """Samples (distinct keys) in a shard, reading tar headers only; None if the tar is damaged."""
    keys = set()
    try:
        with open(path, "rb") as f:
            for name, _, _ in tar_members(f):
                keys.add(name.rpartition("/")[2].partition(".")[0])
    except (ValueError, UnicodeDecodeError):
        return None
    return len(keys)


def check_hashes(manifest: Manifest, hashed: dict[str, dict[str, Any]]) -> None:
    """Raise ShardError naming the first shard whose sha256, or sample count, differs from the manifest's."""
    want = {s.name: s.sha256 for sp in manifest.splits for s in manifest.shards(sp)}
    counts = {s.name: s.count for sp in manifest.splits for s in manifest.shards(sp)}
    for name, rec in sorted(hashed.items()):
        if rec["sha256"] != want.get(name):
            raise ShardError(
                f"{manifest.root / name}: sha256 differs from {manifest.path}: the shard changed after it was "
                "written; re-shard, or train on it anyway with --set data.verify=false",
                collective=True,
            )
        if rec.get("count") is not None and rec["count"] != counts.get(name):  # the manifest was edited
            raise ShardError(
                f"{manifest.root / name}: holds {rec['count']} samples but {manifest.path} says {counts.get(name)}: "
                "samples would be dropped or invented silently; re-shard",
                collective=True,
            )


def verify_for_run(manifest: Manifest, run_dir: Path, dist: Any, group: Any = None) -> None:
    """Every shard's sha256 against the manifest, once per run folder, the ranks sharing the hashing.

    Rank ``r`` hashes shards ``r, r + W, ...`` of those not in the run's cache (by size and
    mtime); the results are gathered so every rank raises the same error for a changed shard.
    """
    import torch.distributed as tdist

    from hpcvae.dist import print0

    cache = run_dir / VERIFY_CACHE
    todo, records = shards_to_verify(manifest, cache)
    t0 = time.perf_counter()
    mine = hash_shards(manifest, todo[dist.rank :: dist.world_size])
    if dist.distributed:
        parts: list[Any] = [None] * dist.world_size
        tdist.all_gather_object(parts, mine, group=group)
        mine = {k: v for part in parts for k, v in part.items()}
    check_hashes(manifest, mine)
    if todo:
        gb = sum(r["size"] for r in mine.values()) / 1e9
        print0(f"data: verified {len(todo)} shard(s), {gb:.2f} GB, against {manifest.path} "
               f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_verify_cache(cache, manifest, {**records, **mine})


def write_verify_cache(cache_file: Path, manifest: Manifest, records: dict[str, dict[str, Any]]) -> None:
    tmp = cache_file.with_name(f".{cache_file.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"manifest": str(manifest.path), "shards": records}, indent=1) + "\n")
    os.replace(tmp, cache_file)


# -- writing -----------------------------------------------------------------------------------

SPLITS = ("train", "val")
PERCENTILES = (0.1, 1.0, 5.0, 50.0, 95.0, 99.0, 99.9)
SHARD_NAME = "{split}-{index:06d}.tar"


def shard_name(split: str, index: int) -> str:
    return SHARD_NAME.format(split=split, index=index)


@dataclass(kw_only=True)
class PixelStats:
    """The train split's pixel statistics, accumulated per image and merged across workers.

    Mean and variance are exact over every pixel (Chan et al.'s parallel merge, float64);
    the percentiles behind the robust normalisations come from a bounded subsample.  The
    typical sky-noise sigma (the median of the catalog's NOISE_VARIANCE) sets asinh's scale.
    """

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    vmin: float = math.inf
    vmax: float = -math.inf
    samples: list[np.ndarray] = field(default_factory=list)
    noise_vars: list[float] = field(default_factory=list)

    def add(
        self, img: np.ndarray, sample: np.ndarray | None = None, noise_variance: float | None = None
    ) -> None:
        d = img.ravel().astype(np.float64)
        m_b = float(d.mean())
        d -= m_b
        # einsum, not d @ d: BLAS threads on a busy node turn a 25k-element dot into milliseconds.
        self._merge(d.size, m_b, float(np.einsum("i,i->", d, d)), float(img.min()), float(img.max()))
        if sample is not None:
            self.samples.append(np.asarray(sample, dtype=np.float32))
        if noise_variance is not None and noise_variance >= 0:
            self.noise_vars.append(float(noise_variance))

    def _merge(self, n_b: int, m_b: float, m2_b: float, lo: float, hi: float) -> None:
        n = self.n + n_b
        if n == 0:
            return
        delta = m_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n
        self.vmin, self.vmax = min(self.vmin, lo), max(self.vmax, hi)

    def merge(self, other: PixelStats) -> None:
        if other.n:
            self._merge(other.n, other.mean, other.m2, other.vmin, other.vmax)
        self.samples += other.samples
        self.noise_vars += other.noise_vars

    def to_dict(self) -> dict[str, float]:
        """The manifest's ``stats.train``: min/max/mean/std, percentiles, mad_std, noise_std."""
        sample = np.concatenate(self.samples).astype(np.float64) if self.samples else np.zeros(1)
        pct = np.percentile(sample, PERCENTILES)
        med = float(np.median(sample))
        stats = {
            "min": self.vmin,
            "max": self.vmax,
            "mean": self.mean,
            "std": math.sqrt(self.m2 / self.n) if self.n else 0.0,
            **{f"p{p:g}": float(v) for p, v in zip(PERCENTILES, pct)},
            "mad_std": 1.4826 * float(np.median(np.abs(sample - med))),
            "n_pixels": self.n,
            "n_pixels_sampled": int(sample.size),
        }
        if self.noise_vars:
            stats["noise_std"] = math.sqrt(float(np.median(self.noise_vars)))
        return stats


def manifest_record(
    *,
    size: int,
    splits: dict[str, Any],
    stats: dict[str, float],
    source: dict[str, Any],
    has_redshift: bool,
    redshift_column: str | None,
    n_rows: int,
    skipped: list[dict[str, Any]] = (),  # type: ignore[assignment]
    dtype: str = "float32",
    pad: str = "zeros",
    val_fraction: float = 0.1,
    **extra: Any,
) -> dict[str, Any]:
    """A ``manifest.json`` body with every field the loader, training and evaluation rely on."""
    from hpcvae._version import __version__

    skipped = list(skipped)
    return {
        "format": FORMAT,
        "hpcvae_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "image": {"size": int(size), "dtype": dtype},
        "has_redshift": bool(has_redshift),
        "redshift_column": redshift_column,
        "pad": pad,
        "val_fraction": val_fraction,
        "source": source,
        "splits": splits,
        "stats": {"train": stats},
        "n_rows": int(n_rows),
        "n_skipped": len(skipped),
        "n_duplicates": sum(str(x.get("reason", "")).startswith("duplicate of row") for x in skipped),
        "skipped": skipped,
        **extra,
    }


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_wids_indexes(root: Path, data: dict[str, Any]) -> None:
    """``SPLIT.wids.json`` (wids' ``wids-shard-index-v1``), so ``wids.ShardListDataset`` opens a split."""
    for split, s in data.get("splits", {}).items():
        index = {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "name": f"{root.name}/{split}",
            "shardlist": [{"url": sh["name"], "nsamples": sh["count"]} for sh in s.get("shards", [])],
        }
        _atomic_json(root / f"{split}{WIDS_SUFFIX}", index)


def write_manifest(root: str | Path, data: dict[str, Any]) -> Manifest:
    """Write ``manifest.json`` atomically (temp file, rename): a folder with one is always a complete set.

    The wids indexes are written first: the manifest is the commit point of a set.
    """
    root = Path(root)
    write_wids_indexes(root, data)
    tmp = root / f".tmp-{os.getpid()}-{MANIFEST_NAME}"
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, root / MANIFEST_NAME)
    finally:
        tmp.unlink(missing_ok=True)
    return Manifest.load(root)


class SetWriter:
    """A whole shard set written sample by sample, ``per_shard`` samples to a shard, then its manifest.

    For callers that make samples themselves (the benchmarks' big sets, the test helpers);
    ingest (``hpcvae.shards.ingest``) writes shards in parallel with the same pieces.
    """

    def __init__(self, root: str | Path, *, per_shard: int = 1000, stats_every: int = 1) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.per_shard, self.stats_every = per_shard, max(1, stats_every)
        self._writer_cls = ShardWriter
        self._open: dict[str, Any] = {}
        self._count = {s: 0 for s in SPLITS}
        self._shards: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self.stats = PixelStats()

    def add(self, split: str, key: str, image: np.ndarray, meta: dict[str, Any]) -> None:
        w = self._open.get(split)
        if w is None:
            name = shard_name(split, len(self._shards[split]))
            w = self._open[split] = (self._writer_cls(str(self.root / name)), name, [0])
        writer, name, n = w
        writer.add_sample(key, image, meta)
        n[0] += 1
        if split == "train" and self._count["train"] % self.stats_every == 0:
            self.stats.add(image, sample=image.ravel()[:: max(1, image.size // 2000)],
                           noise_variance=meta.get("noise_variance"))  # fmt: skip
        self._count[split] += 1
        if n[0] >= self.per_shard:
            self._close(split)

    def _close(self, split: str) -> None:
        w = self._open.pop(split, None)
        if w is not None:
            writer, name, n = w
            self._shards[split].append({"name": name, "count": n[0], "sha256": writer.close()})

    def finish(self, **fields: Any) -> Manifest:
        """Close the shards and write the manifest (``fields`` as for :func:`manifest_record`)."""
        for split in SPLITS:
            self._close(split)
        splits = {s: {"count": self._count[s], "shards": self._shards[s]} for s in SPLITS}
        fields.setdefault("stats", self.stats.to_dict())
        fields.setdefault("n_rows", sum(self._count.values()))
        return write_manifest(self.root, manifest_record(splits=splits, **fields))


def iter_samples(manifest: Manifest, split: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """``(key, image, meta)`` of every sample of a split, in manifest order: for anyone who just wants to read it."""
    for info, path in zip(manifest.shards(split), manifest.shard_paths(split)):
        if not path.is_file():
            raise ShardError(f"{path}: shard listed in {manifest.path} is missing")
        for _, key, files in read_samples(path, expect=info.count):
            img, meta = decode_sample(path, key, files)
            yield key, img, meta
