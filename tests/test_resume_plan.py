"""A resume never silently breaks "each sample at most once per epoch".

A mid-epoch checkpoint resumed under another loader layout (workers, shuffle buffer, seed,
batch size, world size, streaming vs GPU-resident) finishes the interrupted epoch under its
original plan: the samples that plan had not shown yet, spread over the new layout.  Each
run records the keys of every batch it trains on, so the test checks the epoch itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from train_helpers import REPO, child_env, launch, logs, make_shards, run_ranks, train_args, wait

from hpcvae.checkpoint import latest_checkpoint, list_checkpoints, read_meta
from hpcvae.shards.manifest import Manifest

pytestmark = pytest.mark.slow

# The real CLI; every rank appends "epoch step key key ..." per batch to KEYS_DIR/rankN.txt, and
# parks after global step STOP_AT until the test's SIGUSR2 arrives.
KEYS_CHILD = """
import os, sys, time
from pathlib import Path
from hpcvae import trainer as T
stop_at = int(os.environ.get("STOP_AT", "0"))
keys = Path(os.environ["KEYS_DIR"])
orig = T.Trainer.train_step
def train_step(self, batch, *args):
    with open(keys / f"rank{self.dist.rank}.txt", "a") as f:
        f.write(f"{self.epoch} {self.step_in_epoch} " + " ".join(batch["key"]) + "\\n")
    orig(self, batch, *args)
    if stop_at and self.global_step + 1 == stop_at:  # the loop counts the step once train_step returns
        Path(os.environ["READY_DIR"], f"rank{self.dist.rank}").touch()
        t0 = time.time()
        while not self.stop_requested and time.time() - t0 < 120:
            time.sleep(0.01)
T.Trainer.train_step = train_step
from hpcvae.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("plan"), n=300)


def _run(args: list[str], tmp: Path, name: str, *, world: int, stop_at: int = 0) -> list[int]:
    keys = tmp / "keys"
    keys.mkdir(exist_ok=True)
    ready = tmp / f"ready-{name}"
    ready.mkdir()
    env = {"KEYS_DIR": str(keys), "STOP_AT": str(stop_at), "READY_DIR": str(ready)}
    procs = launch(args, world=world, script=KEYS_CHILD, env=env, log_dir=tmp / f"logs-{name}")
    if stop_at:
        deadline = time.time() + 240
        while len(list(ready.iterdir())) < world:
            assert time.time() < deadline and all(p.poll() is None for p in procs), logs(tmp / f"logs-{name}")
            time.sleep(0.05)
        for p in procs:
            os.kill(p.pid, signal.SIGUSR2)
    return wait(procs, tmp / f"logs-{name}")


def _epoch_keys(tmp: Path, epoch: int) -> list[str]:
    out: list[str] = []
    for f in (tmp / "keys").glob("rank*.txt"):
        for line in f.read_text().splitlines():
            e, _, *ks = line.split()
            if int(e) == epoch:
                out += ks
    return out


def _interrupt_and_resume(shards: Path, tmp: Path, first: list[str], then: list[str], *,
                          world: tuple[int, int] = (1, 1), stop_at: int = 7) -> str:  # fmt: skip
    """Stop mid-epoch 0 under ``first``, resume under ``then``; returns the resumed run's rank-0 log."""
    out = tmp / "run"
    base = train_args(shards, out, epochs=2, batch=8)
    assert _run([*base, *first], tmp, "stopped", world=world[0], stop_at=stop_at) == [3] * world[0]
    assert read_meta(latest_checkpoint(out))["step_in_epoch"] == stop_at
    rcs = _run([*base, *then, "--resume", "auto"], tmp, "resumed", world=world[1])
    assert rcs == [0] * world[1], logs(tmp / "logs-resumed")
    return (tmp / "logs-resumed" / "rank0.log").read_text()


def _check_epoch(shards: Path, tmp: Path, epoch: int, max_dropped: int) -> None:
    seen = _epoch_keys(tmp, epoch)
    repeats = [k for k, c in Counter(seen).items() if c > 1]
    assert not repeats, f"epoch {epoch}: {len(repeats)} samples repeated, e.g. {repeats[:3]}"
    n = Manifest.load(shards).count("train")
    assert n - max_dropped <= len(seen) <= n, (len(seen), n)


FORK = ("--set", "data.start_method=fork")  # the plan is the subject here, not how workers start

LAYOUT_CHANGES = {
    "num_workers": (["--set", "data.num_workers=3", *FORK], ["--set", "data.num_workers=2", *FORK]),
    "shuffle_buffer": (["--set", "data.shuffle_buffer=50"], ["--set", "data.shuffle_buffer=7"]),
    "seed": (["--seed", "1"], ["--seed", "2"]),
    "batch_size": (["--batch-size", "8"], ["--batch-size", "5"]),
    "gpu_resident": ([], ["--set", "data.gpu_resident=true"]),
}


@pytest.mark.parametrize("change", list(LAYOUT_CHANGES))
def test_resume_under_a_changed_layout_finishes_the_epoch_exactly(
    shards: Path, tmp_path: Path, change: str
) -> None:
    first, then = LAYOUT_CHANGES[change]
    log = _interrupt_and_resume(shards, tmp_path, first, then)
    assert "finishing epoch 1" in log and change in log, log[-3000:]
    # The interrupted epoch: everything its plan would have shown, each sample once
    # (the old plan's drop, < 8, plus the new layout's drop of the remainder, < 8).
    _check_epoch(shards, tmp_path, 0, max_dropped=8 + 8)
    _check_epoch(shards, tmp_path, 1, max_dropped=8)  # the next epoch is a whole one


def test_resume_with_another_world_size_finishes_the_epoch_exactly(shards: Path, tmp_path: Path) -> None:
    log = _interrupt_and_resume(shards, tmp_path, [], [], world=(2, 1), stop_at=5)
    assert "finishing epoch 1" in log and "world_size" in log, log[-3000:]
    _check_epoch(shards, tmp_path, 0, max_dropped=16 + 8)
    _check_epoch(shards, tmp_path, 1, max_dropped=8)


def test_resume_twice_under_two_layouts(shards: Path, tmp_path: Path) -> None:
    """The tail of an epoch is itself a plan: interrupted again under a third layout, still exact."""
    out = tmp_path / "run"
    base = train_args(shards, out, epochs=1, batch=8)
    assert _run([*base, "--set", "data.num_workers=3", *FORK], tmp_path, "a", world=1, stop_at=7) == [3]
    assert _run([*base, "--batch-size", "6", "--resume", "auto"], tmp_path, "b", world=1, stop_at=12) == [3]
    assert _run([*base, "--batch-size", "4", "--resume", "auto"], tmp_path, "c", world=1) == [0]
    _check_epoch(shards, tmp_path, 0, max_dropped=8 + 6 + 4)


def test_resume_on_other_data_is_refused_unless_allowed(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = train_args(shards, out, epochs=2, batch=8)
    assert _run(base, tmp_path, "stopped", world=1, stop_at=7) == [3]
    other = tmp_path / "other-shards"
    shutil.copytree(shards, other)
    m = json.loads((other / "manifest.json").read_text())
    m["stats"]["train"]["p99.9"] *= 2  # another normalisation: what re-sharding other files gives
    (other / "manifest.json").write_text(json.dumps(m))
    args = train_args(other, out, epochs=2, batch=8)
    before = sorted(p.name for p in out.iterdir())
    r = subprocess.run([sys.executable, "-m", "hpcvae.train", *args], cwd=REPO, env=child_env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "allow_new_data" in r.stderr and str(other) in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before  # the refused run wrote nothing
    assert run_ranks(
        [*args, "--set", "checkpoint.allow_new_data=true"], tmp_path / "logs-allowed", world=1
    ) == [0]
    text = (tmp_path / "logs-allowed" / "rank0.log").read_text()
    assert "new data" in text and "keeps the normalisation" in text
    assert len(list_checkpoints(out)) >= 1


def test_plan_is_a_pure_function_of_its_inputs() -> None:
    """Consumed + remaining = planned, with no overlap, for every kind of layout change."""
    from hpcvae.data.plan import PlanInputs, planned, resume_plan

    counts = (37, 50, 41, 22)
    old = PlanInputs(loader="stream", shard_counts=counts, seed=3, world_size=2, batch_size=6,
                     num_workers=3, shuffle_buffer=10, max_steps=0)  # fmt: skip
    variants = {
        "num_workers": {"num_workers": 2},
        "world_size": {"world_size": 3},
        "batch_size": {"batch_size": 4},
        "loader": {"loader": "resident", "num_workers": 1, "shuffle_buffer": 0},
    }
    for name, change in variants.items():
        new = PlanInputs(**{**old.to_dict(), **change})
        r = resume_plan(old, epoch=4, step=5, pool=None, new=new)
        assert {"loader": "data.gpu_resident False -> True"}.get(name, name) in r.note
        full = planned(old, 4, None)
        done = np.setdiff1d(full, r.pool)
        assert len(done) == 2 * 5 * 6  # 2 ranks x 5 steps x batch 6 were consumed
        assert np.intersect1d(done, r.pool).size == 0 and np.union1d(done, r.pool).size == full.size
    same = resume_plan(old, epoch=4, step=5, pool=None, new=old)
    assert (same.step, same.pool) == (5, None) and same.note == ""
