"""Seconds per epoch for each architecture x engine x precision x option, against the seed.

``python -m benchmarks.epoch_time [--archs ...] [--engines ddp,deepspeed] [--precisions fp32,bf16]
[--options none,channels_last,compile,channels_last+compile] [--batch-size 64] [--steps N] [--smoke] --out DIR``

Method.  Every variant runs in its own subprocess (so one variant's peak memory, compile
cache or process group cannot leak into the next), builds the model from the registry and
steps it through the product's own training step, fed by the product's loader
(``ShardData``) over a shard set derived from ``hpcvae.synth`` galaxies.  The first
``warmup`` steps are excluded (their excess over a timed step is reported as compile
time); the next ``steps`` are timed and the mean step time is extrapolated to the
drop_last epochs of 81,499 and 314,000 galaxies.  FLOPs per batch come from
``FlopCounterMode`` on a meta-device copy of the model (no compute, same count), MFU is
given against the data-sheet bf16 peak (GPU only) and against a big matmul timed in the
same run.  The seed's own loop (``benchmarks.seed_baseline``) runs in the same
invocation on the same images stored in the seed's h5 layout, so every row is also a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from benchmarks import common
from hpcvae.cli import run_cli
from hpcvae.config import ArchName, Engine, Flavour, Precision
from hpcvae.errors import ConfigError

ARCHS: tuple[str, ...] = ("vae128", "vae158", "cvae", "cvae2", "fancy_cvae")
OPTIONS = ("none", "channels_last", "compile", "channels_last+compile", "channels_last+compile+resident",
           "channels_last+resident")  # fmt: skip
Option = Literal["none", "channels_last", "compile", "channels_last+compile"]
SEED_REF = {"vae158": "vae158", "vae128": "vae158", "cvae2": "cvae2", "cvae": "cvae2", "fancy_cvae": "cvae2"}
"""The seed model each architecture's ratio is taken against (the baseline copies only the seed's cvae2 and vae158)."""


@dataclass(kw_only=True, frozen=True)
class Variant:
    arch: ArchName
    engine: Engine = "ddp"
    precision: Precision = "fp32"
    option: Option = "none"

    @property
    def channels_last(self) -> bool:
        return "channels_last" in self.option

    @property
    def compile(self) -> bool:
        return "compile" in self.option

    @property
    def resident(self) -> bool:
        """The train split held on the device (GpuResidentData) instead of streamed by workers."""
        return "resident" in self.option

    @property
    def name(self) -> str:
        return f"{self.arch}/{self.engine}/{self.precision}/{self.option}"

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``arch:engine:precision:option``, as given to ``--extra``."""
        parts = text.split(":")
        if len(parts) != 4:
            raise ConfigError(f"--extra {text!r}: expected arch:engine:precision:option")
        arch, engine, precision, option = parts
        return cls(arch=arch, engine=engine, precision=precision, option=option)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown architecture {self.arch!r} (choices: {', '.join(ARCHS)})")
        if self.engine not in ("ddp", "deepspeed"):
            raise ConfigError(f"unknown engine {self.engine!r} (choices: ddp, deepspeed)")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"unknown precision {self.precision!r} (choices: fp32, bf16, fp16)")
        if self.option not in OPTIONS:
            raise ConfigError(f"unknown option {self.option!r} (choices: {', '.join(OPTIONS)})")


@dataclass(kw_only=True)
class EpochTimeConfig:
    """One invocation: which variants, how long to time them, on what data."""

    variants: list[Variant]
    batch_size: int = 64
    steps: int = 5
    """Timed steps per variant (after warm-up)."""
    warmup: int = 1
    """Untimed steps per variant; compiled variants get one more."""
    flavour: Flavour = "default"
    image_size: int | None = None
    """Override the arch's image side (the seed's 158/128 when None)."""
    nf: int | None = None
    z_dim: int | None = None
    num_workers: int = 2
    """Loader workers for our runs (the product default)."""
    n_images: int = 0
    """Galaxies in the benchmark shard set; 0 = enough for warm-up + timed steps of one epoch."""
    pool: int = 64
    """Galaxies rendered with hpcvae.synth; the set is drawn from them with rotations, flips, noise."""
    seed_baseline: bool = True
    seed_steps: int | None = None
    variant_timeout_s: float = 900.0
    workdir: str | None = None
    profile: bool = False
    """Profile one extra step of each variant with torch.profiler and report the top ops."""
    lightning: bool = True
    """Also time cvae2 under PyTorch Lightning (``Trainer(precision="bf16-mixed")``), the peer users would pick."""
    tag: str = ""
    """Appended to the results' file names (``epoch_time-<device>-<date>-<tag>``), to keep two runs of a day."""

    def __post_init__(self) -> None:
        if not self.variants:
            raise ConfigError("no variants to run (check --archs/--engines/--precisions/--options)")
        if self.batch_size < 1 or self.steps < 1 or self.warmup < 0:
            raise ConfigError("--batch-size and --steps must be >= 1, --warmup >= 0")
        if self.num_workers < 0:
            raise ConfigError("--num-workers must be >= 0")


@dataclass(kw_only=True)
class StepTimes:
    first_s: list[float] = field(default_factory=list)
    """Warm-up step times (compile happens here)."""
    step_s: list[float] = field(default_factory=list)
    wait_s: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------------
# The data both sides train on


def prepare_data(cfg: EpochTimeConfig, workdir: Path, size: int) -> tuple[Path, Path, dict[str, Any]]:
    """A shard set for our loader and an h5 file in the seed's layout holding the same train images."""
    from benchmarks.seed_baseline import write_seed_h5
    from hpcvae.shards.manifest import Manifest
    from hpcvae.transforms import get_transform

    shard_dir = workdir / f"shards-{size}"
    h5_path = workdir / f"seed-{size}.h5"
    total_steps = cfg.warmup + 1 + cfg.steps
    n = cfg.n_images or max(4 * cfg.batch_size, int(1.05 * cfg.batch_size * total_steps) + cfg.batch_size)
    t0 = time.perf_counter()
    pool = common.render_pool(cfg.pool, size, workdir / f"pool-{size}", seed=0, workers=1)
    t_pool = time.perf_counter() - t0
    t0 = time.perf_counter()
    common.make_big_set(n, size, shard_dir, pool, per_shard=max(cfg.batch_size * 4, 256), progress=False)
    t_set = time.perf_counter() - t0
    images, redshifts = common.read_shard_images(shard_dir, splits=("train",))
    m = Manifest.load(shard_dir)
    t = get_transform("minmax", m.stats("train"))
    write_seed_h5(h5_path, images, redshifts)
    info = {
        "image_size": size,
        "n_images": n,
        "n_train": int(images.shape[0]),
        "pool": cfg.pool,
        "render_pool_s": t_pool,
        "make_set_s": t_set,
        "transform": t.to_dict(),
        "shards": str(shard_dir),
        "seed_h5": str(h5_path),
    }
    return shard_dir, h5_path, info


# ----------------------------------------------------------------------------------------
# Our step, as the trainer runs it


def time_ours(variant: Variant, job: dict[str, Any]) -> dict[str, Any]:
    """Run inside the variant's subprocess: build the product's Trainer, warm up, time, measure memory."""
    device = common.pick_device(job.get("device"))
    step = ProductStep(variant, job, device)
    model = step.trainer.model
    n_params = sum(p.numel() for p in model.parameters())
    flops = flops_per_batch(variant.arch, job, step.trainer.manifest.image_size)
    mm = _matmul_now(device, variant.precision)
    common.reset_peak_memory(device)
    _reset_rss_peak()
    warmup = job["warmup"] + (1 if variant.compile else 0)
    times = _run_steps(step, step.trainer.data, device, warmup, job["steps"])
    peak, peak_kind = _peak_memory(device)
    mm_after = _matmul_now(device, variant.precision)
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


def time_seed(arch: str, job: dict[str, Any]) -> dict[str, Any]:
    """The seed's loop on the seed's h5 loader, in its own subprocess like ours."""
    from benchmarks.seed_baseline import build_seed_model, run_seed_loop, seed_loader

    device = common.pick_device(job.get("device"))
    torch.manual_seed(0)
    nf = job.get("nf") or 64
    z_dim = job.get("z_dim") or 32
    model = build_seed_model(arch, nf, z_dim)
    params = job["transform"]["params"]
    loader = seed_loader(job["seed_h5"], params["lo"], params["hi"], batch_size=job["batch_size"])
    mm = _matmul_now(device, "fp32")
    common.reset_peak_memory(device)
    _reset_rss_peak()
    run = run_seed_loop(model, loader, device, steps=job["seed_steps"], warmup=job["warmup"])
    peak, peak_kind = _peak_memory(device)
    mm_after = _matmul_now(device, "fp32")
    return {
        "arch": arch,
        "n_params": sum(p.numel() for p in model.parameters()),
        "flops_per_batch": seed_flops_per_batch(arch, job["batch_size"], nf, z_dim),
        "step_times_s": run.step_times,
        "wait_times_s": run.data_wait,
        "warmup_times_s": [],
        "matmul_tflops": mm,
        "matmul_tflops_after": mm_after,
        "final_loss": run.losses[-1] if run.losses else None,
        "peak_memory_mb": peak,
        "peak_memory_kind": peak_kind,
    }


def time_lightning(arch: str, job: dict[str, Any]) -> dict[str, Any]:
    """The peer a user would pick instead: a plain LightningModule and ``Trainer(precision="bf16-mixed")``.

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

    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=total, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Timer()], num_sanity_val_steps=0)  # fmt: skip
    mm = _matmul_now(device, "bf16")
    common.reset_peak_memory(device)
    _reset_rss_peak()
    t0 = time.perf_counter()
    trainer.fit(Module(), train_dataloaders=Batches())
    times = np.diff([t0, *ends]).tolist()
    waits = (np.asarray(starts) - np.asarray([t0, *ends[:-1]])).tolist()
    peak, peak_kind = _peak_memory(device)
    data.close()
    return {
        "arch": arch,
        "n_params": sum(p.numel() for p in model.parameters()),
        "flops_per_batch": flops_per_batch(arch, job, manifest.image_size),
        "warmup_times_s": times[: job["warmup"]],
        "step_times_s": times[job["warmup"] :],
        "wait_times_s": waits[job["warmup"] :],
        "matmul_tflops": mm,
        "matmul_tflops_after": _matmul_now(device, "bf16"),
        "peak_memory_mb": peak,
        "peak_memory_kind": peak_kind,
        "engine_info": {"engine": f"lightning {L.__version__}", "optimizer": "Adam", "fused": False},
    }


def _matmul_now(device: torch.device, precision: str) -> float:
    """The matmul rate right now, in this process: on a shared machine the rate moves with the load,
    so each row's MFU is taken against a rate measured moments before its own steps."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    return common.matmul_tflops(device, dtype, reps=3)


def _reset_rss_peak() -> None:
    """Reset this process's VmHWM so CPU peak RSS covers the timed part only (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return common.peak_memory_mb(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(
                    line.split()[1]
                ) / 1024.0, "peak RSS of the training process (VmHWM, workers excluded)"
    except OSError:
        pass
    return common.peak_memory_mb(device)


# ----------------------------------------------------------------------------------------
# Orchestration


def _spawn(kind: str, what: str, job: dict[str, Any], workdir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one variant in a fresh interpreter; its failure is recorded, not fatal."""
    jobfile = workdir / f"job-{kind}-{what.replace('/', '_').replace('+', '_')}.json"
    resfile = jobfile.with_suffix(".result.json")
    jobfile.write_text(json.dumps({**job, "kind": kind, "what": what, "result": str(resfile)}))
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.epoch_time", "--worker", str(jobfile)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not resfile.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}", "wall_s": wall}
    res = json.loads(resfile.read_text())
    res["wall_s"] = wall
    return res


def _derive(res: dict[str, Any], batch: int, env: dict[str, Any], precision: str) -> dict[str, Any]:
    """Per-step times -> images/s, epoch seconds, MFU, data-wait share."""
    steps = np.asarray(res.get("step_times_s") or [], dtype=np.float64)
    waits = np.asarray(res.get("wait_times_s") or [], dtype=np.float64)
    if steps.size == 0:
        return {}
    mean = float(steps.mean())
    flops = res.get("flops_per_batch") or 0
    start_mm = env["matmul_tflops"]["bf16" if precision in ("bf16", "fp16") else "fp32"]
    mm = res.get("matmul_tflops") or start_mm
    rates = [r for r in (res.get("matmul_tflops"), res.get("matmul_tflops_after")) if r]
    peak = env.get("bf16_peak_tflops")
    first = res.get("warmup_times_s") or []
    d = {
        "step_s": mean,
        "step_s_median": float(np.median(steps)),
        "step_s_min": float(steps.min()),
        "step_s_max": float(steps.max()),
        "images_per_s": batch / mean,
        "epoch_s_81k": (common.COSMOS_EPOCH // batch) * mean,
        "epoch_s_314k": (common.BIG_EPOCH // batch) * mean,
        "data_wait_share": float(waits.sum() / steps.sum()) if waits.size else None,
        "compute_step_s": float((steps - waits).mean()) if waits.size else mean,
        "gflop_per_image": flops / batch / 1e9,
        "achieved_tflops": flops / mean / 1e12,
        "mfu_vs_matmul": flops / mean / 1e12 / mm if mm else None,
        "mfu_vs_bf16_peak": flops / mean / 1e12 / peak if peak else None,
        "cpu_share": min(rates) / start_mm if rates and start_mm else None,
        "warmup_overhead_s": max(0.0, first[0] - mean) if first else None,
        "compile_s": max(0.0, first[0] - mean)
        if first and res.get("variant", {}).get("option", "").endswith("compile")
        else None,
        "first_step_s": first[0] if first else None,
    }
    return d


def run(cfg: EpochTimeConfig, out: Path) -> dict[str, Any]:
    device = common.pick_device()
    env = common.environment(device)
    print(f"epoch_time: device {env['device']} ({env['device_description']}); load {env['loadavg_start']}")
    env["matmul_tflops"] = {
        "fp32": common.matmul_tflops(device, torch.float32),
        "bf16": common.matmul_tflops(device, torch.bfloat16),
    }
    env["bf16_peak_tflops"] = common.bf16_peak_tflops(device)
    print(
        f"epoch_time: measured matmul {env['matmul_tflops']['fp32']:.3f} TFLOP/s fp32, "
        f"{env['matmul_tflops']['bf16']:.3f} TFLOP/s bf16; data-sheet bf16 peak {env['bf16_peak_tflops']}"
    )
    with tempfile.TemporaryDirectory(prefix="hpcvae-bench-", dir=cfg.workdir) as tmp:
        workdir = Path(tmp)
        sizes = {}
        for v in cfg.variants:
            size = cfg.image_size or (128 if v.arch == "vae128" else 158)
            sizes.setdefault(size, None)
        data: dict[int, dict[str, Any]] = {}
        for size in sizes:
            shard_dir, h5, info = prepare_data(cfg, workdir, size)
            data[size] = info
            print(
                f"epoch_time: data {size}x{size}: {info['n_train']} train images "
                f"(pool {info['pool']} rendered in {info['render_pool_s']:.1f} s, set in {info['make_set_s']:.1f} s)"
            )
        base_job = {
            "batch_size": cfg.batch_size,
            "steps": cfg.steps,
            "warmup": cfg.warmup,
            "flavour": cfg.flavour,
            "nf": cfg.nf,
            "z_dim": cfg.z_dim,
            "num_workers": cfg.num_workers,
            "seed_steps": cfg.seed_steps or cfg.steps,
            "profile": cfg.profile,
        }
        rows: list[dict[str, Any]] = []
        seed_jobs: dict[str, dict[str, Any]] = {}
        if cfg.seed_baseline:
            for arch in sorted({SEED_REF[v.arch] for v in cfg.variants}):
                info = data.get(158)
                if info is None:
                    print(f"epoch_time: seed {arch} skipped: the seed's modules are fixed at 158x158")
                    continue
                seed_jobs[arch] = {**base_job, "transform": info["transform"], "seed_h5": info["seed_h5"]}
        # The seed runs before and after our variants: on a shared machine the load drifts, and
        # bracketing keeps the ratio from hanging on one moment's load.
        first_seed = {a: _spawn("seed", a, j, workdir, cfg.variant_timeout_s) for a, j in seed_jobs.items()}
        for a, r in first_seed.items():
            _print_row(f"seed {a} (before)", {**r, **_derive(r, cfg.batch_size, env, "fp32")})
        for v in cfg.variants:
            size = cfg.image_size or (128 if v.arch == "vae128" else 158)
            info = data[size]
            job = {**base_job, "variant": asdict(v), "transform": info["transform"], "shards": info["shards"]}
            res = _spawn("ours", v.name, job, workdir, cfg.variant_timeout_s)
            res.update(_derive(res, cfg.batch_size, env, v.precision))
            res["name"] = v.name
            res.update(asdict(v))
            rows.append(res)
            _print_row(v.name, res)
        if cfg.lightning:
            info = data[cfg.image_size or 158]
            job = {**base_job, "transform": info["transform"], "shards": info["shards"]}
            res = _spawn("lightning", "cvae2", job, workdir, cfg.variant_timeout_s)
            res.update(_derive(res, cfg.batch_size, env, "bf16"))
            res.update(name="cvae2/lightning/bf16-mixed/none", arch="cvae2", engine="lightning", precision="bf16",
                       option="none")  # fmt: skip
            rows.append(res)
            _print_row(res["name"], res)
        seeds: dict[str, dict[str, Any]] = {}
        for a, j in seed_jobs.items():
            after = _spawn("seed", a, j, workdir, cfg.variant_timeout_s)
            seeds[a] = _merge_seed_runs(a, first_seed[a], after, cfg.batch_size, env)
            _print_row(seeds[a]["name"], seeds[a])
        for res in rows:
            ref = seeds.get(SEED_REF[res["arch"]])
            if ref and res.get("images_per_s") and ref.get("images_per_s"):
                res["seed_ref"] = SEED_REF[res["arch"]]
                res["speedup_vs_seed"] = res["images_per_s"] / ref["images_per_s"]
                res["speedup_vs_seed_best_step"] = ref["step_s_min"] / res["step_s_min"]
                res["compute_speedup_vs_seed"] = ref["compute_step_s"] / res["compute_step_s"]
    env["loadavg_end"] = common.loadavg()
    seed_cvae2 = seeds.get("cvae2", {})
    flop_check = {
        "stated_gflop_per_image": common.SEED_CVAE2_GFLOP_PER_IMAGE,
        "flopcounter_seed_cvae2_gflop_per_image": seed_cvae2.get("gflop_per_image"),
        "flopcounter_ours_cvae2_gflop_per_image": next(
            (r.get("gflop_per_image") for r in rows if r.get("arch") == "cvae2" and r.get("gflop_per_image")),
            None,
        ),
    }
    payload = {
        "benchmark": "epoch_time",
        "environment": env,
        "config": {**asdict(cfg), "variants": [v.name for v in cfg.variants]},
        "data": data,
        "flop_check": flop_check,
        "seed": seeds,
        "results": rows,
    }
    stem = common.result_stem("epoch_time", device) + (f"-{cfg.tag}" if cfg.tag else "")
    common.write_results(out, stem, payload, render_md(payload))
    if Path(out).resolve() == common.RESULTS_DIR.resolve():
        common.update_index(out)
    print(f"epoch_time: wrote {Path(out) / stem}.json and .md")
    return payload


def _merge_seed_runs(
    arch: str, before: dict[str, Any], after: dict[str, Any], batch: int, env: dict[str, Any]
) -> dict[str, Any]:
    """One seed row from its two bracketing runs: all timed steps pooled, each run's mean kept."""
    runs = [r for r in (before, after) if "error" not in r]
    if not runs:
        return {**before, "name": f"seed {arch}"}
    merged = dict(runs[0])
    for key in ("step_times_s", "wait_times_s"):
        merged[key] = [t for r in runs for t in r.get(key, [])]
    merged["matmul_tflops"] = float(np.mean([r["matmul_tflops"] for r in runs]))
    merged["matmul_tflops_after"] = min(r.get("matmul_tflops_after") or r["matmul_tflops"] for r in runs)
    merged["peak_memory_mb"] = max(r["peak_memory_mb"] for r in runs)
    merged["run_means_s"] = [float(np.mean(r["step_times_s"])) for r in runs]
    merged.update(_derive(merged, batch, env, "fp32"))
    merged["name"] = f"seed {arch} (fp32, h5py loader, .item() per step)"
    return merged


def _print_row(name: str, r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"  {name:45s} FAILED: {r['error']}")
        return
    sp = f"  x{r['speedup_vs_seed']:.2f} vs seed" if r.get("speedup_vs_seed") else ""
    print(
        f"  {name:45s} {r['step_s']:.3f} s/step  {r['images_per_s']:8.1f} img/s  "
        f"81k epoch {r['epoch_s_81k']:8.0f} s  wait {100 * (r['data_wait_share'] or 0):4.1f}%{sp}",
        flush=True,
    )


COLUMNS = [
    ("name", "variant"),
    ("step_s", "s/step"),
    ("images_per_s", "img/s"),
    ("epoch_s_81k", "s/epoch 81,499"),
    ("epoch_s_314k", "s/epoch 314,000"),
    ("speedup_vs_seed", "× seed (img/s)"),
    ("speedup_vs_seed_best_step", "× seed (best step)"),
    ("gflop_per_image", "GFLOP/img f+b"),
    ("achieved_tflops", "TFLOP/s"),
    ("mfu_vs_matmul", "MFU vs matmul"),
    ("mfu_vs_bf16_peak", "MFU vs bf16 peak"),
    ("data_wait_share", "data wait"),
    ("cpu_share", "matmul rate vs start"),
    ("compile_s", "compile s"),
    ("peak_memory_mb", "peak MB"),
]


PROFILE_COLUMNS = [("op", "op"), ("shapes", "input shapes"), ("calls", "calls"), ("self_ms", "self ms"),
                   ("share", "share")]  # fmt: skip


def render_md(p: dict[str, Any]) -> str:
    env, cfg = p["environment"], p["config"]
    seeds = list(p["seed"].values())
    rows = [r for r in seeds + p["results"] if "error" not in r]
    failed = [r for r in seeds + p["results"] if "error" in r]
    fc = p["flop_check"]
    mm = env["matmul_tflops"]
    mem_kind = next((r.get("peak_memory_kind") for r in rows if r.get("peak_memory_kind")), "")
    lines = [
        f"# Epoch time — {env['device']} — {env['date'][:10]}",
        "",
        common.env_md(env),
        f"- measured matmul: {mm['fp32']:.3f} TFLOP/s fp32, {mm['bf16']:.3f} TFLOP/s bf16; data-sheet bf16 peak: "
        + (
            f"{env['bf16_peak_tflops']} TFLOP/s"
            if env["bf16_peak_tflops"]
            else "none (CPU: no published peak, MFU is vs the measured matmul only)"
        ),
        f"- config: batch {cfg['batch_size']}, {cfg['steps']} timed steps after {cfg['warmup']} warm-up "
        f"(+1 for compiled variants), flavour {cfg['flavour']}, nf {cfg['nf'] or 'arch default'}, "
        f"loader workers {cfg['num_workers']}, seed steps {cfg['seed_steps'] or cfg['steps']}",
        "- data: " + ", ".join(f"{d['n_train']} train images at {s}²" for s, d in p["data"].items()) + ", "
        "from hpcvae.synth galaxies (rotations, flips, noise re-draws) in our shard format; the seed reads the same "
        "train images from an h5 file in its layout",
        "",
        "## FLOPs check (cvae2, 158², forward+backward per image)",
        "",
        f"stated {fc['stated_gflop_per_image']} GFLOP; FlopCounterMode: seed cvae2 "
        f"{common.fmt(fc['flopcounter_seed_cvae2_gflop_per_image'], 4)} GFLOP, ours "
        f"{common.fmt(fc['flopcounter_ours_cvae2_gflop_per_image'], 4)} GFLOP"
        + (
            ""
            if cfg["flavour"] == "default" and not cfg["nf"]
            else " (this run used a reduced width, so the counts differ from 6.5)"
        ),
        "",
        "## Results",
        "",
        "Epoch seconds = mean timed step × (galaxies // batch), drop_last. `× seed (img/s)` divides our images/s by the "
        "seed loop's (cvae and fancy_cvae against the seed's cvae2, vae128 against its vae158: the baseline copies only "
        "those two); the seed ran before and after our variants and its row pools both runs (this machine is shared, "
        "the load drifts); `× seed (best step)` compares the fastest single steps, the figure least disturbed by "
        "other processes. "
        "MFU vs matmul: achieved FLOP/s over a big matmul timed in the same process just before the row's steps, in the "
        "row's precision (bf16 for bf16 rows, fp32 for fp32 rows). `compile s`: the first step's excess over a timed step, for torch.compile rows. "
        f"Peak memory: {mem_kind}.",
        "",
        common.md_table(rows, COLUMNS),
        "",
        "Seed step means per run (before, after our variants): "
        + "; ".join(
            f"{a}: {', '.join(f'{t:.2f} s' for t in r.get('run_means_s', []))}" for a, r in p["seed"].items()
        ),
    ]
    if failed:
        lines += ["", "## Variants that failed", ""]
        lines += [f"- `{r['name']}`: {r['error']}" for r in failed]
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        lines += ["", "## Where the step's time goes (torch.profiler, one step after the timed ones)"]
        for r in profiled:
            lines += ["", f"### {r['name']}", "", common.md_table(r["profile"], PROFILE_COLUMNS)]
    lines += ["", "Raw per-step times are in the JSON twin of this file."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# CLI


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


SMOKE_VARIANTS = ("cvae2:ddp:fp32:none", "cvae2:ddp:bf16:channels_last")
"""What --smoke runs unless told otherwise: the seed's pick, plain and in the configuration we recommend on CPU."""


def build_config(args: argparse.Namespace) -> EpochTimeConfig:
    explicit = any((args.archs, args.engines, args.precisions, args.options))
    variants: list[Variant] = []
    if explicit or not args.smoke:
        archs = _csv(args.archs or ",".join(ARCHS))
        engines = _csv(args.engines or "ddp")
        precisions = _csv(args.precisions or "fp32,bf16")
        options = _csv(args.options or "none,channels_last")
        variants = [
            Variant(arch=a, engine=e, precision=p, option=o)  # type: ignore[arg-type]
            for a in archs
            for e in engines
            for p in precisions
            for o in options
        ]
    elif not args.extra:
        variants = [Variant.parse(x) for x in SMOKE_VARIANTS]
    variants += [Variant.parse(x) for x in args.extra or []]
    if args.smoke:
        # Debug-width models at the seed's 158 so the seed's own modules (fixed at 158) run beside them.
        return EpochTimeConfig(
            variants=variants,
            batch_size=args.batch_size or 8,
            steps=args.steps or 2,
            warmup=1,
            flavour="debug",
            image_size=158,
            nf=4,
            z_dim=8,
            num_workers=args.num_workers if args.num_workers is not None else 0,
            pool=8,
            seed_steps=args.seed_steps,
            variant_timeout_s=120,
            workdir=args.workdir,
            profile=args.profile,
            lightning=not args.no_lightning,
            tag=args.tag,
        )
    return EpochTimeConfig(
        variants=variants,
        batch_size=args.batch_size or 64,
        steps=args.steps or 5,
        warmup=args.warmup,
        flavour=args.flavour,
        image_size=args.image_size,
        nf=args.nf,
        z_dim=args.z_dim,
        num_workers=args.num_workers if args.num_workers is not None else 2,
        pool=args.pool,
        seed_steps=args.seed_steps,
        seed_baseline=not args.no_seed,
        workdir=args.workdir,
        profile=args.profile,
        lightning=not args.no_lightning,
        tag=args.tag,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.epoch_time", description=__doc__.splitlines()[0])
    ap.add_argument("--archs", help=f"comma list (default all: {','.join(ARCHS)})")
    ap.add_argument("--engines", help="comma list of ddp,deepspeed (default ddp)")
    ap.add_argument("--precisions", help="comma list of fp32,bf16,fp16 (default fp32,bf16)")
    ap.add_argument("--options", help=f"comma list of {','.join(OPTIONS)} (default none,channels_last)")
    ap.add_argument(
        "--extra", action="append", help="one more variant arch:engine:precision:option (repeatable)"
    )
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--steps", type=int, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed-steps", type=int, help="timed steps of the seed loop (default --steps)")
    ap.add_argument("--no-seed", action="store_true", help="skip the seed baseline")
    ap.add_argument("--no-lightning", action="store_true", help="skip the PyTorch Lightning peer")
    ap.add_argument("--tag", default="", help="suffix of the results' file names")
    ap.add_argument("--flavour", default="default", choices=["default", "debug"])
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--nf", type=int)
    ap.add_argument("--z-dim", type=int)
    ap.add_argument("--num-workers", type=int)
    ap.add_argument("--pool", type=int, default=64, help="galaxies rendered with hpcvae.synth")
    ap.add_argument("--workdir", help="scratch folder (default: the system temp dir)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over one extra step per variant")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny run (< 1 min on 2 CPU cores): checks the suite works"
    )
    ap.add_argument("--out", help="results folder (e.g. benchmarks/results)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(Path(args.worker))
    if not args.out:
        raise ConfigError("--out DIR is required")
    run(build_config(args), Path(args.out))
    return 0


def _worker(jobfile: Path) -> int:
    job = json.loads(jobfile.read_text())
    if job["kind"] == "seed":
        res = time_seed(job["what"], job)
    elif job["kind"] == "lightning":
        res = time_lightning(job["what"], job)
    else:
        res = time_ours(Variant(**job["variant"]), job)
    Path(job["result"]).write_text(json.dumps(common.finite_or_none(res)))
    return 0


if __name__ == "__main__":
    run_cli(main, "benchmarks.epoch_time")
