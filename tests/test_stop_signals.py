"""Stop signals with loader worker processes: the stop-time checkpoint survives and resume is exact.

SLURM preemption and ``scontrol requeue`` send SIGTERM to every process of the job step,
DataLoader workers included.  These runs put every rank and its workers in one process
group and signal the whole group, then resume and compare the final weights with an
uninterrupted run bit for bit, with the loader settings users actually run: the
``DataConfig`` defaults (2 persistent workers) and the seed configs' (4 workers).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from train_helpers import (
    REPO,
    assert_same_weights,
    load_weights,
    logs,
    make_shards,
    run_ranks,
    stop_and_resume,
    train_args,
)

from hpcvae.checkpoint import list_checkpoints, read_meta
from hpcvae.config import DataConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("signals"))


def _loader_set(**values: object) -> list[str]:
    out: list[str] = []
    for k, v in values.items():
        out += ["--set", f"data.{k}={json.dumps(v)}"]
    return out


def _default_loader() -> list[str]:
    d = DataConfig()
    return _loader_set(num_workers=d.num_workers, persistent_workers=d.persistent_workers,
                       shuffle_buffer=d.shuffle_buffer, prefetch_factor=d.prefetch_factor)  # fmt: skip


def _seed_loader() -> list[str]:
    data = tomllib.loads((REPO / "configs" / "seed_cvae2.toml").read_text())["data"]
    keys = ("num_workers", "persistent_workers", "shuffle_buffer", "prefetch_factor")
    merged = {k: data.get(k, getattr(DataConfig(), k)) for k in keys}
    return _loader_set(**merged)


def _steps(out: Path) -> int:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["steps_per_epoch"]


def _stop_resume_equals_full(shards: Path, tmp: Path, loader: list[str], *, world: int, how: str) -> None:
    args_full = train_args(shards, tmp / "full", *loader, epochs=2)
    assert run_ranks(args_full, tmp / "logs-full", world=world) == [0] * world, logs(tmp / "logs-full")
    steps = _steps(tmp / "full")
    stop_at = steps + 3  # mid epoch 2, after epoch 1's validation (which has its own workers)
    split = tmp / "split"
    stop_and_resume(train_args(shards, split, *loader, epochs=2), tmp, stop_at=stop_at, world=world, how=how)
    positions = [
        (m["global_step"], m["epoch"], m["step_in_epoch"]) for m in map(read_meta, list_checkpoints(split))
    ]
    assert (stop_at, 1, 3) in positions or stop_at < min(p[0] for p in positions), positions
    assert_same_weights(
        load_weights(tmp / "full" / "model.safetensors"), load_weights(split / "model.safetensors")
    )


@pytest.mark.parametrize("world", [1, 2], ids=["1-process", "2-ranks"])
def test_sigterm_to_process_group_with_workers(shards: Path, tmp_path: Path, world: int) -> None:
    """Workers ignore SIGTERM, so the ranks checkpoint mid-epoch, exit 3, and resume exactly."""
    _stop_resume_equals_full(shards, tmp_path, _loader_set(num_workers=2), world=world, how="group-term")


@pytest.mark.parametrize("loader", [_default_loader, _seed_loader], ids=["defaults", "seed-configs"])
def test_sigusr2_resume_bit_identical_with_real_loader_settings(shards: Path, tmp_path: Path, loader) -> None:
    """Persistent workers used to make a resumed run draw one fewer seed from the global RNG."""
    _stop_resume_equals_full(shards, tmp_path, loader(), world=1, how="usr2")


@pytest.mark.parametrize("where", ["mid-epoch", "epoch-tail"])
def test_stop_lands_at_the_next_control_point(shards: Path, tmp_path: Path, where: str) -> None:
    """Ranks agree on stopping at most train.sync_every steps apart and at each epoch end, then resume exactly."""
    every = ["--set", "train.sync_every=4"]
    full = tmp_path / "full"
    assert run_ranks(train_args(shards, full, *every, epochs=3), tmp_path / "logs-full") == [0, 0]
    steps = _steps(full)
    # mid-epoch: the signal at step steps+1 is agreed within 4 steps, before epoch 2 ends (control points
    # follow the last one, epoch ends included, by at most sync_every steps); epoch-tail: at the last step
    # of epoch 2, so only its epoch-end control point can see it.
    stop_at = steps + 1 if where == "mid-epoch" else 2 * steps - 1
    split = tmp_path / "split"
    stop_and_resume(train_args(shards, split, *every, epochs=3), tmp_path, stop_at=stop_at, world=2)
    stopped = (tmp_path / "logs-stopped" / "rank0.log").read_text()
    m = re.search(r"written at step (\d+)\n", stopped)
    assert m, stopped[-2000:]
    landed = int(m.group(1))
    if where == "mid-epoch":
        assert stop_at <= landed < min(stop_at + 4, 2 * steps), stopped[-2000:]
    else:
        assert landed == 2 * steps, stopped[-2000:]
    assert_same_weights(load_weights(full / "model.safetensors"), load_weights(split / "model.safetensors"))
