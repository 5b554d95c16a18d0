"""What ``benchmarks.epoch_time`` times ours against, each in its own subprocess on the same images.

* **seed**: the seed's own loop and h5 loader (``benchmarks.seed_baseline``), fp32, NCHW.
* **bare**: the seed's model with no data loading: one fixed batch on the device, Adam, the loss,
  backward, step.  The floor any framework can reach on this machine, in a given precision and
  memory layout.
* **lightning**: the peer users would pick instead: a plain ``LightningModule`` on our loader,
  ``Trainer(precision="32-true" | "bf16-mixed")``, with Lightning's defaults otherwise.

The helpers that every row shares (FLOP counts, the matmul rate, peak memory) live here too.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common

LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def matmul_now(device: torch.device, precision: str) -> float:
    """The matmul rate right now, in this process: on a shared machine the rate moves with the load,
    so each row's MFU is taken against a rate measured moments before its own steps."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    return common.matmul_tflops(device, dtype, reps=3)


def reset_rss_peak() -> None:
    """Reset this process's VmHWM so CPU peak RSS covers the timed part only (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return common.peak_memory_mb(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                kb = int(line.split()[1])
                return kb / 1024.0, "peak RSS of the training process (VmHWM, workers excluded)"
    except OSError:
        pass
    return common.peak_memory_mb(device)


def flops_per_batch(arch: str, job: dict[str, Any], size: int) -> int:
    """Forward+backward FLOPs of one batch, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from hpcvae.models import build_model

    b = job["batch_size"]
    with torch.device("meta"):
        m = build_model(arch, job["flavour"], image_size=size, nf=job.get("nf"), z_dim=job.get("z_dim"))
        x = torch.rand(b, 1, size, size)
        r = torch.rand(b) if m.conditional else None
    counter = FlopCounterMode(display=False)
    with counter:
        out = m(x, r)
        m.compute_loss(out, x, r, 0.1)["total"].backward()
    return int(counter.get_total_flops())


def seed_flops_per_batch(arch: str, b: int, nf: int, z_dim: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.seed_baseline import build_seed_model, seed_loss

    with torch.device("meta"):
        m = build_seed_model(arch, nf, z_dim)
        x = torch.rand(b, 1, 158, 158)
        r = torch.rand(b)
    counter = FlopCounterMode(display=False)
    with counter:
        recon, mu, logvar = m(x, r)
        seed_loss(recon, x, mu, logvar, 0.1).backward()
    return int(counter.get_total_flops())


def _measured(device: torch.device, precision: str, run: Any) -> dict[str, Any]:
    """Matmul rate before and after, peak memory around ``run()``; returns run's dict plus those."""
    mm = matmul_now(device, precision)
    common.reset_peak_memory(device)
    reset_rss_peak()
    res = run()
    peak, kind = peak_memory(device)
    return {**res, "matmul_tflops": mm, "matmul_tflops_after": matmul_now(device, precision),
            "peak_memory_mb": peak, "peak_memory_kind": kind}  # fmt: skip


def time_seed(arch: str, job: dict[str, Any]) -> dict[str, Any]:
    """The seed's loop on the seed's h5 loader."""
    from benchmarks.seed_baseline import build_seed_model, run_seed_loop, seed_loader

    device = common.pick_device(job.get("device"))
    torch.manual_seed(0)
    nf, z_dim = job.get("nf") or 64, job.get("z_dim") or 32
    model = build_seed_model(arch, nf, z_dim)
    params = job["transform"]["params"]
    loader = seed_loader(job["seed_h5"], params["lo"], params["hi"], batch_size=job["batch_size"])

    def run() -> dict[str, Any]:
        r = run_seed_loop(model, loader, device, steps=job["seed_steps"], warmup=job["warmup"])
        return {"step_times_s": r.step_times, "wait_times_s": r.data_wait, "warmup_times_s": [],
                "final_loss": r.losses[-1] if r.losses else None}  # fmt: skip

    res = _measured(device, "fp32", run)
    return {**res, "arch": arch, "n_params": sum(p.numel() for p in model.parameters()),
            "flops_per_batch": seed_flops_per_batch(arch, job["batch_size"], nf, z_dim)}  # fmt: skip


def time_bare(arch: str, job: dict[str, Any]) -> dict[str, Any]:
    """The seed's model on one fixed batch already on the device: no loader, no framework."""
    from benchmarks.seed_baseline import build_seed_model, seed_loss

    device = common.pick_device(job.get("device"))
    precision, channels_last = job["precision"], bool(job["channels_last"])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    nf, z_dim = job.get("nf") or 64, job.get("z_dim") or 32
    model = build_seed_model(arch, nf, z_dim).to(device, memory_format=fmt).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = job["batch_size"]
    x = torch.rand(b, 1, 158, 158, device=device).contiguous(memory_format=fmt)
    z = torch.rand(b, device=device)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())  # fmt: skip

    def run() -> dict[str, Any]:
        times: list[float] = []
        for _ in range(job["warmup"] + job["steps"]):
            t0 = time.perf_counter()
            with amp:
                recon, mu, logvar = model(x, z)
            loss = seed_loss(recon.float(), x, mu.float(), logvar.float(), 0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            common.sync(device)
            times.append(time.perf_counter() - t0)
        w = job["warmup"]
        return {
            "step_times_s": times[w:],
            "wait_times_s": [0.0] * len(times[w:]),
            "warmup_times_s": times[:w],
        }

    res = _measured(device, precision, run)
    return {**res, "arch": arch, "n_params": sum(p.numel() for p in model.parameters()),
            "flops_per_batch": seed_flops_per_batch(arch, b, nf, z_dim)}  # fmt: skip


def time_lightning(arch: str, job: dict[str, Any]) -> dict[str, Any]:
    """A plain LightningModule on our loader and ``Trainer(precision=...)``, Lightning's defaults otherwise.

    The same registry model, the same shards through the same loader (ShardData), Adam at the
    same learning rate; a callback times each step from the previous step's end to this one's
    (the batch fetch included, as for ours).
    """
    import lightning as L

    from hpcvae.config import DataConfig
    from hpcvae.data import ShardData
    from hpcvae.models import build_model
    from hpcvae.shards.manifest import Manifest
    from hpcvae.transforms import transform_from_dict

    device = common.pick_device(job.get("device"))
    precision = job["precision"]
    torch.manual_seed(0)
    manifest = Manifest.load(job["shards"])
    model = build_model(
        arch, job["flavour"], image_size=manifest.image_size, nf=job.get("nf"), z_dim=job.get("z_dim")
    )
    t = transform_from_dict(job["transform"])
    data = ShardData(DataConfig(path=job["shards"], batch_size=job["batch_size"], num_workers=job["num_workers"]),
                     manifest, rank=0, world_size=1, seed=0, transform=t)  # fmt: skip
    total = job["warmup"] + job["steps"]

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def training_step(self, batch: dict[str, Any], _: int) -> torch.Tensor:
            x, r = batch["image"], batch.get("redshift")
            return self.m.compute_loss(self.m(x, r), x, r, 0.1)["total"]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.m.parameters(), lr=1e-3)

    starts: list[float] = []
    ends: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *_: Any) -> None:
            starts.append(time.perf_counter())  # the batch is fetched by now: the wait is start - last end

        def on_train_batch_end(self, *_: Any) -> None:
            common.sync(device)
            ends.append(time.perf_counter())

    class Batches:  # every epoch of our loader, for as many steps as asked
        def __iter__(self):
            epoch = 0
            while True:
                yield from data.train_loader(epoch)
                epoch += 1

    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision=LIGHTNING_PRECISION[precision], max_steps=total, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Timer()], num_sanity_val_steps=0)  # fmt: skip

    def run() -> dict[str, Any]:
        t0 = time.perf_counter()
        trainer.fit(Module(), train_dataloaders=Batches())
        times = np.diff([t0, *ends]).tolist()
        waits = (np.asarray(starts) - np.asarray([t0, *ends[:-1]])).tolist()
        w = job["warmup"]
        return {"warmup_times_s": times[:w], "step_times_s": times[w:], "wait_times_s": waits[w:]}

    res = _measured(device, precision, run)
    data.close()
    return {**res, "arch": arch, "n_params": sum(p.numel() for p in model.parameters()),
            "flops_per_batch": flops_per_batch(arch, job, manifest.image_size),
            "engine_info": {"engine": f"lightning {L.__version__}", "optimizer": "Adam", "fused": False,
                            "precision": LIGHTNING_PRECISION[precision]}}  # fmt: skip
