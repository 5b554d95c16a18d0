"""A run's metric sinks, on rank 0: ``metrics.jsonl``, TensorBoard, and progress on stderr.

* Every ``metrics.jsonl`` line is valid JSON: NaN and infinity are written as ``null``
  (JSON has no such numbers; Python's ``json`` would write bare ``NaN``).
* TensorBoard events written after the step a resumed run starts from are purged
  (``purge_step``), so a curve never shows the replayed steps twice.
* On a terminal the progress is a tqdm bar; anywhere else (a SLURM log file) it is one status
  line every ``status_every`` steps, since a bar redrawn there floods the file.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np


def json_safe(x: Any) -> Any:
    """JSON-safe copy: numpy scalars and arrays -> Python, NaN/inf -> None (undefined, not a number)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def json_line(rec: dict[str, Any]) -> str:
    return json.dumps(json_safe(rec), allow_nan=False)


class Metrics:
    """Opened by the training loop on rank 0 only (``enabled=False`` elsewhere makes every call a no-op)."""

    def __init__(self, folder: Path, *, enabled: bool, tensorboard: bool = True, status_every: int = 200,
                 prog: str = "hpcvae.train", stream: TextIO | None = None) -> None:  # fmt: skip
        self.folder, self.enabled, self.prog = Path(folder), enabled, prog
        self.status_every = max(1, status_every)
        self.stream = stream or sys.stderr
        self._jsonl: TextIO | None = None
        self._tb: Any = None
        self._bar: Any = None
        self._tensorboard = tensorboard
        self._epoch_text, self._done, self._total, self._postfix = "", 0, 0, ""
        self._t0 = time.perf_counter()

    @property
    def interactive(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def open(self, total: int, purge_step: int | None = None) -> Metrics:
        """``purge_step``: the step a resumed run starts from (TensorBoard drops later events)."""
        if not self.enabled:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.folder / "metrics.jsonl", "a")
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.folder / "tb"), purge_step=purge_step or None)
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=1.0, file=self.stream)
        return self

    def close(self) -> None:
        for obj in (self._bar, self._tb, self._jsonl):
            if obj is not None:
                obj.close()
        self._bar = self._tb = self._jsonl = None

    # -- records ------------------------------------------------------------------------------
    def write(self, rec: dict[str, Any]) -> None:
        """One line of metrics.jsonl and, for its numbers, TensorBoard scalars under ``kind/name``."""
        if self._jsonl is None:
            return
        self._jsonl.write(json_line(rec) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            kind = rec.get("kind")
            for k, v in rec.items():
                if k not in ("kind", "step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, rec.get("step", 0))

    # -- progress -----------------------------------------------------------------------------
    def epoch(self, text: str, total: int, done: int = 0) -> None:
        self._epoch_text, self._total, self._done = text, total, done
        if self._bar is not None:
            self._bar.reset(total=total)
            self._bar.update(done)
            self._bar.set_description(text)

    def step(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled and (self._done % self.status_every == 0 or self._done == self._total):
            elapsed = time.perf_counter() - self._t0
            print(f"{self.prog}: {self._epoch_text}, step {self._done}/{self._total}{self._postfix} "
                  f"[{elapsed:.0f} s]", file=self.stream, flush=True)  # fmt: skip

    def postfix(self, **values: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix(refresh=False, **values)
        self._postfix = "".join(f", {k} {v}" for k, v in values.items())
