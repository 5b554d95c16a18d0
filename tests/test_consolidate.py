"""model.safetensors + model.json: the CLI, load_model's refusals, and loading without deepspeed or pickle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import REPO, assert_same_weights, child_env, load_weights, make_shards, train_args

from hpcvae import load_model
from hpcvae.checkpoint import list_checkpoints
from hpcvae.consolidate import consolidate_checkpoint
from hpcvae.errors import CheckpointError
from hpcvae.train import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("consolidate")
    out = root / "run"
    assert main(train_args(make_shards(root), out, epochs=1)) == 0
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    dst.mkdir()
    for name in ("model.safetensors", "model.json"):
        shutil.copy(run_dir / name, dst / name)
    return dst


def test_cli_consolidates_a_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    ck = list_checkpoints(run_dir)[-1]
    r = subprocess.run([sys.executable, "-m", "hpcvae.consolidate", str(ck), str(tmp_path / "c")], cwd=REPO,
                       env=child_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert_same_weights(
        load_weights(tmp_path / "c" / "model.safetensors"), load_weights(run_dir / "model.safetensors")
    )
    a, b = (json.loads((d / "model.json").read_text()) for d in (tmp_path / "c", run_dir))
    for key in ("arch", "model_config", "transform", "manifest_digest", "beta_schedule"):
        assert a[key] == b[key], key
    # A run folder works too (its latest checkpoint).
    consolidate_checkpoint(run_dir, tmp_path / "d")
    assert_same_weights(
        load_weights(tmp_path / "d" / "model.safetensors"), load_weights(run_dir / "model.safetensors")
    )


def test_load_model_refuses_mismatches(run_dir: Path, tmp_path: Path) -> None:
    d = _copy(run_dir, tmp_path)
    info = json.loads((d / "model.json").read_text())
    info["model_config"]["nf"] = 16
    (d / "model.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="differs from"):
        load_model(d)

    d2 = tmp_path / "other"
    shutil.copytree(d, d2)
    info["model_config"]["nf"] = 8
    info["model_config"]["arch"] = info["arch"] = "vae158"
    (d2 / "model.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="arch 'cvae2'"):
        load_model(d2)

    (d2 / "model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an hpcvae model"):
        load_model(d2)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing")


def test_load_model_refuses_weights_of_another_config(run_dir: Path, tmp_path: Path) -> None:
    """Weights without our metadata (e.g. written by hand) are still checked tensor by tensor."""
    from safetensors.torch import save_file

    d = _copy(run_dir, tmp_path)
    sd = load_weights(d / "model.safetensors")
    sd.pop(next(iter(sd)))
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensors"):
        load_model(d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(d)


def test_load_model_needs_neither_deepspeed_nor_pickle(run_dir: Path) -> None:
    code = f"""
import pickle, sys
sys.modules["deepspeed"] = None          # import deepspeed -> ImportError
def no(*a, **k): raise AssertionError("unpickling attempted")
pickle.loads = pickle.load = no
import torch
torch.load = no
from hpcvae import load_model
m = load_model({str(run_dir / "model.safetensors")!r})
x = m.sample(2, redshift=0.7)
assert x.shape == (2, 1, 32, 32) and not m.training
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
