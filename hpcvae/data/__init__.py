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
    "resident_fits",
    "plan_epoch",
    "resume_plan",
    "val_ranges",
]


def resident_fits(
    manifest: Manifest, device: torch.device | str | None, total_bytes: int | None = None
) -> bool:
    """Whether the default keeps the data on the device: CUDA, and the splits in fp16 fit in half its memory."""
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        return False
    if total_bytes is None:
        total_bytes = torch.cuda.get_device_properties(dev).total_memory
    n = sum(manifest.count(s) for s in manifest.splits)
    return n * manifest.image_size**2 * 2 <= total_bytes // 2


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
    resident = cfg.gpu_resident if cfg.gpu_resident is not None else resident_fits(manifest, device)
    if resident:
        return GpuResidentData(cfg, manifest, device=device, **kw)
    return ShardData(cfg, manifest, **kw)
