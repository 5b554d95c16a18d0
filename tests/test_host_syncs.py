"""No per-step host work: a training step never waits for the device.

On a GPU a step at batch 64 is 1-2 ms, so one ``.item()`` per step (a device-to-host sync)
or one collective per step costs a large share of it.  Syncs happen only at control points
(every ``train.sync_every`` steps, at epoch ends and saves) and at logging steps.  On CPU
there is no device to wait for, so the test counts the calls that would sync on a GPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def count_syncs():
    """Count calls of the Tensor methods that make the host wait for the device."""
    counts: dict[str, int] = dict.fromkeys(SYNCING, 0)
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def wrap(name):
        orig = saved[name]

        def f(self, *a, **k):
            counts[name] += 1
            return orig(self, *a, **k)

        return f

    for name in SYNCING:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_training_step_does_not_sync_the_host(tiny_shards: Path, tmp_path: Path, precision: str) -> None:
    from hpcvae.config import JobConfig, load_options
    from hpcvae.dist import init_distributed
    from hpcvae.trainer import Trainer

    cfg = load_options(
        JobConfig,
        Path(__file__).resolve().parents[1] / "configs" / "debug.toml",
        flags={
            "data.path": str(tiny_shards),
            "out": str(tmp_path / "r"),
            "train.epochs": 1,
            "train.device": "cpu",
            "train.precision": precision,
            "data.num_workers": 0,
            "data.persistent_workers": False,
            "data.batch_size": 8,
            "train.log_every": 10_000,
            "train.sync_every": 10_000,
            "train.status_every": 10_000,
            "checkpoint.every_steps": 0,
            "train.sample_grid": False,
        },  # fmt: skip
    )
    dist = init_distributed(device="cpu")
    trainer = Trainer(cfg, dist)
    per_step: list[dict[str, int]] = []
    orig = trainer.train_step

    def counted(batch, *args):
        with count_syncs() as c:
            orig(batch, *args)
        per_step.append(dict(c))

    trainer.train_step = counted
    with count_syncs() as total:
        result = trainer.train()
    assert result.status == "completed" and len(per_step) == trainer.steps_per_epoch >= 3
    for i, c in enumerate(per_step):
        assert sum(c.values()) == 0, f"step {i}: host syncs {c}"
    # the whole epoch: a handful at the epoch's control point, validation and the model files, not per step
    assert 0 < total["item"] < 40, total


def test_the_counter_sees_a_sync():
    with count_syncs() as c:
        x = torch.ones(2)
        float(x.sum())
        x.sum().item()
    assert c["item"] == 1 and c["__float__"] == 1
