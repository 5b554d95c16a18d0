"""hpcvae.launch against the real local SLURM dev cluster (slurm/dev-cluster/start.sh).

Every job is real: 2 emulated nodes x 1 task, gloo over 127.0.0.1, the debug cvae2 on CPU.
The preemption tests interrupt a job mid-epoch (submitit's ``job._interrupt()``, and
``scontrol requeue``), let it checkpoint, requeue and finish, and compare its final weights
with an uninterrupted run bit for bit.  Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_shards, train_args

from hpcvae.launch import LaunchOptions, Submitted, follow, status, submit

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
START_SH = REPO / "slurm" / "dev-cluster" / "start.sh"
DEV_PROFILE = REPO / "slurm" / "dev-cluster.toml"
DEBUG_TOML = REPO / "configs" / "debug.toml"
JOB_TIMEOUT_S = 240


# ----------------------------------------------------------------------------------------
# Fixtures


def _controller_up() -> bool:
    if not shutil.which("scontrol"):
        return False
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0 and "UP" in r.stdout


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The dev cluster, started with slurm/dev-cluster/start.sh when it is not up (CI starts it first)."""
    if _controller_up():
        return
    if os.geteuid() != 0:
        pytest.skip("the SLURM dev cluster is not running, and starting it needs root")
    r = subprocess.run(["bash", str(START_SH), "4"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not _controller_up():
        pytest.fail(f"slurm/dev-cluster/start.sh failed (rc {r.returncode}):\n{r.stderr[-4000:]}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~540 train galaxies (32x32): 67 steps per epoch at 2 ranks x 4; 3 epochs leave time to interrupt mid-epoch."""
    return make_shards(tmp_path_factory.mktemp("slurm-shards"), n=600, size=32)


def _submit(run: Path, data: Path, *extra: str, epochs: int = 3, max_requeues: int = 3) -> Submitted:
    opts = LaunchOptions(
        nodes=2,
        gpus_per_node=1,
        cluster="slurm",
        profile=str(DEV_PROFILE),
        time="00:30:00",  # > 10 min: submitit counts every signal as a time-out below that
        max_requeues=max_requeues,
        train_args=train_args(data, run, *extra, epochs=epochs, batch=4),
    )
    return submit(opts)


def _follow(sub: Submitted) -> int:
    return follow(sub.run, "slurm", sub.job_id, sub.folder, timeout_s=JOB_TIMEOUT_S, poll_s=1.0)


def _wait_for_step(sub: Submitted, step: int, timeout: float = 150) -> int:
    """Block until rank 0 logged a train record at global step >= ``step``; return that step."""
    metrics = sub.run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file():
            steps = [
                rec["step"]
                for rec in map(json.loads, metrics.read_text().splitlines())
                if rec.get("kind") == "train"
            ]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.2)
    log = sub.log.read_text()[-3000:] if sub.log.exists() else "(no log)"
    raise AssertionError(f"job {sub.job_id} did not reach step {step} in {timeout}s; rank 0 log:\n{log}")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by up to {(a[k] - b[k]).abs().max().item():.3g}"


def _events(run: Path) -> list[dict]:
    return json.loads((run / "launch.json").read_text())["events"]


@pytest.fixture(scope="module")
def baseline(
    slurm_cluster: None, shards: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted 2-node run."""
    sub = _submit(tmp_path_factory.mktemp("baseline") / "run", shards)
    assert _follow(sub) == 0, sub.log.read_text()[-3000:]
    assert [e["event"] for e in _events(sub.run)] == ["start", "completed"]
    return _weights(sub.run)


def _steps_per_epoch(run: Path) -> int:
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    return int(first["steps_per_epoch"])


def _check_requeued_mid_epoch(sub: Submitted) -> None:
    events = _events(sub.run)
    requeues = [e for e in events if e["event"] == "requeue"]
    assert requeues, events
    assert events[-1]["event"] == "completed" and events[-1]["requeues"] == len(requeues)
    first = int(re.search(r"step-(\d+)", requeues[0]["checkpoint"]).group(1))
    assert first % _steps_per_epoch(sub.run) != 0, f"the first stop (step {first}) was not mid-epoch"
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == len(requeues) + 1 and all(s["job_id"] == sub.job_id for s in starts)
    log = sub.log.read_text()
    assert log.count("Starting with JobEnvironment") == len(starts), "rank 0 log is not kept across requeues"


# ----------------------------------------------------------------------------------------
# Tests


AWKWARD = "run dir 'q' $(touch INJECTED) ;& x"


def test_two_nodes_train_one_epoch_from_the_cli(
    slurm_cluster: None, tiny_shards: Path, tmp_path: Path
) -> None:
    """The user's command, with a job name and run folder full of shell metacharacters."""
    data = tmp_path / "shard set with spaces"
    shutil.copytree(tiny_shards, data)
    run = tmp_path / AWKWARD
    name = """vae "two" nodes; $(touch INJECTED) 'x'"""
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "hpcvae.launch", "--nodes", "2", "--gpus-per-node", "1", "--cluster", "slurm",
         "--profile", str(DEV_PROFILE), "--time", "00:30:00", "--job-name", name, "--follow",
         "--follow-timeout", str(JOB_TIMEOUT_S),
         "--config", str(DEBUG_TOML), "--data", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "8",
         "--device", "cpu", "--set", "train.sample_grid=false"],
        capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 60, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert time.monotonic() - t0 < JOB_TIMEOUT_S
    assert (run / "model.safetensors").is_file() and (run / "model.json").is_file()
    assert "on 2 rank(s)" in r.stdout
    job_id = re.search(r"submitted job (\d+)", r.stdout).group(1)
    logs = {t: (run / "slurm" / f"{job_id}_{t}_log.out").read_text() for t in (0, 1)}
    assert "task 0/2 on n1 " in logs[0] and "task 1/2 on n2 " in logs[1]
    assert not list(tmp_path.rglob("INJECTED")), "a metacharacter in a name or path was executed"
    # The controller keeps the name byte for byte (accounting turns quotes into backticks).
    squeue = subprocess.run(
        ["squeue", "-t", "all", "-h", "-o", "%j|%T|%N", "-j", job_id],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert squeue.splitlines()[0] == f"{name}|COMPLETED|n[1-2]"
    st = subprocess.run(
        [sys.executable, "-m", "hpcvae.launch", "--status", str(run)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert st.returncode == 0, st.stderr
    info = dict(line.split(": ", 1) for line in st.stdout.splitlines())
    assert info["job_id"] == job_id and info["state"] == "COMPLETED" and info["requeues"] == "0"
    assert info["last_checkpoint"].startswith("step-") and float(info["images_per_s"]) > 0


def test_submitit_interrupt_checkpoints_requeues_and_matches(
    baseline: dict[str, torch.Tensor], shards: Path, tmp_path: Path
) -> None:
    sub = _submit(tmp_path / "run", shards)
    _wait_for_step(sub, 6)
    # SIGTERM then USR2 to every task.  scancel retries the USR2 while the job is being
    # requeued, so it can land on the next run too: that costs one extra requeue, no more.
    sub.job._interrupt()
    assert _follow(sub) == 0, sub.log.read_text()[-4000:]
    _check_requeued_mid_epoch(sub)
    assert status(sub.run)["requeues"] >= 1
    _assert_same_weights(_weights(sub.run), baseline)


def test_scontrol_requeue_checkpoints_requeues_and_matches(
    baseline: dict[str, torch.Tensor], shards: Path, tmp_path: Path
) -> None:
    sub = _submit(tmp_path / "run", shards)
    _wait_for_step(sub, 6)
    subprocess.run(["scontrol", "requeue", sub.job_id], check=True, timeout=30)
    assert _follow(sub) == 0, sub.log.read_text()[-4000:]
    _check_requeued_mid_epoch(sub)
    assert "requeue request refused" in sub.log.read_text()  # SLURM requeued it; rank 0 only saved
    _assert_same_weights(_weights(sub.run), baseline)


WORKERS = ("--set", "data.num_workers=2", "--set", "data.persistent_workers=true")


def test_scontrol_requeue_with_loader_workers(slurm_cluster: None, shards: Path, tmp_path: Path) -> None:
    """SLURM's SIGTERM reaches the loader workers too; they ignore it and the stop checkpoint is written."""
    ref = _submit(tmp_path / "ref", shards, *WORKERS, epochs=2)
    assert _follow(ref) == 0, ref.log.read_text()[-4000:]
    sub = _submit(tmp_path / "run", shards, *WORKERS, epochs=2)
    _wait_for_step(sub, 6)
    subprocess.run(["scontrol", "requeue", sub.job_id], check=True, timeout=30)
    assert _follow(sub) == 0, sub.log.read_text()[-4000:]
    _check_requeued_mid_epoch(sub)
    log = sub.log.read_text()
    assert "killed by signal" not in log and "Traceback" not in log, log[-4000:]
    _assert_same_weights(_weights(sub.run), _weights(ref.run))


def test_max_requeues_stops_and_a_relaunch_resumes(
    baseline: dict[str, torch.Tensor], shards: Path, tmp_path: Path
) -> None:
    sub = _submit(tmp_path / "run", shards, max_requeues=0)
    _wait_for_step(sub, 6)
    sub.job._interrupt()
    assert _follow(sub) == 1
    events = _events(sub.run)
    assert [e["event"] for e in events] == ["start", "gave_up"]
    assert "--max-requeues 0" in sub.log.read_text()
    # Launching again with the same --out continues from the checkpoint it left.
    again = _submit(sub.run, shards)
    assert again.job_id != sub.job_id
    assert _follow(again) == 0, again.log.read_text()[-4000:]
    _assert_same_weights(_weights(sub.run), baseline)


def _launch_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hpcvae.launch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_unknown_partition_is_a_clear_error(slurm_cluster: None, tiny_shards: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = _launch_cli(
        "--nodes", "2", "--partition", "nosuch", "--profile", str(DEV_PROFILE),
        "--data", str(tiny_shards), "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == "hpcvae.launch: error: partition 'nosuch' does not exist on this cluster (known: debug)"
    )
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "r" / "launch.json").exists()


def test_dead_controller_is_a_clear_error_and_does_not_hang(
    slurm_cluster: None, tiny_shards: Path, tmp_path: Path
) -> None:
    """A config whose controller port nobody listens on: the shared cluster keeps running."""
    live = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    dead = tmp_path / "slurm.conf"
    dead.write_text(re.sub(r"(?m)^SlurmctldPort=.*$", "SlurmctldPort=6999", live.read_text()))
    t0 = time.monotonic()
    r = _launch_cli(
        "--nodes", "2", "--profile", str(DEV_PROFILE), "--data", str(tiny_shards), "--out", str(tmp_path / "r"),
        env={"SLURM_CONF": str(dead)},
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.startswith(
        f"hpcvae.launch: error: the SLURM controller is not reachable (SLURM_CONF={dead})"
    )
    assert "DOWN" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 60
    assert _controller_up()
