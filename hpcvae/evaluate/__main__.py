"""``python -m hpcvae.evaluate MODEL --data SHARDS --out REPORT``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from hpcvae.cli import run_cli
from hpcvae.evaluate.markdown import _fmt
from hpcvae.evaluate.report import EvalConfig, evaluate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpcvae.evaluate",
        description="Evaluate a trained model: reconstructions, generations, redshift sweeps, latent maps "
        "and HSM population statistics against real galaxies, in one report (PNGs + report.json + report.md).",
    )
    p.add_argument("model", help="consolidated model (model.safetensors / model.json) or a run folder")
    p.add_argument("--data", required=True, help="shard set folder (with manifest.json)")
    p.add_argument("--split", default="val", help="split to compare against (default: val)")
    p.add_argument(
        "--n", type=int, default=2048, help="real galaxies used, and as many generated (default 2048)"
    )
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated latents")
    p.add_argument("--batch-size", type=int, default=256, help="inference batch size")
    p.add_argument(
        "--prior", choices=("flow", "normal"), default=None,
        help="latent prior of generated galaxies (default: the model's flow prior if it has one, else normal)",
    )  # fmt: skip
    p.add_argument(
        "--metrics", default=None, help="metrics.jsonl for the loss curves (default: the run folder's)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = EvalConfig(
        split=args.split, n=args.n, device=args.device, seed=args.seed, batch_size=args.batch_size,
        prior=args.prior,
    )  # fmt: skip
    rep = evaluate(args.model, args.data, args.out, config=cfg, metrics=args.metrics)
    out = Path(args.out)
    pop = rep["population"]
    print(
        f"hpcvae.evaluate: {rep['data']['n_used']} galaxies, {pop['prior']} prior; "
        f"HSM failures real {pop['hsm_failures']['real']}, "
        f"generated {pop['hsm_failures']['generated']}"
    )
    for k, c in pop["stats"].items():
        print(
            f"  {k:13s} real {_fmt(c['mean_real'])}  generated {_fmt(c['mean_generated'])}  W1 {_fmt(c['w1'])}"
        )
    print(f"hpcvae.evaluate: wrote {out / 'report.md'}, {out / 'report.json'} and {len(rep['figures'])} PNGs")
    return 0


if __name__ == "__main__":
    run_cli(main, "hpcvae.evaluate")
