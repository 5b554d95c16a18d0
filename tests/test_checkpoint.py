"""Atomic checkpoints: keep-last, RNG round trip, resume rules, and kill -9 in the middle of a save."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import (
    REPO,
    assert_same_weights,
    child_env,
    load_weights,
    make_shards,
    run_ranks,
    train_args,
)

from hpcvae.checkpoint import (
    COMPLETE,
    Checkpointer,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    read_meta,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from hpcvae.config import EngineConfig
from hpcvae.dist import DistInfo
from hpcvae.engines import DDPEngine
from hpcvae.errors import CheckpointError
from hpcvae.models import build_model


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("ckpt"))


def _engine() -> DDPEngine:
    torch.manual_seed(0)
    return DDPEngine(EngineConfig(), build_model("cvae2", "debug", image_size=32), DistInfo())


def test_save_load_keep_last(tmp_path: Path) -> None:
    eng = _engine()
    ck = Checkpointer(tmp_path, keep_last=2, dist=DistInfo())
    for step in (1, 2, 3):
        with torch.no_grad():
            next(eng.module.parameters()).add_(1.0)
        ck.save(step, engine=eng, components={}, meta={"global_step": step, "arch": "cvae2"}, config_toml="")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000002", "step-000000003"]
    assert all(is_complete(p) for p in list_checkpoints(tmp_path))
    saved = {k: v.clone() for k, v in eng.module.state_dict().items()}
    other = _engine()
    meta = Checkpointer(tmp_path, keep_last=2, dist=DistInfo()).load(
        latest_checkpoint(tmp_path), engine=other, components={}, expect={"arch": "cvae2"}
    )
    assert meta["global_step"] == 3 and meta["rng_restored"]
    assert_same_weights(other.module.state_dict(), saved)
    with pytest.raises(CheckpointError, match="arch = 'cvae2' but this run has arch = 'vae158'"):
        ck.load(latest_checkpoint(tmp_path), engine=other, components={}, expect={"arch": "vae158"})


def test_rng_state_round_trip() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_resolve_resume(tmp_path: Path) -> None:
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path), tmp_path)
    half = tmp_path / "checkpoints" / "step-000000007"
    half.mkdir(parents=True)
    (half / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(half), tmp_path)
    assert resolve_resume("auto", tmp_path) is None  # an incomplete folder is never picked


# Runs the real CLI; the second checkpoint save (step 4) stalls right before it is committed.
_SLOW_SAVE_CHILD = """
import os, sys, time
from pathlib import Path
import hpcvae.checkpoint as C
def slow(folder):
    if folder.name.endswith("step-000000004"):
        Path(os.environ["MARKER"]).touch()
        time.sleep(120)
C._before_commit = slow
from hpcvae.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_during_save_keeps_previous_checkpoint(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = train_args(shards, out, "--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep_last=5")
    marker = tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE_CHILD, *args], env=child_env(MARKER=str(marker)),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 180
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()

    # The half-written step 4 is all on disk, but only under its temporary name.
    assert (out / "checkpoints" / ".tmp-step-000000004" / "model.safetensors").is_file()
    assert latest_checkpoint(out).name == "step-000000002"
    assert (latest_checkpoint(out) / COMPLETE).is_file()

    # Resume and reference run in child processes too: bit-identity needs the same thread set-up.
    assert run_ranks([*args, "--resume", "auto"], tmp_path / "logs-resume", world=1) == [0]
    assert not (out / "checkpoints" / ".tmp-step-000000004").exists()  # cleaned by the next save
    assert read_meta(latest_checkpoint(out))["epoch"] == 2

    # TensorBoard: the steps logged after step 2 and replayed on resume appear once (purge_step).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    steps = [e.step for e in ea.Scalars("train/loss")]
    assert len(steps) == len(set(steps)) and 4 in steps, steps

    # ... and the result is the same as never having crashed.
    ref = tmp_path / "ref"
    assert run_ranks(train_args(shards, ref), tmp_path / "logs-ref", world=1) == [0]
    assert_same_weights(load_weights(ref / "model.safetensors"), load_weights(out / "model.safetensors"))


def test_resume_position_moves_on_when_the_rank_layout_changed() -> None:
    from hpcvae.checkpoint import resume_position

    meta = {"epoch": 2, "step_in_epoch": 5, "world_size": 2, "batch_size": 8, "steps_per_epoch": 7}
    assert resume_position(meta, world_size=2, batch_size=8, steps_per_epoch=7) == (2, 5, False)
    assert resume_position(meta, world_size=4, batch_size=8, steps_per_epoch=3) == (3, 0, True)
    assert resume_position(meta, world_size=2, batch_size=16, steps_per_epoch=3) == (3, 0, True)
    at_boundary = {**meta, "step_in_epoch": 0}  # an epoch-end checkpoint fits any layout
    assert resume_position(at_boundary, world_size=4, batch_size=8, steps_per_epoch=3) == (2, 0, False)
