"""What every loader shares: the ``Loader`` protocol, ``EpochLoader``, the resumable position, worker signals."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from hpcvae.data.plan import PlanInputs, mask_to_pool, pool_to_mask
from hpcvae.errors import CheckpointError, ShardError


class Loader(Protocol):
    """The interface of ``ShardData`` and ``GpuResidentData``: what the trainer needs from a loader."""

    inputs: PlanInputs
    """Everything this loader's epoch plan depends on (recorded in checkpoints)."""

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def dropped_per_epoch(self) -> int: ...

    def epoch_steps(self, pool: np.ndarray | None = None) -> int:
        """Steps of an epoch over ``pool`` (None: the whole split)."""
        ...

    def train_loader(
        self, epoch: int, start_step: int = 0, pool: np.ndarray | None = None
    ) -> EpochLoader: ...

    def val_loader(self) -> EpochLoader: ...

    def close(self) -> None: ...


@dataclass(kw_only=True)
class DataPosition:
    """The loader's resumable state: which plan the current epoch runs, and how far it got.

    ``state_dict`` holds only tensors and plain values, so it loads with
    ``torch.load(weights_only=True)``; the pool travels as packed bits.
    """

    inputs: PlanInputs
    epoch: int = 0
    step: int = 0
    """Steps of ``epoch`` done under ``inputs``."""
    pool: np.ndarray | None = None
    """Manifest indices the epoch runs on, when it is the tail of an interrupted epoch."""

    def state_dict(self) -> dict[str, Any]:
        bits = pool_to_mask(self.pool, self.inputs.total)
        return {"inputs": self.inputs.to_dict(), "epoch": self.epoch, "step": self.step,
                "pool_bits": None if bits is None else torch.from_numpy(bits)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.inputs = PlanInputs.from_dict(state["inputs"])
            bits = state.get("pool_bits")
            self.pool = mask_to_pool(None if bits is None else bits.numpy(), self.inputs.total)
            self.epoch, self.step = int(state["epoch"]), int(state["step"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"unreadable data position in the checkpoint: {exc}") from None

    def load_legacy(self, folder: Path, meta: dict[str, Any]) -> None:
        """A checkpoint from before positions were recorded: rebuild its plan from its own config.toml."""
        from hpcvae.config import load_config

        cfg = load_config(folder / "config.toml")
        self.inputs = PlanInputs(loader="resident" if cfg.data.gpu_resident else "stream",
                                 shard_counts=self.inputs.shard_counts, seed=cfg.train.seed,
                                 world_size=int(meta["world_size"]), batch_size=int(meta["batch_size"]),
                                 num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                                 max_steps=cfg.train.max_steps_per_epoch)  # fmt: skip
        self.epoch, self.step, self.pool = int(meta["epoch"]), int(meta["step_in_epoch"]), None


@dataclass(frozen=True)
class _Failure:
    """A worker's ShardError, sent as data: torch would re-raise it with a multi-line traceback."""

    message: str


# -- worker processes and stop signals -----------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
"""What SLURM sends a job step on preemption, requeue and time limit, and Ctrl-C (the terminal sends it to the
whole process group): the trainer's to handle, not a worker's."""


def worker_init(_worker_id: int) -> None:
    """Loader workers leave the stop signals to the trainer, yet still end when their parent says so.

    SLURM signals every process of the step, workers included.  torch's worker handler
    re-raises any SIGTERM not sent by the parent, so the worker died, and the main process
    then failed inside the stop-time checkpoint.  Here the signals stay blocked (the worker
    inherited the mask, see :func:`stop_signals_blocked`, so none can land before this
    runs) and a thread takes them with ``sigwaitinfo``, which names the sender: a SIGTERM
    from the parent (``Process.terminate()``, e.g. multiprocessing's exit hook) ends the
    worker as before; any other SIGTERM, SIGUSR2 or SIGINT is dropped.
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
def stop_signals_blocked(start_method: str | None = "spawn") -> Iterator[None]:
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


# -- one epoch -----------------------------------------------------------------------------------

_END = object()


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
            with torch.random.fork_rng(devices=[]), stop_signals_blocked(self._start_method):
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
