"""hpcvae's own step, timed for epoch_time: the product's Trainer driven step by step, with the profile.

The peers (the seed's loop, the bare loop, Lightning) are in :mod:`benchmarks.epoch_peers`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks import common
from benchmarks import epoch_peers as peers

if TYPE_CHECKING:
    from benchmarks.epoch_time import Variant


@dataclass(kw_only=True)
class StepTimes:
    first_s: list[float] = field(default_factory=list)
    """Warm-up step times (compile happens here)."""
    step_s: list[float] = field(default_factory=list)
    wait_s: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------------
# The data both sides train on


def time_ours(variant: Variant, job: dict[str, Any]) -> dict[str, Any]:
    """Run inside the variant's subprocess: build the product's Trainer, warm up, time, measure memory."""
    device = common.pick_device(job.get("device"))
    step = ProductStep(variant, job, device)
    model = step.trainer.model
    n_params = sum(p.numel() for p in model.parameters())
    flops = peers.flops_per_batch(variant.arch, job, step.trainer.manifest.image_size)
    mm = peers.matmul_now(device, step.precision)
    common.reset_peak_memory(device)
    peers.reset_rss_peak()
    warmup = job["warmup"] + (1 if variant.compile else 0)
    times = _run_steps(step, step.trainer.data, device, warmup, job["steps"])
    peak, peak_kind = peers.peak_memory(device)
    mm_after = peers.matmul_now(device, step.precision)
    profile = _profile_step(step, step.trainer.data, device) if job.get("profile") else None
    step.close()
    return {
        "variant": asdict(variant),
        "n_params": n_params,
        "flops_per_batch": flops,
        "steps_per_epoch_in_set": step.trainer.steps_per_epoch,
        "warmup_times_s": times.first_s,
        "step_times_s": times.step_s,
        "wait_times_s": times.wait_s,
        "matmul_tflops": mm,
        "matmul_tflops_after": mm_after,
        "peak_memory_mb": peak,
        "peak_memory_kind": peak_kind,
        "engine_info": step.info,
        "resolved": step.resolved,
        "profile": profile,
    }


class ProductStep:
    """The product's own training step: ``hpcvae.trainer.Trainer.train_step`` on its own loader.

    The Trainer is built from a ``JobConfig`` exactly as ``python -m hpcvae.train`` builds
    it (model from the registry, engine with fused Adam, autocast, channels_last,
    torch.compile, LR scheduler), so nothing here can be faster than a real run.  The only
    thing left out is the metric logging every ``train.log_every`` steps (one host sync).
    """

    def __init__(self, variant: Variant, job: dict[str, Any], device: torch.device) -> None:
        from hpcvae.config import CheckpointConfig, DataConfig, JobConfig, ModelConfig, TrainConfig
        from hpcvae.dist import DistInfo
        from hpcvae.trainer import Trainer

        run_dir = Path(job["result"]).with_suffix(".run")
        cfg = JobConfig(
            name=f"bench-{variant.arch}",
            out=str(run_dir),
            data=DataConfig(
                path=job["shards"],
                batch_size=job["batch_size"],
                num_workers=job["num_workers"],
                gpu_resident=variant.resident,
            ),  # fmt: skip
            model=ModelConfig(
                arch=variant.arch, flavour=job["flavour"], nf=job.get("nf"), z_dim=job.get("z_dim")
            ),
            train=TrainConfig(
                engine=variant.engine,
                precision=variant.precision,
                channels_last=variant.channels_last,
                compile=variant.compile,
                sample_grid=False,
            ),
            checkpoint=CheckpointConfig(every_steps=0, resume="none"),
        )
        dist = DistInfo(device=device, backend="nccl" if device.type == "cuda" else "gloo")
        self.trainer = Trainer(cfg, dist)
        h = self.trainer.hardware
        self.precision = h["precision"]
        self.resolved = {"precision": h["precision"], "channels_last": h["channels_last"],
                         "reason": f"{h['precision_reason']}; {h['channels_last_reason']}"}  # fmt: skip
        self.beta = float(self.trainer.beta(0))
        opt = self.trainer.engine.optimizer
        self.info = {
            "engine": type(self.trainer.engine).__name__,
            "optimizer": type(opt).__name__,
            "fused": bool(opt.defaults.get("fused")),
        }

    def __call__(self, batch: dict[str, Any]) -> None:
        self.trainer.train_step(batch, self.beta)

    def close(self) -> None:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()


def _run_steps(step, data, device: torch.device, warmup: int, steps: int) -> StepTimes:
    """Iterate real loader epochs; time each step from asking for the batch to the step's end.

    On a GPU the step ends with a synchronize so a step's time is its own (the trainer
    syncs only every ``log_every`` steps; the extra sync costs microseconds against
    steps of milliseconds).
    """
    out = StepTimes()
    done, epoch = 0, 0
    total = warmup + steps
    while done < total:
        it = iter(data.train_loader(epoch))
        while done < total:
            t0 = time.perf_counter()
            try:
                batch = next(it)  # EpochLoader keeps the global RNG untouched, as in training
            except StopIteration:
                break
            t1 = time.perf_counter()
            step(batch)
            common.sync(device)
            t2 = time.perf_counter()
            if done < warmup:
                out.first_s.append(t2 - t0)
            else:
                out.step_s.append(t2 - t0)
                out.wait_s.append(t1 - t0)
            done += 1
        epoch += 1
    return out


def _profile_step(step, data, device: torch.device, top: int = 12) -> list[dict[str, Any]]:
    """torch.profiler over one more step: the ops that take the time, with their input shapes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    it = iter(data.train_loader(1))
    batch = next(it)
    with profile(activities=acts, record_shapes=True) as prof:
        step(batch)
        common.sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(getattr(e, attr) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    return [
        {
            "op": e.key,
            "shapes": str(e.input_shapes)[:120],
            "calls": e.count,
            "self_ms": getattr(e, attr) / 1e3,
            "share": getattr(e, attr) / total,
        }
        for e in ranked
    ]


# ----------------------------------------------------------------------------------------
# Orchestration
