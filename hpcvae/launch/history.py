"""The run's launch history, ``RUN/launch.json``: jobs submitted and what happened to them."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from hpcvae.errors import LaunchError


def _history_path(run: Path) -> Path:
    return run / "launch.json"


def read_history(run: Path) -> dict[str, Any]:
    p = _history_path(run)
    if not p.is_file():
        return {"jobs": [], "events": []}
    from hpcvae.jsonfiles import LAUNCH, read_json

    try:
        return read_json(p, LAUNCH, LaunchError, "launch history")
    except LaunchError as exc:
        raise LaunchError(f"{exc}; delete it to start a fresh history") from None


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
