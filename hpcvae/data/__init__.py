"""Loading shard sets for training: exact, resumable epochs.

* :mod:`hpcvae.data.plan`: the epoch plan (pure functions: the core of exact epochs and resume);
* :mod:`hpcvae.data.stream`: :class:`ShardData`, tar shards through DataLoader workers;
* :mod:`hpcvae.data.resident`: :class:`GpuResidentData`, the split held on the device;
* :mod:`hpcvae.data.loader`: the :class:`Loader` protocol both follow, :class:`EpochLoader`,
  the resumable :class:`DataPosition`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hpcvae.config import DataConfig
from hpcvae.data.loader import DataPosition, EpochLoader, Loader
from hpcvae.data.plan import EpochPlan, PlanInputs, buffer_shuffle, plan_epoch, resume_plan, val_ranges
from hpcvae.data.resident import GpuResidentData
from hpcvae.data.stream import ShardData
from hpcvae.shards.manifest import Manifest

__all__ = [
    "DataPosition",
    "EpochLoader",
    "EpochPlan",
    "GpuResidentData",
    "Loader",
    "PlanInputs",
    "ShardData",
    "buffer_shuffle",
    "make_data",
    "plan_epoch",
    "resume_plan",
    "val_ranges",
]


def make_data(
    cfg: DataConfig,
    manifest: Manifest,
    *,
    rank: int,
    world_size: int,
    seed: int,
    transform: Callable[[np.ndarray], Any] | None = None,
    max_steps: int = 0,
    device: torch.device | str | None = None,
    psf: bool = False,
) -> ShardData | GpuResidentData:
    """The loader ``cfg.gpu_resident`` asks for; both follow the :class:`Loader` protocol.

    ``psf``: batches also carry each galaxy's PSF (``batch["psf"]``, (B, 1, P, P)).
    """
    kw = {
        "rank": rank,
        "world_size": world_size,
        "seed": seed,
        "transform": transform,
        "max_steps": max_steps,
        "psf": psf,
    }
    if cfg.gpu_resident:
        return GpuResidentData(cfg, manifest, device=device, **kw)
    return ShardData(cfg, manifest, **kw)
