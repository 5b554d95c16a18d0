"""Launching ``hpcvae.train`` on SLURM (or locally) through submitit, with requeue on preemption.

* ``profile.py``: site profiles and the launcher's options;
* ``job.py``: the submitted job (train on every task, requeue after an all-rank checkpoint);
* ``backends.py``: the launcher backends (``slurm``, ``local``, ``debug``) behind one interface;
* ``slurm.py``: questions to SLURM (controller, partition, job state);
* ``watch.py``: a job's outcome, ``--follow`` and ``--status``;
* ``history.py``: ``RUN/launch.json``;
* ``cli.py``: the executor, ``--dry-run``, submission and the command line;
* ``submitit_compat.py``: every use of submitit's internals, with the tested version range.
"""

from __future__ import annotations

from hpcvae.launch.cli import Submitted, build_executor, dry_run_script, launch, main, sbatch_script, submit
from hpcvae.launch.job import DEFAULT_ENV, TrainJob, resolve_train_target
from hpcvae.launch.profile import (
    LaunchOptions,
    SiteProfile,
    check_script_text,
    load_profile,
    parse_mem_gb,
    parse_time_minutes,
)
from hpcvae.launch.watch import follow, status

__all__ = [
    "DEFAULT_ENV",
    "LaunchOptions",
    "SiteProfile",
    "Submitted",
    "TrainJob",
    "build_executor",
    "check_script_text",
    "dry_run_script",
    "follow",
    "launch",
    "load_profile",
    "main",
    "parse_mem_gb",
    "parse_time_minutes",
    "resolve_train_target",
    "sbatch_script",
    "status",
    "submit",
]
