"""The GPU path: CUDA and NCCL, bf16, fp16 with loss scaling and a forced overflow, channels_last,
compile, and the GPU-resident loader with a mid-epoch resume.

These run on the device ``HPCVAE_TEST_DEVICE`` names (``benchmarks/gpu_check.sh`` sets
``cuda``); without it they run on CUDA when present and are skipped otherwise, except under
``benchmarks/gpu_check.sh --cpu-rehearsal`` (``HPCVAE_TEST_DEVICE=cpu``), which runs the same
tests on CPU at the same tiny sizes so the script is known to work before a GPU is at hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from train_helpers import (
    assert_same_weights,
    load_weights,
    make_shards,
    run_ranks,
    stop_and_resume,
    train_args,
)

DEVICE = os.environ.get("HPCVAE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not DEVICE, reason="no GPU (benchmarks/gpu_check.sh --cpu-rehearsal runs these on CPU)"
    ),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("gpu"))


def _args(shards: Path, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    args = train_args(shards, out, "--device", DEVICE, *extra, epochs=epochs)
    return args


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_backend_and_ddp_step_on_the_device(one_rank_group) -> None:
    """A process group of one on the device's backend (NCCL on CUDA), an all-reduce and a DDP step."""
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hpcvae.models import build_model

    dev = torch.device(DEVICE)
    one_rank_group("nccl" if dev.type == "cuda" else "gloo")
    t = torch.ones(4, device=dev)
    tdist.all_reduce(t)
    assert t.sum().item() == 4
    m = build_model("cvae2", "debug", image_size=32).to(dev)
    ddp = DDP(m, device_ids=[dev] if dev.type == "cuda" else None)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, fused=dev.type == "cuda")
    x, z = torch.rand(8, 1, 32, 32, device=dev), torch.full((8,), 0.5, device=dev)
    for _ in range(2):
        loss = m.compute_loss(ddp(x, z), x, z, 0.1)["total"]
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--precision", "bf16", "--channels-last"], id="bf16-channels_last"),
        pytest.param(["--precision", "fp16"], id="fp16"),
        pytest.param(
            ["--precision", "bf16", "--channels-last", "--compile"], id="bf16-channels_last-compile"
        ),
    ],
)
def test_fast_paths_train_a_finite_model(shards: Path, tmp_path: Path, extra: list[str]) -> None:
    from hpcvae.train import main

    out = tmp_path / "r"
    args = _args(shards, out, *extra)
    args.remove("--deterministic")  # cuDNN's fastest kernels, as a user would run
    assert main(args) == 0
    w = load_weights(out / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())
    assert json.loads((out / "model.json").read_text())["training"]["precision"] == extra[1]


def test_fp16_forced_overflow_is_skipped_and_counted(shards: Path, tmp_path: Path) -> None:
    """A loss scale of 2^20 overflows at once: the scaler skips those steps, backs off, and trains on."""
    from hpcvae.train import main

    out = tmp_path / "r"
    args = _args(shards, out, "--precision", "fp16", "--set", "deepspeed.initial_scale_power=20",
                 "--set", "train.log_every=1", epochs=2)  # fmt: skip
    args.remove("--deterministic")
    assert main(args) == 0
    train = [r for r in _records(out) if r["kind"] == "train"]
    assert 1 <= train[-1]["skipped_steps"] < len(train)
    w = load_weights(out / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_gpu_resident_loader_resumes_mid_epoch_bit_identically(shards: Path, tmp_path: Path) -> None:
    """The resident loader's exact-epoch contract survives a stop mid-epoch and a resume."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = (
        ":4096:8"  # deterministic cuBLAS for the children (CPU ignores it)
    )
    full = tmp_path / "full"
    resident = ["--set", "data.gpu_resident=true"]
    assert run_ranks(_args(shards, full, *resident, epochs=2), tmp_path / "logs-full", world=1) == [0]
    split = tmp_path / "split"
    stop_and_resume(_args(shards, split, *resident, epochs=2), tmp_path, stop_at=5, world=1)
    assert_same_weights(load_weights(full / "model.safetensors"), load_weights(split / "model.safetensors"))


def test_training_steps_never_sync_the_host(shards: Path, tmp_path: Path) -> None:
    """On CUDA, torch's sync debug mode turns any device-to-host sync inside a step into an error."""
    from hpcvae.config import JobConfig, load_options
    from hpcvae.dist import init_distributed
    from hpcvae.trainer import Trainer

    cfg = load_options(JobConfig, Path(__file__).resolve().parents[1] / "configs" / "debug.toml", flags={
        "data.path": str(shards), "out": str(tmp_path / "r"), "train.epochs": 1, "train.device": DEVICE,
        "train.precision": "bf16", "train.channels_last": True, "data.num_workers": 0,
        "data.persistent_workers": False, "data.batch_size": 8, "train.log_every": 10_000,
        "train.sync_every": 10_000, "train.status_every": 10_000, "checkpoint.every_steps": 0,
        "train.sample_grid": False})  # fmt: skip
    trainer = Trainer(cfg, init_distributed(device=DEVICE))
    orig, steps = trainer.train_step, []

    def guarded(batch, *args):
        if DEVICE.startswith("cuda"):
            torch.cuda.set_sync_debug_mode("error")
        try:
            orig(batch, *args)
        finally:
            if DEVICE.startswith("cuda"):
                torch.cuda.set_sync_debug_mode("default")
        steps.append(1)

    trainer.train_step = guarded
    assert trainer.train().status == "completed" and len(steps) == trainer.steps_per_epoch
