"""Corrupted data must not train into a model.

* Every shard's sha256 is checked against the manifest the first time a run reads it (the
  result is cached in the run folder by size and mtime, so a resume does not rehash).
* A non-finite loss or gradient stops the run with an error naming the epoch, the step and
  the batch's sample keys, and keeps the last good checkpoint; no model is written.
* ``load_model`` and ``evaluate`` refuse non-finite weights; non-finite config values are
  config errors; a long run of fp16 overflows is an error, not an endless skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import cli, make_shards, train_args

from hpcvae.checkpoint import list_checkpoints
from hpcvae.errors import CheckpointError, ConfigError
from hpcvae.shards.format import tar_members

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("bad-data"))


def _error_line(r: subprocess.CompletedProcess, prog: str) -> str:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [s for s in r.stderr.splitlines() if s.startswith(f"{prog}: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _poison(shard: Path, *, value: float, n_pixels: int = 3, sample: int = 1) -> str:
    """Overwrite a few pixels of one sample in place (tar structure intact); returns the sample's key."""
    with open(shard, "r+b") as f:
        members = [m for m in tar_members(f) if m[0].endswith(".image.npy")]
        name, offset, size = members[sample]
        f.seek(offset + size - 4 * 200)
        f.write(np.full(n_pixels, value, dtype="<f4").tobytes())
    return name.split(".", 1)[0]


def _broken_copy(shards: Path, tmp: Path, *, value: float) -> tuple[Path, Path, str]:
    bad = tmp / "shards"
    shutil.copytree(shards, bad)
    victim = sorted(bad.glob("train-*.tar"))[0]
    return bad, victim, _poison(victim, value=value)


@pytest.mark.parametrize("value", [0.123, float("nan")], ids=["finite", "nan"])
def test_changed_shard_is_refused_before_training(shards: Path, tmp_path: Path, value: float) -> None:
    bad, victim, _ = _broken_copy(shards, tmp_path, value=value)
    out = tmp_path / "run"
    line = _error_line(cli("-m", "hpcvae.train", *train_args(bad, out, epochs=1)), "hpcvae.train")
    assert str(victim) in line and "sha256" in line and "data.verify=false" in line, line
    assert not (out / "model.safetensors").exists() and not list_checkpoints(out)


def test_verification_is_cached_by_size_and_mtime(shards: Path, tmp_path: Path) -> None:
    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    out = tmp_path / "run"
    r = cli("-m", "hpcvae.train", *train_args(data, out, epochs=1))
    assert r.returncode == 0, r.stderr[-3000:]
    cache = json.loads((out / "shards_verified.json").read_text())
    names = {s["name"] for sp in ("train", "val") for s in json.loads((data / "manifest.json").read_text())["splits"][sp]["shards"]}  # fmt: skip
    assert set(cache["shards"]) == names
    # Same size and mtime: trusted from the cache, not rehashed (that is the point of the cache) ...
    victim = sorted(data.glob("train-*.tar"))[0]
    st = victim.stat()
    _poison(victim, value=0.5)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = cli("-m", "hpcvae.train", *train_args(data, out, epochs=2))
    assert r.returncode == 0, r.stderr[-3000:]
    # ... a new mtime, as any rewrite of the file gives, is hashed again and caught.
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    line = _error_line(cli("-m", "hpcvae.train", *train_args(data, out, epochs=3)), "hpcvae.train")
    assert victim.name in line and "sha256" in line


def test_nan_pixels_with_verification_off_stop_with_the_batch_named(shards: Path, tmp_path: Path) -> None:
    bad, _, key = _broken_copy(shards, tmp_path, value=float("nan"))
    out = tmp_path / "run"
    args = train_args(bad, out, "--set", "data.verify=false", "--set", "checkpoint.every_steps=2", epochs=2)
    line = _error_line(cli("-m", "hpcvae.train", *args), "hpcvae.train")
    assert "non-finite" in line and "epoch 1" in line and key in line, line
    assert "step" in line and "last good checkpoint" in line
    assert not (out / "model.safetensors").exists()
    from safetensors.torch import load_file

    for ck in list_checkpoints(out):  # every checkpoint on disk holds finite weights
        w = load_file(str(ck / "model.safetensors"))
        assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point()), ck


@pytest.mark.parametrize(
    "flag", [["--lr", "inf"], ["--set", "beta.value=nan"], ["--set", "optim.grad_clip=-inf"]]
)
def test_non_finite_config_values_are_config_errors(shards: Path, tmp_path: Path, flag: list[str]) -> None:
    line = _error_line(cli("-m", "hpcvae.train", *train_args(shards, tmp_path / "r", *flag)), "hpcvae.train")
    assert "finite" in line, line


def test_a_long_run_of_fp16_overflows_is_an_error(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = train_args(shards, out, "--precision", "fp16", "--set", "deepspeed.initial_scale_power=120",
                      "--set", "train.max_skipped_in_a_row=8", epochs=1)  # fmt: skip
    args.remove("--deterministic")
    line = _error_line(cli("-m", "hpcvae.train", *args), "hpcvae.train")
    assert "8 optimizer steps in a row" in line and "fp16" in line, line
    assert not (out / "model.safetensors").exists()


def _write_nan_model(src_run: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    shutil.copy(src_run / "model.json", dst / "model.json")
    sd = load_file(str(src_run / "model.safetensors"))
    victim = sorted(k for k, v in sd.items() if v.is_floating_point())[3]
    sd[victim] = sd[victim].clone()
    sd[victim].view(-1)[0] = float("nan")
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "hpcvae-model/1", "arch": "cvae2"})
    return dst


@pytest.fixture(scope="module")
def trained(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    r = cli("-m", "hpcvae.train", *train_args(shards, out, epochs=1))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_load_model_and_evaluate_refuse_non_finite_weights(
    shards: Path, trained: Path, tmp_path: Path
) -> None:
    from hpcvae import load_model

    bad = _write_nan_model(trained, tmp_path / "nan-model")
    with pytest.raises(CheckpointError, match="non-finite"):
        load_model(bad)
    line = _error_line(
        cli(
            "-m",
            "hpcvae.evaluate",
            str(bad),
            "--data",
            str(shards),
            "--out",
            str(tmp_path / "rep"),
            "--n",
            "8",
        ),
        "hpcvae.evaluate",
    )
    assert "non-finite" in line and "model.safetensors" in line


def test_write_model_refuses_non_finite_weights(trained: Path, tmp_path: Path) -> None:
    from hpcvae import load_model
    from hpcvae.model_files import ModelInfo, write_model

    m = load_model(trained)
    sd = m.state_dict()
    k = next(k for k, v in sd.items() if v.is_floating_point())
    sd[k] = torch.full_like(sd[k], float("inf"))
    with pytest.raises(CheckpointError, match=f"{k} holds .* non-finite"):
        write_model(tmp_path / "m", sd, ModelInfo(model_config=m.config))
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_config_rejects_non_finite_numbers() -> None:
    from hpcvae.config import load_config

    for key in ("optim.lr", "beta.value", "scheduler.gamma"):
        with pytest.raises(ConfigError, match=f"{key}: nan is not a finite number"):
            load_config(None, {key: float("nan")})
