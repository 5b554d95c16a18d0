"""Site profiles (``slurm/<site>.toml``) and the launcher's options, with the checks both need."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hpcvae.config import load_options
from hpcvae.errors import ConfigError

ClusterKind = Literal["slurm", "local", "debug"]


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


def safe_command(what: str, value: str) -> str:
    """A command (``python3``, ``/opt/env/bin/python -X faulthandler``) that lands unquoted on the srun line:
    each word may hold only path characters, so nothing in it can run as shell."""
    import shlex

    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise ConfigError(f"{what}: {value!r} is not a command ({exc})") from None
    bad = next((w for w in words if not re.fullmatch(r"[A-Za-z0-9_./+:=,@%-]+", w)), None)
    if not words or bad is not None:
        raise ConfigError(f"{what}: {value!r} may hold only a program path and plain arguments"
                          f"{f' (not {bad!r})' if bad else ''}; it is run by the job's shell")  # fmt: skip
    return " ".join(words)


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
        for k, v in self.sbatch.items():  # submitit writes "#SBATCH --KEY=VALUE" as given: one flag, one word
            if not re.fullmatch(r"[a-z][a-z0-9-]*", k):
                raise ConfigError(
                    f"profile {self.name}: sbatch key {k!r} is not an sbatch option name (like mail-type)"
                )
            if not v or re.search(r"\s", v):
                raise ConfigError(f"profile {self.name}: sbatch.{k} = {v!r} must be one word (no spaces): "
                                  "sbatch would read the rest as more options")  # fmt: skip
        if self.python is not None:
            self.python = safe_command(f"profile {self.name}: python", self.python)


def load_profile(path: str | Path | None) -> SiteProfile:
    """Read a TOML site profile (``None``: built-in defaults)."""
    if path is None:
        return SiteProfile()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"profile {p} does not exist (see slurm/example-site.toml)")
    try:
        return load_options(SiteProfile, p, base={"name": p.stem})
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if str(p) in msg else f"profile {p}: {msg}") from None


@dataclass(kw_only=True)
class LaunchOptions:
    """What ``python -m hpcvae.launch`` was asked for; ``train_args`` go to ``hpcvae.train``."""

    nodes: int = 1
    """SLURM nodes."""
    gpus_per_node: int = 1
    """One task per GPU; on a CPU-only profile simply the tasks per node."""
    partition: str | None = None
    """SLURM partition (default: the profile's)."""
    account: str | None = None
    """SLURM account (default: the profile's)."""
    qos: str | None = None
    """SLURM QOS (default: the profile's)."""
    time: str | None = None
    """Wall time, e.g. 02:00:00 (default: the profile's)."""
    cpus_per_task: int | None = None
    """CPUs per task, also OMP_NUM_THREADS (default: the profile's)."""
    mem: str | None = None
    """Memory per node, e.g. 200G."""
    profile: str | None = None
    """Site profile TOML (default: $HPCVAE_SLURM_PROFILE)."""
    cluster: ClusterKind = "slurm"
    """``slurm``, ``local`` (this machine, through submitit) or ``debug`` (in this process)."""
    dry_run: bool = False
    """Print the sbatch script, submit nothing."""
    follow: bool = False
    """Stream rank 0's log until the job ends."""
    follow_timeout_s: float = 0.0
    """Stop following after this long (0: until the job ends)."""
    max_requeues: int = 3
    """Requeues after preemption or time-out before the job gives up."""
    job_name: str | None = None
    """SLURM job name (default: the run folder's name)."""
    train_args: list[str] = field(default_factory=list)
    """The arguments passed to ``hpcvae.train``."""

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
        from hpcvae.launch.backends import backend

        backend(self.cluster)  # a one-line error naming the known backends
        if self.job_name is not None and not self.job_name.strip():
            raise ConfigError("--job-name must not be empty")
        for flag in ("job_name", "partition", "account", "qos", "time", "mem"):
            value = getattr(self, flag)
            if value is not None:
                check_script_text(f"--{flag.replace('_', '-')}", value)
