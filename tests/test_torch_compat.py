"""The private PyTorch APIs hpcvae relies on (hpcvae/torch_compat.py) and the loader workers' signal rule."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import torch
from torch.utils.data import DataLoader, IterableDataset

from hpcvae.data.loader import stop_signals_blocked, worker_init
from hpcvae.torch_compat import TESTED_TORCH, shutdown_loader_workers


class _Pids(IterableDataset):
    def __iter__(self):
        while True:
            yield os.getpid()
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _loader() -> DataLoader:
    import multiprocessing

    return DataLoader(_Pids(), batch_size=None, num_workers=2, persistent_workers=True,
                      multiprocessing_context=multiprocessing.get_context("spawn"),
                      worker_init_fn=worker_init)  # fmt: skip


def test_tested_range_covers_this_torch() -> None:
    major_minor = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    lo, hi = (tuple(int(x) for x in v.lstrip("<>=").split(".")) for v in TESTED_TORCH)
    assert lo <= major_minor < hi, (
        f"torch {torch.__version__} is outside {TESTED_TORCH}: recheck torch_compat"
    )


def test_workers_ignore_stop_signals_from_others_but_not_from_their_parent() -> None:
    dl = _loader()
    with stop_signals_blocked("spawn"):
        it = iter(dl)
    pids = {next(it) for _ in range(20)}
    assert len(pids) == 2 and os.getpid() not in pids
    # From another process (as SLURM's signals are): ignored, and the loader keeps going.
    for sig in ("-TERM", "-USR2"):
        subprocess.run(["kill", sig, *map(str, pids)], check=True, timeout=10)
    time.sleep(0.5)
    assert all(_alive(p) for p in pids)
    assert {next(it) for _ in range(20)} == pids
    # From the parent (Process.terminate(), multiprocessing's exit hook): the worker ends, as in torch.
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
    del it


def test_shutdown_loader_workers_stops_persistent_workers() -> None:
    dl = _loader()
    it = iter(dl)
    pids = {next(it) for _ in range(20)}
    assert all(_alive(p) for p in pids)
    shutdown_loader_workers(dl)
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def test_default_store_outlives_the_group_it_came_from(one_rank_group):
    """dist.cleanup counts ranks out in the rendezvous store after destroy_process_group: it must still answer."""
    import torch.distributed as tdist

    from hpcvae.torch_compat import default_store

    one_rank_group()
    store = default_store()
    assert store.add("hpcvae/test", 1) == 1
    tdist.destroy_process_group()
    assert store.add("hpcvae/test", 0) == 1
