"""Single-process training runs of the debug cvae2 on real (ingested) shards, in-process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import assert_same_weights, load_weights, make_shards, train_args

from hpcvae import load_model
from hpcvae.checkpoint import list_checkpoints, read_meta
from hpcvae.config import SchedulerConfig
from hpcvae.schedules import lr_factor
from hpcvae.train import config_from_args, main, parser, run


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("train"))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_debug_run_writes_everything(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(train_args(shards, out, "--set", "train.sample_grid=true", "--channels-last")) == 0
    for name in ("config.toml", "metrics.jsonl", "model.safetensors", "model.json", "samples.png"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    recs = _records(out)
    train = [r for r in recs if r["kind"] == "train"]
    for key in ("loss", "recon", "kl", "lr", "beta", "step_time_s", "images_per_s", "data_wait_share",
                "skipped_steps", "dropped_samples"):  # fmt: skip
        assert key in train[-1], key
    assert all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["loss"] < train[0]["loss"]  # it learns
    assert len([r for r in recs if r["kind"] == "val"]) == 2

    # The consolidated model is exactly the final trained state, ready to use.
    final = list_checkpoints(out)[-1]
    model = load_model(out)
    assert_same_weights(model.state_dict(), load_weights(final / "model.safetensors"))
    assert not model.training
    info = json.loads((out / "model.json").read_text())
    assert info["arch"] == "cvae2" and info["model_config"]["image_size"] == 32
    assert (
        info["transform"]["name"] == "asinh" and info["beta_schedule"]["value"] == 0.1
    )  # asinh: the default
    assert info["training"]["steps"] == read_meta(final)["global_step"] and info["manifest_digest"]
    flux = model.sample(3, redshift=0.7)
    norm = model.sample(3, redshift=0.7, normalized=True)
    assert flux.shape == (3, 1, 32, 32) and torch.isfinite(flux).all()
    assert not torch.allclose(flux, norm)  # physical units through the stored normalisation


def test_galaxy_film_without_noise_variances_trains_calibrated_and_says_so(
    shards: Path, tmp_path: Path, capsys
) -> None:
    """The h5 set carries no NOISE_VARIANCE: galaxy_film's default calibrated_noise gives way to calibrated."""
    out = tmp_path / "film"
    assert main(train_args(shards, out, "--arch", "galaxy_film", epochs=1)) == 0
    said = capsys.readouterr().out
    assert "model: likelihood calibrated (" in said and "default, calibrated_noise)" in said
    assert json.loads((out / "model.json").read_text())["model_config"]["likelihood"] == "calibrated"


def test_request_stop_then_resume(shards: Path, tmp_path: Path) -> None:
    """The launcher's path: run(cfg) with request_stop() -> preempted + checkpoint; run again -> completed."""
    out = tmp_path / "run"
    cfg = config_from_args(parser().parse_args(train_args(shards, out, epochs=1)))
    res = run(cfg, on_start=lambda t: t.request_stop())
    assert res.status == "preempted" and res.global_step == 1 and res.checkpoint is not None
    assert read_meta(res.checkpoint)["step_in_epoch"] == 1
    res = run(cfg)
    assert res.status == "completed" and res.model_path == out / "model.safetensors"
    assert res.global_step == read_meta(list_checkpoints(out)[-1])["global_step"] > 1


def test_fp16_overflow_steps_are_skipped_and_counted(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = train_args(shards, out, "--precision", "fp16", "--set", "deepspeed.initial_scale_power=12",
                      "--set", "train.log_every=1", epochs=1)  # fmt: skip
    args.remove("--deterministic")
    assert main(args) == 0
    train = [r for r in _records(out) if r["kind"] == "train"]
    skipped = train[-1]["skipped_steps"]
    assert 1 <= skipped < len(train)  # the scale backs off until steps go through
    w = load_weights(out / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_lr_schedules() -> None:
    warm = SchedulerConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, warm, total_steps=110, steps_per_epoch=11) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    step = SchedulerConfig(kind="step", step_epochs=2, gamma=0.5)
    assert [lr_factor(e * 5, step, total_steps=100, steps_per_epoch=5) for e in range(6)] == [
        1,
        1,
        0.5,
        0.5,
        0.25,
        0.25,
    ]
    assert lr_factor(99, SchedulerConfig(), total_steps=100, steps_per_epoch=5) == 1.0


@pytest.mark.parametrize("zero", ["0", "2"])
def test_deepspeed_channels_last(shards: Path, tmp_path: Path, zero: str) -> None:
    """DeepSpeed flattens parameters with ``p.data.view``, which NHWC weights used to break."""
    pytest.importorskip("deepspeed")
    out = tmp_path / f"ds{zero}"
    args = train_args(shards, out, "--engine", "deepspeed", "--zero-stage", zero, "--precision", "bf16",
                      "--channels-last", epochs=1)  # fmt: skip
    # A subprocess each: DeepSpeed caches process groups globally, across runs in one interpreter.
    proc = subprocess.run([sys.executable, "-m", "hpcvae.train", *args], capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = [r for r in _records(out) if r["kind"] == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train)
    model = load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gpu_resident_data_path_trains(shards: Path, tmp_path: Path) -> None:
    """data.gpu_resident swaps in the device-resident loader (here the device is the CPU)."""
    out = tmp_path / "resident"
    assert main(train_args(shards, out, "--set", "data.gpu_resident=true", epochs=1)) == 0
    train = [r for r in _records(out) if r["kind"] == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train)
    assert (out / "model.safetensors").is_file()
