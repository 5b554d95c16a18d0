"""The GPU-resident loader: the train split held in device memory and shuffled there."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from hpcvae.config import DataConfig
from hpcvae.data.loader import EpochLoader, _Failure
from hpcvae.data.plan import PlanInputs, epoch_steps, resident_order, val_ranges
from hpcvae.data.stream import _Source, _source, _verify
from hpcvae.errors import ConfigError, ShardError
from hpcvae.shards.manifest import Manifest


class _ResidentBatches:
    """Batches ``first..`` of a fixed index list, gathered on the device (no host round trip for pixels)."""

    def __init__(self, data: GpuResidentData, split: str, idx: np.ndarray, sizes: Sequence[int]) -> None:
        self.data, self.split, self.idx, self.sizes = data, split, idx, list(sizes)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        arrays, keys = self.data._arrays[self.split]
        dev_idx = torch.from_numpy(self.idx).to(arrays["image"].device, non_blocking=True)
        pos = 0
        for size in self.sizes:
            sel = dev_idx[pos : pos + size]
            batch: dict[str, Any] = {k: a.index_select(0, sel).float() for k, a in arrays.items()}
            batch["key"] = [keys[i] for i in self.idx[pos : pos + size].tolist()]
            pos += size
            yield batch


class GpuResidentData:
    """The train split (and this rank's val share) held in device memory and shuffled there.

    For the small seed models the loader, not the GPU, limits throughput; a 56k-galaxy
    158x158 split is 2.8 GB in fp16, so every rank can hold all of it.  Same exact-epoch
    contract as ShardData: a seeded global permutation per epoch, rank r takes its
    contiguous share, ``steps = N // (W * B)``, resume skips by index.  Pixels are stored in
    ``dtype`` (fp16 keeps ~3.3 significant digits of a normalised [0, 1] image; pass
    float32 for exact pixels) and returned as float32 on ``device``.
    """

    def __init__(
        self,
        cfg: DataConfig,
        manifest: Manifest,
        *,
        rank: int,
        world_size: int,
        seed: int,
        transform: Callable[[np.ndarray], Any] | None = None,
        max_steps: int = 0,
        verify: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float16,
        psf: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.cfg, self.manifest = cfg, manifest
        self.rank, self.world_size, self.seed, self.max_steps = rank, world_size, seed, max_steps
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        manifest.check_files()
        if verify:
            _verify(manifest)
        self._arrays: dict[str, tuple[dict[str, torch.Tensor], list[str]]] = {}
        src = _source(manifest, "train", transform, cfg.batch_size, psf)
        self._n = sum(src.counts)
        self._arrays["train"] = self._load(src, 0, self._n, dtype)
        b = cfg.batch_size
        self.inputs = PlanInputs(loader="resident", shard_counts=tuple(src.counts), seed=seed,
                                 world_size=world_size, batch_size=b, num_workers=1, shuffle_buffer=0,
                                 max_steps=max_steps)  # fmt: skip
        self._steps = epoch_steps(self.inputs, self._n)
        if self._steps == 0:
            raise ConfigError(
                f"{manifest.path}: train split has {self._n} samples, fewer than "
                f"world_size*batch_size = {world_size}*{b}; lower data.batch_size",
                collective=True,
            )
        self._val = (0, 0)
        if "val" in manifest.splits:
            vsrc = _source(manifest, "val", transform, b, psf)
            self._val = val_ranges(sum(vsrc.counts), rank, world_size)
            self._arrays["val"] = self._load(vsrc, *self._val, dtype)

    def _load(
        self, src: _Source, lo: int, hi: int, dtype: torch.dtype
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Samples ``[lo, hi)`` of a split on the device: images in ``dtype``, per-sample values in fp32."""
        s = src.image_size
        arrays = {"image": torch.empty((hi - lo, 1, s, s), dtype=dtype, device=self.device)}
        keys: list[str] = []
        starts = np.concatenate([[0], np.cumsum(src.counts)[:-1]]).astype(int).tolist()
        chunk = 256
        sizes = [min(chunk, hi - a) for a in range(lo, hi, chunk)]
        pos = 0
        for batch in src.batches(
            names=src.names, starts=starts, counts=src.counts, order=np.arange(lo, hi), sizes=sizes
        ):
            if isinstance(batch, _Failure):
                raise ShardError(batch.message)
            m = len(batch["key"])
            for k, v in batch.items():
                if k == "key":
                    continue
                if k not in arrays:  # per-sample values and PSFs: fp32
                    arrays[k] = torch.empty((hi - lo, *v.shape[1:]), dtype=torch.float32, device=self.device)
                arrays[k][pos : pos + m] = v.to(self.device, arrays[k].dtype)
            keys += batch["key"]
            pos += m
        return arrays, keys

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    @property
    def dropped_per_epoch(self) -> int:
        return self._n - self.world_size * self._steps * self.cfg.batch_size

    @property
    def samples_per_epoch(self) -> int:
        return self.world_size * self._steps * self.cfg.batch_size

    @property
    def val_count(self) -> int:
        return self._val[1] - self._val[0]

    def epoch_steps(self, pool: np.ndarray | None = None) -> int:
        return self._steps if pool is None else epoch_steps(self.inputs, len(pool))

    def epoch_indices(self, epoch: int, pool: np.ndarray | None = None) -> np.ndarray:
        """This rank's sample indices for ``epoch``, in step order (a share of one global permutation)."""
        return resident_order(self.inputs, epoch, self.rank, pool)

    def train_loader(self, epoch: int, start_step: int = 0, pool: np.ndarray | None = None) -> EpochLoader:
        steps = self.epoch_steps(pool)
        if not 0 <= start_step <= steps:
            raise ConfigError(f"start_step {start_step} is outside the epoch's {steps} steps")
        b = self.cfg.batch_size
        idx = self.epoch_indices(epoch, pool)[start_step * b :]
        n = steps - start_step
        return EpochLoader(_ResidentBatches(self, "train", idx, [b] * n), n)

    def close(self) -> None:
        """Nothing to stop: no worker processes (same interface as ShardData)."""
        self._arrays.clear()

    def val_loader(self) -> EpochLoader:
        n = self.val_count
        if n == 0:
            return EpochLoader(None, 0)
        b = self.cfg.batch_size
        sizes = [min(b, n - a) for a in range(0, n, b)]
        return EpochLoader(_ResidentBatches(self, "val", np.arange(n), sizes), len(sizes))
