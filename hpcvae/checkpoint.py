"""Atomic, resumable checkpoints.

Layout of one checkpoint, ``RUN/checkpoints/step-000000123/``::

    meta.json            position (epoch, step in epoch, global step), arch, model config,
                         engine, world size, manifest digest, transform, training summary
    config.toml          the resolved JobConfig
    model.safetensors    ddp: the model (incl. BatchNorm buffers)
    optimizer.pt         ddp: optimizer + GradScaler state
    deepspeed/           deepspeed: its own checkpoint (every rank writes its ZeRO partition)
    train_state.pt       LR scheduler and other named components (torchtitan style)
    rank-00000.pt ...    per rank: RNG states of torch (+CUDA), numpy, python
    files.json           size and sha256 of every other file, written when the checkpoint is committed
    COMPLETE             written last; a folder without it is ignored

Why the dance: a job can be killed at any instant (SIGKILL after the grace period, node
failure).  All ranks write into ``.tmp-step-N``; after a barrier rank 0 renames it to
``step-N`` and only then writes ``COMPLETE``.  A crash at any point leaves the previous
complete checkpoint untouched, and the leftovers are removed by the next save.  The run
folder must be on a filesystem all ranks share (as on any SLURM cluster).

Damage after the fact (a truncated copy, a bad disk block, a half-synced file system) is
caught by ``files.json``: :func:`verify` checks every file's size and sha256 before a
checkpoint is used.  ``--resume auto`` skips a damaged checkpoint with one line and takes
the newest intact one (:func:`latest_intact`), so a requeued job never crash-loops on it.

Everything but DeepSpeed's own files loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from hpcvae.dist import DistInfo, barrier
from hpcvae.errors import CheckpointError
from hpcvae.hashing import sha256_file

CHECKPOINT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
META = "meta.json"
FILES = "files.json"
FORMAT = "hpcvae-checkpoint/1"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def step_name(step: int) -> str:
    return f"{_PREFIX}{step:09d}"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file() and (folder / META).is_file()


def list_checkpoints(run_dir: str | Path, complete_only: bool = True) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit():
            if not complete_only or is_complete(p):
                out.append(p)
    return sorted(out, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (not verified; see :func:`latest_intact`)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _digest(path: Path) -> str:
    return sha256_file(path)


def file_list(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {size, sha256}}`` of every file under ``folder`` (``files.json`` and COMPLETE aside)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in (FILES, COMPLETE):
            out[rel] = {"size": p.stat().st_size, "sha256": _digest(p)}
    return out


def verify(folder: Path) -> None:
    """Raise CheckpointError naming the first file whose size or sha256 differs from ``files.json``.

    Checkpoints written before ``files.json`` existed are accepted unverified.
    """
    listing = folder / FILES
    if not listing.is_file():
        if not (folder / META).is_file():
            raise CheckpointError(f"checkpoint {folder}: {META} is missing (damaged)")
        return
    from hpcvae.jsonfiles import CHECKPOINT_FILES, read_json

    try:
        files = read_json(listing, CHECKPOINT_FILES, CheckpointError, "checkpoint file list")["files"]
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {folder}: {FILES} is damaged: {exc}") from None
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(
                f"checkpoint {folder}: {FILES} names {rel!r}, outside the checkpoint (damaged)"
            )
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {folder}: file {rel} is missing (damaged)")
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointError(
                f"checkpoint {folder}: file {rel} has {size} bytes, {want['size']} when written (damaged)"
            )
        if _digest(p) != want["sha256"]:
            raise CheckpointError(
                f"checkpoint {folder}: file {rel} has another sha256 than when written (damaged)"
            )


def latest_intact(run_dir: str | Path, report: Any = None) -> Path | None:
    """The newest complete checkpoint that verifies; each damaged one on the way is reported in one line.

    ``None`` when there is no checkpoint at all; an error when there are some but none is intact.
    """
    report = report or print
    found = list_checkpoints(run_dir)
    bad = []
    for ck in reversed(found):
        try:
            verify(ck)
            read_meta(ck)
        except CheckpointError as exc:
            bad.append(ck.name)
            report(f"resume: skipping {exc}; falling back to the previous checkpoint")
            continue
        return ck
    if bad:
        raise CheckpointError(
            f"no intact checkpoint in {Path(run_dir) / CHECKPOINT_DIR} ({', '.join(bad)} are damaged); "
            "restore one or start fresh with --resume none"
        )
    return None


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint folder ``--resume`` means: ``none``, ``auto`` (latest here, if any) or a path.

    A path may be a checkpoint folder or a run folder (its latest complete checkpoint).
    An explicit path without a complete checkpoint is an error, never a silent fresh start.
    """
    if resume == "none":
        return None
    if resume == "auto":
        return latest_intact(run_dir)
    p = Path(resume)
    if not p.exists():
        raise CheckpointError(f"--resume {p}: no such file or folder")
    if (p / META).exists() or p.name.startswith(_PREFIX):
        if not is_complete(p):
            raise CheckpointError(
                f"--resume {p}: checkpoint is incomplete (no {COMPLETE} marker); it was cut off while saving"
            )
        verify(p)
        return p
    if not list_checkpoints(p):
        raise CheckpointError(f"--resume {p}: no complete checkpoint in {p / CHECKPOINT_DIR}")
    return latest_intact(p)


def resume_position(
    meta: dict[str, Any], *, world_size: int, batch_size: int, steps_per_epoch: int
) -> tuple[int, int, bool]:
    """(epoch, step_in_epoch, moved) to continue from a checkpoint's ``meta``.

    Mid-epoch resume is exact only with the rank layout that wrote the checkpoint; under
    another one the epoch splits differently and continuing would repeat or skip samples,
    so the run moves on to the next epoch (``moved``).
    """
    epoch, step = int(meta["epoch"]), int(meta["step_in_epoch"])
    same = (meta.get("world_size"), meta.get("batch_size"), meta.get("steps_per_epoch")) == (
        world_size, batch_size, steps_per_epoch)  # fmt: skip
    if step > 0 and not same:
        return epoch + 1, 0, True
    return epoch, step, False


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not is_complete(folder):
        raise CheckpointError(f"{folder}: not a complete hpcvae checkpoint (needs {META} and {COMPLETE})")
    from hpcvae.jsonfiles import CHECKPOINT_META, read_json

    try:
        meta = read_json(folder / META, CHECKPOINT_META, CheckpointError, "checkpoint meta")
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {folder}: file {META} is damaged: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / META}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _unpickle_reason(exc: BaseException) -> str:
    """What went wrong, without torch's advice to retry with weights_only=False (that would run the code)."""
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc).lower():
        return "it holds Python objects other than tensors and plain data, refused (never unpickled)"
    return _one_line(exc)


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with every failure one CheckpointError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: cannot be loaded: {_unpickle_reason(exc)}") from None


# -- RNG states ----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },  # fmt: skip
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- saving and loading ----------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _before_commit(folder: Path) -> None:
    """Fault-injection point: runs on rank 0 after all files are written, before the rename.

    Tests replace it with a slow function and SIGKILL the process to prove a checkpoint
    cut off mid-save never shadows the previous one.
    """


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and restores one run's checkpoints; every method is called on all ranks together."""

    def __init__(self, run_dir: str | Path, *, keep_last: int, dist: DistInfo) -> None:
        self.root = Path(run_dir) / CHECKPOINT_DIR
        self.keep_last = keep_last
        self.dist = dist

    def save(
        self,
        step: int,
        *,
        engine: Any,
        components: dict[str, Stateful],
        meta: dict[str, Any],
        config_toml: str,
    ) -> Path:
        final = self.root / step_name(step)
        if is_complete(final):  # e.g. preempted again right after resuming: nothing new to save
            return final
        tmp = self.root / f"{_TMP_PREFIX}{step_name(step)}"
        try:
            return self._save(step, final, tmp, engine=engine, components=components, meta=meta,
                              config_toml=config_toml)  # fmt: skip
        except OSError as exc:  # a full disk, a lost mount: the previous checkpoint stays the latest
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {final} ({exc.strerror or exc}); the previous complete "
                                  "checkpoint stays the latest", collective=True) from None  # fmt: skip

    def _save(
        self, step: int, final: Path, tmp: Path, *, engine: Any, components: dict[str, Stateful],
        meta: dict[str, Any], config_toml: str,
    ) -> Path:  # fmt: skip
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for p in self.root.iterdir():  # leftovers of saves that were killed
                if p.name.startswith(_TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)
            if final.exists():
                shutil.rmtree(final)
            tmp.mkdir()
        barrier()
        engine.save(tmp)
        torch.save(rng_state(), tmp / f"rank-{self.dist.rank:05d}.pt")
        if self.dist.is_main:
            torch.save({k: c.state_dict() for k, c in components.items()}, tmp / "train_state.pt")
            (tmp / "config.toml").write_text(config_toml)
            full = {"format": FORMAT, "step": step, "world_size": self.dist.world_size,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta}  # fmt: skip
            (tmp / META).write_text(json.dumps(full, indent=1))
        barrier()
        if self.dist.is_main:
            (tmp / FILES).write_text(json.dumps({"files": file_list(tmp)}, indent=1))
            _before_commit(tmp)
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            with open(final / COMPLETE, "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(final)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = list_checkpoints(self.root.parent)
        for old in done[: max(0, len(done) - self.keep_last)]:
            (old / COMPLETE).unlink(missing_ok=True)  # incomplete first, so a crash mid-delete is harmless
            shutil.rmtree(old, ignore_errors=True)

    def load(
        self,
        folder: Path,
        *,
        engine: Any,
        components: dict[str, Stateful],
        expect: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Restore engine, components and this rank's RNG; returns the checkpoint's meta.

        ``expect`` holds values that must match (arch, engine, ...), each refused with a clear
        error; ``meta`` is the checkpoint's ``read_meta``, when the caller has read it already.
        A component missing from an older checkpoint is rebuilt by its ``load_legacy(folder, meta)``.
        """
        meta = meta if meta is not None else read_meta(folder)
        for key, want in (expect or {}).items():
            have = meta.get(key)
            if have != want:
                raise CheckpointError(
                    f"{folder}: checkpoint has {key} = {have!r} but this run has {key} = {want!r}; "
                    "resume with the same setting or start fresh with --resume none"
                )
        try:
            engine.load(folder)
        except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"checkpoint {folder}: cannot be loaded: {_unpickle_reason(exc)}") from None
        state = safe_torch_load(folder / "train_state.pt")
        for k, c in components.items():
            if k in state:
                c.load_state_dict(state[k])
            elif hasattr(c, "load_legacy"):
                c.load_legacy(folder, meta)
            else:
                raise CheckpointError(f"{folder / 'train_state.pt'}: no {k!r} state")
        rank_file = folder / f"rank-{self.dist.rank:05d}.pt"
        if rank_file.is_file():
            set_rng_state(safe_torch_load(rank_file))
            meta["rng_restored"] = True
        else:  # a different world size: the RNG streams cannot continue exactly
            meta["rng_restored"] = False
        return meta
