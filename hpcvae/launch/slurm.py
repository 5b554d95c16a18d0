"""Questions to SLURM and to submitit's job files: state, outcome, following a job's log, a run's status."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hpcvae.checkpoint import latest_checkpoint
from hpcvae.errors import LaunchError
from hpcvae.launch.history import _history_path, read_history

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
    if job is not None:  # our own child: submitit polls (and so reaps) it; a zombie would look alive
        running = job.state == "RUNNING"
    else:  # a local job's id is its pid
        running = job_id.isdigit() and _pid_alive(int(job_id))
    if running:
        return "RUNNING", 0
    return ("COMPLETED" if _job(cluster, folder, job_id).paths.result_pickle.exists() else "FAILED"), 0


def _job(cluster: str, folder: Path, job_id: str) -> Any:
    """submitit's own handle on a job we did not submit in this process (``--status``, ``--follow``)."""
    import submitit

    return (submitit.SlurmJob if cluster == "slurm" else submitit.LocalJob)(folder=folder, job_id=job_id)


def read_result(cluster: str, folder: Path, job_id: str) -> tuple[str, str | None] | None:
    """("success", None) or ("error", the last line of its trace) once rank 0 wrote its result; else None.

    Through submitit's public ``job.exception()``, which reads the result file it wrote.
    """
    job = _job(cluster, folder, job_id)
    if not job.paths.result_pickle.exists():
        return None
    try:
        exc = job.exception()
    except (EOFError, OSError):  # a result file still being written on a shared file system
        return None
    if exc is None:
        return "success", None
    parts = str(exc).split("----------------------")
    trace = [ln for ln in (parts[1] if len(parts) > 2 else str(exc)).strip().splitlines() if ln.strip()]
    return "error", trace[-1] if trace else type(exc).__name__


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
                    if read_result(cluster, folder, job_id) is not None or base != "COMPLETED":
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
    res = read_result(cluster, folder, job_id)
    base = state.split("+")[0]
    if res is not None and res[0] == "success" and base == "COMPLETED":
        print(f"hpcvae.launch: job {job_id} COMPLETED; run folder {run}", flush=True)
        return 0
    reason = ""
    if res is not None and res[0] == "error":
        reason = f": {res[1]}"
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
