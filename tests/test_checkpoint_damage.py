"""Damaged checkpoints: a clear line naming the checkpoint and the file, and a fall-back to the previous one.

Every file of a checkpoint has its size and sha256 recorded when the checkpoint is
committed.  ``--resume auto`` (what every requeue uses) skips a damaged checkpoint with one
line and resumes from the newest intact one, so a requeued job does not crash-loop; an
explicit ``--resume PATH`` and ``hpcvae.consolidate`` refuse it with one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import assert_same_weights, cli, load_weights, make_shards, train_args

from hpcvae.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("damage"))


def _args(shards: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return train_args(shards, out, "--set", "checkpoint.every_steps=4", "--set", "checkpoint.keep_last=3",
                      *extra, epochs=epochs)  # fmt: skip


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 2 epochs, uninterrupted."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = cli("-m", "hpcvae.train", *_args(shards, out, 2))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _one_epoch(shards: Path, out: Path, *extra: str) -> list[Path]:
    r = cli("-m", "hpcvae.train", *_args(shards, out, 1, *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    return list_checkpoints(out)


@pytest.mark.parametrize(
    ("victim", "damage"),
    [
        ("model.safetensors", _truncate),
        ("optimizer.pt", _truncate),
        ("train_state.pt", _flip),
        ("rank-00000.pt", _truncate),
        ("meta.json", _flip),
    ],
)
def test_resume_auto_falls_back_past_a_damaged_checkpoint(
    shards: Path, reference: Path, tmp_path: Path, victim: str, damage
) -> None:
    out = tmp_path / "run"
    cks = _one_epoch(shards, out)
    newest = cks[-1]
    damage(newest / victim)
    r = cli("-m", "hpcvae.train", *_args(shards, out, 2))
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    assert "Traceback" not in text
    line = [s for s in text.splitlines() if "damaged" in s]
    assert len(line) == 1 and newest.name in line[0] and victim in line[0], text[-3000:]
    assert f"resumed from {cks[-2]}" in text
    # Resuming from the older checkpoint replays the lost steps: same result as never stopping.
    assert_same_weights(
        load_weights(reference / "model.safetensors"), load_weights(out / "model.safetensors")
    )


def test_every_checkpoint_damaged_is_a_clear_error(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    for ck in _one_epoch(shards, out):
        _truncate(ck / "model.safetensors")
    r = cli("-m", "hpcvae.train", *_args(shards, out, 2))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = [s for s in r.stderr.splitlines() if s.startswith("hpcvae.train: error:")]
    assert len(err) == 1 and "no intact checkpoint" in err[0] and "--resume none" in err[0], r.stderr


def test_explicit_resume_of_a_damaged_checkpoint_is_refused(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    newest = _one_epoch(shards, out)[-1]
    _truncate(newest / "optimizer.pt")
    r = cli("-m", "hpcvae.train", *_args(shards, tmp_path / "other", 2, "--resume", str(newest)))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "optimizer.pt" in r.stderr and newest.name in r.stderr, r.stderr


def test_consolidate_refuses_a_damaged_checkpoint(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    newest = _one_epoch(shards, out)[-1]
    _flip(newest / "model.safetensors")
    r = cli("-m", "hpcvae.consolidate", str(newest), str(tmp_path / "model"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("hpcvae.consolidate: error:") and "model.safetensors" in r.stderr, r.stderr
    assert not (tmp_path / "model" / "model.safetensors").exists()


@pytest.mark.deepspeed
def test_damaged_deepspeed_partition_falls_back(shards: Path, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    cks = _one_epoch(shards, out, "--engine", "deepspeed", "--zero-stage", "2")
    victim = next((cks[-1] / "deepspeed").glob("*optim_states.pt"))
    _truncate(victim)
    r = cli("-m", "hpcvae.train", *_args(shards, out, 2, "--engine", "deepspeed", "--zero-stage", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {cks[-2]}" in r.stdout + r.stderr
    assert victim.name in (r.stdout + r.stderr)
