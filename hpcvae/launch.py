"""``python -m hpcvae.launch``: run ``hpcvae.train`` as a submitit job that survives preemption.

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

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hpcvae.errors import ConfigError, LaunchError, ShardError

ClusterKind = Literal["slurm", "local", "debug"]

DEFAULT_ENV: dict[str, str] = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
}
"""Exported in every job; see the module docstring for why."""

EXIT_PREEMPTED = 3
"""``hpcvae.train.main`` returns this after an agreed, all-rank checkpoint on a signal."""

TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
    "REVOKED",
}

_SLURM_CMD_TIMEOUT_S = 30


# ----------------------------------------------------------------------------------------
# Options and site profiles


def parse_time_minutes(text: str) -> int:
    """SLURM time string (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) -> whole minutes."""
    t = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m or not t:
        raise ConfigError(f"--time {text!r} is not a SLURM time (MM, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        secs = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        secs = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        secs = int(a) * 60 + int(b)
    else:  # MM
        secs = int(a) * 60
    if secs <= 0:
        raise ConfigError(f"--time {text!r} must be longer than zero")
    return max(1, math.ceil(secs / 60))


def parse_mem_gb(text: str) -> float:
    """``64G``, ``500M``, ``1T`` or a bare number of GB -> GB (per node)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"--mem {text!r} is not a memory size such as 64G or 500M")
    value = float(m.group(1))
    scale = {"": 1.0, "K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}[m.group(2).upper()]
    gb = value * scale
    if gb <= 0:
        raise ConfigError(f"--mem {text!r} must be more than zero")
    return gb


def check_script_text(what: str, value: str) -> str:
    """Refuse control characters in a value that lands in the sbatch script.

    Quotes, ``$()`` and backticks are quoted safely, but a newline (or any other control
    character) would end the line it is on and start a new line of shell.
    """
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ConfigError(
            f"{what} {value!r} contains a control character ({bad!r}); it would become part of the batch "
            "script's shell, so it is not allowed"
        )
    return value


@dataclass(kw_only=True)
class SiteProfile:
    """Site defaults from ``slurm/<site>.toml``; command-line flags win over them."""

    name: str = "default"
    """Shown in logs; defaults to the file name."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus: bool = True
    """Request GPUs (``--gpus-per-node``).  ``false`` on CPU-only clusters such as the dev
    cluster, where ``--gpus-per-node N`` then only means N tasks per node."""
    time: str = "02:00:00"
    cpus_per_task: int | None = None
    mem: str | None = None
    """Memory per node, e.g. ``"200G"``."""
    signal_delay_s: int = 120
    """Seconds between SLURM's USR2 warning and the time limit: must cover one step plus a save."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before ``srun`` (``module load ...``, activating an environment)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for every task, on top of :data:`DEFAULT_ENV`."""
    python: str | None = None
    """Command that runs Python inside the job; default: the interpreter running the launcher."""
    srun_args: list[str] = field(default_factory=list)
    sbatch: dict[str, str] = field(default_factory=dict)
    """Any other ``#SBATCH`` flags, e.g. ``{mail-type = "END"}``."""

    def __post_init__(self) -> None:
        if self.signal_delay_s < 10:
            raise ConfigError(f"profile {self.name}: signal_delay_s must be >= 10, got {self.signal_delay_s}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ConfigError(f"profile {self.name}: cpus_per_task must be >= 1")
        parse_time_minutes(self.time)
        if self.mem is not None:
            parse_mem_gb(self.mem)
        for k, v in {**self.env, **self.sbatch}.items():
            if not isinstance(v, str) or not isinstance(k, str):
                raise ConfigError(f"profile {self.name}: env/sbatch entry {k!r} must be a string, got {v!r}")
        for k in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ConfigError(f"profile {self.name}: {k!r} is not a valid environment variable name")
        # Everything but ``setup`` (shell by design) reaches the script as a quoted value.
        for key in ("name", "partition", "account", "qos", "constraint", "time", "mem", "python"):
            if getattr(self, key) is not None:
                check_script_text(f"profile {self.name}: {key}", getattr(self, key))
        for key, table in (("env", self.env), ("sbatch", self.sbatch)):
            for k, v in table.items():
                check_script_text(f"profile {self.name}: {key}.{k}", k)
                check_script_text(f"profile {self.name}: {key}.{k}", v)
        for i, a in enumerate(self.srun_args):
            check_script_text(f"profile {self.name}: srun_args[{i}]", str(a))


def load_profile(path: str | Path | None) -> SiteProfile:
    """Read a TOML site profile (``None``: built-in defaults)."""
    if path is None:
        return SiteProfile()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"profile {p} does not exist (see slurm/example-site.toml)")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"profile {p}: invalid TOML: {exc}") from None
    known = {f.name for f in dataclasses.fields(SiteProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"profile {p}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    data.setdefault("name", p.stem)
    try:
        return SiteProfile(**data)
    except ConfigError as exc:
        raise ConfigError(f"profile {p}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"profile {p}: {exc}") from None


@dataclass(kw_only=True)
class LaunchOptions:
    """What ``python -m hpcvae.launch`` was asked for; ``train_args`` go to ``hpcvae.train``."""

    nodes: int = 1
    gpus_per_node: int = 1
    """One task per GPU; on a CPU-only profile simply the tasks per node."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    profile: str | None = None
    cluster: ClusterKind = "slurm"
    dry_run: bool = False
    follow: bool = False
    follow_timeout_s: float = 0.0
    """Stop following after this long (0: until the job ends)."""
    max_requeues: int = 3
    job_name: str | None = None
    train_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ConfigError(
                f"--gpus-per-node must be >= 1 (it sets the tasks per node), got {self.gpus_per_node}"
            )
        if self.max_requeues < 0:
            raise ConfigError(f"--max-requeues must be >= 0, got {self.max_requeues}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ConfigError(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        if self.time is not None:
            parse_time_minutes(self.time)
        if self.mem is not None:
            parse_mem_gb(self.mem)
        if self.cluster not in ("slurm", "local", "debug"):
            raise ConfigError(f"--cluster must be slurm, local or debug, got {self.cluster!r}")
        if self.job_name is not None and not self.job_name.strip():
            raise ConfigError("--job-name must not be empty")
        for flag in ("job_name", "partition", "account", "qos", "time", "mem"):
            value = getattr(self, flag)
            if value is not None:
                check_script_text(f"--{flag.replace('_', '-')}", value)


# ----------------------------------------------------------------------------------------
# Train arguments: find the run folder and the data, make paths absolute


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


# ----------------------------------------------------------------------------------------
# Run history (runs/NAME/launch.json)


def _history_path(run: Path) -> Path:
    return run / "launch.json"


def read_history(run: Path) -> dict[str, Any]:
    p = _history_path(run)
    if not p.is_file():
        return {"jobs": [], "events": []}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise LaunchError(f"{p} is not valid JSON ({exc}); delete it to start a fresh history") from None


def record(run: Path, *, job: dict[str, Any] | None = None, event: dict[str, Any] | None = None) -> None:
    """Append to the history with an atomic rename (the launcher and rank 0 both write it)."""
    run.mkdir(parents=True, exist_ok=True)
    hist = read_history(run)
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    if job is not None:
        hist["jobs"].append({"submitted": now, **job})
    if event is not None:
        hist["events"].append({"time": now, **event})
    tmp = _history_path(run).with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(hist, indent=1) + "\n")
    os.replace(tmp, _history_path(run))


# ----------------------------------------------------------------------------------------
# The job


def latest_checkpoint(run: Path) -> Path | None:
    """Newest ``checkpoints/step-*`` folder with a ``COMPLETE`` marker."""
    ck = run / "checkpoints"
    if not ck.is_dir():
        return None
    done = [p for p in ck.iterdir() if p.is_dir() and (p / "COMPLETE").exists()]
    return max(done, key=lambda p: p.name) if done else None


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
        if job_env.cluster == "debug":
            return {"status": "requeue", "next": self.checkpoint().function}
        from submitit.core import job_environment as je
        from submitit.core.utils import DelayedSubmission

        paths = job_env.paths
        delayed = DelayedSubmission.load(paths.submitted_pickle)
        handler = je.SignalHandler(job_env, paths, delayed)
        handler._start_time = started  # lets submitit tell a time-out from a preemption
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
            handler.checkpoint_and_try_requeue(int(JobEnvironmentSignal.get()))
        except subprocess.CalledProcessError as exc:
            # `scontrol requeue` from outside, or SLURM preemption, already requeues or
            # cancels the job: our pickle is updated, so just leave without a result.
            print(f"hpcvae.launch: requeue request refused ({exc}); SLURM is ending the job", flush=True)
            sys.exit(0)
        raise LaunchError("submitit returned from its requeue call")  # pragma: no cover


class JobEnvironmentSignal:
    """submitit's preemption signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""

    @staticmethod
    def get() -> signal.Signals:
        from submitit.core.job_environment import JobEnvironment

        return signal.Signals(JobEnvironment._usr_sig())


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
        for s in (JobEnvironmentSignal.get(), signal.SIGTERM):
            self._old[s] = signal.signal(s, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        if os.environ.get("SUBMITIT_DEBUG_JOB_ID"):  # in-process: give the caller its handlers back
            for s, h in self._old.items():
                signal.signal(s, h)


# ----------------------------------------------------------------------------------------
# Executors


def _gpu_request(profile: SiteProfile, opts: LaunchOptions) -> int | None:
    if opts.cluster == "slurm":
        return opts.gpus_per_node if profile.gpus else None
    import torch

    return opts.gpus_per_node if torch.cuda.is_available() else None


def job_env_vars(profile: SiteProfile, opts: LaunchOptions) -> dict[str, str]:
    env = dict(DEFAULT_ENV)
    cpus = opts.cpus_per_task or profile.cpus_per_task
    if cpus:
        env["OMP_NUM_THREADS"] = str(cpus)
    env.update(profile.env)
    return env


def setup_lines(profile: SiteProfile, opts: LaunchOptions, env: dict[str, str]) -> list[str]:
    lines = list(profile.setup) if opts.cluster == "slurm" else []
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    return lines


@contextlib.contextmanager
def _pretend_srun() -> Iterator[None]:
    """Let ``--dry-run`` build the sbatch script on a machine without SLURM."""
    import shutil

    from submitit.slurm.slurm import SlurmExecutor

    if shutil.which("srun"):
        yield
        return
    orig = SlurmExecutor.__dict__["affinity"]
    SlurmExecutor.affinity = classmethod(lambda cls: 2)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        SlurmExecutor.affinity = orig  # type: ignore[method-assign]


def build_executor(opts: LaunchOptions, profile: SiteProfile, folder: Path, job_name: str) -> Any:
    """An ``AutoExecutor`` with every parameter of the job set (CLI > profile > defaults)."""
    import submitit

    env = job_env_vars(profile, opts)
    time_min = parse_time_minutes(opts.time or profile.time)
    kwargs: dict[str, Any] = {}
    if opts.cluster in ("slurm", "local"):
        kwargs[f"{opts.cluster}_max_num_timeout"] = opts.max_requeues
    if opts.cluster == "slurm" and profile.python:
        kwargs["slurm_python"] = profile.python
    ctx = _pretend_srun() if (opts.cluster == "slurm" and opts.dry_run) else contextlib.nullcontext()
    with ctx:
        try:
            ex = submitit.AutoExecutor(folder=folder, cluster=opts.cluster, **kwargs)
        except RuntimeError as exc:
            raise LaunchError(f"cannot use --cluster {opts.cluster}: {exc}") from None
    params: dict[str, Any] = {
        "name": job_name,
        "timeout_min": time_min,
        "nodes": opts.nodes,
        "tasks_per_node": opts.gpus_per_node,
        "stderr_to_stdout": True,
    }
    gpus = _gpu_request(profile, opts)
    if gpus:
        params["gpus_per_node"] = gpus
    cpus = opts.cpus_per_task or profile.cpus_per_task
    if cpus:
        params["cpus_per_task"] = cpus
    mem = opts.mem or profile.mem
    if mem:
        params["mem_gb"] = parse_mem_gb(mem)
    if opts.cluster == "slurm":
        for key in ("partition", "account", "qos"):
            value = getattr(opts, key) or getattr(profile, key)
            if value:
                params[f"slurm_{key}"] = value
        if profile.constraint:
            params["slurm_constraint"] = profile.constraint
        params["slurm_signal_delay_s"] = profile.signal_delay_s
        params["slurm_setup"] = setup_lines(profile, opts, env)
        if profile.srun_args:
            params["slurm_srun_args"] = list(profile.srun_args)
        if profile.sbatch:
            params["slurm_additional_parameters"] = dict(profile.sbatch)
    elif opts.cluster == "local":
        params["local_setup"] = setup_lines(profile, opts, env)
    try:
        ex.update_parameters(**params)
    except (ValueError, NameError, AssertionError) as exc:
        raise LaunchError(f"submitit rejected the job parameters: {str(exc).splitlines()[0]}") from None
    return ex


def sbatch_script(ex: Any) -> str:
    """The exact sbatch file submitit would submit."""
    inner = ex._executor
    return inner._make_submission_file_text(inner._submitit_command_str, "dry-run")


# ----------------------------------------------------------------------------------------
# SLURM queries (every call bounded)


def _slurm(cmd: list[str], timeout: float = _SLURM_CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LaunchError(f"{cmd[0]} not found: SLURM client tools are not installed here") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(
            f"`{' '.join(cmd)}` did not answer within {timeout:.0f}s; is slurmctld reachable "
            f"(SLURM_CONF={os.environ.get('SLURM_CONF', '/etc/slurm/slurm.conf')})?"
        ) from None


def check_controller() -> None:
    """Fail fast with a clear message when no slurmctld answers."""
    r = _slurm(["scontrol", "ping"])
    if r.returncode != 0 or "UP" not in r.stdout:
        conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
        lines = [
            ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip() and not ln.startswith("*")
        ]
        raise LaunchError(
            f"the SLURM controller is not reachable (SLURM_CONF={conf}): "
            f"{lines[0] if lines else 'scontrol ping failed'}; for the dev cluster run slurm/dev-cluster/start.sh"
        )


def check_partition(partition: str) -> None:
    r = _slurm(["sinfo", "-h", "-o", "%R"])
    known = sorted(set(r.stdout.split()))
    if r.returncode == 0 and known and partition not in known:
        raise LaunchError(
            f"partition {partition!r} does not exist on this cluster (known: {', '.join(known)})"
        )


def slurm_state(job_id: str) -> tuple[str, int]:
    """(state, restarts) from the controller, falling back to accounting."""
    r = _slurm(["scontrol", "show", "job", "-o", job_id])
    if r.returncode == 0 and "JobState=" in r.stdout:
        state = re.search(r"JobState=(\S+)", r.stdout)
        restarts = re.search(r"Restarts=(\d+)", r.stdout)
        return (state.group(1) if state else "UNKNOWN", int(restarts.group(1)) if restarts else 0)
    r = _slurm(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id])
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    if r.returncode == 0 and lines:
        return lines[-1].split()[0], 0
    return "UNKNOWN", 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_state(cluster: str, job_id: str, folder: Path, job: Any = None) -> tuple[str, int]:
    """State of a job of any kind, by its id and submitit folder (and its ``Job`` when we hold it)."""
    if cluster == "slurm":
        return slurm_state(job_id)
    proc = getattr(job, "_process", None)
    if proc is not None:  # our own child: poll() also reaps it, a zombie would look alive
        running = proc.poll() is None
    else:
        running = job_id.isdigit() and _pid_alive(int(job_id))
    if running:
        return "RUNNING", 0
    return ("COMPLETED" if (folder / f"{job_id}_0_result.pkl").exists() else "FAILED"), 0


def read_result(folder: Path, job_id: str) -> tuple[str, Any] | None:
    p = folder / f"{job_id}_0_result.pkl"
    if not p.exists():
        return None
    from submitit.core.utils import pickle_load

    try:
        return pickle_load(p)
    except (EOFError, OSError):
        return None


# ----------------------------------------------------------------------------------------
# Follow and status


def follow(
    run: Path,
    cluster: str,
    job_id: str,
    folder: Path,
    timeout_s: float = 0.0,
    poll_s: float = 2.0,
    job: Any = None,
) -> int:
    """Stream rank 0's log until the job ends; 0 if it completed, 1 otherwise."""
    log = folder / f"{job_id}_0_log.out"
    pos = 0
    t0 = time.monotonic()
    last_check = 0.0
    state = "PENDING"
    unknown_since: float | None = None

    def drain() -> None:
        nonlocal pos
        if log.exists():
            with log.open("rb") as f:
                f.seek(pos)
                chunk = f.read()
            if chunk:
                pos += len(chunk)
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()

    while True:
        drain()
        now = time.monotonic()
        if now - last_check >= poll_s:
            last_check = now
            state, _ = job_state(cluster, job_id, folder, job)
            base = state.split("+")[0]
            if base in TERMINAL_STATES:
                # The result file can trail the state by a moment on shared file systems.
                for _ in range(10):
                    if read_result(folder, job_id) is not None or base != "COMPLETED":
                        break
                    time.sleep(0.5)
                drain()
                break
            if base == "UNKNOWN":
                unknown_since = unknown_since or now
                if now - unknown_since > 120:
                    raise LaunchError(
                        f"job {job_id}: SLURM has not known its state for 2 minutes; giving up following"
                    )
            else:
                unknown_since = None
        if timeout_s and now - t0 > timeout_s:
            raise LaunchError(
                f"job {job_id} still {state} after following it for {timeout_s:.0f}s (it keeps running)"
            )
        time.sleep(0.3)
    res = read_result(folder, job_id)
    base = state.split("+")[0]
    if res is not None and res[0] == "success" and base == "COMPLETED":
        print(f"hpcvae.launch: job {job_id} COMPLETED; run folder {run}", flush=True)
        return 0
    reason = ""
    if res is not None and res[0] == "error":
        reason = ": " + str(res[1]).strip().splitlines()[-1]
    print(f"hpcvae.launch: job {job_id} ended {base}{reason}", file=sys.stderr, flush=True)
    return 1


def status(run: Path) -> dict[str, Any]:
    """Job id, state, requeues, last checkpoint and the latest images/s of a run."""
    hist = read_history(run)
    if not hist["jobs"]:
        raise LaunchError(f"{_history_path(run)} lists no job; was this run launched with hpcvae.launch?")
    job = hist["jobs"][-1]
    cluster, job_id = job["cluster"], str(job["job_id"])
    folder = Path(job["folder"])
    if cluster == "debug":  # in-process: only the history knows
        mine = [e["event"] for e in hist["events"] if str(e.get("job_id")) == job_id]
        state = {"completed": "COMPLETED", "gave_up": "FAILED"}.get(mine[-1] if mine else "", "UNKNOWN")
        restarts = 0
    else:
        state, restarts = job_state(cluster, job_id, folder)
    requeues = sum(
        1 for e in hist["events"] if e.get("event") == "requeue" and str(e.get("job_id")) == job_id
    )
    ips = None
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "images_per_s" in rec:
                ips = rec["images_per_s"]
    ck = latest_checkpoint(run)
    return {
        "run": str(run),
        "job_id": job_id,
        "cluster": cluster,
        "state": state,
        "requeues": max(requeues, restarts),
        "last_checkpoint": ck.name if ck else None,
        "images_per_s": ips,
        "log": str(folder / f"{job_id}_0_log.out"),
    }


# ----------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpcvae.launch",
        description="Submit hpcvae.train to SLURM (or run it locally) with requeue on preemption. "
        "Options not listed here are passed to hpcvae.train.",
        allow_abbrev=False,
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="one task per GPU")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", help="wall time, e.g. 02:00:00 (default: the profile's)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem", help="memory per node, e.g. 200G")
    p.add_argument(
        "--profile",
        default=os.environ.get("HPCVAE_SLURM_PROFILE"),
        help="site profile TOML (default: $HPCVAE_SLURM_PROFILE)",
    )
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], default="slurm")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.add_argument("--follow", action="store_true", help="stream rank 0's log until the job ends")
    p.add_argument("--follow-timeout", type=float, default=0.0, metavar="S")
    p.add_argument("--max-requeues", type=int, default=3)
    p.add_argument("--job-name")
    p.add_argument("--status", metavar="RUN", help="show the state of the run folder RUN and exit")
    return p


def _resolve_run_arg(text: str) -> Path:
    p = Path(text).expanduser()
    if not p.exists() and not p.is_absolute() and (Path("runs") / p).exists():
        p = Path("runs") / p
    if not p.is_dir():
        raise LaunchError(f"run folder {p} does not exist")
    return p.resolve()


@dataclass(kw_only=True)
class Submitted:
    """A submitted job: the submitit ``Job`` plus where its run and logs live."""

    job: Any
    job_id: str
    cluster: ClusterKind
    run: Path
    folder: Path

    @property
    def log(self) -> Path:
        """Rank 0's log (stdout and stderr), the same file across requeues."""
        return self.folder / f"{self.job_id}_0_log.out"


@dataclass(kw_only=True)
class _Plan:
    profile: SiteProfile
    target: TrainTarget
    job_name: str
    folder: Path
    fn: TrainJob


def _plan(opts: LaunchOptions) -> _Plan:
    profile = load_profile(opts.profile)
    target = resolve_train_target(opts.train_args, dry_run=opts.dry_run)
    if opts.cluster == "local" and opts.nodes > 1:
        raise ConfigError(f"--cluster local runs on this machine only; use --nodes 1 (got {opts.nodes})")
    env = job_env_vars(profile, opts)
    fn = TrainJob(train_args=target.args, run=str(target.out), env=env, max_requeues=opts.max_requeues)
    return _Plan(
        profile=profile,
        target=target,
        job_name=opts.job_name or target.out.name,
        folder=target.out / opts.cluster,
        fn=fn,
    )


def dry_run_script(opts: LaunchOptions, plan: _Plan | None = None) -> str:
    """The sbatch script ``opts`` would submit (nothing is submitted)."""
    opts = dataclasses.replace(opts, cluster="slurm", dry_run=True)
    plan = plan or _plan(opts)
    ex = build_executor(opts, plan.profile, plan.folder, plan.job_name)
    return sbatch_script(ex)


def submit(opts: LaunchOptions) -> Submitted:
    """Check the cluster and the inputs, submit the job, record it in ``launch.json``."""
    if opts.cluster == "debug" or opts.dry_run:
        raise ConfigError("submit() needs --cluster slurm or local without --dry-run")
    plan = _plan(opts)
    if opts.cluster == "slurm":
        check_controller()
        partition = opts.partition or plan.profile.partition
        if partition:
            check_partition(partition)
    plan.folder.mkdir(parents=True, exist_ok=True)
    ex = build_executor(opts, plan.profile, plan.folder, plan.job_name)
    from submitit.core.utils import FailedJobError

    try:
        job = ex.submit(plan.fn)
    except FailedJobError as exc:
        m = re.search(r"(sbatch: error: .*)", str(exc))
        msg = m.group(1).strip() if m else " ".join(str(exc).split())
        if "gres" in msg.lower() and plan.profile.gpus:
            msg += "; on a cluster without GPUs use a profile with gpus = false (e.g. slurm/dev-cluster.toml)"
        raise LaunchError(f"sbatch refused the job: {msg}") from None
    run = plan.target.out
    record(
        run,
        job={
            "job_id": str(job.job_id),
            "cluster": opts.cluster,
            "folder": str(plan.folder),
            "nodes": opts.nodes,
            "tasks_per_node": opts.gpus_per_node,
            "job_name": plan.job_name,
            "train_args": plan.target.args,
        },
    )
    return Submitted(job=job, job_id=str(job.job_id), cluster=opts.cluster, run=run, folder=plan.folder)


def launch(opts: LaunchOptions) -> int:
    """The command: dry-run, run in-process, or submit (and optionally follow)."""
    if opts.dry_run:
        if opts.cluster == "slurm":
            plan = _plan(opts)
            sys.stdout.write(dry_run_script(opts, plan))
            print(
                f"# hpcvae.train arguments (pickled with the job): {shlex.join(plan.target.args)}",
                file=sys.stderr,
            )
        else:
            plan = _plan(opts)
            print(
                f"--cluster {opts.cluster} would run: python -m hpcvae.train {shlex.join(plan.target.args)}"
            )
        return 0
    if opts.cluster == "debug":
        plan = _plan(opts)
        return _run_debug(plan.fn, plan.target.out)
    minutes = parse_time_minutes(opts.time or load_profile(opts.profile).time)
    if minutes <= 10:
        print(
            f"hpcvae.launch: note: with --time of {minutes} min (<= 10) submitit counts every preemption as a "
            f"time-out; both are limited by --max-requeues {opts.max_requeues}",
            file=sys.stderr,
        )
    sub = submit(opts)
    print(
        f"hpcvae.launch: submitted job {sub.job_id} ({opts.cluster}, {opts.nodes}x{opts.gpus_per_node} tasks)"
    )
    print(f"hpcvae.launch: rank 0 log {sub.log}")
    print(f"hpcvae.launch: status: python -m hpcvae.launch --status {shlex.quote(str(sub.run))}", flush=True)
    if opts.follow:
        return follow(
            sub.run, sub.cluster, sub.job_id, sub.folder, timeout_s=opts.follow_timeout_s, job=sub.job
        )
    return 0


def _run_debug(fn: TrainJob, run: Path) -> int:
    """In-process run (``--cluster debug``): requeues become a loop in this process."""
    job_id = f"debug-{os.getpid()}-{int(time.time())}"
    record(run, job={"job_id": job_id, "cluster": "debug", "folder": str(run / "debug"), "nodes": 1})
    saved = dict(os.environ)
    os.environ["SUBMITIT_DEBUG_JOB_ID"] = job_id
    try:
        while True:
            res = fn()
            if res.get("status") != "requeue":
                break
            fn = res["next"]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    print(f"hpcvae.launch: debug run completed; run folder {run}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, train_args = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.status:
        info = status(_resolve_run_arg(args.status))
        for k, v in info.items():
            print(f"{k}: {v}")
        return 0
    opts = LaunchOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        time=args.time,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        profile=args.profile,
        cluster=args.cluster,
        dry_run=args.dry_run,
        follow=args.follow,
        follow_timeout_s=args.follow_timeout,
        max_requeues=args.max_requeues,
        job_name=args.job_name,
        train_args=list(train_args),
    )
    return launch(opts)


__all__ = [
    "DEFAULT_ENV",
    "LaunchOptions",
    "SiteProfile",
    "TrainJob",
    "build_executor",
    "follow",
    "launch",
    "load_profile",
    "main",
    "sbatch_script",
    "status",
    "submit",
    "Submitted",
    "dry_run_script",
]

if __name__ == "__main__":
    from hpcvae.cli import run_cli

    run_cli(main, "hpcvae.launch")
