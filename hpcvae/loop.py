"""The training loop every trainer shares: ``Loop.run()`` -> ``_epoch()`` -> the trainer's ``train_step()``.

The loop owns what must behave the same for the VAE (``hpcvae.trainer``) and its flow prior
(``hpcvae.train_prior``):

* epochs and the position in them (``epoch``, ``step_in_epoch``, ``global_step``);
* stop requests: SIGUSR2/SIGTERM/SIGINT (Ctrl-C), or ``request_stop()`` from another thread, only set a flag;
* **control points**, every ``sync_every`` steps, before every save and at each epoch end: the
  ranks agree on stopping and on numerical health in one all-reduce of three integers on a CPU
  group (one host sync for the device flags).  A stop is then saved by every rank together;
  the first non-finite loss or gradient raises ``NumericalError`` naming its epoch, step and
  sample keys before anything is saved, so no checkpoint ever holds non-finite state;
* checkpoint cadence (every ``every_steps``, each epoch end, on stop) through ``Checkpointer``;
* the metric sinks (``hpcvae.metrics.Metrics``) and the log cadence;
* the run folder: one run at a time (``_open_run``), released whatever the ending (``close``).

A trainer supplies only what differs (see the hooks below): its batches, ``train_step``,
``log_train``, ``validate_epoch``, its checkpoint meta and components, ``finish``.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as tdist

from hpcvae.checkpoint import Checkpointer
from hpcvae.dist import DistInfo, on_rank0, print0
from hpcvae.errors import NumericalError
from hpcvae.metrics import Metrics
from hpcvae.runlock import RunLock


@dataclass(kw_only=True)
class LoopConfig:
    """The cadences of one loop (from ``train.*`` and ``checkpoint.*`` of a JobConfig, or the prior's options)."""

    epochs: int
    every_steps: int
    """Checkpoint every this many steps (0: epoch ends and stops only)."""
    keep_last: int
    sync_every: int
    """Steps between control points (stop agreement and health)."""
    log_every: int
    max_skipped_in_a_row: int = 50
    sync_seconds: float = 10.0
    """At most about this long between control points: slow steps bring them closer than ``sync_every``."""


class Loop:
    """The shared loop; subclasses implement the hooks marked *trainer's*."""

    log_prefix = ""
    """Put before the loop's own messages (``train_prior: `` for the flow prior)."""

    def __init__(
        self, *, loop: LoopConfig, dist: DistInfo, engine: Any, checkpoint_dir: Path, metrics: Metrics
    ) -> None:
        self.loop, self.dist, self.engine, self.metrics = loop, dist, engine, metrics
        self.checkpointer = Checkpointer(checkpoint_dir, keep_last=loop.keep_last, dist=dist)
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.last_checkpoint: Path | None = None
        self._stop_requested = False
        self._stop_agreed = False
        self._steps_since_log = 0
        # Health, on the device (read at control points only): the first global step whose loss or
        # gradient was not finite (-1: none), and (step, epoch, step in epoch, keys) of the batches since
        # the last control point (they come at most sync_every steps apart, so the bad one is kept).
        self._bad_at = torch.full((), -1, dtype=torch.int64, device=dist.device)
        self._recent: deque[tuple[int, int, int, list[str]]] = deque(maxlen=loop.sync_every)
        # The next control point: after one step (to time it), then every min(sync_every, sync_seconds / step)
        # steps, the step time being the slowest rank's (agreed in the control point's all-reduce).
        self._next_cp: int | None = None
        self._cp_t0, self._cp_step = time.perf_counter(), 0
        # Control collectives on the CPU: no GPU sync at the step boundary.
        self._ctrl_group = None
        if dist.distributed and dist.backend != "gloo":
            self._ctrl_group = tdist.new_group(backend="gloo")

    # -- the trainer's ------------------------------------------------------------------------------
    def epoch_batches(self) -> tuple[int, Iterator[Any]]:
        """(steps of the current epoch, its batches from ``step_in_epoch`` on)."""
        raise NotImplementedError

    def train_step(self, batch: Any) -> None:
        """One optimizer step, bookkeeping on the device only; calls :meth:`record_step`."""
        raise NotImplementedError

    def log_train(self) -> None:
        """Turn the accumulated train metrics into one record (one host sync) and reset them."""

    def end_epoch(self, batches: Iterator[Any]) -> None:
        """After the epoch's last step (the VAE checks its loader gave exactly the planned batches)."""

    def validate_epoch(self) -> None:
        """At each epoch's end (the trainer decides whether validation is due)."""

    def checkpoint_meta(self) -> dict[str, Any]:
        raise NotImplementedError

    def checkpoint_components(self) -> dict[str, Any]:
        """Stateful objects saved beside the engine (scheduler, data position, ...)."""
        return {}

    def checkpoint_config(self) -> str:
        return ""

    def next_epoch(self) -> None:
        """Reset per-epoch state once an epoch is done (before its checkpoint)."""

    def finish(self) -> Any:
        """After the last epoch: write the results (model files)."""

    def close(self) -> None:
        """Release what the run held (loader workers, the run-folder lock), completed or not."""
        self._release_run()

    # -- the run folder -----------------------------------------------------------------------------
    def _open_run(self, folder: Path, build: Callable[[], None], *, what: str, lock: bool = True) -> None:
        """Hold ``folder`` for this run (rank 0's ``flock``, :class:`RunLock`) while ``build`` runs.

        One run per folder.  A run refused inside ``build`` (busy folder, bad checkpoint, changed
        data, a model that does not fit the data) releases the lock and leaves the folder as it
        was; the trainer calls :meth:`_announce_run` once every refusal check has passed.
        """
        self._lock = RunLock(folder, what=what) if lock else None
        if self._lock is not None:
            on_rank0(self._lock.acquire)
        try:
            build()
        except BaseException:
            self._release_run(refused=True)
            raise

    def _announce_run(self) -> None:
        """Every refusal check has passed: name this run's host and pid in the lock (for a second run)."""
        if getattr(self, "_lock", None) is not None and self.dist.is_main:
            self._lock.announce()

    def _release_run(self, refused: bool = False) -> None:
        if getattr(self, "_lock", None) is not None and self.dist.is_main:
            self._lock.release(refused=refused)

    # -- stopping ---------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to checkpoint and stop at the next control point (signal- and thread-safe)."""
        self._stop_requested = True

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def _install_signals(self) -> dict[int, Any]:
        old: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return old  # the launcher calls request_stop() instead
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda signum, frame: self.request_stop())
        old[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_ctrl_c)
        return old

    def _on_ctrl_c(self, signum: int, frame: Any) -> None:
        """Ctrl-C stops like SIGTERM (a checkpoint at the next control point); a second one aborts."""
        if self._stop_requested:
            raise KeyboardInterrupt
        print0(
            f"{self.log_prefix}Ctrl-C: saving a checkpoint at the next control point (Ctrl-C again to abort)"
        )
        self.request_stop()

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> Literal["completed", "preempted"]:
        """Every epoch from the current position; ``preempted`` after a stop (checkpoint written)."""
        old = self._install_signals()
        try:
            while self.epoch < self.loop.epochs:
                if not self._epoch():
                    return "preempted"
                self.epoch += 1
                self.step_in_epoch = 0
                self.next_epoch()
                self.save_checkpoint()
                if self._stop_agreed and self.epoch < self.loop.epochs:  # asked in the epoch's last steps
                    self._stopped()
                    return "preempted"
            self.control_point()
            self.finish()
            return "completed"
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.metrics.close()
            self.close()

    def _epoch(self) -> bool:
        """One epoch from ``step_in_epoch``; False when stopped early (checkpoint written)."""
        steps, batches = self.epoch_batches()
        every = self.loop.every_steps
        local_stop = not self.dist.distributed  # one process needs no agreement: seen at the next step
        while self.step_in_epoch < steps:
            self.train_step(next(batches))
            self.step_in_epoch += 1
            self.global_step += 1
            self._steps_since_log += 1
            self.metrics.step()
            if self._steps_since_log >= self.loop.log_every:
                self._log()
            due = every and self.global_step % every == 0 and self.step_in_epoch < steps
            if self._next_cp is None:
                self._next_cp, self._cp_step = self.global_step, self.global_step - 1
            if due or self.global_step >= self._next_cp or (local_stop and self._stop_requested):
                if self.control_point():
                    self._log()
                    self.save_checkpoint()
                    self._stopped()
                    return False
                if due:
                    self.save_checkpoint()
        self.end_epoch(batches)
        self._log()
        self.validate_epoch()
        return True

    def _log(self) -> None:
        if self._steps_since_log:
            self.log_train()
            self._steps_since_log = 0

    def _stopped(self) -> None:
        print0(
            f"{self.log_prefix}stop requested: checkpoint {self.last_checkpoint} written at step {self.global_step}"
        )

    # -- health ---------------------------------------------------------------------------------------
    def record_step(self, loss: torch.Tensor, keys: list[str]) -> None:
        """Note a step's loss (and the engine's gradient check) on the device, and its sample keys."""
        self._recent.append((self.global_step, self.epoch, self.step_in_epoch, keys))
        if not self.engine.overflow_is_normal:  # fp16 skips and counts overflow steps instead
            ok = torch.isfinite(loss.detach())
            if self.engine.grad_finite is not None:
                ok = ok & self.engine.grad_finite
            self._bad_at.masked_fill_(~ok & (self._bad_at < 0), self.global_step)

    def control_point(self) -> bool:
        """Agree across ranks on stopping, and stop with an error on non-finite numbers; True = stop now.

        One host sync (the device health flags) and, with several ranks, one all-reduce of three
        integers on the CPU group, so no rank is left alone in a collective.
        """
        bad_at = int(self._bad_at.item())
        in_a_row = int(self.engine.skipped_in_a_row.item())
        stop = self._stop_requested
        now = time.perf_counter()
        steps = max(1, self.global_step - self._cp_step)
        step_us = int(1e6 * (now - self._cp_t0) / steps)
        if self.dist.distributed:
            big = 1 << 62  # MAX-reduce of (big - step) gives the earliest bad step of any rank
            t = torch.tensor(
                [int(stop), big - bad_at if bad_at >= 0 else 0, in_a_row, step_us], dtype=torch.int64
            )
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self._ctrl_group)
            stop, bad_at, in_a_row = bool(t[0]), (big - int(t[1])) if int(t[1]) else -1, int(t[2])
            step_us = int(t[3])
        budget = int(self.loop.sync_seconds * 1e6 / max(step_us, 1))
        self._next_cp = self.global_step + max(1, min(self.loop.sync_every, budget))
        self._cp_t0, self._cp_step = now, self.global_step
        if bad_at >= 0:
            raise self._numerical_error(bad_at)
        limit = self.loop.max_skipped_in_a_row
        if in_a_row >= limit:
            raise NumericalError(
                f"at least {limit} optimizer steps in a row were skipped for fp16 overflow (up to global step "
                f"{self.global_step}): the loss scale cannot recover; the last good checkpoint is "
                f"{self.last_checkpoint or 'none'}. Use --precision bf16, lower optim.lr, or check the data",
                collective=True,
            )
        self._recent.clear()
        self._stop_agreed = stop
        return stop

    def _numerical_error(self, bad_at: int) -> NumericalError:
        """The error for the first non-finite step: its epoch, step and batch keys, from whichever rank had it."""
        mine = next(((e, s, k) for g, e, s, k in self._recent if g == bad_at), None)
        if self.dist.distributed:
            parts: list[Any] = [None] * self.dist.world_size
            tdist.all_gather_object(parts, mine, group=self._ctrl_group)
            found = [p for p in parts if p is not None]
            keys = [k for p in found for k in p[2]]
            mine = (found[0][0], found[0][1], keys) if found else None
        epoch, step, keys = mine if mine is not None else (self.epoch, -1, [])
        shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        return NumericalError(
            f"non-finite loss or gradient at epoch {epoch + 1}, step {step + 1} of the epoch (global step "
            f"{bad_at + 1}); batch keys: {shown or 'unknown'}; the last good checkpoint is "
            f"{self.last_checkpoint or 'none (none was written yet)'} and no model was written. Check those "
            "samples (hpcvae.shard --skip-bad, data.verify) or lower optim.lr",
            collective=True,
        )

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """An all-rank checkpoint of the current state, after checking it is numerically sound."""
        self.control_point()  # raises before anything non-finite reaches the disk
        meta = {"global_step": self.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                **self.checkpoint_meta()}  # fmt: skip
        self.last_checkpoint = self.checkpointer.save(
            self.global_step, engine=self.engine, components=self.checkpoint_components(), meta=meta,
            config_toml=self.checkpoint_config(),
        )  # fmt: skip
        return self.last_checkpoint

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if any rank passed True (on the CPU group)."""
        from hpcvae.dist import any_rank

        return any_rank(flag, group=self._ctrl_group)
