"""The epoch plan: which samples each rank and worker trains on, step by step.

Everything here is a pure function of :class:`PlanInputs`, the epoch and an optional *pool*
(no I/O), which is what makes epochs exact and resumable:

* every rank computes the same number of steps from the manifest counts alone, so no rank
  can run an extra step and hang the others in a collective;
* a batch's content depends only on the inputs and the step, so a resumed epoch skips the
  consumed batches without reading them;
* the samples an interrupted epoch has already shown can be recomputed for *any* layout, so
  a resume under another layout (workers, shuffle buffer, seed, batch size, world size,
  streaming vs GPU-resident) finishes the epoch with exactly the samples its plan had left:
  :func:`resume_plan`.  That remainder is the epoch's *pool*; a pool is itself a plan input,
  so a second interruption in the same epoch is handled the same way.

Two index spaces appear: *manifest indices* (the train split in manifest order: shard ``i``,
sample ``j`` is ``starts[i] + j``), which name samples independently of any layout, and the
streaming loader's *epoch indices* (positions in that epoch's shard order).  Pools,
:func:`planned` and :func:`consumed` speak manifest indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from hpcvae.errors import ConfigError

LoaderKind = Literal["stream", "resident"]

_SHARD_ORDER_TAG = 0
_WORKER_SHUFFLE_TAG = 1
_RESIDENT_PERM_TAG = 2

SETTING_NAMES = {
    "loader": "data.gpu_resident",
    "shard_counts": "the shard set",
    "seed": "train.seed",
    "world_size": "world_size",
    "batch_size": "data.batch_size",
    "num_workers": "data.num_workers",
    "shuffle_buffer": "data.shuffle_buffer",
    "max_steps": "train.max_steps_per_epoch",
}
"""The user-facing setting behind each plan input, for messages."""


def _rng(*parts: int) -> np.random.Generator:
    """A generator whose stream depends on every part (PCG64 streams are stable across numpy versions)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(p) % (1 << 63) for p in parts])))


@dataclass(frozen=True, kw_only=True)
class PlanInputs:
    """Everything an epoch's sample order depends on; recorded in every checkpoint."""

    loader: LoaderKind
    """``stream`` (tar shards through DataLoader workers) or ``resident`` (on the device)."""
    shard_counts: tuple[int, ...]
    """Samples per train shard, in manifest order."""
    seed: int
    world_size: int
    batch_size: int
    """Per rank."""
    num_workers: int
    """Virtual workers of the streaming loader (>= 1); 1 for the resident one."""
    shuffle_buffer: int
    """The streaming loader's shuffle buffer; 0 for the resident one."""
    max_steps: int = 0
    """Cap on steps per epoch (0 = none)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shard_counts", tuple(int(c) for c in self.shard_counts))
        if self.loader == "resident":  # settings the resident loader does not use cannot differ
            object.__setattr__(self, "num_workers", 1)
            object.__setattr__(self, "shuffle_buffer", 0)
        else:
            object.__setattr__(self, "num_workers", max(1, int(self.num_workers)))
        if self.world_size < 1 or self.batch_size < 1:
            raise ConfigError(
                f"world_size and batch_size must be >= 1, got {self.world_size}, {self.batch_size}"
            )

    @property
    def total(self) -> int:
        return sum(self.shard_counts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shard_counts"] = list(self.shard_counts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanInputs:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def changes(self, new: PlanInputs) -> list[str]:
        """``"data.num_workers 3 -> 2"`` for each input that differs."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(new, f.name)
            if a == b or (f.name in ("num_workers", "shuffle_buffer") and self.loader != new.loader):
                continue
            if f.name == "loader":
                out.append(f"data.gpu_resident {a == 'resident'} -> {b == 'resident'}")
            elif f.name == "shard_counts":
                out.append(f"the shard set ({len(a)} shards, {sum(a)} samples -> {len(b)}, {sum(b)})")
            else:
                out.append(f"{SETTING_NAMES[f.name]} {a} -> {b}")
        return out


def epoch_steps(inputs: PlanInputs, n: int) -> int:
    """Steps of an epoch over ``n`` samples: the same on every rank, whole batches only."""
    steps = n // (inputs.world_size * inputs.batch_size)
    return min(steps, inputs.max_steps) if inputs.max_steps > 0 else steps


def _manifest_starts(counts: Sequence[int]) -> np.ndarray:
    return (
        np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        if len(counts)
        else np.zeros(0, np.int64)
    )


# -- the streaming loader's plan ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EpochPlan:
    """The global sample layout of one epoch, as seen by one rank of the streaming loader.

    Ranks and workers own contiguous *positions* of the epoch's sample sequence: all of
    ``[0, total)`` in the epoch's shard order, or, for a pool, the pool's samples in that order.
    """

    epoch: int
    rank: int
    world_size: int
    batch_size: int
    num_workers: int
    """Virtual workers (>= 1; a loader with ``num_workers=0`` has one)."""
    seed: int
    shuffle_buffer: int
    shard_order: tuple[int, ...]
    """Indices into the split's shard list, in the order they are concatenated this epoch."""
    shard_starts: tuple[int, ...]
    """Epoch index of the first sample of each shard in ``shard_order``."""
    shard_counts: tuple[int, ...]
    """Sample count of each shard in ``shard_order``."""
    total: int
    """Samples in the epoch's sequence (the split, or the pool)."""
    steps: int
    dropped: int
    rank_range: tuple[int, int]
    """This rank's positions in the sequence."""
    worker_ranges: tuple[tuple[int, int], ...]
    """Contiguous positions of each virtual worker (whole batches)."""
    worker_steps: tuple[int, ...]
    """Number of batches of each virtual worker."""
    sequence: np.ndarray | None = None
    """Epoch indices of a pool, ascending (tar order); ``None``: position = epoch index."""

    def first_local_batch(self, worker: int, start_step: int) -> int:
        """The first local batch of ``worker`` whose step is >= ``start_step``."""
        return max(0, -(-(start_step - worker) // self.num_workers))

    def spans(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(position in shard_order, first, end) local sample spans covering epoch indices ``[lo, hi)``."""
        out = []
        for pos, (start, count) in enumerate(zip(self.shard_starts, self.shard_counts)):
            a, b = max(lo, start), min(hi, start + count)
            if a < b:
                out.append((pos, a - start, b - start))
        return out

    def indices(self, positions: np.ndarray) -> np.ndarray:
        """Epoch indices at sequence ``positions``."""
        return positions if self.sequence is None else self.sequence[positions]

    def worker_order(self, worker: int) -> np.ndarray:
        """Epoch indices virtual ``worker`` emits, in order: its positions through its seeded shuffle buffer."""
        a, e = self.worker_ranges[worker]
        rng = _rng(self.seed, self.epoch, _WORKER_SHUFFLE_TAG, self.rank, worker)
        return self.indices(a + buffer_shuffle(e - a, self.shuffle_buffer, rng))

    def to_manifest(self, g: np.ndarray) -> np.ndarray:
        """Manifest indices of epoch indices ``g``."""
        g = np.asarray(g, dtype=np.int64)
        counts_manifest = np.empty(len(self.shard_order), np.int64)
        counts_manifest[list(self.shard_order)] = self.shard_counts
        mstarts = _manifest_starts(counts_manifest)
        pos = np.searchsorted(np.asarray(self.shard_starts), g, side="right") - 1
        shard = np.asarray(self.shard_order, dtype=np.int64)[pos]
        return mstarts[shard] + (g - np.asarray(self.shard_starts, dtype=np.int64)[pos])

    def to_epoch(self, m: np.ndarray) -> np.ndarray:
        """Epoch indices of manifest indices ``m``."""
        m = np.asarray(m, dtype=np.int64)
        counts_manifest = np.empty(len(self.shard_order), np.int64)
        counts_manifest[list(self.shard_order)] = self.shard_counts
        mstarts = _manifest_starts(counts_manifest)
        shard = np.searchsorted(mstarts, m, side="right") - 1
        where = np.empty(len(self.shard_order), np.int64)
        where[list(self.shard_order)] = np.arange(len(self.shard_order))
        return np.asarray(self.shard_starts, dtype=np.int64)[where[shard]] + (m - mstarts[shard])


def plan_epoch(
    shard_counts: Sequence[int],
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    max_steps: int = 0,
    *,
    shuffle_buffer: int = 1,
    pool: np.ndarray | None = None,
) -> EpochPlan:
    """Lay out epoch ``epoch`` for ``rank``: shard order, its contiguous range, the workers' ranges.

    ``shard_counts`` are the train shards' counts in manifest order; ``pool`` (manifest
    indices) restricts the epoch to those samples, as when finishing an interrupted epoch.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    nw = max(1, num_workers)
    order = _rng(seed, epoch, _SHARD_ORDER_TAG).permutation(len(shard_counts)).tolist()
    counts = [int(shard_counts[i]) for i in order]
    starts = _manifest_starts(counts).tolist()
    plan_args = dict(epoch=epoch, rank=rank, world_size=world_size, batch_size=batch_size, num_workers=nw,
                     seed=seed, shuffle_buffer=shuffle_buffer, shard_order=tuple(order),
                     shard_starts=tuple(starts), shard_counts=tuple(counts))  # fmt: skip
    sequence = None
    total = sum(counts)
    if pool is not None:
        probe = EpochPlan(**plan_args, total=0, steps=0, dropped=0, rank_range=(0, 0), worker_ranges=(),
                          worker_steps=())  # fmt: skip
        sequence = np.sort(probe.to_epoch(pool))
        total = len(sequence)
    steps = total // (world_size * batch_size)
    if max_steps > 0:
        steps = min(steps, max_steps)
    per_rank = steps * batch_size
    r0 = rank * per_rank
    wsteps = [steps // nw + (1 if w < steps % nw else 0) for w in range(nw)]
    wranges = []
    a = r0
    for n in wsteps:
        wranges.append((a, a + n * batch_size))
        a += n * batch_size
    return EpochPlan(**plan_args, total=total, steps=steps, dropped=total - world_size * per_rank,
                     rank_range=(r0, r0 + per_rank), worker_ranges=tuple(wranges), worker_steps=tuple(wsteps),
                     sequence=sequence)  # fmt: skip


def stream_plan(inputs: PlanInputs, epoch: int, rank: int, pool: np.ndarray | None = None) -> EpochPlan:
    return plan_epoch(inputs.shard_counts, epoch, inputs.seed, rank, inputs.world_size, inputs.batch_size,
                      inputs.num_workers, inputs.max_steps, shuffle_buffer=inputs.shuffle_buffer,
                      pool=pool)  # fmt: skip


def buffer_shuffle(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a streaming shuffle buffer of ``buffer`` items emits items ``0..n-1``.

    In the style of ``webdataset.filters.shuffle`` (fill the buffer, then emit a random
    slot per new item, drain at the end) but not the same algorithm: webdataset draws from
    Python's ``random`` and starts emitting at a smaller ``initial`` fill.  This one is
    computed on indices from a seeded PCG64 stream, so it can be replayed without the data.
    """
    u = rng.random(n)
    out = np.empty(n, dtype=np.int64)
    buf: list[int] = []
    k = 0
    for i in range(n):
        buf.append(i)
        if len(buf) >= buffer:
            j = int(u[k] * len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out[k] = buf.pop()
            k += 1
    while buf:
        j = int(u[k] * len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        out[k] = buf.pop()
        k += 1
    return out


# -- the resident loader's plan ------------------------------------------------------------------


def resident_order(inputs: PlanInputs, epoch: int, rank: int, pool: np.ndarray | None = None) -> np.ndarray:
    """Manifest indices ``rank`` trains on in ``epoch``, in step order: its share of one seeded permutation."""
    base = np.arange(inputs.total, dtype=np.int64) if pool is None else np.asarray(pool, dtype=np.int64)
    seq = base[_rng(inputs.seed, epoch, _RESIDENT_PERM_TAG).permutation(len(base))]
    per_rank = epoch_steps(inputs, len(base)) * inputs.batch_size
    return seq[rank * per_rank : (rank + 1) * per_rank]


# -- what an epoch shows, and resuming it under another layout -------------------------------------


def planned(inputs: PlanInputs, epoch: int, pool: np.ndarray | None) -> np.ndarray:
    """Sorted manifest indices the epoch shows over all ranks (the split or pool, less the drop)."""
    if inputs.loader == "resident":
        parts = [resident_order(inputs, epoch, r, pool) for r in range(inputs.world_size)]
        return np.sort(np.concatenate(parts))
    p = stream_plan(inputs, epoch, 0, pool)
    shown = p.indices(np.arange(inputs.world_size * p.steps * p.batch_size))
    return np.sort(p.to_manifest(shown))


def consumed(inputs: PlanInputs, epoch: int, step: int, pool: np.ndarray | None) -> np.ndarray:
    """Sorted manifest indices of the batches of steps ``< step``, over all ranks."""
    parts: list[np.ndarray] = []
    b = inputs.batch_size
    for r in range(inputs.world_size):
        if inputs.loader == "resident":
            parts.append(resident_order(inputs, epoch, r, pool)[: step * b])
            continue
        p = stream_plan(inputs, epoch, r, pool)
        for v in range(p.num_workers):
            done = min(p.first_local_batch(v, step), p.worker_steps[v])
            if done:
                parts.append(p.to_manifest(p.worker_order(v)[: done * b]))
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True, kw_only=True)
class Resume:
    """Where a resumed run continues: ``epoch``, ``step`` in it, the epoch's ``pool`` (None = all)."""

    epoch: int
    step: int
    pool: np.ndarray | None
    note: str = ""
    """One line for the log when the layout changed; empty for an exact continuation."""


def resume_plan(
    old: PlanInputs, *, epoch: int, step: int, pool: np.ndarray | None, new: PlanInputs
) -> Resume:
    """Continue a checkpoint's epoch under the ``new`` layout, never repeating or silently skipping a sample.

    Same layout: the same plan, from ``step``.  Another layout mid-epoch: the samples the old
    plan had not shown yet become the epoch's pool, spread over the new layout from step 0;
    the new layout's own drop (fewer than ``world_size * batch_size``) is reported.
    """
    if old.shard_counts != new.shard_counts:
        raise ConfigError(
            "the checkpoint's epoch plan is for another shard set "
            f"({'; '.join(old.changes(new))}); it cannot be finished on this one"
        )
    if old == new or (step == 0 and pool is None):
        return Resume(epoch=epoch, step=step, pool=pool)
    todo = np.setdiff1d(planned(old, epoch, pool), consumed(old, epoch, step, pool), assume_unique=True)
    steps = epoch_steps(new, len(todo))
    dropped = len(todo) - steps * new.world_size * new.batch_size
    head = f"resume: {', '.join(old.changes(new))} since the checkpoint (epoch {epoch + 1}, step {step})"
    if steps == 0:
        return Resume(epoch=epoch + 1, step=0, pool=None,
                      note=f"{head}; finishing epoch {epoch + 1}: its {len(todo)} remaining samples are fewer "
                           f"than one batch per rank, so they are dropped and epoch {epoch + 2} starts")  # fmt: skip
    return Resume(epoch=epoch, step=0, pool=todo,
                  note=f"{head}; finishing epoch {epoch + 1} under its original plan: its {len(todo)} remaining "
                       f"samples in {steps} steps of {new.world_size}x{new.batch_size} ({dropped} dropped)")  # fmt: skip


def pool_to_mask(pool: np.ndarray | None, total: int) -> np.ndarray | None:
    """A pool as packed bits (``total / 8`` bytes: 10 kB for 81k galaxies) for a checkpoint."""
    if pool is None:
        return None
    mask = np.zeros(total, dtype=bool)
    mask[pool] = True
    return np.packbits(mask)


def mask_to_pool(bits: np.ndarray | None, total: int) -> np.ndarray | None:
    if bits is None:
        return None
    return np.flatnonzero(np.unpackbits(np.asarray(bits, dtype=np.uint8), count=total)).astype(np.int64)


def val_ranges(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous share of the val split (the first ``total % world_size`` get one more)."""
    base, extra = divmod(total, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)
