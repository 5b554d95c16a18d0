"""Seconds per epoch for each architecture x engine x precision x option, against the seed, a bare loop and Lightning.

``python -m benchmarks.epoch_time [--archs cvae2] [--engines ddp,deepspeed] [--precisions auto,fp32,bf16]
[--options none,channels_last,auto,compile,...] [--rounds 3] [--batch-size 64] [--steps N] [--smoke] --out DIR``

Method.  Every row runs in its own subprocess (so one row's peak memory, compile cache or
process group cannot leak into the next).  Ours builds the model from the registry and steps
it through the product's own training step, fed by the product's loader (``ShardData``) over a
shard set derived from ``hpcvae.synth`` galaxies.  Beside it, in the same invocation and on the
same images (``benchmarks.epoch_peers``): the seed's own loop and h5 loader; a bare loop (the
seed's model on one fixed batch: the floor any framework reaches) in each precision and layout;
and PyTorch Lightning in each precision.  The whole list runs ``rounds`` times, in alternating
order, so a machine's drifting load shows as a spread instead of a bias; ratios are taken per
round (paired) and reported with that spread.  Rows in a precision the device only emulates
(``hpcvae.hardware``) run in the first round only, with fewer steps: they are there to show
which precision is fastest, not to be timed to the percent.

The first ``warmup`` steps are excluded (their excess over a timed step is reported as compile
time); the mean step time is extrapolated to the drop_last epochs of 81,499 and 314,000
galaxies.  FLOPs per batch come from ``FlopCounterMode`` on a meta-device copy of the model;
MFU is given against the data-sheet bf16 peak (GPU only) and against a big matmul timed in the
same process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from benchmarks import common
from benchmarks import epoch_peers as peers
from benchmarks.epoch_ours import time_ours
from benchmarks.epoch_peers import seed_flops_per_batch  # noqa: F401  (re-exported for the tests)
from benchmarks.epoch_results import (
    PEER_ARCH,
    SEED_REF,
    derive,
    fastest_precision,
    flop_check,
    merge_runs,
    pair_ratios,
    print_row,
)
from hpcvae.cli import run_cli
from hpcvae.config import ArchName, Engine, Flavour, Precision
from hpcvae.errors import ConfigError

ARCHS: tuple[str, ...] = ("vae128", "vae158", "cvae", "cvae2", "fancy_cvae")
OPTIONS = ("none", "channels_last", "auto", "compile", "channels_last+compile", "channels_last+compile+resident",
           "channels_last+resident")  # fmt: skip
Option = Literal["none", "channels_last", "auto", "compile", "channels_last+compile"]


@dataclass(kw_only=True, frozen=True)
class Variant:
    arch: ArchName
    engine: Engine = "ddp"
    precision: Precision = "fp32"
    option: Option = "none"

    @property
    def channels_last(self) -> bool | None:
        """``None`` for option ``auto``: the product's own rule decides (``hpcvae.hardware``)."""
        return None if self.option == "auto" else "channels_last" in self.option

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
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"unknown precision {self.precision!r} (choices: auto, fp32, bf16, fp16)")
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
    """Also time cvae2 under PyTorch Lightning (``Trainer(precision=...)``), the peer users would pick."""
    bare: bool = True
    """Also time the bare loop (the seed's cvae2 on one fixed batch: the floor any framework reaches)."""
    peer_precisions: tuple[str, ...] = ("fp32", "bf16")
    """Precisions of the bare loop and Lightning rows (the bare loop in both layouts)."""
    rounds: int = 3
    """Times the whole list runs, in alternating order; ratios are paired per round."""
    emulated_steps: int = 2
    """Timed steps of a row whose precision the device only emulates (first round only)."""
    tag: str = ""
    """Appended to the results' file names (``epoch_time-<device>-<date>-<tag>``), to keep two runs of a day."""

    def __post_init__(self) -> None:
        if not self.variants:
            raise ConfigError("no variants to run (check --archs/--engines/--precisions/--options)")
        if self.batch_size < 1 or self.steps < 1 or self.warmup < 0:
            raise ConfigError("--batch-size and --steps must be >= 1, --warmup >= 0")
        if self.num_workers < 0:
            raise ConfigError("--num-workers must be >= 0")
        if self.rounds < 1 or self.emulated_steps < 1:
            raise ConfigError("--rounds must be >= 1")
        bad = [p for p in self.peer_precisions if p not in peers.LIGHTNING_PRECISION]
        if bad:
            raise ConfigError(f"--peer-precisions: unknown precision {bad[0]!r} (choices: fp32, bf16, fp16)")


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


def _spawn(kind: str, what: str, job: dict[str, Any], workdir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one variant in a fresh interpreter; its failure is recorded, not fatal."""
    jobfile = workdir / f"job-{kind}-{re.sub(r'[^A-Za-z0-9.-]+', '_', what)}.json"
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


@dataclass(kw_only=True, frozen=True)
class Row:
    """One line of the results: ours (a Variant) or a peer (seed, bare, lightning) in a precision and layout."""

    kind: Literal["ours", "seed", "bare", "lightning"]
    arch: str
    precision: str
    channels_last: bool | None = None
    variant: Variant | None = None

    @property
    def label(self) -> str:
        if self.variant is not None:
            return self.variant.name
        if self.kind == "seed":
            return f"seed {self.arch} (fp32, h5py loader, .item() per step)"
        if self.kind == "bare":
            return f"bare {self.arch} {self.precision}{' channels_last' if self.channels_last else ''} (fixed batch)"
        return f"lightning {self.arch} {peers.LIGHTNING_PRECISION[self.precision]}"


def plan_rows(cfg: EpochTimeConfig) -> list[Row]:
    """Every row of one round: the seed, the bare loop and Lightning around our variants."""
    rows = [Row(kind="ours", arch=v.arch, precision=v.precision, channels_last=v.channels_last, variant=v)
            for v in cfg.variants]  # fmt: skip
    if cfg.seed_baseline:
        rows += [
            Row(kind="seed", arch=a, precision="fp32")
            for a in sorted({SEED_REF[v.arch] for v in cfg.variants})
        ]
    if cfg.bare:
        rows += [Row(kind="bare", arch=PEER_ARCH, precision=p, channels_last=cl)
                 for p in cfg.peer_precisions for cl in (False, True)]  # fmt: skip
    if cfg.lightning:
        rows += [Row(kind="lightning", arch=PEER_ARCH, precision=p) for p in cfg.peer_precisions]
    return rows


def _emulated(precision: str, caps: Any) -> bool:
    return (precision == "bf16" and not caps.native_bf16) or (precision == "fp16" and not caps.native_fp16)


def run(cfg: EpochTimeConfig, out: Path) -> dict[str, Any]:
    from benchmarks.epoch_report import render_md
    from hpcvae import hardware

    device = common.pick_device()
    env = common.environment(device)
    caps = hardware.capabilities(device)
    prec, layout = hardware.resolve_training("auto", None, device)
    env["capabilities"] = caps.to_dict()
    env["auto"] = {
        "precision": prec.value,
        "channels_last": layout.value,
        "reason": f"{prec.reason}; {layout.reason}",
    }
    print(f"epoch_time: device {env['device']} ({env['device_description']}); load {env['loadavg_start']}")
    print(f"epoch_time: native bf16 {caps.native_bf16}, native fp16 {caps.native_fp16}; auto picks "
          f"{prec.value}, channels_last {layout.value}")  # fmt: skip
    env["matmul_tflops"] = {
        "fp32": common.matmul_tflops(device, torch.float32),
        "bf16": common.matmul_tflops(device, torch.bfloat16),
    }
    env["bf16_peak_tflops"] = common.bf16_peak_tflops(device)
    print(
        f"epoch_time: measured matmul {env['matmul_tflops']['fp32']:.3f} TFLOP/s fp32, "
        f"{env['matmul_tflops']['bf16']:.3f} TFLOP/s bf16; data-sheet bf16 peak {env['bf16_peak_tflops']}"
    )
    rows = plan_rows(cfg)
    runs: dict[str, list[dict[str, Any]]] = {r.label: [] for r in rows}
    with tempfile.TemporaryDirectory(prefix="hpcvae-bench-", dir=cfg.workdir) as tmp:
        workdir = Path(tmp)
        sizes = dict.fromkeys(cfg.image_size or (128 if v.arch == "vae128" else 158) for v in cfg.variants)
        if cfg.seed_baseline or cfg.bare or cfg.lightning:
            sizes.setdefault(158, None)  # the seed's modules, the bare loop and Lightning run at 158
        data: dict[int, dict[str, Any]] = {}
        for size in sizes:
            _, _, info = prepare_data(cfg, workdir, size)
            data[size] = info
            print(f"epoch_time: data {size}x{size}: {info['n_train']} train images (pool {info['pool']} rendered "
                  f"in {info['render_pool_s']:.1f} s, set in {info['make_set_s']:.1f} s)")  # fmt: skip
        base = {"batch_size": cfg.batch_size, "warmup": cfg.warmup, "flavour": cfg.flavour, "nf": cfg.nf,
                "z_dim": cfg.z_dim, "num_workers": cfg.num_workers, "profile": cfg.profile}  # fmt: skip
        for k in range(cfg.rounds):
            for row in rows if k % 2 == 0 else rows[::-1]:  # alternate, so the load's drift is paired out
                emulated = _emulated(row.precision, caps)
                if emulated and k > 0:
                    continue
                steps = cfg.emulated_steps if emulated else cfg.steps
                size = cfg.image_size or (128 if row.arch == "vae128" else 158) if row.kind == "ours" else 158
                info = data[size]
                job = {**base, "steps": steps, "seed_steps": cfg.seed_steps or steps, "precision": row.precision,
                       "channels_last": row.channels_last, "transform": info["transform"], "shards": info["shards"],
                       "seed_h5": info["seed_h5"], "round": k, "arch": row.arch}  # fmt: skip
                if row.variant is not None:
                    job["variant"] = asdict(row.variant)
                res = _spawn(row.kind, f"{row.label}-r{k}", job, workdir, cfg.variant_timeout_s)
                resolved = (res.get("resolved") or {}).get("precision", row.precision)
                res.update(derive(res, cfg.batch_size, env, resolved))
                runs[row.label].append(res)
                print_row(f"{row.label} [round {k + 1}]", res)
    env["loadavg_end"] = common.loadavg()
    results = [merge_runs(row, runs[row.label], cfg.batch_size, env) for row in rows]
    pair_ratios(results)
    payload = {
        "benchmark": "epoch_time",
        "environment": env,
        "config": {**asdict(cfg), "variants": [v.name for v in cfg.variants]},
        "data": data,
        "flop_check": flop_check(results),
        "results": results,
        "fastest": fastest_precision(results),
    }
    stem = common.result_stem("epoch_time", device) + (f"-{cfg.tag}" if cfg.tag else "")
    common.write_results(out, stem, payload, render_md(payload))
    if Path(out).resolve() == common.RESULTS_DIR.resolve():
        common.update_index(out)
    print(f"epoch_time: wrote {Path(out) / stem}.json and .md")
    return payload


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


SMOKE_VARIANTS = ("cvae2:ddp:fp32:none", "cvae2:ddp:auto:auto")
"""What --smoke runs unless told otherwise: the seed's pick, plain and as ``--precision auto`` picks."""
DEFAULT_VARIANTS = ("cvae2:ddp:auto:auto", "cvae2:ddp:fp32:none", "cvae2:ddp:fp32:channels_last",
                    "cvae2:ddp:bf16:channels_last")  # fmt: skip
"""A full run without --archs/--precisions/--options: the defaults against fp32 and bf16 in both layouts."""


def build_config(args: argparse.Namespace) -> EpochTimeConfig:
    explicit = any((args.archs, args.engines, args.precisions, args.options))
    variants: list[Variant] = []
    if explicit:
        archs = _csv(args.archs or "cvae2")
        engines = _csv(args.engines or "ddp")
        precisions = _csv(args.precisions or "auto,fp32,bf16")
        options = _csv(args.options or "auto,none,channels_last")
        variants = [
            Variant(arch=a, engine=e, precision=p, option=o)  # type: ignore[arg-type]
            for a in archs
            for e in engines
            for p in precisions
            for o in options
        ]
    elif not args.extra:
        variants = [Variant.parse(x) for x in (SMOKE_VARIANTS if args.smoke else DEFAULT_VARIANTS)]
    variants += [Variant.parse(x) for x in args.extra or []]
    peer_precisions = tuple(_csv(args.peer_precisions)) if args.peer_precisions else ("fp32", "bf16")
    common_kw = dict(variants=variants, seed_steps=args.seed_steps, workdir=args.workdir, profile=args.profile,
                     lightning=not args.no_lightning, bare=not args.no_bare, tag=args.tag,
                     peer_precisions=peer_precisions, seed_baseline=not args.no_seed)  # fmt: skip
    if args.smoke:
        # Debug-width models at the seed's 158 so the seed's own modules (fixed at 158) run beside them.
        return EpochTimeConfig(**common_kw, batch_size=args.batch_size or 8, steps=args.steps or 2, warmup=1,
                               flavour="debug", image_size=158, nf=4, z_dim=8,
                               num_workers=args.num_workers if args.num_workers is not None else 0, pool=8,
                               variant_timeout_s=120, rounds=args.rounds or 1, emulated_steps=1)  # fmt: skip
    return EpochTimeConfig(**common_kw, batch_size=args.batch_size or 64, steps=args.steps or 5, warmup=args.warmup,
                           flavour=args.flavour, image_size=args.image_size, nf=args.nf, z_dim=args.z_dim,
                           num_workers=args.num_workers if args.num_workers is not None else 2, pool=args.pool,
                           rounds=args.rounds or 3, emulated_steps=args.emulated_steps)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.epoch_time", description=__doc__.splitlines()[0])
    ap.add_argument("--archs", help=f"comma list (default cvae2; any of {','.join(ARCHS)})")
    ap.add_argument("--engines", help="comma list of ddp,deepspeed (default ddp)")
    ap.add_argument("--precisions", help="comma list of auto,fp32,bf16,fp16 (default auto,fp32,bf16)")
    ap.add_argument("--options", help=f"comma list of {','.join(OPTIONS)} (default auto,none,channels_last)")
    ap.add_argument(
        "--extra", action="append", help="one more variant arch:engine:precision:option (repeatable)"
    )
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--steps", type=int, help="timed steps per row and round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--rounds", type=int, help="runs of the whole list, alternating order (default 3; smoke 1)"
    )
    ap.add_argument(
        "--emulated-steps", type=int, default=2, help="timed steps of rows in an emulated precision"
    )
    ap.add_argument("--seed-steps", type=int, help="timed steps of the seed loop (default --steps)")
    ap.add_argument(
        "--peer-precisions", help="comma list for the bare loop and Lightning (default fp32,bf16)"
    )
    ap.add_argument("--no-seed", action="store_true", help="skip the seed baseline")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare loop")
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
        "--smoke", action="store_true", help="tiny run (< 2 min on 2 CPU cores): checks the suite works"
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
    timers = {"seed": peers.time_seed, "bare": peers.time_bare, "lightning": peers.time_lightning}
    if job["kind"] in timers:
        res = timers[job["kind"]](job["arch"], job)
    else:
        res = time_ours(Variant(**job["variant"]), job)
    res["round"] = job.get("round", 0)
    Path(job["result"]).write_text(json.dumps(common.finite_or_none(res)))
    return 0


if __name__ == "__main__":
    run_cli(main, "benchmarks.epoch_time")
