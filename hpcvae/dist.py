"""Distributed set-up in one place.

Reads the rank layout from torchrun (RANK / LOCAL_RANK / WORLD_SIZE), from submitit or
``srun`` (SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS), or falls back to a single
process, then picks the device and the backend: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from hpcvae.errors import DistributedError, HpcvaeError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise DistributedError(f"environment variable {n}={v!r} is not an integer") from None
    return None


def _slurm_master_addr() -> str:
    """First host of the allocation, as ``scontrol show hostnames`` names it."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    import subprocess

    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0]


def read_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun, SLURM, or a single process."""
    world = _env_int("WORLD_SIZE")
    if world is not None:
        rank = _env_int("RANK") or 0
        local = _env_int("LOCAL_RANK") or 0
    elif _env_int("SLURM_NTASKS") is not None and _env_int("SLURM_PROCID") is not None:
        world = _env_int("SLURM_NTASKS") or 1
        rank = _env_int("SLURM_PROCID") or 0
        local = _env_int("SLURM_LOCALID") or 0
        if world > 1:
            os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
            job = _env_int("SLURM_JOB_ID") or 0
            os.environ.setdefault("MASTER_PORT", str(20000 + job % 20000))
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(local))
        os.environ.setdefault("WORLD_SIZE", str(world))
    else:
        return 0, 0, 1
    if not 0 <= rank < world:
        raise DistributedError(f"rank {rank} is outside world size {world}")
    return rank, local, world


def _local_world_size(world: int) -> int:
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        v = os.environ.get(name, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    tpn = os.environ.get("SLURM_TASKS_PER_NODE", "")  # e.g. "2(x4)" or "2"
    head = tpn.split("(")[0].split(",")[0]
    if head.isdigit() and int(head) > 0:
        return int(head)
    return world  # torchrun without LOCAL_WORLD_SIZE or plain env: assume one host


def set_cpu_threads(world: int) -> int:
    """Give each CPU rank its share of the cores, unless OMP_NUM_THREADS says otherwise.

    torch defaults every process to all cores; two ranks on two cores then spin-wait
    on each other's OpenMP threads and run ~30x slower than with one thread each.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    n = max(1, cores // max(1, _local_world_size(world)))
    torch.set_num_threads(n)
    return n


def init_distributed(device: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the process group if there is more than one rank; pick device and backend.

    ``device`` forces ``cpu`` or ``cuda``; by default CUDA is used when present.
    """
    rank, local, world = read_env()
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistributedError("device 'cuda' requested but no CUDA device is visible")
        n = torch.cuda.device_count()
        dev = torch.device("cuda", local % n)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
        set_cpu_threads(world)
    if world > 1 and not tdist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        try:
            tdist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=dev if backend == "nccl" else None,
            )
        except Exception as exc:
            raise DistributedError(
                f"could not join process group as rank {rank}/{world} via "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({backend}): {exc}"
            ) from exc
    return DistInfo(rank=rank, local_rank=local, world_size=world, device=dev, backend=backend)


LEAVE_KEY = "hpcvae/left"
LEAVE_TIMEOUT_S = 10.0


def cleanup() -> None:
    """Leave the process group; rank 0, whose process hosts the rendezvous store, leaves last.

    Why: with gloo, a rank still tearing its group down when rank 0 exits (taking the store and its sockets
    with it) could abort in C++ ("terminate called without an active exception", exit status -6): about
    one 2-rank ``train_prior`` in ten, after the model was written.  Each other rank counts itself out in the
    store once its group is gone; rank 0 waits for them (at most LEAVE_TIMEOUT_S: a rank that died does not
    count) before its process, and the store, go.
    """
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    rank, world = tdist.get_rank(), tdist.get_world_size()
    store = None
    if world > 1:
        from hpcvae.torch_compat import default_store

        try:
            store = default_store()
        except (RuntimeError, ValueError, AttributeError):
            store = None
    tdist.destroy_process_group()
    if store is None:
        return
    try:
        if rank:
            store.add(LEAVE_KEY, 1)
            return
        deadline = time.monotonic() + LEAVE_TIMEOUT_S
        while store.add(LEAVE_KEY, 0) < world - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    except (RuntimeError, OSError):  # rank 0 already gone (or a peer's socket): nothing left to order
        pass


def get_rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def print0(*args, **kwargs) -> None:
    """print() on global rank 0 only."""
    if get_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def barrier() -> None:
    if get_world_size() > 1:
        tdist.barrier()


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give every rank its result, or raise its error on every rank.

    For checks that read shared files (which checkpoint is intact, whether the run folder is
    free): one rank does the I/O, and no rank is left waiting in a collective because
    another one raised.  Only ``HpcvaeError`` travels; anything else is a bug and stays local.
    """
    if get_world_size() == 1:
        return fn()
    payload: list[Any] = [None]
    if get_rank() == 0:
        try:
            payload[0] = ("ok", fn())
        except HpcvaeError as exc:
            payload[0] = ("error", type(exc), str(exc))
    tdist.broadcast_object_list(payload, src=0)
    kind, *rest = payload[0]
    if kind == "error":
        cls, msg = rest
        raise cls(msg, collective=True)
    return rest[0]


def any_rank(flag: bool, group: Any = None) -> bool:
    """True on every rank if any rank passed True.

    A CPU tensor, so ``group`` must be a gloo group (the default group on CPU; the loop's control
    group under NCCL).
    """
    if get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=group)
    return bool(t.item())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
