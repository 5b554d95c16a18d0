"""What every benchmark shares: the machine's identity, peak rates, FLOPs, memory, results files.

A benchmark number is only useful with its context (device, versions, load, config), so
every result file carries it; and a time without a ratio to the seed, or an MFU, says
little about whether it is good.  The shard writer here makes large shard sets cheaply
(rotations, flips and noise re-draws of a small rendered pool) for the scale tests.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

COSMOS_EPOCH = 81_499
"""Galaxies in the seed's COSMOS set (one epoch)."""
BIG_EPOCH = 314_000
"""The seed's named next step."""

SEED_CVAE2_GFLOP_PER_IMAGE = 6.5
"""cvae2 at 158x158, forward+backward, as stated in the issue; printed next to our count."""

# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets.
GPU_BF16_PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}


# ----------------------------------------------------------------------------------------
# Machine and environment


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_label(device: torch.device) -> str:
    """``cpu-2core`` or the GPU's name as a file-name-safe slug (``nvidia-h100-80gb-hbm3``)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")
    return f"cpu-{os.cpu_count()}core"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, ISA {torch.backends.cpu.get_cpu_capability()}"


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The data-sheet dense bf16 peak; ``None`` on CPU (no published figure to trust)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(GPU_BF16_PEAK_TFLOPS, key=len, reverse=True):
        if all(tok.lower() in name.lower() for tok in key.split()):
            return GPU_BF16_PEAK_TFLOPS[key]
    return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import hpcvae

        out["hpcvae"] = hpcvae.__version__
    except ImportError:  # pragma: no cover - the package is installed editable
        out["hpcvae"] = "missing"
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except Exception as exc:  # noqa: BLE001 - deepspeed import can fail in many ways
        out["deepspeed"] = f"unavailable ({type(exc).__name__})"
    try:
        import subprocess

        out["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["git"] = "unknown"
    return out


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "device": device_label(device),
        "device_description": device_description(device),
        "gpu_available": torch.cuda.is_available(),
        "versions": versions(),
        "loadavg_start": loadavg(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "argv": sys.argv,
    }


# ----------------------------------------------------------------------------------------
# Memory


def peak_rss_mb() -> float:
    """Peak resident set of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb(pid: int | None = None) -> float:
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return float("nan")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            kids.extend(int(k) for k in text)
    except OSError:
        pass
    return kids


def tree_rss_mb(pid: int | None = None) -> float:
    """RSS of a process and all its descendants (DataLoader workers included)."""
    root = pid or os.getpid()
    total, todo = 0.0, [root]
    while todo:
        p = todo.pop()
        r = current_rss_mb(p)
        if not math.isnan(r):
            total += r
        todo.extend(_children(p))
    return total


class RssSampler:
    """Samples the process tree's RSS in a thread; ``peak`` is the largest sum seen.

    ``ru_maxrss`` alone misses DataLoader workers, and summing per-process peaks
    overstates memory that was never held at the same time.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb())
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_mb())


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(value, what it is): allocator peak on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    return peak_rss_mb(), "peak RSS (ru_maxrss, whole process)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------
# Rates


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """A big square matmul, timed: the rate this device really reaches in this run.

    Without ``n`` the side grows from 256 until one product takes 0.1 s (at most 8192 on a GPU,
    2048 on a CPU): an emulated dtype (bf16 on a CPU without AVX512-BF16 ran at ~1 GFLOP/s here)
    would take minutes at the full size.
    """
    if n is None:
        cap = 8192 if device.type == "cuda" else 2048
        n = 256
        while n < cap:
            a = torch.randn(n, n, device=device, dtype=dtype)
            sync(device)
            t0 = time.perf_counter()
            a @ a
            sync(device)
            if time.perf_counter() - t0 > 0.1:
                break
            n *= 2
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def summarise(times: Sequence[float]) -> dict[str, float]:
    a = np.asarray(times, dtype=np.float64)
    if a.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "min": float(a.min()),
        "max": float(a.max()),
    }


# ----------------------------------------------------------------------------------------
# Results files


def finite_or_none(x: Any) -> Any:
    """JSON has no NaN/inf; a number that is not finite is written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def md_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(key)) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def env_md(env: dict[str, Any]) -> str:
    v = env["versions"]
    lines = [
        f"- device: `{env['device']}` ({env['device_description']})",
        f"- GPU available: {'yes' if env['gpu_available'] else 'no — this run had no GPU; all figures are CPU'}",
        f"- versions: python {v['python']}, torch {v['torch']}, hpcvae {v['hpcvae']}, deepspeed {v['deepspeed']}, git {v.get('git', '?')}",
        f"- date: {env['date']}",
        f"- load average (1/5/15 min) at start: {env['loadavg_start']}, at end: {env.get('loadavg_end', '?')}"
        " — other engineers share this machine, so times on a loaded CPU are upper bounds",
        f"- command: `{' '.join(env['argv'])}`",
    ]
    return "\n".join(lines)


def write_results(out: str | Path, stem: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jp = out / f"{stem}.json"
    mp = out / f"{stem}.md"
    jp.write_text(json.dumps(finite_or_none(payload), indent=2, default=str) + "\n")
    mp.write_text(markdown.rstrip() + "\n")
    return jp, mp


_RESULT_NAME = re.compile(r"^(?P<kind>[a-z_]+)-(?P<device>.+?)-(?P<date>\d{4}-\d{2}-\d{2})(?:-(?P<tag>.+))?$")


def _result_key(f: Path) -> tuple[str, str, str, str]:
    """(kind, device, date, tag) from ``<kind>-<device>-<YYYY-MM-DD>[-<tag>].md``; unparsable names sort last."""
    m = _RESULT_NAME.match(f.stem)
    if m is None:
        return f.stem, "", "", ""
    return m["kind"], m["device"], m["date"], m["tag"] or ""


def update_index(results_dir: str | Path = RESULTS_DIR) -> Path:
    """Rewrite ``results/README.md``: the newest result file of each kind, device and tag first.

    Newest by the date in the name, not the file's mtime: a fresh clone gives every file the same mtime.
    """
    results_dir = Path(results_dir)
    files = [f for f in results_dir.glob("*.md") if f.name != "README.md"]
    files.sort(key=lambda f: (_result_key(f)[2], f.stat().st_mtime, f.name), reverse=True)
    lines = [
        "# Benchmark results",
        "",
        "Made by the `python -m benchmarks.<name>` commands (epoch_time, data_throughput, science,",
        "scaling; see the README's Benchmarks); each `.md` has a `.json` twin with every number.",
        "Newest first.",
        "",
    ]
    seen: set[tuple[str, str, str]] = set()
    for f in files:
        kind, device, _, tag = _result_key(f)
        latest = "" if (kind, device, tag) in seen else " (latest)"
        seen.add((kind, device, tag))
        lines.append(f"- [{f.name}]({f.name}){latest}")
    path = results_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def result_stem(kind: str, device: torch.device) -> str:
    return f"{kind}-{device_label(device)}-{datetime.date.today().isoformat()}"


# ----------------------------------------------------------------------------------------
# Cheap big shard sets for the scale tests


@dataclass(kw_only=True)
class Pool:
    """A small set of rendered galaxies that big sets are drawn from."""

    images: np.ndarray
    """N x H x W float32 physical pixels."""
    redshifts: np.ndarray
    """N float32 (zphot)."""
    noise_sigma: float
    """Pixel noise of the pool, re-drawn for every derived image."""


def render_pool(n: int, size: int, workdir: str | Path, seed: int = 0, workers: int = 1) -> Pool:
    """Render ``n`` GalSim galaxies with ``hpcvae.synth`` and read them back through our shards.

    Going through ``make_synthetic`` and ``build_shards`` (not a private renderer) means
    the pool has the pixel statistics the product's own pipeline produces.
    """
    from hpcvae.shards import build_shards
    from hpcvae.synth import make_synthetic

    workdir = Path(workdir)
    cat_dir = workdir / "synth"
    shard_dir = workdir / "pool-shards"
    if not (shard_dir / "manifest.json").is_file():
        catalog = make_synthetic(n, size, cat_dir, seed=seed, workers=workers)
        build_shards(catalog, shard_dir, size=size, val_fraction=0.0, overwrite=True)
    images, redshifts = read_shard_images(shard_dir)
    # Noise estimate from the border pixels, where the stamps are sky only.
    border = np.concatenate([images[:, :3, :].ravel(), images[:, -3:, :].ravel()])
    sigma = float(1.4826 * np.median(np.abs(border - np.median(border))))
    return Pool(images=images, redshifts=redshifts, noise_sigma=max(sigma, 1e-6))


def read_shard_images(
    folder: str | Path, splits: Sequence[str] = ("train", "val")
) -> tuple[np.ndarray, np.ndarray]:
    """All images and redshifts of a shard set (``hpcvae.shards.manifest.iter_samples``)."""
    from hpcvae.shards.manifest import Manifest, iter_samples

    m = Manifest.load(folder)
    images: list[np.ndarray] = []
    zs: list[float] = []
    for split in (s for s in splits if s in m.splits):
        for _, img, meta in iter_samples(m, split):
            images.append(img)
            z = meta.get("zphot")
            zs.append(float(z) if z is not None else 0.0)
    return np.stack(images), np.asarray(zs, dtype=np.float32)


def _fit(images: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or zero-pad a stack to ``size`` x ``size`` (the shard format's ``pad: zeros``)."""
    n, h, w = images.shape
    out = np.zeros((n, size, size), dtype=np.float32)
    ch, cw = min(h, size), min(w, size)
    sy, sx = (h - ch) // 2, (w - cw) // 2
    dy, dx = (size - ch) // 2, (size - cw) // 2
    out[:, dy : dy + ch, dx : dx + cw] = images[:, sy : sy + ch, sx : sx + cw]
    return out


def make_big_set(
    n: int,
    size: int,
    out: str | Path,
    pool: Pool,
    *,
    per_shard: int = 1000,
    val_fraction: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    dtype: str = "float32",
) -> Path:
    """Write an ``n``-galaxy shard set derived from ``pool``, straight in the shard format.

    Each galaxy is a pool image under one of the 8 rotations/flips with its noise
    re-drawn, so no two derived images are byte-identical and the loader cannot be
    flattered by repeated content.  Shards hold ``per_shard`` samples whatever ``n`` is,
    so comparing two sizes changes only how many shards there are.
    """
    from tqdm import tqdm

    from hpcvae.shards.format import sample_key
    from hpcvae.shards.manifest import SetWriter

    base = _fit(pool.images, size)
    npool = base.shape[0]
    rng = np.random.default_rng(seed)
    writer = SetWriter(out, per_shard=per_shard, stats_every=64)
    block = 1024
    bar = tqdm(total=n, desc=f"make_big_set {size}x{size}", unit="gal", disable=not progress, mininterval=1.0)
    for start in range(0, n, block):
        m = min(block, n - start)
        idx = rng.integers(0, npool, size=m)
        imgs = base[idx]
        k = rng.integers(0, 4, size=m)
        flip = rng.integers(0, 2, size=m).astype(bool)
        for r in range(1, 4):
            sel = k == r
            imgs[sel] = np.rot90(imgs[sel], r, axes=(1, 2))
        imgs[flip] = imgs[flip, :, ::-1]
        imgs = imgs + rng.normal(0.0, pool.noise_sigma, size=imgs.shape).astype(np.float32)
        if dtype == "float16":  # stored as hpcvae.shard --dtype float16 stores them
            imgs = imgs.astype(np.float16)
        for j in range(m):
            row = start + j
            ident = f"big{row}"
            h = int.from_bytes(hashlib.sha256(f"{ident}:big:{row}".encode()).digest()[:8], "big")
            meta = {
                "ident": ident,
                "row": row,
                "zphot": float(pool.redshifts[idx[j]]),
                "mag": 0.0,
                "pixel_scale": 0.03,
                "noise_variance": pool.noise_sigma**2,
                "orig_shape": [size, size],
                "file": "make_big_set",
                "hdu": int(idx[j]),
            }
            writer.add("val" if h / 2**64 < val_fraction else "train", sample_key(row), imgs[j], meta)
        bar.update(m)
    bar.close()
    source = {"kind": "h5", "catalog": f"benchmarks.common.make_big_set(pool={npool})", "catalog_sha256": "",
              "fits_catalog": None, "fits_catalog_sha256": None}  # fmt: skip
    writer.finish(size=size, source=source, has_redshift=True, redshift_column="zphot", n_rows=n,
                  val_fraction=val_fraction, dtype=dtype)  # fmt: skip
    return Path(out)


def dir_size_mb(path: str | Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def job_env() -> dict[str, str]:
    """One thread per process: with several jobs on 2 shared cores, more threads only spin-wait."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_jobs(jobs: list[tuple[str, list[str], Path]], parallel: int) -> dict[str, float]:
    """Run ``(name, argv, log)`` commands, ``parallel`` at a time; wall seconds per job. Fails loudly."""
    pending, running, times = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, argv, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            fh = open(log, "w")
            print(f"  start {name}: {' '.join(argv[2:])}", flush=True)
            running[name] = (subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=job_env(), cwd=Path(__file__).resolve().parents[1]),
                             fh, time.perf_counter(), log)  # fmt: skip
        time.sleep(0.5)
        for name in list(running):
            proc, fh, t0, log = running[name]
            if proc.poll() is None:
                continue
            fh.close()
            del running[name]
            times[name] = time.perf_counter() - t0
            if proc.returncode != 0:
                tail = log.read_text()[-2000:]
                raise SystemExit(f"{name} failed with exit code {proc.returncode}; log {log}:\n{tail}")
            print(f"  done  {name} in {times[name]:.0f} s", flush=True)
    return times
