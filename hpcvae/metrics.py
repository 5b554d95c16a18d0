"""A run's metric sinks, on rank 0: ``metrics.jsonl``, TensorBoard, and progress on stderr.

A sink is one class with ``open/write/text/image/close`` and one line in :data:`SINKS`; a run picks
them with ``[metrics] sinks = [...]`` (``--set metrics.sinks=...``).  A Weights & Biases sink would be
one class here that calls ``wandb.init(resume=...)`` in ``open`` and ``wandb.log`` in ``write``.

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
from collections.abc import Sequence
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


class Sink:
    """Where records go.  ``purge_step``: the step a resumed run starts from (later records are dropped)."""

    def open(self, folder: Path, purge_step: int | None) -> None: ...

    def write(self, rec: dict[str, Any]) -> None: ...

    def text(self, tag: str, body: str, step: int) -> None: ...

    def image(self, tag: str, image: np.ndarray, step: int) -> None: ...

    def close(self) -> None: ...


class JsonlSink(Sink):
    """``metrics.jsonl``: one strict-JSON line per record, cut back to ``purge_step`` on resume."""

    def __init__(self) -> None:
        self._f: TextIO | None = None

    def open(self, folder: Path, purge_step: int | None) -> None:
        if purge_step is not None:
            truncate_after(folder / "metrics.jsonl", purge_step)
        self._f = open(folder / "metrics.jsonl", "a")

    def write(self, rec: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json_line(rec) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f = None


class TensorBoardSink(Sink):
    """TensorBoard events in ``tb/``: scalars under ``kind/name``, text panels, sample grids."""

    def __init__(self) -> None:
        self._tb: Any = None

    def open(self, folder: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(folder / "tb"), purge_step=purge_step or None)

    def write(self, rec: dict[str, Any]) -> None:
        if self._tb is None:
            return
        kind = rec.get("kind")
        for k, v in rec.items():
            if k not in ("kind", "step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(f"{kind}/{k}", v, rec.get("step", 0))

    def text(self, tag: str, body: str, step: int) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, body, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, np.asarray(image, dtype=np.float32)[None], step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        self._tb = None


SINKS: dict[str, type[Sink]] = {"jsonl": JsonlSink, "tensorboard": TensorBoardSink}
"""Metric sinks by name: a new sink is one class above and one entry here (and its name in ``SinkName``)."""


class Metrics:
    """Opened by the training loop on rank 0 only (``enabled=False`` elsewhere makes every call a no-op)."""

    def __init__(self, folder: Path, *, enabled: bool, sinks: Sequence[str] = ("jsonl", "tensorboard"),
                 status_every: int = 200, prog: str = "hpcvae.train", stream: TextIO | None = None) -> None:  # fmt: skip
        self.folder, self.enabled, self.prog = Path(folder), enabled, prog
        self.status_every = max(1, status_every)
        self.stream = stream or sys.stderr
        self._names = list(sinks)
        self._sinks: list[Sink] = []
        self._bar: Any = None
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
        for name in self._names:
            sink = SINKS[name]()
            sink.open(self.folder, purge_step)
            self._sinks.append(sink)
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=1.0, file=self.stream)
        return self

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for sink in self._sinks:
            sink.close()
        self._bar, self._sinks = None, []

    # -- records ------------------------------------------------------------------------------
    def write(self, rec: dict[str, Any]) -> None:
        """One record (a line of metrics.jsonl; TensorBoard scalars under ``kind/name``), with its UTC time."""
        if not self._sinks:
            return
        rec = {**rec, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for sink in self._sinks:
            sink.write(rec)

    def text(self, tag: str, body: str, step: int = 0) -> None:
        """A text panel (the run's config, its hyper-parameters)."""
        for sink in self._sinks:
            sink.text(tag, body, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """A grayscale image (H, W) in [0, 1] (a grid of samples at each validation)."""
        for sink in self._sinks:
            sink.image(tag, image, step)

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
