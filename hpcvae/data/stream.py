"""The streaming loader: tar shards -> exact, deterministic, resumable epochs of batches.

Pipeline, in the style of WebDataset's small generator stages::

    plan (hpcvae.data.plan: shard order, split by rank, split by worker, shuffle order)
      -> read_raw   (tar members of the wanted samples only; others are seeked over)
      -> reorder    (the seeded shuffle buffer, simulated on indices up front)
      -> decode     (.npy header parse + frombuffer, meta.json for the redshift)
      -> transform  (the normalisation, per image)
      -> collate    (one np.stack per batch, done inside the worker)

Why the shuffle is simulated on indices: a batch's content is then a pure function of the
plan inputs and the step, so a resumed epoch can start at any step, skip the consumed
samples without decoding them, and still reproduce the uninterrupted epoch bit for bit.
Reading stays sequential and at most ``shuffle_buffer`` raw samples are held, exactly like
a streaming shuffle buffer.

Step ``t`` of an epoch belongs to "virtual worker" ``t % num_workers``; each virtual worker
owns a contiguous sample range (few shards per worker).  PyTorch's DataLoader takes batches
from its workers round-robin, starting at worker 0, and a worker that runs out only ends its
own stream; so DataLoader worker ``p`` of a loader started at step ``k`` plays virtual
worker ``(k + p) % num_workers`` from its first batch at or after ``k``, and the batches
arrive in step order.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hpcvae.config import DataConfig
from hpcvae.data.loader import EpochLoader, _Failure, worker_init
from hpcvae.data.plan import EpochPlan, PlanInputs, epoch_steps, stream_plan, val_ranges
from hpcvae.errors import ConfigError, ShardError
from hpcvae.shards.format import IMAGE, META, PSF, decode_npy, read_samples
from hpcvae.shards.manifest import Manifest
from hpcvae.shards.physics import pad_psf


@dataclass(frozen=True, kw_only=True)
class _Raw:
    index: int
    key: str
    shard: str
    files: dict[str, bytes]


def _identity(x: Any) -> Any:
    return x


@dataclass(kw_only=True)
class _Source:
    """Everything a worker needs to read one split; small and picklable (spawn/forkserver workers)."""

    root: str
    names: list[str]
    counts: list[int]
    image_size: int
    has_redshift: bool
    transform: Callable[[np.ndarray], Any] | None
    batch_size: int
    has_noise: bool = False
    """The samples' meta.json carry noise_variance: batches then have ``noise_var`` (physical units)."""
    psf_shape: tuple[int, int] | None = None
    """Batches carry each sample's ``psf.npy`` as ``psf`` (B, 1, P, P); None = not read."""
    cond_names: tuple[str, ...] = ()
    """The manifest's conditions: batches carry them as ``cond`` (B, len(cond_names)), raw catalog values."""

    def path(self, name: str) -> Path:
        return Path(self.root) / name

    # stage: raw samples -------------------------------------------------------------------------
    def read_raw(
        self,
        names: Sequence[str],
        starts: Sequence[int],
        counts: Sequence[int],
        lo: int,
        hi: int,
        want: np.ndarray,
    ) -> Iterator[_Raw]:
        """Raw samples with global index in ``[lo, hi)`` and ``want[index - lo]``, in tar order."""
        for name, start, count in zip(names, starts, counts):
            a, b = max(lo, start), min(hi, start + count)
            if a < b:
                yield from self._read_shard(name, count, a - start, b - start, start, want[a - lo : b - lo])

    def _read_shard(
        self, name: str, count: int, first: int, end: int, base: int, want: np.ndarray
    ) -> Iterator[_Raw]:
        path = self.path(name)
        for idx, key, files in read_samples(path, first=first, end=end, want=want, expect=count):
            yield _Raw(index=base + idx, key=key, shard=str(path), files=files)

    # stage: decode + transform ------------------------------------------------------------------
    def decode_psf(self, raw: _Raw) -> np.ndarray:
        data = raw.files.get(PSF)
        if data is None:
            raise ShardError(
                f"{raw.shard}: sample {raw.key} has no {PSF}, but the model needs each galaxy's PSF"
            )
        try:
            psf = decode_npy(data)
        except ValueError as exc:
            raise ShardError(f"{raw.shard}: sample {raw.key}: {PSF}: {exc}") from None
        assert self.psf_shape is not None
        side = self.psf_shape[0]
        square = psf.ndim == 2 and psf.shape[0] == psf.shape[1]
        if not (square and psf.shape[0] <= side and np.isfinite(psf).all()):
            raise ShardError(
                f"{raw.shard}: sample {raw.key}: {PSF} is {psf.shape} (finite: {bool(np.isfinite(psf).all())}); "
                f"the manifest says square, at most {side}x{side} (shards written before PSFs were squared: re-shard)"
            )
        return psf if psf.shape[0] == side else pad_psf(psf, side)

    def decode(self, raw: _Raw) -> tuple[str, np.ndarray, float, float]:
        img = raw.files.get(IMAGE)
        if img is None:
            raise ShardError(f"{raw.shard}: sample {raw.key} has no image.npy (has {sorted(raw.files)})")
        try:
            x = decode_npy(img)
        except ValueError as exc:
            raise ShardError(f"{raw.shard}: sample {raw.key}: image.npy: {exc}") from None
        if x.shape != (self.image_size, self.image_size):
            raise ShardError(
                f"{raw.shard}: sample {raw.key}: image shape {x.shape}, the manifest says "
                f"{self.image_size}x{self.image_size}"
            )
        x = x.astype(np.float32, copy=False)
        if self.transform is not None:
            fwd = getattr(self.transform, "forward", self.transform)
            x = np.asarray(fwd(x), dtype=np.float32)
        z = nv = math.nan
        cond: list[float] = []
        if self.has_redshift or self.has_noise or self.cond_names:
            meta = raw.files.get(META)
            if meta is None:
                raise ShardError(f"{raw.shard}: sample {raw.key} has no meta.json")
            try:
                info = json.loads(meta)
                zv, nvv = info.get("zphot"), info.get("noise_variance")
                z = float(zv) if zv is not None else math.nan
                nv = float(nvv) if nvv is not None else math.nan
                if self.cond_names:
                    given = info.get("conditions") or {}
                    cond = [float(given[c]) for c in self.cond_names]
            except (ValueError, TypeError, AttributeError, KeyError) as exc:
                raise ShardError(f"{raw.shard}: sample {raw.key}: bad meta.json: {exc!r}") from None
            if self.has_redshift and not math.isfinite(z):
                raise ShardError(
                    f"{raw.shard}: sample {raw.key}: zphot is {zv!r} but the manifest has redshifts"
                )
            if not all(math.isfinite(c) for c in cond):
                raise ShardError(f"{raw.shard}: sample {raw.key}: a condition is not finite ({cond})")
        return raw.key, x, z, nv, cond

    # stage: everything, for one worker ----------------------------------------------------------
    def batches(
        self,
        *,
        names: Sequence[str],
        starts: Sequence[int],
        counts: Sequence[int],
        order: np.ndarray,
        sizes: Sequence[int],
    ) -> Iterator[dict[str, Any] | _Failure]:
        """Emit the samples of ``order`` (global indices, emission order) as batches of ``sizes``."""
        if len(order) == 0:
            return
        lo, hi = int(order.min()), int(order.max()) + 1
        want = np.zeros(hi - lo, dtype=bool)
        want[order - lo] = True
        raw = self.read_raw(names, starts, counts, lo, hi, want)
        pending: dict[int, _Raw] = {}
        pos = 0
        try:
            for size in sizes:
                keys, zs, nvs, conds = [], [], [], []
                imgs = np.empty((size, self.image_size, self.image_size), dtype=np.float32)
                psfs = np.empty((size, *self.psf_shape), dtype=np.float32) if self.psf_shape else None
                for i, g in enumerate(order[pos : pos + size].tolist()):
                    while g not in pending:
                        r = next(raw, None)
                        if r is None:
                            raise ShardError(
                                f"{self.root}: sample index {g} was never read (shard counts wrong?)"
                            )
                        pending[r.index] = r
                    raw_g = pending.pop(g)
                    k, imgs[i], z, nv, c = self.decode(raw_g)
                    conds.append(c)
                    if psfs is not None:
                        psfs[i] = self.decode_psf(raw_g)
                    keys.append(k)
                    zs.append(z)
                    nvs.append(nv)
                pos += size
                batch: dict[str, Any] = {"image": torch.from_numpy(imgs).unsqueeze(1), "key": keys}
                if self.has_redshift:
                    batch["redshift"] = torch.tensor(zs, dtype=torch.float32)
                if self.has_noise:
                    batch["noise_var"] = torch.tensor(nvs, dtype=torch.float32)
                if psfs is not None:
                    batch["psf"] = torch.from_numpy(psfs).unsqueeze(1)
                if self.cond_names:
                    batch["cond"] = torch.tensor(conds, dtype=torch.float32)
                yield batch
        except ShardError as exc:
            yield _Failure(str(exc))


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _TrainStream(IterableDataset):
    """One rank's train epoch; epoch, start step and pool come from shared memory.

    Shared memory instead of attributes because persistent workers keep their own copy of
    the dataset: the main process writes ``(epoch, start_step, has_pool)`` and the pool mask
    before each ``iter()``, and every worker reads them when its iterator restarts.
    """

    def __init__(self, *, source: _Source, inputs: PlanInputs, rank: int, state: torch.Tensor,
                 pool_mask: torch.Tensor) -> None:  # fmt: skip
        self.source, self.inputs, self.rank = source, inputs, rank
        self.state, self.pool_mask = state, pool_mask

    def __iter__(self) -> Iterator[dict[str, Any] | _Failure]:
        epoch, start, has_pool = (int(v) for v in self.state.tolist())
        pool = np.flatnonzero(self.pool_mask.numpy()) if has_pool else None
        p, nw = _worker()
        plan = stream_plan(self.inputs, epoch, self.rank, pool)
        if nw != plan.num_workers:
            yield _Failure(f"loader has {nw} workers but the epoch was planned for {plan.num_workers}")
            return
        v = (start + p) % nw
        j0 = plan.first_local_batch(v, start)
        n_batches = plan.worker_steps[v] - j0
        if n_batches <= 0:
            return
        b = plan.batch_size
        order = plan.worker_order(v)
        names = [self.source.names[i] for i in plan.shard_order]
        yield from self.source.batches(
            names=names, starts=plan.shard_starts, counts=plan.shard_counts,
            order=order[j0 * b :], sizes=[b] * n_batches,
        )  # fmt: skip


class _ValStream(IterableDataset):
    """One rank's val share, in manifest order; batch ``t`` comes from worker ``t % num_workers``."""

    def __init__(self, *, source: _Source, rank: int, world_size: int) -> None:
        self.source, self.rank, self.world_size = source, rank, world_size

    def chunks(self) -> list[tuple[int, int]]:
        lo, hi = val_ranges(sum(self.source.counts), self.rank, self.world_size)
        b = self.source.batch_size
        return [(a, min(a + b, hi)) for a in range(lo, hi, b)]

    def __iter__(self) -> Iterator[dict[str, Any] | _Failure]:
        p, nw = _worker()
        mine = self.chunks()[p::nw]
        if not mine:
            return
        order = np.concatenate([np.arange(a, e) for a, e in mine])
        counts = self.source.counts
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        yield from self.source.batches(
            names=self.source.names, starts=starts, counts=counts, order=order, sizes=[e - a for a, e in mine]
        )


def _source(
    manifest: Manifest,
    split: str,
    transform: Callable[[np.ndarray], Any] | None,
    batch_size: int,
    psf: bool = False,
) -> _Source:
    shards = manifest.shards(split)
    psf_info = (manifest.data.get("physics") or {}).get("psf") or {}
    if psf and not psf_info.get("per_galaxy"):
        raise ConfigError(
            f"{manifest.path}: batches with each galaxy's PSF were asked for, but the shards carry none "
            "(re-shard from a catalog with PSF_FILENAME/PSF_HDU)",
            collective=True,
        )
    return _Source(
        root=str(manifest.root),
        names=[s.name for s in shards],
        counts=[s.count for s in shards],
        image_size=manifest.image_size,
        has_redshift=manifest.has_redshift,
        transform=transform,
        batch_size=batch_size,
        has_noise=manifest.has_noise_variance,
        psf_shape=tuple(psf_info["shape"]) if psf else None,
        cond_names=manifest.condition_names,
    )


def _verify(manifest: Manifest) -> None:
    """Every shard's sha256 against the manifest (no cache: the trainer keeps one per run folder)."""
    from hpcvae.shards.manifest import check_hashes, hash_shards

    shards = [s for sp in manifest.splits for s in manifest.shards(sp) if s.sha256]
    check_hashes(manifest, hash_shards(manifest, shards))


class ShardData:
    """Train and val loaders over one shard set for one rank (the :class:`~hpcvae.data.Loader` protocol).

    ``samples_per_epoch`` counts all ranks (``world_size * steps * batch_size``);
    ``dropped_per_epoch`` is the remainder no rank sees that epoch (a different subset each
    epoch, since the shard order and the rank ranges move).

    With ``num_workers > 0`` and ``cfg.persistent_workers`` the train workers live across
    epochs (the epoch reaches them through shared memory) and the val workers likewise, so
    up to ``2 * num_workers`` worker processes stay alive per rank until :meth:`close`.
    Only one train epoch may be iterated at a time.
    """

    def __init__(
        self,
        cfg: DataConfig,
        manifest: Manifest,
        *,
        rank: int,
        world_size: int,
        seed: int,
        transform: Callable[[np.ndarray], Any] | None = None,
        max_steps: int = 0,
        verify: bool = False,
        psf: bool = False,
    ) -> None:
        self.cfg, self.manifest = cfg, manifest
        self.rank, self.world_size, self.seed, self.max_steps = rank, world_size, seed, max_steps
        manifest.check_files()
        if verify:
            _verify(manifest)
        self._train_src = _source(manifest, "train", transform, cfg.batch_size, psf)
        self.inputs = PlanInputs(loader="stream", shard_counts=tuple(self._train_src.counts), seed=seed,
                                 world_size=world_size, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                 shuffle_buffer=cfg.shuffle_buffer, max_steps=max_steps)  # fmt: skip
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self._plan0 = stream_plan(self.inputs, 0, rank)
        if self._plan0.steps == 0:
            raise ConfigError(
                f"{manifest.path}: train split has {self._plan0.total} samples, fewer than "
                f"world_size*batch_size = {world_size}*{cfg.batch_size}; lower data.batch_size",
                collective=True,
            )
        self._val_src = (
            _source(manifest, "val", transform, cfg.batch_size, psf) if "val" in manifest.splits else None
        )
        # (epoch, start_step, has_pool) and the pool as a mask: read by (persistent) workers.
        self._state = torch.zeros(3, dtype=torch.int64).share_memory_()
        self._pool_mask = torch.zeros(self.inputs.total, dtype=torch.uint8).share_memory_()
        self._train_dl: DataLoader | None = None
        self._val_dl: DataLoader | None = None

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return self._plan0.steps

    @property
    def dropped_per_epoch(self) -> int:
        return self._plan0.dropped

    @property
    def samples_per_epoch(self) -> int:
        return self.world_size * self._plan0.steps * self.cfg.batch_size

    @property
    def val_count(self) -> int:
        """Val samples on this rank."""
        if self._val_src is None:
            return 0
        lo, hi = val_ranges(sum(self._val_src.counts), self.rank, self.world_size)
        return hi - lo

    def epoch_steps(self, pool: np.ndarray | None = None) -> int:
        return self._plan0.steps if pool is None else epoch_steps(self.inputs, len(pool))

    def plan(self, epoch: int, pool: np.ndarray | None = None) -> EpochPlan:
        return stream_plan(self.inputs, epoch, self.rank, pool)

    # -- loaders ---------------------------------------------------------------------------------
    @property
    def _start_method(self) -> str | None:
        return self.cfg.start_method if self.cfg.num_workers > 0 else None

    def _dataloader(self, dataset: IterableDataset) -> DataLoader:
        nw = self.cfg.num_workers
        kw: dict[str, Any] = {}
        if nw > 0:
            kw = {
                "persistent_workers": self.cfg.persistent_workers,
                "prefetch_factor": self.cfg.prefetch_factor,
                "multiprocessing_context": multiprocessing.get_context(self.cfg.start_method),
                "worker_init_fn": worker_init,
            }
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=nw,
            collate_fn=_identity,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            **kw,
        )

    def train_loader(self, epoch: int, start_step: int = 0, pool: np.ndarray | None = None) -> EpochLoader:
        """Batches ``start_step ..`` of ``epoch`` (over ``pool`` if given), the same as an uninterrupted run's."""
        steps = self.epoch_steps(pool)
        if not 0 <= start_step <= steps:
            raise ConfigError(f"start_step {start_step} is outside the epoch's {steps} steps")
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        if self._train_dl is None:
            stream = _TrainStream(source=self._train_src, inputs=self.inputs, rank=self.rank, state=self._state,
                                  pool_mask=self._pool_mask)  # fmt: skip
            self._train_dl = self._dataloader(stream)

        def before() -> None:
            self._state[0], self._state[1], self._state[2] = epoch, start_step, int(pool is not None)
            if pool is not None:
                self._pool_mask.zero_()
                self._pool_mask[torch.from_numpy(np.asarray(pool, dtype=np.int64))] = 1

        return EpochLoader(self._train_dl, steps - start_step, before, self._start_method)

    def val_loader(self) -> EpochLoader:
        """This rank's share of the val split, in order, no drop (last batch may be smaller)."""
        if self._val_src is None:
            return EpochLoader(None, 0)
        if self._val_dl is None:
            self._val_dl = self._dataloader(
                _ValStream(source=self._val_src, rank=self.rank, world_size=self.world_size)
            )
        n = -(-self.val_count // self.cfg.batch_size)
        return EpochLoader(self._val_dl, n, None, self._start_method)

    def close(self) -> None:
        """Stop any persistent worker processes now (idempotent), rather than in an exit hook."""
        from hpcvae.torch_compat import shutdown_loader_workers

        for dl in (self._train_dl, self._val_dl):
            if dl is not None:
                shutdown_loader_workers(dl)
        self._train_dl = self._val_dl = None
