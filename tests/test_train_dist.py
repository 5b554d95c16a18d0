"""Two-rank gloo runs on the CPU: DDP, DeepSpeed ZeRO 0 and 2, exact epochs, and resume after SIGUSR2.

The key property: a run stopped mid-epoch by a real SIGUSR2 and resumed with
``--resume auto`` ends with bit-identical weights to an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import (
    assert_same_weights,
    load_weights,
    logs,
    make_shards,
    run_ranks,
    stop_and_resume,
    train_args,
)

from hpcvae import load_model
from hpcvae.checkpoint import list_checkpoints, read_meta
from hpcvae.shards.manifest import Manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("dist"))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "engine_args",
    [
        pytest.param(
            ["--engine", "ddp", "--set", "data.num_workers=1", "--set", "data.start_method=fork"], id="ddp"
        ),
        pytest.param(["--engine", "deepspeed", "--zero-stage", "2"], id="deepspeed-zero2"),
    ],
)
def test_sigusr2_resume_is_bit_identical(shards: Path, tmp_path: Path, engine_args: list[str]) -> None:
    full = tmp_path / "full"
    rcs = run_ranks(train_args(shards, full, *engine_args), tmp_path / "logs-full")
    assert rcs == [0, 0], logs(tmp_path / "logs-full")

    # Exact epochs: 2 ranks x batch 8, the remainder (< 16) dropped, the same steps on each rank.
    n = Manifest.load(shards).count("train")
    steps = n // 16
    start = _records(full)[0]
    assert (start["steps_per_epoch"], start["dropped_per_epoch"], start["world_size"]) == (
        steps,
        n - 16 * steps,
        2,
    )
    final = read_meta(list_checkpoints(full)[-1])
    assert (final["global_step"], final["epoch"], final["step_in_epoch"]) == (2 * steps, 2, 0)

    split = tmp_path / "split"
    stop_and_resume(train_args(shards, split, *engine_args), tmp_path, stop_at=steps + 2)  # mid epoch 2
    metas = [read_meta(p) for p in list_checkpoints(split)]
    assert (steps + 2, 1, 2) in [(m["global_step"], m["epoch"], m["step_in_epoch"]) for m in metas]

    assert_same_weights(load_weights(full / "model.safetensors"), load_weights(split / "model.safetensors"))
    # Every rank's RNG was restored, so the streams continue too.
    assert (split / "checkpoints").is_dir()


def test_deepspeed_zero0_bf16_and_consolidation(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "z0"
    args = train_args(
        shards, out, "--engine", "deepspeed", "--zero-stage", "0", "--precision", "bf16", epochs=1
    )
    rcs = run_ranks(args, tmp_path / "logs")
    assert rcs == [0, 0], logs(tmp_path / "logs")
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 0 and ds["train_batch_size"] == 16
    ck = list_checkpoints(out)[-1]
    assert (ck / "deepspeed" / "mp_rank_00_model_states.pt").is_file()
    val = [r for r in _records(out) if r["kind"] == "val"]
    assert val and val[-1]["count"] == Manifest.load(shards).count("val")  # all of val, over both ranks
    model = load_model(out)
    assert not model.training and model.transform is not None
    from hpcvae.engines import weights_from_checkpoint

    assert_same_weights(model.state_dict(), weights_from_checkpoint(ck, read_meta(ck)))
    x = model.sample(4, redshift=0.7)
    assert x.shape == (4, 1, 32, 32) and torch.isfinite(x).all()


@pytest.mark.parametrize("stage", ["2", "3"])
def test_zero_checkpoint_consolidates_via_cli(shards: Path, tmp_path: Path, stage: str) -> None:
    import subprocess
    import sys

    from train_helpers import REPO, child_env

    out = tmp_path / "z2"
    rcs = run_ranks(
        train_args(shards, out, "--engine", "deepspeed", "--zero-stage", stage, epochs=1), tmp_path / "logs"
    )
    assert rcs == [0, 0], logs(tmp_path / "logs")
    ck = list_checkpoints(out)[-1]
    dest = tmp_path / "consolidated"
    r = subprocess.run([sys.executable, "-m", "hpcvae.consolidate", str(ck), str(dest)], env=child_env(),
                       cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # Partitions gathered by DeepSpeed's zero_to_fp32 == the weights the run consolidated itself.
    assert_same_weights(load_weights(dest / "model.safetensors"), load_weights(out / "model.safetensors"))
    assert json.loads((dest / "model.json").read_text())["arch"] == "cvae2"
    x = load_model(dest).sample(2, redshift=0.7)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize(
    "ddp_args",
    [
        pytest.param(["--set", "ddp.comm_hook=fp16"], id="fp16-compression"),
        pytest.param(["--set", "ddp.bucket_cap_mb=0.05"], id="small-buckets"),
        pytest.param(
            ["--set", "ddp.static_graph=true", "--set", "ddp.gradient_as_bucket_view=false"], id="static"
        ),
    ],
)
def test_ddp_communication_options_train_the_same_model(
    shards: Path, tmp_path: Path, ddp_args: list[str]
) -> None:
    """Every DDP option trains on 2 gloo ranks; exact options give the same weights, compression nearly."""
    ref, run = tmp_path / "ref", tmp_path / "opt"
    assert run_ranks(train_args(shards, ref, epochs=1), tmp_path / "logs-ref") == [0, 0], logs(
        tmp_path / "logs-ref"
    )
    rcs = run_ranks(train_args(shards, run, *ddp_args, epochs=1), tmp_path / "logs-opt")
    assert rcs == [0, 0], logs(tmp_path / "logs-opt")
    a, b = load_weights(ref / "model.safetensors"), load_weights(run / "model.safetensors")
    if "comm_hook" in " ".join(ddp_args):
        diffs = [float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point()]
        assert 0 < max(diffs) < 0.05, max(diffs)  # half-precision gradients: close, not equal
    else:
        assert_same_weights(a, b)


def test_bf16_compression_on_gloo_is_a_one_line_error(shards: Path, tmp_path: Path) -> None:
    rcs = run_ranks(
        train_args(shards, tmp_path / "r", "--set", "ddp.comm_hook=bf16", epochs=1), tmp_path / "logs"
    )
    assert rcs == [2, 2]
    text = logs(tmp_path / "logs")
    assert "ddp.comm_hook = 'bf16' needs NCCL" in text and "Traceback" not in text
