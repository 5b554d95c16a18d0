"""Every use of submitit's internals, in one place, with the versions it is tested on.

Tested range: submitit 1.5.2 - 1.5.x (1.5.4 here).  ``tests/test_launch.py`` (the golden
sbatch file) and ``tests/test_launch_slurm.py`` (real requeues) exercise each function; an
upgrade that breaks one of them is fixed here.  Job state and results use submitit's public
API (``SlurmJob``/``LocalJob``, ``job.state``, ``job.exception()``), not these.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from collections.abc import Iterator
from typing import Any

TESTED_SUBMITIT = (">=1.5.2", "<1.6")


def preempt_signal() -> signal.Signals:
    """submitit's preemption signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    from submitit.core.job_environment import JobEnvironment

    return signal.Signals(JobEnvironment._usr_sig())


def submission_script(executor: Any) -> str:
    """The exact sbatch file an ``AutoExecutor`` would submit (submitit has no public call for it)."""
    inner = executor._executor
    return inner._make_submission_file_text(inner._submitit_command_str, "dry-run")


@contextlib.contextmanager
def without_srun() -> Iterator[None]:
    """Let a SLURM executor be built on a machine without SLURM (``--dry-run`` on a laptop).

    submitit asks ``srun`` for the CPU affinity when it builds a SlurmExecutor; without srun
    installed that fails, so the query answers a fixed value for the duration.
    """
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


def checkpoint_and_requeue(job_env: Any, started: float) -> None:
    """Dump the job's ``checkpoint()`` submission over its pickle and ask SLURM to requeue, then exit.

    What submitit's own USR2 handler does, but called by rank 0 after every rank has saved,
    never inside a signal handler.  ``started`` lets submitit tell a time-out from a
    preemption.  Raises CalledProcessError when ``scontrol requeue`` is refused (SLURM is
    already requeueing or cancelling the job).
    """
    from submitit.core import job_environment as je
    from submitit.core.utils import DelayedSubmission

    paths = job_env.paths
    handler = je.SignalHandler(job_env, paths, DelayedSubmission.load(paths.submitted_pickle))
    handler._start_time = started
    handler.checkpoint_and_try_requeue(int(preempt_signal()))
