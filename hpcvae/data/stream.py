"""The loader: tar shards -> exact, deterministic, resumable epochs of batches.

Pipeline, in the style of WebDataset's small generator stages::

    plan_epoch (shard order, split by rank, split by worker)
      -> read_raw   (tar members of the wanted samples only; others are seeked over)
      -> reorder    (a seeded shuffle buffer, simulated on indices up front)
      -> decode     (.npy header parse + frombuffer, meta.json for the redshift)
      -> transform  (the normalisation, per image)
      -> collate    (one np.stack per batch, done inside the worker)

Why the shuffle is simulated on indices: a batch's content is then a pure function of
``(seed, epoch, rank, world_size, num_workers, batch_size, shuffle_buffer, step)``, so a
resumed epoch can start at any step, skip the consumed samples without decoding them, and
still reproduce the uninterrupted epoch bit for bit.  Reading stays sequential and at most
``shuffle_buffer`` raw samples are held, exactly like a streaming shuffle buffer.

Step ``t`` of an epoch belongs to "virtual worker" ``t % num_workers``; each virtual worker
owns a contiguous sample range (few shards per worker).  PyTorch's DataLoader takes batches
from its workers round-robin, starting at worker 0, and a worker that runs out only ends its
own stream; so DataLoader worker ``p`` of a loader started at step ``k`` plays virtual
worker ``(k + p) % num_workers`` from its first batch at or after ``k``, and the batches
arrive in step order.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hpcvae.config import DataConfig
from hpcvae.errors import ConfigError, ShardError
from hpcvae.manifest import Manifest, sha256_file

__all__ = [
    "EpochLoader",
    "EpochPlan",
    "GpuResidentData",
    "ShardData",
    "make_data",
    "buffer_shuffle",
    "decode_npy",
    "plan_epoch",
    "val_ranges",
]

_SHARD_ORDER_TAG = 0
_WORKER_SHUFFLE_TAG = 1
_RESIDENT_PERM_TAG = 2


def _rng(*parts: int) -> np.random.Generator:
    """A generator whose stream depends on every part (PCG64 streams are stable across numpy versions)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(p) % (1 << 63) for p in parts])))


# -- planning (pure functions: no I/O) -------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EpochPlan:
    """The global sample layout of one epoch, as seen by one rank."""

    epoch: int
    rank: int
    world_size: int
    batch_size: int
    num_workers: int
    """Virtual workers (>= 1; a loader with ``num_workers=0`` has one)."""
    shard_order: tuple[int, ...]
    """Indices into the split's shard list, in the order they are concatenated this epoch."""
    shard_starts: tuple[int, ...]
    """Global index of the first sample of each shard in ``shard_order``."""
    shard_counts: tuple[int, ...]
    """Sample count of each shard in ``shard_order``."""
    total: int
    steps: int
    dropped: int
    rank_range: tuple[int, int]
    worker_ranges: tuple[tuple[int, int], ...]
    """Contiguous global sample range of each virtual worker (whole batches)."""
    worker_steps: tuple[int, ...]
    """Number of batches of each virtual worker."""

    def step_owner(self, step: int) -> tuple[int, int]:
        """(virtual worker, its local batch index) that produces global step ``step``."""
        return step % self.num_workers, step // self.num_workers

    def first_local_batch(self, worker: int, start_step: int) -> int:
        """The first local batch of ``worker`` whose step is >= ``start_step``."""
        return max(0, -(-(start_step - worker) // self.num_workers))

    def spans(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(position in shard_order, first, end) local sample spans covering global ``[lo, hi)``."""
        out = []
        for pos, (start, count) in enumerate(zip(self.shard_starts, self.shard_counts)):
            a, b = max(lo, start), min(hi, start + count)
            if a < b:
                out.append((pos, a - start, b - start))
        return out


def plan_epoch(
    shard_counts: Sequence[int],
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    max_steps: int = 0,
) -> EpochPlan:
    """Lay out epoch ``epoch`` for ``rank``: shard order, its contiguous range, the workers' ranges.

    All ranks compute the same ``steps`` from the manifest counts alone, so no rank can run
    an extra step and hang the others in a collective.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    nw = max(1, num_workers)
    order = _rng(seed, epoch, _SHARD_ORDER_TAG).permutation(len(shard_counts)).tolist()
    counts = [int(shard_counts[i]) for i in order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist() if counts else []
    total = sum(counts)
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
    return EpochPlan(
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        num_workers=nw,
        shard_order=tuple(order),
        shard_starts=tuple(starts),
        shard_counts=tuple(counts),
        total=total,
        steps=steps,
        dropped=total - world_size * per_rank,
        rank_range=(r0, r0 + per_rank),
        worker_ranges=tuple(wranges),
        worker_steps=tuple(wsteps),
    )


def buffer_shuffle(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a streaming shuffle buffer of ``buffer`` items emits items ``0..n-1``.

    Same algorithm as ``webdataset.filters.shuffle`` (fill, then swap a random slot out per
    new item, drain at the end); computed on indices so it can be replayed without data.
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


def val_ranges(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous share of the val split (the first ``total % world_size`` get one more)."""
    base, extra = divmod(total, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


# -- tar headers -----------------------------------------------------------------------------------


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def tar_members(f: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in a ustar/pax/GNU tar, reading headers only.

    Python's tarfile spends ~0.25 ms per member parsing headers (WebDataset's writer adds a
    pax header to each); this reads only what the loader needs and seeks over the data, so
    skipping samples on resume costs one 512-byte read each.  Raises ValueError on damage.
    """
    pos = 0
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        f.seek(pos)
        hdr = f.read(512)
        if len(hdr) == 0:
            return
        if len(hdr) < 512:
            raise ValueError(f"header at byte {pos} cut short")
        if hdr.count(0) == 512:
            return
        if _octal(hdr[148:156]) != sum(hdr) - sum(hdr[148:156]) + 256:
            raise ValueError(f"bad header checksum at byte {pos}")
        size = _octal(hdr[124:136])
        kind = hdr[156:157]
        data = pos + 512
        nxt = data + (size + 511) // 512 * 512
        if kind in (b"x", b"g", b"L"):
            payload = f.read(size)
            if len(payload) != size:
                raise ValueError(f"extended header at byte {pos} cut short")
            if kind == b"x":
                pax = _pax_records(payload)
            elif kind == b"L":
                long_name = payload.split(b"\0", 1)[0].decode("utf-8")
            pos = nxt
            continue
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8")
        if hdr[257:262] == b"ustar" and hdr[345] != 0:
            name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        name = pax.get("path", long_name or name)
        if "size" in pax:
            size = int(pax["size"])
            nxt = data + (size + 511) // 512 * 512
        pax, long_name = {}, None
        if kind in (b"0", b"\0", b"7"):
            yield name, data, size
        pos = nxt


def _pax_records(payload: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(payload) and payload[i] != 0:
        sp = payload.index(b" ", i)
        n = int(payload[i:sp])
        key, _, value = payload[sp + 1 : i + n - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8")
        i += n
    return out


# -- decoding --------------------------------------------------------------------------------------

_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}


def decode_npy(data: bytes) -> np.ndarray:
    """Parse ``.npy`` bytes without np.load's file machinery (headers repeat, so they are cached)."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy file (bad magic)")
    major = data[6]
    if major == 1:
        off = 10 + int.from_bytes(data[8:10], "little")
    elif major in (2, 3):
        off = 12 + int.from_bytes(data[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy version {major}")
    head = data[:off]
    parsed = _NPY_HEADERS.get(head)
    if parsed is None:
        start = 10 if major == 1 else 12
        try:
            d = ast.literal_eval(head[start:].decode("latin1"))
            dtype = np.dtype(d["descr"])
            shape = tuple(int(s) for s in d["shape"])
            fortran = bool(d["fortran_order"])
        except (ValueError, SyntaxError, KeyError, TypeError) as exc:
            raise ValueError(f"bad .npy header: {exc}") from None
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        parsed = (dtype, shape, fortran, math.prod(shape))
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[head] = parsed
    dtype, shape, fortran, n = parsed
    if len(data) - off != n * dtype.itemsize:
        raise ValueError(f"truncated .npy: {len(data) - off} data bytes, expected {n * dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype, count=n, offset=off)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


@dataclass(frozen=True, kw_only=True)
class _Raw:
    index: int
    key: str
    shard: str
    files: dict[str, bytes]


@dataclass(frozen=True)
class _Failure:
    """A worker's ShardError, sent as data: torch would re-raise it with a multi-line traceback."""

    message: str


def _identity(x: Any) -> Any:
    return x


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
"""What SLURM sends a job step on preemption, requeue and time limit: the trainer's to handle, not a worker's."""


def _worker_init(_worker_id: int) -> None:
    """Loader workers leave the stop signals to the trainer, yet still end when their parent says so.

    SLURM signals every process of the step, workers included.  torch's worker handler
    re-raises any SIGTERM not sent by the parent, so the worker died, and the main process
    then failed inside the stop-time checkpoint.  Here the signals stay blocked (the worker
    inherited the mask, see :func:`_stop_signals_blocked`, so none can land before this
    runs) and a thread takes them with ``sigwaitinfo``, which names the sender: a SIGTERM
    from the parent (``Process.terminate()``, e.g. multiprocessing's exit hook) ends the
    worker as before; any other SIGTERM or SIGUSR2 is dropped.
    """
    parent = os.getppid()

    def relay() -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=relay, name="hpcvae-stop-signals", daemon=True).start()


@contextlib.contextmanager
def _stop_signals_blocked(start_method: str | None = "spawn") -> Iterator[None]:
    """Hold SIGTERM/SIGUSR2 while worker processes start, so they start with both blocked.

    Only delays the signals in this thread (they are delivered on leaving), so a stop request
    is never lost.  multiprocessing's resource tracker, which a spawned worker needs, unblocks
    SIGTERM when it is first started, so it is started before the signals are blocked.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if start_method not in (None, "fork"):
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
        key: str | None = None
        idx = -1
        cur: dict[str, bytes] | None = None
        try:
            with open(path, "rb") as f:
                for mname, offset, size in tar_members(f):
                    k, _, ext = mname.rpartition("/")[2].partition(".")
                    if k != key:
                        if cur is not None:
                            yield _Raw(index=base + idx, key=key or "", shard=str(path), files=cur)
                            cur = None
                        key, idx = k, idx + 1
                        if idx >= end:
                            return
                        if idx >= first and want[idx - first]:
                            cur = {}
                    if cur is not None:
                        f.seek(offset)
                        data = f.read(size)
                        if len(data) != size:
                            raise ValueError(f"member {mname} ends after {len(data)} of {size} bytes")
                        cur[ext] = data
                if cur is not None:
                    yield _Raw(index=base + idx, key=key or "", shard=str(path), files=cur)
        except (ValueError, OSError) as exc:
            if isinstance(exc, ShardError):
                raise
            at = f" (at sample {key})" if key else ""
            raise ShardError(f"{path}: corrupt or truncated shard{at}: {exc}") from None
        if idx + 1 < end:
            raise ShardError(
                f"{path}: truncated shard: holds {idx + 1} samples, the manifest says {count}"
                + (f" (last complete key {key})" if key else "")
            )

    # stage: decode + transform ------------------------------------------------------------------
    def decode(self, raw: _Raw) -> tuple[str, np.ndarray, float]:
        img = raw.files.get("image.npy")
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
        z = math.nan
        if self.has_redshift:
            meta = raw.files.get("meta.json")
            if meta is None:
                raise ShardError(
                    f"{raw.shard}: sample {raw.key} has no meta.json but the manifest has redshifts"
                )
            try:
                zv = json.loads(meta).get("zphot")
                z = float(zv) if zv is not None else math.nan
            except (ValueError, TypeError, AttributeError) as exc:
                raise ShardError(f"{raw.shard}: sample {raw.key}: bad meta.json: {exc}") from None
            if not math.isfinite(z):
                raise ShardError(
                    f"{raw.shard}: sample {raw.key}: zphot is {zv!r} but the manifest has redshifts"
                )
        return raw.key, x, z

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
                keys, zs = [], []
                imgs = np.empty((size, self.image_size, self.image_size), dtype=np.float32)
                for i, g in enumerate(order[pos : pos + size].tolist()):
                    while g not in pending:
                        r = next(raw, None)
                        if r is None:
                            raise ShardError(
                                f"{self.root}: sample index {g} was never read (shard counts wrong?)"
                            )
                        pending[r.index] = r
                    k, imgs[i], z = self.decode(pending.pop(g))
                    keys.append(k)
                    zs.append(z)
                pos += size
                batch: dict[str, Any] = {"image": torch.from_numpy(imgs).unsqueeze(1), "key": keys}
                if self.has_redshift:
                    batch["redshift"] = torch.tensor(zs, dtype=torch.float32)
                yield batch
        except ShardError as exc:
            yield _Failure(str(exc))


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _TrainStream(IterableDataset):
    """One rank's train epoch; epoch and start step come from a shared tensor.

    Shared memory instead of attributes because persistent workers keep their own copy of
    the dataset: the main process writes ``(epoch, start_step)`` before each ``iter()``, and
    every worker reads it when its iterator restarts.
    """

    def __init__(self, *, source: _Source, state: torch.Tensor, seed: int, rank: int, world_size: int,
                 num_workers: int, shuffle_buffer: int, max_steps: int) -> None:  # fmt: skip
        self.source, self.state, self.seed = source, state, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer, self.max_steps = shuffle_buffer, max_steps

    def plan(self, epoch: int) -> EpochPlan:
        s = self.source
        return plan_epoch(s.counts, epoch, self.seed, self.rank, self.world_size, s.batch_size,
                          self.num_workers, self.max_steps)  # fmt: skip

    def __iter__(self) -> Iterator[dict[str, Any] | _Failure]:
        epoch, start = (int(v) for v in self.state.tolist())
        p, nw = _worker()
        plan = self.plan(epoch)
        if nw != plan.num_workers:
            yield _Failure(f"loader has {nw} workers but the epoch was planned for {plan.num_workers}")
            return
        v = (start + p) % nw
        j0 = plan.first_local_batch(v, start)
        n_batches = plan.worker_steps[v] - j0
        if n_batches <= 0:
            return
        b = plan.batch_size
        a, e = plan.worker_ranges[v]
        rng = _rng(self.seed, epoch, _WORKER_SHUFFLE_TAG, self.rank, v)
        order = a + buffer_shuffle(e - a, self.shuffle_buffer, rng)
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


class EpochLoader:
    """An iterable over one epoch's batches with ``len()`` = batches still to come.

    Raises ShardError in the main process with the worker's one-line message, and checks
    that exactly ``len()`` batches came out, since a short rank would hang the others.

    Loading never touches the global torch RNG: a DataLoader draws its workers' base seed
    from it whenever it starts an iterator, and a persistent one only the first time, so a
    resumed run (fresh workers) and an uninterrupted one (reused workers) would continue
    the reparameterisation noise from different states.  Every call into the underlying
    loader runs inside ``fork_rng``, which restores the state afterwards.
    """

    def __init__(
        self,
        loader: Iterable[Any] | None,
        n: int,
        before: Callable[[], None] | None = None,
        start_method: str | None = None,
    ) -> None:
        self._loader, self._n, self._before = loader, n, before
        self._start_method = start_method
        """How the loader starts worker processes (``None``: it has none)."""

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._before is not None:
            self._before()
        got = 0
        if self._n > 0 and self._loader is not None:
            with torch.random.fork_rng(devices=[]), _stop_signals_blocked(self._start_method):
                it = iter(self._loader)
            while True:
                with torch.random.fork_rng(devices=[]):
                    batch = next(it, _END)
                if batch is _END:
                    break
                if isinstance(batch, _Failure):
                    raise ShardError(batch.message)
                got += 1
                if got > self._n:
                    break
                yield batch
        if got != self._n:
            raise ShardError(f"loader produced {got} batches, expected {self._n}")


_END = object()


def _source(
    manifest: Manifest, split: str, transform: Callable[[np.ndarray], Any] | None, batch_size: int
) -> _Source:
    shards = manifest.shards(split)
    return _Source(
        root=str(manifest.root),
        names=[s.name for s in shards],
        counts=[s.count for s in shards],
        image_size=manifest.image_size,
        has_redshift=manifest.has_redshift,
        transform=transform,
        batch_size=batch_size,
    )


def _verify(manifest: Manifest) -> None:
    for split in manifest.splits:
        for s in manifest.shards(split):
            if s.sha256 and sha256_file(manifest.root / s.name) != s.sha256:
                raise ShardError(f"{manifest.root / s.name}: sha256 differs from {manifest.path}")


class ShardData:
    """Train and val loaders over one shard set for one rank.

    ``samples_per_epoch`` counts all ranks (``world_size * steps * batch_size``);
    ``dropped_per_epoch`` is the remainder no rank sees that epoch (a different subset each
    epoch, since the shard order and the rank ranges move).

    With ``num_workers > 0`` and ``cfg.persistent_workers`` the train workers live across
    epochs (the epoch reaches them through shared memory) and the val workers likewise, so
    up to ``2 * num_workers`` worker processes stay alive per rank.  Only one train epoch
    may be iterated at a time.
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
    ) -> None:
        self.cfg, self.manifest = cfg, manifest
        self.rank, self.world_size, self.seed, self.max_steps = rank, world_size, seed, max_steps
        manifest.check_files()
        if verify:
            _verify(manifest)
        self._train_src = _source(manifest, "train", transform, cfg.batch_size)
        self._plan0 = plan_epoch(self._train_src.counts, 0, seed, rank, world_size, cfg.batch_size,
                                 cfg.num_workers, max_steps)  # fmt: skip
        if self._plan0.steps == 0:
            raise ConfigError(
                f"{manifest.path}: train split has {self._plan0.total} samples, fewer than "
                f"world_size*batch_size = {world_size}*{cfg.batch_size}; lower data.batch_size"
            )
        self._val_src = (
            _source(manifest, "val", transform, cfg.batch_size) if "val" in manifest.splits else None
        )
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()
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

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self._train_src.counts, epoch, self.seed, self.rank, self.world_size,
                          self.cfg.batch_size, self.cfg.num_workers, self.max_steps)  # fmt: skip

    # -- loaders ---------------------------------------------------------------------------------
    def _dataloader(self, dataset: IterableDataset) -> DataLoader:
        nw = self.cfg.num_workers
        kw: dict[str, Any] = {}
        if nw > 0:
            kw = {
                "persistent_workers": self.cfg.persistent_workers,
                "prefetch_factor": self.cfg.prefetch_factor,
            }
        if nw > 0:
            kw["multiprocessing_context"] = multiprocessing.get_context(self.cfg.start_method)
            kw["worker_init_fn"] = _worker_init
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=nw,
            collate_fn=_identity,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            **kw,
        )

    def train_loader(self, epoch: int, start_step: int = 0) -> EpochLoader:
        """Batches ``start_step .. steps_per_epoch - 1`` of ``epoch``, the same as an uninterrupted run's."""
        steps = self.steps_per_epoch
        if not 0 <= start_step <= steps:
            raise ConfigError(f"start_step {start_step} is outside the epoch's {steps} steps")
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        if self._train_dl is None:
            self._train_dl = self._dataloader(
                _TrainStream(
                    source=self._train_src,
                    state=self._state,
                    seed=self.seed,
                    rank=self.rank,
                    world_size=self.world_size,
                    num_workers=self.cfg.num_workers,
                    shuffle_buffer=self.cfg.shuffle_buffer,
                    max_steps=self.max_steps,
                )
            )

        def before() -> None:
            self._state[0], self._state[1] = epoch, start_step

        return EpochLoader(self._train_dl, steps - start_step, before, self._start_method)

    @property
    def _start_method(self) -> str | None:
        return self.cfg.start_method if self.cfg.num_workers > 0 else None

    def close(self) -> None:
        """Stop any persistent worker processes now (idempotent), rather than in an exit hook."""
        from hpcvae.torch_compat import shutdown_loader_workers

        for dl in (self._train_dl, self._val_dl):
            if dl is not None:
                shutdown_loader_workers(dl)
        self._train_dl = self._val_dl = None

    def val_loader(self) -> EpochLoader:
        """This rank's share of the val split, in order, no drop (last batch may be smaller)."""
        if self._val_src is None:
            return EpochLoader(None, 0)
        if self._val_dl is None:
            self._val_dl = self._dataloader(
                _ValStream(source=self._val_src, rank=self.rank, world_size=self.world_size)
            )
        return EpochLoader(self._val_dl, -(-self.val_count // self.cfg.batch_size), None, self._start_method)


class _ResidentBatches:
    """Batches ``first..`` of a fixed index list, gathered on the device (no host round trip for pixels)."""

    def __init__(self, data: GpuResidentData, split: str, idx: np.ndarray, sizes: Sequence[int]) -> None:
        self.data, self.split, self.idx, self.sizes = data, split, idx, list(sizes)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        images, z, keys = self.data._arrays[self.split]
        dev_idx = torch.from_numpy(self.idx).to(images.device, non_blocking=True)
        pos = 0
        for size in self.sizes:
            sel = dev_idx[pos : pos + size]
            batch: dict[str, Any] = {
                "image": images.index_select(0, sel).float(),
                "key": [keys[i] for i in self.idx[pos : pos + size].tolist()],
            }
            if z is not None:
                batch["redshift"] = z.index_select(0, sel)
            pos += size
            yield batch


class GpuResidentData:
    """The train split (and this rank's val share) held in device memory and shuffled there.

    For the small seed models the loader, not the GPU, limits throughput; a 56k-galaxy
    158x158 split is 2.8 GB in fp16, so every rank can hold all of it.  Same exact-epoch
    contract as ShardData: a seeded global permutation per epoch, rank r takes its
    contiguous share, ``steps = N // (W * B)``, resume skips by index.  Pixels are stored in
    ``dtype`` (fp16 keeps ~3.3 significant digits of a normalised [0, 1] image; pass
    float32 for exact pixels) and returned as float32 on ``device``.
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
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.cfg, self.manifest = cfg, manifest
        self.rank, self.world_size, self.seed, self.max_steps = rank, world_size, seed, max_steps
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        manifest.check_files()
        if verify:
            _verify(manifest)
        self._arrays: dict[str, tuple[torch.Tensor, torch.Tensor | None, list[str]]] = {}
        src = _source(manifest, "train", transform, cfg.batch_size)
        self._n = sum(src.counts)
        self._arrays["train"] = self._load(src, 0, self._n, dtype)
        b = cfg.batch_size
        steps = self._n // (world_size * b)
        self._steps = min(steps, max_steps) if max_steps > 0 else steps
        if self._steps == 0:
            raise ConfigError(
                f"{manifest.path}: train split has {self._n} samples, fewer than "
                f"world_size*batch_size = {world_size}*{b}; lower data.batch_size"
            )
        self._val = (0, 0)
        if "val" in manifest.splits:
            vsrc = _source(manifest, "val", transform, b)
            self._val = val_ranges(sum(vsrc.counts), rank, world_size)
            self._arrays["val"] = self._load(vsrc, *self._val, dtype)

    def _load(
        self, src: _Source, lo: int, hi: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        s = src.image_size
        images = torch.empty((hi - lo, 1, s, s), dtype=dtype, device=self.device)
        z = torch.empty(hi - lo, dtype=torch.float32, device=self.device) if src.has_redshift else None
        keys: list[str] = []
        starts = np.concatenate([[0], np.cumsum(src.counts)[:-1]]).astype(int).tolist()
        chunk = 256
        sizes = [min(chunk, hi - a) for a in range(lo, hi, chunk)]
        pos = 0
        for batch in src.batches(
            names=src.names, starts=starts, counts=src.counts, order=np.arange(lo, hi), sizes=sizes
        ):
            if isinstance(batch, _Failure):
                raise ShardError(batch.message)
            m = len(batch["key"])
            images[pos : pos + m] = batch["image"].to(self.device, dtype)
            if z is not None:
                z[pos : pos + m] = batch["redshift"].to(self.device)
            keys += batch["key"]
            pos += m
        return images, z, keys

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    @property
    def dropped_per_epoch(self) -> int:
        return self._n - self.world_size * self._steps * self.cfg.batch_size

    @property
    def samples_per_epoch(self) -> int:
        return self.world_size * self._steps * self.cfg.batch_size

    @property
    def val_count(self) -> int:
        return self._val[1] - self._val[0]

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for ``epoch``, in step order (a share of one global permutation)."""
        per_rank = self._steps * self.cfg.batch_size
        perm = _rng(self.seed, epoch, _RESIDENT_PERM_TAG).permutation(self._n)
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank]

    def train_loader(self, epoch: int, start_step: int = 0) -> EpochLoader:
        if not 0 <= start_step <= self._steps:
            raise ConfigError(f"start_step {start_step} is outside the epoch's {self._steps} steps")
        b = self.cfg.batch_size
        idx = self.epoch_indices(epoch)[start_step * b :]
        n = self._steps - start_step
        return EpochLoader(_ResidentBatches(self, "train", idx, [b] * n), n)

    def close(self) -> None:
        """Nothing to stop: no worker processes (same interface as ShardData)."""

    def val_loader(self) -> EpochLoader:
        n = self.val_count
        if n == 0:
            return EpochLoader(None, 0)
        b = self.cfg.batch_size
        sizes = [min(b, n - a) for a in range(0, n, b)]
        return EpochLoader(_ResidentBatches(self, "val", np.arange(n), sizes), len(sizes))


def make_data(
    cfg: DataConfig,
    manifest: Manifest,
    *,
    rank: int,
    world_size: int,
    seed: int,
    transform: Callable[[np.ndarray], Any] | None = None,
    max_steps: int = 0,
    device: torch.device | str | None = None,
) -> ShardData | GpuResidentData:
    """The loader ``cfg.gpu_resident`` asks for; both have the same interface."""
    kw = {
        "rank": rank,
        "world_size": world_size,
        "seed": seed,
        "transform": transform,
        "max_steps": max_steps,
    }
    if cfg.gpu_resident:
        return GpuResidentData(cfg, manifest, device=device, **kw)
    return ShardData(cfg, manifest, **kw)
