"""Launcher backends: the ways a training job runs, one class each, on submitit's executor model.

The command (``launch/cli.py``) and the watchers (``launch/watch.py``) ask the backend, never
its name: how to build its submitit executor, which parameters and setup lines it takes,
whether a scheduler must answer first, how to find a job it did not submit and its state.
A new backend (another scheduler submitit knows, or a submitit plugin executor) is one
subclass plus its line in :data:`BACKENDS` and its name in ``ClusterKind`` (``profile.py``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from hpcvae.errors import ConfigError, LaunchError

if TYPE_CHECKING:
    from hpcvae.launch.profile import LaunchOptions, SiteProfile


class Backend:
    """A way to run ``TrainJob``: submitit's ``AutoExecutor(cluster=name)`` plus what differs per kind."""

    name: ClassVar[str]
    in_process: ClassVar[bool] = False
    """Runs in this process (no submission, no job files; requeues become a loop)."""
    batch_script: ClassVar[bool] = False
    """``--dry-run`` prints the batch script it would submit (else the command it would run)."""
    max_nodes: ClassVar[int | None] = None

    def check(self, opts: LaunchOptions) -> None:
        """Refuse options this backend cannot honour, before anything is built."""
        if self.max_nodes is not None and opts.nodes > self.max_nodes:
            raise ConfigError(
                f"--cluster {self.name} runs on this machine only; use --nodes {self.max_nodes} (got {opts.nodes})"
            )

    def preflight(self, opts: LaunchOptions, profile: SiteProfile) -> None:
        """Before a submission: is the scheduler there and does it know the requested resources?"""

    def executor_kwargs(self, opts: LaunchOptions, profile: SiteProfile) -> dict[str, Any]:
        return {f"{self.name}_max_num_timeout": opts.max_requeues}

    def executor_context(self, opts: LaunchOptions) -> contextlib.AbstractContextManager[Any]:
        """Around the executor's construction (a dry run must not need the scheduler's tools)."""
        return contextlib.nullcontext()

    def gpus(self, opts: LaunchOptions, profile: SiteProfile) -> int | None:
        """GPUs per node to request: one per task where this machine has them."""
        import torch

        return opts.gpus_per_node if torch.cuda.is_available() else None

    def parameters(self, opts: LaunchOptions, profile: SiteProfile, env_lines: list[str]) -> dict[str, Any]:
        """This kind's own ``update_parameters`` keys; ``env_lines`` export the job's environment."""
        return {f"{self.name}_setup": env_lines}

    def job(self, folder: Path, job_id: str) -> Any:
        """submitit's handle on a job this process did not submit (``--status``, ``--follow``)."""
        raise LaunchError(f"--cluster {self.name} leaves no job to look up")

    def state(self, run: Path, job_id: str, folder: Path, job: Any = None) -> tuple[str, int]:
        """(state in SLURM's words, restarts) of a job, by its id and submitit folder."""
        raise NotImplementedError


class SlurmBackend(Backend):
    """``sbatch`` through submitit; the site profile supplies partition, account, setup and srun flags."""

    name = "slurm"
    batch_script = True

    def preflight(self, opts: LaunchOptions, profile: SiteProfile) -> None:
        from hpcvae.launch.slurm import check_controller, check_partition

        check_controller()
        partition = opts.partition or profile.partition
        if partition:
            check_partition(partition)

    def executor_kwargs(self, opts: LaunchOptions, profile: SiteProfile) -> dict[str, Any]:
        kwargs = super().executor_kwargs(opts, profile)
        if profile.python:
            kwargs["slurm_python"] = profile.python
        return kwargs

    def executor_context(self, opts: LaunchOptions) -> contextlib.AbstractContextManager[Any]:
        from hpcvae.launch.submitit_compat import without_srun

        return without_srun() if opts.dry_run else contextlib.nullcontext()

    def gpus(self, opts: LaunchOptions, profile: SiteProfile) -> int | None:
        return opts.gpus_per_node if profile.gpus else None

    def parameters(self, opts: LaunchOptions, profile: SiteProfile, env_lines: list[str]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for key in ("partition", "account", "qos"):
            value = getattr(opts, key) or getattr(profile, key)
            if value:
                params[f"slurm_{key}"] = value
        if profile.constraint:
            params["slurm_constraint"] = profile.constraint
        params["slurm_signal_delay_s"] = profile.signal_delay_s
        params["slurm_setup"] = list(profile.setup) + env_lines
        if profile.srun_args:
            params["slurm_srun_args"] = list(profile.srun_args)
        if profile.sbatch:
            params["slurm_additional_parameters"] = dict(profile.sbatch)
        return params

    def job(self, folder: Path, job_id: str) -> Any:
        import submitit

        return submitit.SlurmJob(folder=folder, job_id=job_id)

    def state(self, run: Path, job_id: str, folder: Path, job: Any = None) -> tuple[str, int]:
        from hpcvae.launch.slurm import slurm_state

        return slurm_state(job_id)


class LocalBackend(Backend):
    """This machine, through submitit's local executor (a child process per task)."""

    name = "local"
    max_nodes = 1

    def job(self, folder: Path, job_id: str) -> Any:
        import submitit

        return submitit.LocalJob(folder=folder, job_id=job_id)

    def state(self, run: Path, job_id: str, folder: Path, job: Any = None) -> tuple[str, int]:
        if job is not None:  # our own child: submitit polls (and so reaps) it; a zombie would look alive
            running = job.state == "RUNNING"
        else:  # a local job's id is its pid
            running = job_id.isdigit() and _pid_alive(int(job_id))
        if running:
            return "RUNNING", 0
        return ("COMPLETED" if self.job(folder, job_id).paths.result_pickle.exists() else "FAILED"), 0


class DebugBackend(Backend):
    """In this process (submitit's debug executor model): for a first try and for debuggers."""

    name = "debug"
    in_process = True

    def executor_kwargs(self, opts: LaunchOptions, profile: SiteProfile) -> dict[str, Any]:
        return {}

    def parameters(self, opts: LaunchOptions, profile: SiteProfile, env_lines: list[str]) -> dict[str, Any]:
        return {}

    def state(self, run: Path, job_id: str, folder: Path, job: Any = None) -> tuple[str, int]:
        """Only the run's history knows how an in-process run ended."""
        from hpcvae.launch.history import read_history

        mine = [e["event"] for e in read_history(run)["events"] if str(e.get("job_id")) == job_id]
        return {"completed": "COMPLETED", "gave_up": "FAILED"}.get(mine[-1] if mine else "", "UNKNOWN"), 0


BACKENDS: dict[str, type[Backend]] = {
    "slurm": SlurmBackend,
    "local": LocalBackend,
    "debug": DebugBackend,
}


def backend(name: str) -> Backend:
    """The backend called ``name`` (``--cluster``); a one-line error naming the known ones."""
    if name not in BACKENDS:
        raise ConfigError(f"--cluster must be one of {', '.join(BACKENDS)}, got {name!r}")
    return BACKENDS[name]()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
