"""Data-path benchmarks: loader images/s against the seed's h5py loader, sharding galaxies/s,
the GPU-resident path, and the loader's peak RSS on a 314,000-galaxy shard set.

``python -m benchmarks.data_throughput [--smoke] --out DIR``

Loader: our ``ShardData`` train loader (num_workers 0 and 2) and the seed's
``DataLoader(h5py Dataset, batch_size=64, shuffle=True)`` read the *same* images (the
shard set's train split written to an h5 file in the seed's layout), both from the page
cache, both producing normalised float32 (B, 1, H, W) batches.  Epoch 0 includes worker
start-up; epoch 1 is the steady rate that a multi-epoch run sees.

RSS: one full epoch of the loader over shard sets of different sizes, each in a fresh
process, sampling the RSS of the process tree (main + workers) every 50 ms.  The sets
share image size, shard size and loader settings, so only N changes; a loader whose
memory does not grow with N shows the same peak at 10k and 314k galaxies.  314,000 x
158² float32 is 31 GB, too big for this disk budget, so the full 314k set uses 32² images
(and the 158² set is checked at smaller N); what could grow with N (index arrays, shard
lists, key lists, the manifest) grows the same way whatever the image side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.data_report import print_loader, print_rss, render_md
from hpcvae.cli import run_cli
from hpcvae.errors import ConfigError


@dataclass(kw_only=True)
class DataBenchConfig:
    """What one invocation measures and at which sizes."""

    image_size: int = 158
    loader_n: int = 4096
    """Galaxies in the loader-throughput set."""
    batch_size: int = 64
    workers: tuple[int, ...] = (0, 2)
    epochs: int = 2
    """Loader epochs timed per configuration (epoch 0 includes worker start-up)."""
    pool: int = 64
    """Galaxies rendered with hpcvae.synth for the derived sets."""
    shard_n: int = 4000
    """Galaxies sharded by hpcvae.shard.build_shards for the sharding rate."""
    shard_workers: tuple[int, ...] = (1, 2)
    rss_sizes: tuple[int, ...] = (10_000, 314_000)
    rss_image_size: int = 32
    rss_small_sizes: tuple[int, ...] = (3_000, 8_000)
    """Sizes of the RSS check at ``image_size`` (158²): the real image side, smaller N.  Both exceed
    ``workers x shuffle_buffer`` (2 x 1000), so the shuffle buffers are full in both and only N differs."""
    rss_workers: tuple[int, ...] = (0, 2)
    per_shard: int = 1000
    workdir: str | None = None
    keep_big_set: bool = False

    def __post_init__(self) -> None:
        if self.loader_n < 2 * self.batch_size:
            raise ConfigError(f"--loader-n must be at least 2 batches ({2 * self.batch_size})")
        if self.epochs < 1:
            raise ConfigError("--epochs must be >= 1")
        if any(n < self.batch_size for n in (*self.rss_sizes, *self.rss_small_sizes)):
            raise ConfigError("every RSS set must hold at least one batch")


# ----------------------------------------------------------------------------------------
# Loader throughput


SMOKE = DataBenchConfig(
    image_size=64,
    loader_n=512,
    batch_size=32,
    workers=(0, 2),
    epochs=2,
    pool=8,
    shard_n=64,
    shard_workers=(1,),
    rss_sizes=(500, 2_000),
    rss_image_size=32,
    rss_small_sizes=(),
    rss_workers=(0,),
    per_shard=250,
)


def _time_epochs(make_iter, epochs: int, batch_size: int) -> list[dict[str, float]]:
    """Iterate ``epochs`` full epochs; images/s per epoch, touching every batch's pixels."""
    out = []
    for e in range(epochs):
        n, t0 = 0, time.perf_counter()
        checksum = 0.0
        for batch in make_iter(e):
            x = batch["image"] if isinstance(batch, dict) else batch[0]
            n += int(x.shape[0])
            checksum += float(x[:, 0, 0, 0].sum())  # forces the tensor to be real, cheaply
        dt = time.perf_counter() - t0
        out.append(
            {"epoch": e, "images": n, "seconds": dt, "images_per_s": n / dt if dt > 0 else float("nan")}
        )
    return out


def bench_ours(shards: Path, cfg: DataBenchConfig, workers: int) -> dict[str, Any]:
    from hpcvae.config import DataConfig
    from hpcvae.data import ShardData
    from hpcvae.shards.manifest import Manifest
    from hpcvae.transforms import get_transform

    m = Manifest.load(shards)
    t = get_transform("minmax", m.stats("train"))
    dcfg = DataConfig(path=str(shards), batch_size=cfg.batch_size, num_workers=workers)
    t0 = time.perf_counter()
    data = ShardData(dcfg, m, rank=0, world_size=1, seed=0, transform=t)
    setup = time.perf_counter() - t0
    epochs = _time_epochs(lambda e: data.train_loader(e), cfg.epochs, cfg.batch_size)
    return {"loader": f"ours ShardData num_workers={workers}", "setup_s": setup, "epochs": epochs}


def bench_seed(h5: Path, lo: float, hi: float, cfg: DataBenchConfig, workers: int) -> dict[str, Any]:
    from benchmarks.seed_baseline import seed_loader

    t0 = time.perf_counter()
    loader = seed_loader(h5, lo, hi, batch_size=cfg.batch_size, num_workers=workers)
    setup = time.perf_counter() - t0
    epochs = _time_epochs(lambda e: loader, cfg.epochs, cfg.batch_size)
    label = f"seed h5py Dataset + DataLoader(batch_size={cfg.batch_size}, shuffle=True)"
    if workers:
        label += f", num_workers={workers} (not the seed's; like-for-like)"
    return {"loader": label, "setup_s": setup, "epochs": epochs}


def bench_resident(shards: Path, cfg: DataBenchConfig) -> dict[str, Any]:
    """The GPU-resident path (on the current device; on CPU it measures the in-memory shuffle/gather)."""
    from hpcvae import data as hdata
    from hpcvae.config import DataConfig
    from hpcvae.shards.manifest import Manifest
    from hpcvae.transforms import get_transform

    if not hasattr(hdata, "GpuResidentData"):
        return {"loader": "GpuResidentData", "error": "hpcvae.data has no GpuResidentData"}
    device = common.pick_device()
    m = Manifest.load(shards)
    t = get_transform("minmax", m.stats("train"))
    dcfg = DataConfig(path=str(shards), batch_size=cfg.batch_size, num_workers=0, gpu_resident=True)
    t0 = time.perf_counter()
    data = hdata.GpuResidentData(dcfg, m, rank=0, world_size=1, seed=0, transform=t, device=device)
    common.sync(device)
    load = time.perf_counter() - t0
    epochs = _time_epochs(lambda e: data.train_loader(e), cfg.epochs, cfg.batch_size)
    return {
        "loader": f"GpuResidentData on {device.type} (fp16 storage)",
        "setup_s": load,
        "epochs": epochs,
        "note": "setup_s = reading every shard once into device memory",
    }


def bench_verify(shards: Path, workdir: Path, loader_images_per_s: float | None) -> dict[str, Any]:
    """What ``data.verify`` costs: the first check (sha256 of every shard) and a resume's (cached)."""
    from hpcvae.dist import DistInfo
    from hpcvae.shards.manifest import Manifest, verify_for_run

    m = Manifest.load(shards)
    run_dir = workdir / "verify-run"
    run_dir.mkdir(exist_ok=True)
    dist = DistInfo()  # one process: the first check's cost on one core
    nbytes = sum((m.root / s.name).stat().st_size for sp in m.splits for s in m.shards(sp))
    t0 = time.perf_counter()
    verify_for_run(m, run_dir, dist)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    verify_for_run(m, run_dir, dist)
    cached = time.perf_counter() - t0
    n = m.count("train")
    epoch_s = n / loader_images_per_s if loader_images_per_s else None
    return {"bytes": nbytes, "first_check_s": first, "first_check_gb_per_s": nbytes / first / 1e9,
            "cached_check_s": cached, "loader_epoch_s": epoch_s,
            "first_check_over_epoch": first / epoch_s if epoch_s else None}  # fmt: skip


def _steady(res: dict[str, Any]) -> float | None:
    eps = res.get("epochs") or []
    return eps[-1]["images_per_s"] if eps else None


# ----------------------------------------------------------------------------------------
# Sharding rate


def bench_sharding(workdir: Path, cfg: DataBenchConfig, h5: Path) -> list[dict[str, Any]]:
    """Sharding rate: ``benchmarks.shard_throughput`` (RGC FITS input) and ``build_shards_from_h5`` on the seed's h5.

    The FITS rate runs in ``shard_throughput``'s own process: ``build_shards`` starts its
    workers with ``spawn``, which re-imports the parent's main module, so running it from
    here would bill each worker for importing torch, which the product CLI does not pay.
    The h5 rate is timed in-process with one worker for the same reason.
    """
    from hpcvae.shards import build_shards_from_h5

    rows: list[dict[str, Any]] = []
    js = workdir / "shard_throughput.json"
    cmd = [sys.executable, "-m", "benchmarks.shard_throughput", "--n", str(cfg.shard_n), "--size",
           str(cfg.image_size), "--workers", ",".join(map(str, cfg.shard_workers)), "--json", str(js)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0 or not js.is_file():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        rows.append(
            {"source": "RGC FITS (benchmarks.shard_throughput)", "error": f"exit {proc.returncode}: {tail}"}
        )
    else:
        for r in json.loads(js.read_text()):
            rows.append(
                {
                    "source": "RGC FITS (benchmarks.shard_throughput, random stamps)",
                    "workers": r["workers"],
                    "galaxies": r["galaxies"],
                    "seconds": r["seconds"],
                    "galaxies_per_s": r["galaxies_per_s"],
                }
            )
    out = workdir / "sharded-h5"
    t0 = time.perf_counter()
    m = build_shards_from_h5(h5, out, size=cfg.image_size, workers=1, overwrite=True)
    dt = time.perf_counter() - t0
    n = m.count("train") + m.count("val")
    rows.append({"source": "seed h5 (build_shards_from_h5)", "workers": 1, "galaxies": n, "seconds": dt,
                 "galaxies_per_s": n / dt})  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------------------
# RSS against N


def rss_probe(shards: Path, batch_size: int, workers: int) -> dict[str, Any]:
    """Run in a fresh process: one full train epoch, peak RSS of the process tree."""
    from hpcvae.config import DataConfig
    from hpcvae.data import ShardData
    from hpcvae.shards.manifest import Manifest
    from hpcvae.transforms import get_transform

    base = common.tree_rss_mb()
    m = Manifest.load(shards)
    t = get_transform("minmax", m.stats("train"))
    dcfg = DataConfig(path=str(shards), batch_size=batch_size, num_workers=workers)
    t0 = time.perf_counter()
    data = ShardData(dcfg, m, rank=0, world_size=1, seed=0, transform=t)
    setup_s = time.perf_counter() - t0
    after_setup = common.tree_rss_mb()
    n = 0
    t0 = time.perf_counter()
    with common.RssSampler(0.05) as sampler:
        for batch in data.train_loader(0):
            n += int(batch["image"].shape[0])
    dt = time.perf_counter() - t0
    return {
        "n_train": m.count("train"),
        "n_shards": len(m.shards("train")),
        "image_size": m.image_size,
        "workers": workers,
        "images_read": n,
        "seconds": dt,
        "images_per_s": n / dt,
        "setup_s": setup_s,
        "rss_base_mb": base,
        "rss_after_setup_mb": after_setup,
        "rss_peak_tree_mb": sampler.peak,
        "rss_peak_over_base_mb": sampler.peak - base,
        "rss_samples": sampler.samples,
        "main_vmhwm_mb": common.peak_rss_mb(),
    }


def _spawn_probe(shards: Path, batch_size: int, workers: int, timeout_s: float = 900) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.data_throughput",
        "--rss-probe",
        str(shards),
        "--batch-size",
        str(batch_size),
        "--probe-workers",
        str(workers),
    ]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, cwd=Path(__file__).resolve().parents[1]
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "workers": workers}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"error": f"exit {proc.returncode}: {tail}", "workers": workers}
    return json.loads(lines[-1])


def bench_rss(workdir: Path, cfg: DataBenchConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    plan = [(cfg.rss_image_size, n) for n in cfg.rss_sizes] + [
        (cfg.image_size, n) for n in cfg.rss_small_sizes
    ]
    pools: dict[int, common.Pool] = {}
    for size, n in plan:
        if size not in pools:
            pools[size] = common.render_pool(cfg.pool, size, workdir / f"rss-pool-{size}", seed=1, workers=1)
        out = workdir / f"rss-{size}-{n}"
        t0 = time.perf_counter()
        common.make_big_set(n, size, out, pools[size], per_shard=cfg.per_shard, seed=n, progress=True)
        make_s = time.perf_counter() - t0
        info[f"{size}x{size} n={n}"] = {
            "make_big_set_s": make_s,
            "galaxies_per_s": n / make_s,
            "disk_mb": common.dir_size_mb(out),
        }
        for w in cfg.rss_workers:
            r = _spawn_probe(out, cfg.batch_size, w)
            r.setdefault("n_requested", n)
            r.setdefault("image_size", size)
            rows.append(r)
            print_rss(r)
        if not cfg.keep_big_set:
            shutil.rmtree(out, ignore_errors=True)
    return rows, info


# ----------------------------------------------------------------------------------------
# Driver


def run(cfg: DataBenchConfig, out: Path) -> dict[str, Any]:
    device = common.pick_device()
    env = common.environment(device)
    print(f"data_throughput: device {env['device']}; load {env['loadavg_start']}")
    with tempfile.TemporaryDirectory(prefix="hpcvae-databench-", dir=cfg.workdir) as tmp:
        workdir = Path(tmp)
        from benchmarks.seed_baseline import write_seed_h5
        from hpcvae.shards.manifest import Manifest
        from hpcvae.transforms import get_transform

        t0 = time.perf_counter()
        pool = common.render_pool(cfg.pool, cfg.image_size, workdir / "pool", seed=0, workers=1)
        shards = workdir / "loader-set"
        common.make_big_set(
            cfg.loader_n, cfg.image_size, shards, pool, per_shard=cfg.per_shard, progress=False
        )
        images, redshifts = common.read_shard_images(shards, splits=("train",))
        h5 = write_seed_h5(workdir / "seed.h5", images, redshifts)
        n_train = int(images.shape[0])
        del images
        t = get_transform("minmax", Manifest.load(shards).stats("train"))
        prep_s = time.perf_counter() - t0
        print(
            f"data_throughput: loader set {n_train} train images at {cfg.image_size}² ready in {prep_s:.1f} s"
        )

        loaders: list[dict[str, Any]] = []
        for w in cfg.workers:
            r = bench_seed(h5, t.lo, t.hi, cfg, w)
            loaders.append(r)
            print_loader(r)
        for w in cfg.workers:
            r = bench_ours(shards, cfg, w)
            loaders.append(r)
            print_loader(r)
        r = bench_resident(shards, cfg)
        loaders.append(r)
        print_loader(r)
        seed_rate = _steady(loaders[0])
        for r in loaders:
            rate = _steady(r)
            r["images_per_s"] = rate
            r["first_epoch_images_per_s"] = r["epochs"][0]["images_per_s"] if r.get("epochs") else None
            r["speedup_vs_seed"] = rate / seed_rate if rate and seed_rate else None

        verify = bench_verify(shards, workdir, max((r["images_per_s"] or 0) for r in loaders) or None)
        print(
            f"  data.verify: first check {verify['first_check_s']:.2f} s ({verify['first_check_gb_per_s']:.2f} GB/s), "
            f"cached (a resume) {verify['cached_check_s'] * 1e3:.1f} ms"
        )
        sharding = bench_sharding(workdir, cfg, h5)
        for s in sharding:
            print(
                f"  sharding {s['source']:26s} workers={s['workers']}: {s['galaxies']} galaxies "
                f"{s['galaxies_per_s']:,.0f} galaxies/s"
            )
        rss, big_info = bench_rss(workdir, cfg)
    env["loadavg_end"] = common.loadavg()
    payload = {
        "benchmark": "data_throughput",
        "environment": env,
        "config": asdict(cfg),
        "loader_set": {"n_train": n_train, "image_size": cfg.image_size, "prepare_s": prep_s},
        "loaders": loaders,
        "verify": verify,
        "sharding": sharding,
        "rss": rss,
        "rss_sets": big_info,
        "rss_verdict": rss_verdict(rss),
    }
    stem = common.result_stem("data_throughput", device)
    common.write_results(out, stem, payload, render_md(payload))
    if Path(out).resolve() == common.RESULTS_DIR.resolve():
        common.update_index(out)
    print(f"data_throughput: wrote {Path(out) / stem}.json and .md")
    return payload


def rss_verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (image size, workers): the peak at the largest N over the peak at the smallest."""
    out: dict[str, Any] = {}
    ok = [r for r in rows if "error" not in r]
    for key in sorted({(r["image_size"], r["workers"]) for r in ok}):
        group = sorted((r for r in ok if (r["image_size"], r["workers"]) == key), key=lambda r: r["n_train"])
        if len(group) < 2:
            continue
        lo, hi = group[0], group[-1]
        out[f"{key[0]}x{key[0]} workers={key[1]}"] = {
            "n_small": lo["n_train"],
            "n_large": hi["n_train"],
            "peak_small_mb": lo["rss_peak_tree_mb"],
            "peak_large_mb": hi["rss_peak_tree_mb"],
            "growth_mb": hi["rss_peak_tree_mb"] - lo["rss_peak_tree_mb"],
            "growth_ratio": hi["rss_peak_tree_mb"] / lo["rss_peak_tree_mb"],
            "n_ratio": hi["n_train"] / lo["n_train"],
        }
    return out


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def full_scale(
    out: Path, workdir: str | None, n: int = 314_000, size: int = 158, workers: int = 2
) -> dict[str, Any]:
    """Once, not in CI: the 314k x 158^2 set in float16 (about 16 GB), built and streamed for one full epoch."""
    import torch

    device = torch.device("cpu")
    env = common.environment(device)
    with tempfile.TemporaryDirectory(prefix="hpcvae-fullscale-", dir=workdir) as tmp:
        pool = common.render_pool(64, size, Path(tmp) / "pool", seed=0, workers=1)
        shards = Path(tmp) / "set"
        t0 = time.perf_counter()
        common.make_big_set(n, size, shards, pool, per_shard=1000, seed=0, progress=True, dtype="float16")
        build_s = time.perf_counter() - t0
        disk_gb = common.dir_size_mb(shards) * 2**20 / 1e9
        print(
            f"data_throughput: full scale: {n} galaxies at {size}² in float16, {disk_gb:.1f} GB, built in {build_s:.0f} s"
        )
        probe = _spawn_probe(shards, 64, workers, timeout_s=3600)
        free_gb = shutil.disk_usage(tmp).free / 1e9
    env["loadavg_end"] = common.loadavg()
    payload = {"benchmark": "data_throughput_full_scale", "environment": env, "n": n, "image_size": size,
               "dtype": "float16", "build_s": build_s, "build_galaxies_per_s": n / build_s, "disk_gb": disk_gb,
               "disk_free_gb_while_built": free_gb, "epoch": probe}  # fmt: skip
    e = probe
    md = "\n".join([
        f"# Data throughput at full scale — {env['device']} — {env['date'][:10]}", "", common.env_md(env),
        f"- {n:,} galaxies at {size}², float16 shards (`hpcvae.shard --dtype float16`): {disk_gb:.1f} GB on disk, "
        f"built from a 64-galaxy hpcvae.synth pool (rotations, flips, fresh noise) in {build_s:.0f} s "
        f"({n / build_s:,.0f} galaxies/s)",
        (f"- one full train epoch through `ShardData` ({workers} workers, batch 64): {e['images_read']:,} images in "
         f"{e['seconds']:.0f} s = {e['images_per_s']:,.0f} galaxies/s; peak RSS of the process tree "
         f"{e['rss_peak_tree_mb']:,.0f} MB ({e['rss_peak_over_base_mb']:,.0f} MB over the imports)")
        if "error" not in e else f"- the epoch failed: {e['error']}",
        "", "Made once by `python -m benchmarks.data_throughput --full-scale --out benchmarks/results`, not in CI.", "",
    ])  # fmt: skip
    stem = common.result_stem("data_throughput-full-scale", device)
    common.write_results(out, stem, payload, md)
    if Path(out).resolve() == common.RESULTS_DIR.resolve():
        common.update_index(out)
    print(f"data_throughput: wrote {Path(out) / stem}.json and .md")
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.data_throughput", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke", action="store_true", help="tiny run (< 1 min on 2 CPU cores): checks the suite works"
    )
    ap.add_argument("--out", help="results folder (e.g. benchmarks/results)")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--loader-n", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--workers", help="loader workers to time, comma list (default 0,2)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--shard-n", type=int)
    ap.add_argument("--rss-sizes", help="galaxy counts of the big-set RSS check (default 10000,314000)")
    ap.add_argument("--rss-image-size", type=int)
    ap.add_argument(
        "--rss-small-sizes", help="galaxy counts of the RSS check at --image-size (default 1000,4000)"
    )
    ap.add_argument("--rss-workers", help="loader workers for the RSS check (default 0,2)")
    ap.add_argument("--workdir", help="scratch folder (default: the system temp dir)")
    ap.add_argument(
        "--full-scale",
        action="store_true",
        help="once, not in CI: build the 314k x 158^2 set in float16 and stream one full epoch",
    )
    ap.add_argument("--rss-probe", help=argparse.SUPPRESS)
    ap.add_argument("--probe-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_probe:
        print(
            json.dumps(
                common.finite_or_none(
                    rss_probe(Path(args.rss_probe), args.batch_size or 64, args.probe_workers)
                )
            )
        )
        return 0
    if not args.out:
        raise ConfigError("--out DIR is required")
    if args.full_scale:
        full_scale(Path(args.out), args.workdir)
        return 0
    base = SMOKE if args.smoke else DataBenchConfig()
    over: dict[str, Any] = {}
    for name in ("image_size", "loader_n", "batch_size", "epochs", "shard_n", "rss_image_size"):
        v = getattr(args, name)
        if v is not None:
            over[name] = v
    for name in ("workers", "rss_sizes", "rss_small_sizes", "rss_workers"):
        v = getattr(args, name)
        if v is not None:
            over[name] = _ints(v)
    cfg = DataBenchConfig(**{**asdict(base), **over, "workdir": args.workdir})
    run(cfg, Path(args.out))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_cli(main, "benchmarks.data_throughput")
