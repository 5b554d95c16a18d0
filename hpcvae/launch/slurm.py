"""Questions to SLURM: is the controller up, does the partition exist, what state is a job in."""

from __future__ import annotations

import os
import re
import subprocess

from hpcvae.errors import LaunchError

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
