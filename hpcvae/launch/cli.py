"""``python -m hpcvae.launch``: build the executor, dry-run, submit (or run locally), follow, status.

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
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcvae.errors import ConfigError, LaunchError
from hpcvae.launch.history import record
from hpcvae.launch.job import DEFAULT_ENV, TrainJob, TrainTarget, resolve_train_target
from hpcvae.launch.profile import (
    ClusterKind,
    LaunchOptions,
    SiteProfile,
    load_profile,
    parse_mem_gb,
    parse_time_minutes,
)
from hpcvae.launch.slurm import check_controller, check_partition, follow, status
from hpcvae.launch.submitit_compat import submission_script, without_srun


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
    ctx = without_srun() if (opts.cluster == "slurm" and opts.dry_run) else contextlib.nullcontext()
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
    return submission_script(ex)


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
