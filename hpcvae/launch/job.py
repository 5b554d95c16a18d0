"""The submitted job: run ``hpcvae.train`` on every task, survive preemption.

One SLURM task per GPU (``--ntasks-per-node = --gpus-per-node``); every task runs
:class:`TrainJob`, which exports the torch.distributed variables from
``submitit.helpers.TorchDistributedEnvironment`` and calls ``hpcvae.train.main``.

Requeue: SLURM sends ``USR2`` (``--signal=USR2@<delay>``) before the time limit, and
``SIGTERM`` on preemption or ``scontrol requeue``.  The training engine turns either into
a flag, agrees on it across ranks at the next step boundary, saves one checkpoint with all
ranks and returns ``preempted`` (exit code 3).  Only then does global rank 0 hand
submitit the follow-up job (:meth:`TrainJob.checkpoint`, the same call with
``--resume auto``) and ask SLURM to requeue; the other ranks leave without writing a
result so a stale one can never be mistaken for the final one.  Submitit's own USR2
handler is not used: it checkpoints inside the signal handler on rank 0 alone, mid-step,
while the other ranks may be inside a collective.

Environment defaults exported in every job (profiles can override them):

``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` / ``NCCL_ASYNC_ERROR_HANDLING=1``
    a dead peer aborts the collective instead of hanging the job until its time limit;
``NCCL_DEBUG=WARN``
    NCCL problems show up in the log without the INFO flood;
``OMP_NUM_THREADS`` = ``--cpus-per-task`` when given
    several ranks per node must not each spawn one thread per core.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcvae.checkpoint import latest_checkpoint
from hpcvae.cli import EXIT_PREEMPTED
from hpcvae.errors import ConfigError, LaunchError, ShardError
from hpcvae.launch.backends import backend
from hpcvae.launch.history import record
from hpcvae.launch.profile import check_script_text
from hpcvae.launch.submitit_compat import checkpoint_and_requeue, preempt_signal

DEFAULT_ENV: dict[str, str] = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
}


@dataclass(kw_only=True)
class TrainTarget:
    """Where the training job reads and writes, resolved before submission."""

    out: Path
    data: Path
    args: list[str]
    """The train arguments with ``--out``/``--data``/``--config`` made absolute."""


_PATH_FLAGS = ("--out", "--data", "--config")


def _split_flags(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Pull ``--out/--data/--config`` (``--x v`` or ``--x=v``) out of the train args."""
    found: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        key = a.split("=", 1)[0]
        if key in _PATH_FLAGS:
            if "=" in a:
                found[key] = a.split("=", 1)[1]
            elif i + 1 < len(args):
                found[key] = args[i + 1]
                i += 1
            else:
                raise ConfigError(f"train option {a} needs a value")
        else:
            rest.append(a)
        i += 1
    return found, rest


def resolve_train_target(train_args: Sequence[str], *, dry_run: bool = False) -> TrainTarget:
    """Resolve the run folder and shard set the job will use, and check the data up front.

    The arguments are parsed by ``hpcvae.train``'s own parser, so a typo fails here, in a
    second, instead of after the job waited in the queue.  Paths become absolute so the
    job does not depend on its working directory.
    """
    from hpcvae import train

    parsed, unknown = train.parser().parse_known_args(list(train_args))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {' '.join(unknown)}: neither hpcvae.launch nor hpcvae.train knows them"
        )
    cfg = train.config_from_args(parsed)
    flags, rest = _split_flags(train_args)
    out = Path(cfg.out).expanduser().resolve()
    data = Path(cfg.data.path).expanduser().resolve()
    problem = None
    if not data.is_dir():
        where = (
            "--data"
            if "--data" in flags
            else (f"data.path in {parsed.config}" if parsed.config else "data.path")
        )
        problem = (
            f"shard set folder {data} (from {where}) does not exist; make one with python -m hpcvae.shard"
        )
    elif not (data / "manifest.json").is_file():
        problem = f"shard set folder {data} has no manifest.json; is it a hpcvae.shard output folder?"
    if problem and not dry_run:
        raise ShardError(problem)
    if problem:  # a dry run still shows the script: the data may be made before submitting
        print(f"hpcvae.launch: warning: {problem}", file=sys.stderr)
    check_script_text("--out", str(out))
    args = list(rest)
    if parsed.config:
        args += ["--config", str(Path(parsed.config).expanduser().resolve())]
    args += ["--data", str(data), "--out", str(out)]
    return TrainTarget(out=out, data=data, args=args)


def _with_resume_auto(args: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume="):
            continue
        out.append(a)
    return [*out, "--resume", "auto"]


class TrainJob:
    """The submitted callable: trains on every task, requeues itself after a clean save.

    Checkpointable in submitit's sense (it has :meth:`checkpoint`), but the checkpoint is
    requested by the job itself after ``hpcvae.train`` returned ``preempted`` on all ranks,
    never from inside a signal handler.
    """

    def __init__(
        self,
        *,
        train_args: Sequence[str],
        run: str,
        env: dict[str, str] | None = None,
        max_requeues: int = 3,
        requeues: int = 0,
    ) -> None:
        self.train_args = list(train_args)
        self.run = run
        self.env = dict(env or {})
        self.max_requeues = max_requeues
        self.requeues = requeues

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The follow-up submission: same job, ``--resume auto``, one more requeue counted."""
        from submitit.helpers import DelayedSubmission

        nxt = type(self)(
            train_args=_with_resume_auto(self.train_args),
            run=self.run,
            env=self.env,
            max_requeues=self.max_requeues,
            requeues=self.requeues + 1,
        )
        return DelayedSubmission(nxt, *args, **kwargs)

    def __call__(self) -> dict[str, Any]:
        import submitit

        started = time.time()
        for k, v in self.env.items():
            os.environ.setdefault(k, v)
        job_env = submitit.JobEnvironment()
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        # Keep all node GPUs visible (hpcvae.dist picks cuda:LOCAL_RANK) so NCCL sees NVLink peers.
        run = Path(self.run)
        rank = dist_env.rank
        if rank == 0:
            record(
                run,
                event={
                    "event": "start",
                    "job_id": job_env.job_id,
                    "requeues": self.requeues,
                    "world_size": dist_env.world_size,
                    "master": f"{dist_env.master_addr}:{dist_env.master_port}",
                },
            )
        node = os.environ.get("SLURMD_NODENAME", job_env.hostname)  # emulated nodes share a hostname
        print(
            f"hpcvae.launch: task {rank}/{dist_env.world_size} on {node} "
            f"(job {job_env.job_id}, requeue {self.requeues}/{self.max_requeues}, "
            f"master {dist_env.master_addr}:{dist_env.master_port})",
            flush=True,
        )
        with _StopRelay() as stop:
            rc = self.train(self.train_args, stop)
            if rc == 0:
                if rank == 0:
                    record(
                        run, event={"event": "completed", "job_id": job_env.job_id, "requeues": self.requeues}
                    )
                return {"status": "completed", "out": str(run), "requeues": self.requeues, "rank": rank}
            if rc != EXIT_PREEMPTED:
                raise LaunchError(f"hpcvae.train exited with code {rc} on rank {rank} (run {run})")
            if stop.seen:
                print(f"hpcvae.launch: rank {rank} got signal(s) {sorted(set(stop.seen))}", flush=True)
            return self._requeue(job_env, rank, started)

    def train(self, args: Sequence[str], stop: _StopRelay) -> int:
        """Run ``hpcvae.train``: 0 completed, 3 preempted after an all-rank checkpoint."""
        from hpcvae import train

        cfg = train.config_from_args(train.parser().parse_args(list(args)))
        result = train.run(cfg, on_start=stop.attach)
        return 0 if result.status == "completed" else EXIT_PREEMPTED

    def _requeue(self, job_env: Any, rank: int, started: float) -> dict[str, Any]:
        run = Path(self.run)
        ckpt = latest_checkpoint(run)
        if rank != 0:
            # Only rank 0 talks to submitit/SLURM.  Leaving through SystemExit writes no
            # result file, so the client never reads this run's result as the final one.
            print(f"hpcvae.launch: rank {rank} checkpointed; rank 0 requeues the job", flush=True)
            sys.exit(0)
        if self.requeues >= self.max_requeues:
            record(run, event={"event": "gave_up", "job_id": job_env.job_id, "requeues": self.requeues})
            raise LaunchError(
                f"job {job_env.job_id} was preempted after {self.requeues} requeues (--max-requeues "
                f"{self.max_requeues}); resume by launching again with the same --out {run} "
                f"(last checkpoint: {ckpt})"
            )
        if backend(job_env.cluster).in_process:
            return {"status": "requeue", "next": self.checkpoint().function}
        record(
            run,
            event={
                "event": "requeue",
                "job_id": job_env.job_id,
                "requeues": self.requeues + 1,
                "checkpoint": str(ckpt) if ckpt else None,
            },
        )
        print(f"hpcvae.launch: checkpoint {ckpt}; requeueing job {job_env.job_id}", flush=True)
        try:
            # Dumps checkpoint()'s submission over the job's pickle, runs `scontrol requeue`
            # (LocalExecutor: exit code 144) and exits.
            checkpoint_and_requeue(job_env, started)
        except subprocess.CalledProcessError as exc:
            # `scontrol requeue` from outside, or SLURM preemption, already requeues or
            # cancels the job: our pickle is updated, so just leave without a result.
            print(f"hpcvae.launch: requeue request refused ({exc}); SLURM is ending the job", flush=True)
            sys.exit(0)
        raise LaunchError("submitit returned from its requeue call")  # pragma: no cover


class _StopRelay:
    """Preemption signals outside the trainer's own handlers become ``request_stop()``.

    submitit's USR2 handler would checkpoint and requeue inside the handler, on rank 0
    only, maybe while the other ranks sit in a collective.  This one only notes the signal
    and passes it to the trainer (``hpcvae.train.run(on_start=...)``), which saves with all
    ranks at the next step boundary.  It stays installed until the process ends, so a late
    USR2 cannot start submitit's checkpoint-and-requeue a second time.
    """

    def __init__(self) -> None:
        self.seen: list[int] = []
        self._trainer: Any = None
        self._old: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.seen.append(signum)
        if self._trainer is not None:
            self._trainer.request_stop()

    def attach(self, trainer: Any) -> None:
        self._trainer = trainer
        if self.seen:
            trainer.request_stop()

    def __enter__(self) -> _StopRelay:
        for s in (preempt_signal(), signal.SIGTERM):
            self._old[s] = signal.signal(s, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        if os.environ.get("SUBMITIT_DEBUG_JOB_ID"):  # in-process: give the caller its handlers back
            for s, h in self._old.items():
                signal.signal(s, h)
