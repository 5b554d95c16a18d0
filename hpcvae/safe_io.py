"""Writes that a signal cannot leave half done: a temp file renamed into place, removed on any failure.

``SIGTERM`` (SLURM's kill, ``scancel``) and ``SIGINT`` are turned into :class:`Interrupted` for the
length of the write, so ``finally`` blocks run and the temp file goes.  Several files that belong
together (the model pair) are renamed with signals held back: :func:`replace_pair` holds signals back while it renames them.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hpcvae.errors import HpcvaeError


class Interrupted(HpcvaeError, KeyboardInterrupt):
    """A SIGTERM or SIGINT arrived during a write; the write was undone."""


@contextmanager
def signals_as_interrupt(what: str) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(f"{what}: interrupted by {signal.Signals(signum).name}; nothing was written")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_file(path: str | os.PathLike, what: str = "write") -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` on success, delete it otherwise."""
    path = Path(path)
    tmp = temp_name(path)
    with signals_as_interrupt(f"{what} {path}"):
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def blocked_signals() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block ends (a few renames must happen together or not at all)."""
    sigs = {signal.SIGTERM, signal.SIGINT}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def replace_pair(moves: list[tuple[Path, Path]]) -> None:
    """Rename temp files onto their targets together: a SIGTERM waits until all are in place.

    (A ``kill -9`` between two renames can still mix them; readers that care, such as ``load_model``,
    check that the files name the same write.)
    """
    with blocked_signals():
        for tmp, target in moves:
            os.replace(tmp, target)


def replace_folder(new: Path, out: Path) -> None:
    """Put the complete folder ``new`` at ``out``; an ``out`` already there goes only once ``new`` is in place."""
    old = temp_name(out.with_name(out.name + "-old")) if out.exists() else None
    with blocked_signals():
        if old is not None:
            os.replace(out, old)
        os.replace(new, out)
    if old is not None:
        import shutil

        shutil.rmtree(old, ignore_errors=True)
