"""The README's first command: the whole pipeline on the embedded default, on CPU.

synthetic galaxies (GalSim, RealGalaxyCatalog layout) -> WebDataset shards -> a 2-rank
DDP training job of ``galaxy_film`` (conditioned on zphot, mag_auto, flux_radius) through the launcher (submitit's LocalExecutor, no SLURM
needed) -> consolidated model -> a flow prior fitted to its latents -> evaluation report with
PNGs and the verdict against the real galaxies.

Each stage runs the same ``python -m hpcvae.<command>`` a user would type, and the
commands are printed, so the demo doubles as a worked example.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hpcvae.errors import HpcvaeError


class DemoError(HpcvaeError, RuntimeError):
    """A pipeline stage failed; its own error was printed just above."""


def _run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    if rc != 0:
        raise DemoError(f"stage failed with exit code {rc}: {' '.join(cmd[2:4])}")
    print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcvae.demo", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="synthetic galaxies to render")
    p.add_argument("--size", type=int, default=64, help="stamp size for shards and the model")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--arch", default="galaxy_film")
    p.add_argument("--flow-epochs", type=int, default=100, help="epochs of the flow prior fit (0: none)")
    p.add_argument("--ranks", type=int, default=2, help="training processes (gloo DDP on CPU)")
    p.add_argument("--name", default="demo", help="names shards/synth-NAME, runs/NAME, reports/NAME")
    p.add_argument("--workers", type=int, default=0, help="render/shard processes (0 = all cores)")
    p.add_argument("--cluster", default="local", choices=("local", "slurm", "debug"))
    args = p.parse_args(argv)

    py = sys.executable
    raw = Path("data") / f"synth-{args.name}"
    shards = Path("shards") / f"synth-{args.name}"
    run = Path("runs") / args.name
    report = Path("reports") / args.name
    for d in (raw, run, report):  # the demo's own folders: start clean so reruns work
        if d.exists():
            shutil.rmtree(d)
    workers = ["--workers", str(args.workers)] if args.workers else []
    t0 = time.perf_counter()

    _run(
        [py, "-m", "hpcvae.synth", "--n", str(args.n), "--size", str(args.size), "--out", str(raw), *workers]
    )
    _run(
        [py, "-m", "hpcvae.shard", "--catalog", str(raw / "real_galaxy_catalog_synth.fits"),
         "--size", str(args.size), "--out", str(shards), "--pad", "noise", "--overwrite",
         "--conditions", "zphot,mag_auto,flux_radius", *workers]
    )  # fmt: skip
    _run(
        [py, "-m", "hpcvae.launch", "--cluster", args.cluster, "--nodes", "1",
         "--gpus-per-node", str(args.ranks), "--time", "01:00:00", "--follow",
         "--config", "configs/demo.toml", "--arch", args.arch, "--data", str(shards),
         "--out", str(run), "--epochs", str(args.epochs)]
    )  # fmt: skip
    if args.flow_epochs:
        flow = ["--epochs", str(args.flow_epochs)]
        _run([py, "-m", "hpcvae.train_prior", str(run), "--data", str(shards), *flow])
    _run(
        [
            py,
            "-m",
            "hpcvae.evaluate",
            str(run),
            "--data",
            str(shards),
            "--out",
            str(report),
            "--n",
            "512",
            "--morph-n",
            "96",
        ]
    )  # statmorph is ~0.4 s a stamp on one core: a subset of real, generated, baseline

    seconds = time.perf_counter() - t0
    print(f"\nDone in {seconds:.0f} s.")
    rep = json.loads((report / "report.json").read_text())
    from hpcvae.evaluate.markdown import verdict_table

    (report / "verdict_table.md").write_text(verdict_table(rep) + f"\n\n_Demo total: {seconds:.0f} s._\n")
    verdict = rep.get("verdict", {})
    for k, v in verdict.items():
        if k != "thresholds":
            print(f"  {k:20s} {v['verdict']:5s} {v['line']}")
    print(f"  model:   {run / 'model.safetensors'}  (load with hpcvae.load_model({str(run)!r}))")
    print(f"  samples: {run / 'samples.png'}")
    print(f"  report:  {report / 'report.md'}")
    for png in sorted(report.glob("*.png")):
        print(f"           {png}")
    return 0


if __name__ == "__main__":
    from hpcvae.cli import run_cli

    run_cli(main, "hpcvae.demo")
