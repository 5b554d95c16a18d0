"""Watching a launched job: its outcome, ``--follow`` (rank 0's log until it ends) and ``--status``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from hpcvae.checkpoint import latest_checkpoint
from hpcvae.errors import LaunchError
from hpcvae.launch.backends import Backend, backend
from hpcvae.launch.history import _history_path, read_history
from hpcvae.launch.slurm import TERMINAL_STATES


def read_result(be: Backend, folder: Path, job_id: str) -> tuple[str, str | None] | None:
    """("success", None) or ("error", the last line of its trace) once rank 0 wrote its result; else None.

    Through submitit's public ``job.exception()``, which reads the result file it wrote.
    """
    job = be.job(folder, job_id)
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
    be = backend(cluster)
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
            state, _ = be.state(run, job_id, folder, job)
            base = state.split("+")[0]
            if base in TERMINAL_STATES:
                # The result file can trail the state by a moment on shared file systems.
                for _ in range(10):
                    if read_result(be, folder, job_id) is not None or base != "COMPLETED":
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
    res = read_result(be, folder, job_id)
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
    state, restarts = backend(cluster).state(run, job_id, folder)
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
