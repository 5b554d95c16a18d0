"""``python -m hpcvae.launch``: build the executor, dry-run, submit (or run locally), follow, status.

What runs inside the job (one task per GPU, the stop relay, requeue, the environment
defaults every job exports) is in :mod:`hpcvae.launch.job`.
"""

from __future__ import annotations

import argparse
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

from hpcvae.config import add_options, options_from_args
from hpcvae.errors import ConfigError, LaunchError
from hpcvae.launch.backends import BACKENDS, backend
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
from hpcvae.launch.submitit_compat import submission_script
from hpcvae.launch.watch import follow, status


def job_env_vars(profile: SiteProfile, opts: LaunchOptions) -> dict[str, str]:
    env = dict(DEFAULT_ENV)
    cpus = opts.cpus_per_task or profile.cpus_per_task
    if cpus:
        env["OMP_NUM_THREADS"] = str(cpus)
    env.update(profile.env)
    return env


def build_executor(opts: LaunchOptions, profile: SiteProfile, folder: Path, job_name: str) -> Any:
    """An ``AutoExecutor`` with every parameter of the job set (CLI > profile > defaults)."""
    import submitit

    be = backend(opts.cluster)
    env = job_env_vars(profile, opts)
    time_min = parse_time_minutes(opts.time or profile.time)
    with be.executor_context(opts):
        try:
            ex = submitit.AutoExecutor(
                folder=folder, cluster=opts.cluster, **be.executor_kwargs(opts, profile)
            )
        except RuntimeError as exc:
            raise LaunchError(f"cannot use --cluster {opts.cluster}: {exc}") from None
    params: dict[str, Any] = {
        "name": job_name,
        "timeout_min": time_min,
        "nodes": opts.nodes,
        "tasks_per_node": opts.gpus_per_node,
        "stderr_to_stdout": True,
    }
    gpus = be.gpus(opts, profile)
    if gpus:
        params["gpus_per_node"] = gpus
    cpus = opts.cpus_per_task or profile.cpus_per_task
    if cpus:
        params["cpus_per_task"] = cpus
    mem = opts.mem or profile.mem
    if mem:
        params["mem_gb"] = parse_mem_gb(mem)
    params.update(be.parameters(opts, profile, [f"export {k}={shlex.quote(v)}" for k, v in env.items()]))
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
    # No --config / --set here: those are hpcvae.train's, passed on with the other train options.
    table = add_options(p, LaunchOptions, flags={"follow_timeout": "follow_timeout_s"}, skip=("train_args",),
                        config=False)  # fmt: skip
    p.add_argument("--status", metavar="RUN", help="show the state of the run folder RUN and exit")
    p.set_defaults(_table=table)
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
    backend(opts.cluster).check(opts)
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
    be = backend(opts.cluster)
    if be.in_process or opts.dry_run:
        raise ConfigError(
            f"submit() needs a backend that submits ({', '.join(k for k, b in BACKENDS.items() if not b.in_process)}) without --dry-run"
        )
    plan = _plan(opts)
    be.preflight(opts, plan.profile)
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
    be = backend(opts.cluster)
    if opts.dry_run:
        if be.batch_script:
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
    if be.in_process:
        plan = _plan(opts)
        return _run_in_process(plan.fn, plan.target.out, be.name)
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


def _run_in_process(fn: TrainJob, run: Path, name: str) -> int:
    """In-process run (``--cluster debug``): requeues become a loop in this process."""
    job_id = f"{name}-{os.getpid()}-{int(time.time())}"
    record(run, job={"job_id": job_id, "cluster": name, "folder": str(run / name), "nodes": 1})
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
    print(f"hpcvae.launch: {name} run completed; run folder {run}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, train_args = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.status:
        info = status(_resolve_run_arg(args.status))
        for k, v in info.items():
            print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
        return 0
    profile = None if args.profile else os.environ.get("HPCVAE_SLURM_PROFILE")
    opts = options_from_args(LaunchOptions, args, args._table, profile=profile, train_args=list(train_args))
    return launch(opts)
