"""One run per run folder: a second run exits 2 at once, a killed run leaves no stale lock,
and a refused run writes nothing into the folder."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import STOP_CHILD, child_env, cli, launch, logs, make_shards, train_args, wait

from hpcvae.errors import ConfigError, RunFolderBusy
from hpcvae.runlock import LOCK_NAME, RunLock

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("lock"))


def _parked(args: list[str], tmp: Path, name: str = "a") -> subprocess.Popen:
    """A run parked after global step 2 (it holds the folder) until it gets SIGUSR2."""
    ready = tmp / f"ready-{name}"
    ready.mkdir()
    (p,) = launch(args, world=1, script=STOP_CHILD, env={"STOP_AT": "2", "READY_DIR": str(ready)},
                  log_dir=tmp / f"logs-{name}")  # fmt: skip
    deadline = time.time() + 120
    while not any(ready.iterdir()):
        assert p.poll() is None and time.time() < deadline, logs(tmp / f"logs-{name}")
        time.sleep(0.05)
    return p


def test_second_run_on_the_same_folder_is_refused_at_once(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _parked(train_args(shards, out, epochs=2), tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    t0 = time.monotonic()
    r = cli("-m", "hpcvae.train", *train_args(shards, out, "--seed", "7", "--lr", "0.01", epochs=2))
    assert time.monotonic() - t0 < 30
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("hpcvae.train: error: run folder") and str(out) in line
    assert f"pid {first.pid}" in line and os.uname().nodename in line, line
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # the refused run wrote nothing
    os.kill(first.pid, signal.SIGUSR2)
    assert wait([first], tmp_path / "logs-a") == [3]
    # ... and the first run's checkpoint is its own: the seed and LR were never mixed in.
    meta_cfg = (sorted((out / "checkpoints").iterdir())[-1] / "config.toml").read_text()
    assert "seed = 0" in meta_cfg and "lr = 0.001" in meta_cfg


def test_train_prior_is_refused_while_the_run_trains(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = cli("-m", "hpcvae.train", *train_args(shards, out, epochs=1))
    assert done.returncode == 0, done.stderr[-2000:]
    first = _parked(train_args(shards, out, "--resume", "none", epochs=2), tmp_path)
    r = cli("-m", "hpcvae.train_prior", str(out), "--data", str(shards), "--epochs", "1", "--device", "cpu")
    assert r.returncode == 2 and "is in use by hpcvae.train" in r.stderr, r.stderr[-2000:]
    os.kill(first.pid, signal.SIGUSR2)
    assert wait([first], tmp_path / "logs-a") == [3]


def test_a_killed_run_leaves_no_stale_lock(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _parked(train_args(shards, out, epochs=1), tmp_path)
    first.kill()  # SIGKILL: no handler runs, the kernel drops the flock
    first.wait(timeout=30)
    assert (out / LOCK_NAME).exists()
    r = cli("-m", "hpcvae.train", *train_args(shards, out, epochs=1))
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_refused_resume_writes_nothing(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert cli("-m", "hpcvae.train", *train_args(shards, out, epochs=1)).returncode == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"") for p in out.iterdir()}
    r = cli("-m", "hpcvae.train", *train_args(shards, out, "--arch", "vae158", epochs=2))
    assert r.returncode == 2 and "arch = 'cvae2' but this run has arch = 'vae158'" in r.stderr
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"") for p in out.iterdir()}
    assert after == before  # config.toml was rewritten before this was fixed


def test_a_refused_fresh_run_leaves_no_folder(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    r = cli("-m", "hpcvae.train", *train_args(shards, out, "--resume", str(tmp_path / "nope")))
    assert r.returncode == 2
    assert not out.exists()


def test_lock_names_the_holder_and_releases(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from hpcvae.runlock import RunLock; RunLock(sys.argv[1], 'holder').acquire().announce(); "
        "print('held', flush=True); time.sleep(60)"), str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True, env=child_env())  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        info = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert info["pid"] == holder.pid and info["what"] == "holder"
        with pytest.raises(RunFolderBusy, match=f"in use by holder on host .* pid {holder.pid}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path / "run"):
        pass


def test_a_file_system_without_flock_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one fault simulated here: no test machine has a file system without flock to hand."""
    import fcntl

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(ConfigError, match="does not support flock.*checkpoint.lock = false"):
        RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run").exists()  # nothing left behind
