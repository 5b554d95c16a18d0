"""Sharding throughput: galaxies/s (and per worker) of ``hpcvae.shard`` on an RGC-layout set.

``python -m benchmarks.shard_throughput [--n 20000] [--size 158] [--workers 1,2] [--synth] [--json FILE]``

The input is made on the fly in a temp folder: random non-square float32 stamps (sizes
around ``size``, so both crop and pad paths run) in multi-extension files of
``--per-file`` HDUs plus a catalog, written with fitsio; or, with ``--synth``, GalSim
galaxies from ``hpcvae.synth.make_synthetic``.  The timing covers the whole
``build_shards`` call: catalog read, FITS reads, crop/pad, tar writing with sha256,
stats and manifest; the input files are in the page cache (warm), as on a second run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import fitsio
import numpy as np

from hpcvae.shards import build_shards


def make_random_rgc(folder: Path, n: int, size: int, *, per_file: int = 1000, seed: int = 0) -> Path:
    """Random RGC layout: stamps of (size +- 25%) x (size +- 25%) pixels, a pool reused to save time."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(64):
        h, w = rng.integers(int(size * 0.75), int(size * 1.25) + 1, size=2)
        pool.append((rng.standard_normal((h, w), dtype=np.float32) * 0.01).astype(">f4"))
    names, hdus = [], []
    for start in range(0, n, per_file):
        name = f"images_{start // per_file:03d}.fits"
        with fitsio.FITS(str(folder / name), "rw", clobber=True) as f:
            for i in range(start, min(n, start + per_file)):
                f.write(pool[i % len(pool)])
                names.append(name)
                hdus.append(i - start)
    cat = np.zeros(
        n, dtype=[("IDENT", ">i8"), ("GAL_FILENAME", "S24"), ("GAL_HDU", ">i4"), ("NOISE_VARIANCE", ">f8")]
    )
    cat["IDENT"] = np.arange(n)
    cat["GAL_FILENAME"] = names
    cat["GAL_HDU"] = hdus
    cat["NOISE_VARIANCE"] = 1e-4
    path = folder / "catalog.fits"
    fitsio.write(str(path), cat, clobber=True)
    return path


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the pool's workers), so a busy
    shared node does not hide the per-core rate behind its wall-clock time."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.shard_throughput", description=__doc__.splitlines()[0]
    )
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--size", type=int, default=158)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--per-file", type=int, default=1000, help="HDUs per image file")
    p.add_argument("--pad", choices=("zeros", "noise"), default="zeros")
    p.add_argument(
        "--synth", action="store_true", help="GalSim galaxies via hpcvae.synth instead of random stamps"
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory(prefix="hpcvae-shard-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if args.synth:
            from hpcvae.synth import make_synthetic

            cat = make_synthetic(args.n, args.size, tmp / "rgc", seed=0, workers=max(1, os.cpu_count() or 1))
        else:
            cat = make_random_rgc(tmp / "rgc", args.n, args.size, per_file=args.per_file)
        print(
            f"input: {args.n} galaxies ({'galsim' if args.synth else 'random'}) in {time.perf_counter() - t0:.1f} s"
        )
        for k in (int(w) for w in args.workers.split(",")):
            out = tmp / f"shards-{k}"
            t0, c0 = time.perf_counter(), _cpu_seconds()
            m = build_shards(cat, out, size=args.size, shard_size=args.shard_size, workers=k, pad=args.pad)
            dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            n = m.count("train") + m.count("val")
            row = {
                "workers": k,
                "galaxies": n,
                "seconds": round(dt, 3),
                "galaxies_per_s": round(n / dt, 1),
                "galaxies_per_s_per_worker": round(n / dt / k, 1),
                "cpu_seconds": round(cpu, 3),
                "galaxies_per_cpu_s": round(n / cpu, 1),
                "load_avg_1min": os.getloadavg()[0],
                "size": args.size,
                "pad": args.pad,
                "cpu_count": os.cpu_count(),
            }
            results.append(row)
            print(
                f"workers={k}: {n} galaxies in {dt:.2f} s = {n / dt:,.0f} galaxies/s "
                f"({n / dt / k:,.0f} per worker); {n / cpu:,.0f} galaxies per CPU-second "
                f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
