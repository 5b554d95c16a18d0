"""Shared set-up of the training tests: a small real shard set and multi-rank launches.

The shard set goes through the real ingest (``hpcvae.shard.build_shards_from_h5``) from an
h5 file in the seed's layout: 120 Gaussian-profile galaxies with redshifts, 32x32.
Ranks are launched as plain processes with torchrun's environment variables (what srun
gives us too), so a test can send a real signal to each rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hpcvae.dist import free_port

REPO = Path(__file__).resolve().parents[1]
DEBUG_TOML = REPO / "configs" / "debug.toml"

torch.set_num_threads(1)  # 2 shared cores: threads only contend


def make_h5(path: Path, n: int = 120, size: int = 32, seed: int = 0) -> Path:
    import h5py

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    imgs = [
        np.exp(-(xx**2 + yy**2) / (2 * rng.uniform(1, 4) ** 2)) * rng.uniform(0.5, 2)
        + rng.normal(0, 0.01, (size, size))
        for _ in range(n)
    ]
    with h5py.File(path, "w") as f:
        f["images"] = np.stack(imgs).astype("f4")
        f["redshifts"] = rng.uniform(0.1, 2.0, n).astype("f4")
    return path


def make_shards(root: Path, n: int = 120, size: int = 32) -> Path:
    """A shard set of ``n`` galaxies (about 90% train) in ``root/shards``."""
    from hpcvae.shards import build_shards_from_h5

    root.mkdir(parents=True, exist_ok=True)
    h5 = make_h5(root / "galaxies.h5", n=n, size=size)
    out = root / "shards"
    build_shards_from_h5(h5, out, size=size, shard_size=40, overwrite=True)
    return out


def train_args(data: Path, out: Path, *extra: str, epochs: int = 2, batch: int = 8) -> list[str]:
    """CLI arguments of a fast, deterministic CPU run of the debug cvae2."""
    return [
        "--config", str(DEBUG_TOML), "--data", str(data), "--out", str(out),
        "--epochs", str(epochs), "--batch-size", str(batch), "--device", "cpu", "--deterministic",
        "--set", "train.log_every=2", "--set", "checkpoint.every_steps=0", "--set", "train.sync_every=1",
        "--set", "train.sample_grid=false", *extra,
    ]  # fmt: skip


def cli(*argv: str, timeout: float = 300, cwd: Path = REPO, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess:  # fmt: skip
    """``python ARGV`` as a user runs it (no HPCVAE_TRACEBACK): the tests' one command-line helper."""
    e = {k: v for k, v in (child_env() if env is None else env).items() if k != "HPCVAE_TRACEBACK"}
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout
    )


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


# A child that runs the real CLI, but parks every rank after global step STOP_AT until the
# test has sent it a real signal: the stop then lands at a known step, mid-epoch.
STOP_CHILD = """
import os, sys, time
from pathlib import Path
from hpcvae import trainer as T
stop_at = int(os.environ.get("STOP_AT", "0"))
orig = T.Trainer.train_step
def train_step(self, batch, *args):
    orig(self, batch, *args)
    if self.global_step + 1 == stop_at:  # the loop counts the step once train_step returns
        Path(os.environ["READY_DIR"], f"rank{self.dist.rank}").touch()
        t0 = time.time()
        while not self.stop_requested and time.time() - t0 < 120:
            time.sleep(0.01)
T.Trainer.train_step = train_step
from hpcvae.train import main
sys.exit(main(sys.argv[1:]))
"""


def launch(args: list[str], *, world: int = 2, script: str | None = None, env: dict[str, str] | None = None,
           log_dir: Path, own_group: bool = False) -> list[subprocess.Popen]:  # fmt: skip
    """Start ``world`` ranks of ``python -m hpcvae.train ARGS`` (or of ``script``).

    ``own_group``: every rank joins one new process group, as the processes of a SLURM job step
    do, so ``os.killpg`` reaches ranks and loader workers alike.  One rank runs under ``setsid``;
    with several, rank 0 leads a new group in this session (a process can only join a group of
    its own session).
    """
    port = str(free_port())
    procs: list[subprocess.Popen] = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for r in range(world):
        e = child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port, **(env or {}))  # fmt: skip
        cmd = (
            [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "hpcvae.train", *args]
        )
        group: dict = {}
        if own_group:
            if r > 0:
                group = {"process_group": procs[0].pid}
            else:
                group = {"start_new_session": True} if world == 1 else {"process_group": 0}
        log = open(log_dir / f"rank{r}.log", "w")
        procs.append(subprocess.Popen(cmd, env=e, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, **group))
        log.close()
    return procs


def wait(procs: list[subprocess.Popen], log_dir: Path, timeout: float = 240) -> list[int]:
    deadline = time.time() + timeout
    rcs = []
    for p in procs:
        try:
            rcs.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"ranks hung; logs:\n{logs(log_dir)}") from None
    return rcs


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("rank*.log")))


def run_ranks(args: list[str], log_dir: Path, world: int = 2, timeout: float = 240) -> list[int]:
    return wait(launch(args, world=world, log_dir=log_dir), log_dir, timeout)


def stop_and_resume(
    args: list[str], tmp: Path, stop_at: int, world: int = 2, how: str = "usr2", resume_args: list[str] = ()
) -> None:
    """Run until global step ``stop_at``, signal, then resume with ``--resume auto`` to the end.

    ``how``: ``usr2`` sends SIGUSR2 to every rank (SLURM's time-limit warning); ``group-term``
    sends SIGTERM to the whole process group, loader workers included (what preemption and
    ``scontrol requeue`` do to a job step).  ``resume_args`` are added to the resumed run.
    """
    import signal

    ready = tmp / "ready"
    ready.mkdir()
    logs1 = tmp / "logs-stopped"
    procs = launch(args, world=world, script=STOP_CHILD, env={"STOP_AT": str(stop_at), "READY_DIR": str(ready)},
                   log_dir=logs1, own_group=how == "group-term")  # fmt: skip
    deadline = time.time() + 240
    while len(list(ready.iterdir())) < world:
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError(f"ranks never reached step {stop_at}:\n{logs(logs1)}")
        time.sleep(0.05)
    if how == "group-term":
        time.sleep(0.5)  # let the loader workers prefetch: they are busy when the signal lands
        os.killpg(procs[0].pid, signal.SIGTERM)
    else:
        for p in procs:
            os.kill(p.pid, signal.SIGUSR2)
    rcs = wait(procs, logs1)
    assert rcs == [3] * world, logs(logs1)
    assert "Traceback" not in logs(logs1), logs(logs1)
    logs2 = tmp / "logs-resumed"
    rcs = run_ranks([*args, "--resume", "auto", *resume_args], logs2, world=world)
    assert rcs == [0] * world, logs(logs2)
    assert "resumed from" in (logs2 / "rank0.log").read_text()


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"
