"""One run per run folder: an exclusive ``flock`` on ``RUN/.hpcvae.lock``.

Two trainings with the same ``--out`` corrupt each other (one resumes from the other's
checkpoint, both write the same files).  ``flock`` is released by the kernel when the
holder dies, so a killed run (``kill -9``, a node failure) leaves no stale lock, unlike a
PID file.  The lock file holds the holder's host, pid and start time, for the message the
next run prints.  On a file system without ``flock`` support the lock fails loudly, naming
``checkpoint.lock = false`` as the way to run without it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from hpcvae.errors import ConfigError, RunFolderBusy

LOCK_NAME = ".hpcvae.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    """Hold ``folder``'s lock for this process; :meth:`release` removes what :meth:`acquire` created.

    A run refused after taking the lock (a checkpoint of another architecture, say) calls
    ``release(refused=True)``: the lock file, and the folder itself if this run created it,
    are removed again, so a refused run leaves the folder as it found it.
    """

    def __init__(self, folder: str | Path, what: str = "hpcvae.train") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._created_folder = False
        self._created_file = False
        self._announced = False

    def acquire(self) -> RunLock:
        self._created_folder = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".hpcvae-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            self._undo_folder()
            raise ConfigError(f"run folder {self.folder}: cannot write there ({exc.strerror or exc})",
                              collective=True) from None  # fmt: skip
        while True:
            existed = self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                os.close(fd)
                self._undo_folder()
                raise RunFolderBusy(
                    f"run folder {self.folder} is in use by {holder}; wait for it to finish, stop it, "
                    "or choose another --out",
                    collective=True,
                ) from None
            except OSError as exc:
                os.close(fd)
                if not existed:
                    self.path.unlink(missing_ok=True)
                self._undo_folder()
                if exc.errno in _UNSUPPORTED:
                    raise ConfigError(
                        f"run folder {self.folder}: the file system does not support flock ({exc.strerror}), so "
                        "two runs could write it at once; put --out on one that does, or set "
                        "checkpoint.lock = false to run without the guard",
                        collective=True,
                    ) from None
                raise
            # The file may have been unlinked by a refused run between our open and our lock.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        self._fd = fd
        self._created_file = not existed
        return self

    def announce(self) -> None:
        """Write this holder's host and pid into the lock file, for the message a second run prints.

        Separate from :meth:`acquire` so a run refused by its start-up checks never touches the file.
        """
        if self._fd is None:
            return
        info = {"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(info) + "\n").encode(), 0)
        self._announced = True

    def release(self, refused: bool = False) -> None:
        if self._fd is None:
            return
        if refused and self._created_file:
            self.path.unlink(missing_ok=True)  # while still holding it: nobody can hold a stale inode
        elif self._announced:
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None
        if refused:
            self._undo_folder()

    def _undo_folder(self) -> None:
        if self._created_folder:
            try:
                self.folder.rmdir()  # only if empty: never removes anything else
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        self.acquire().announce()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.release(refused=exc_type is not None)


def _read(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    return f"{info.get('what', 'a run')} on host {info.get('host')} pid {info.get('pid')} (since {info.get('since')})"
