"""A run's metric sinks, on rank 0: ``metrics.jsonl``, TensorBoard, and progress on stderr.

* Every ``metrics.jsonl`` line is valid JSON: NaN and infinity are written as ``null``
  (JSON has no such numbers; Python's ``json`` would write bare ``NaN``).
* Records written after the step a resumed run starts from are dropped, from TensorBoard
  (``purge_step``) and from ``metrics.jsonl`` (the file is cut back), so a curve never shows
  the replayed steps twice; each record carries its UTC ``time``.
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
        if purge_step is not None:
            truncate_after(self.folder / "metrics.jsonl", purge_step)
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
        rec = {**rec, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._jsonl.write(json_line(rec) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            kind = rec.get("kind")
            for k, v in rec.items():
                if k not in ("kind", "step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, rec.get("step", 0))

    def text(self, tag: str, body: str, step: int = 0) -> None:
        """A text panel in TensorBoard (the run's config, its hyper-parameters)."""
        if self._tb is not None:
            self._tb.add_text(tag, body, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """A grayscale image (H, W) in [0, 1] in TensorBoard (a grid of samples at each validation)."""
        if self._tb is not None:
            self._tb.add_image(tag, np.asarray(image, dtype=np.float32)[None], step)

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


def truncate_after(path: Path, step: int) -> int:
    """Drop the records of ``path`` past ``step`` (a killed run wrote them; its resume replays them).

    Rewritten atomically; torn lines are dropped too.  Returns the number of records dropped.
    """
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        tmp.replace(path)
    return dropped
