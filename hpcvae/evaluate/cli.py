"""``python -m hpcvae.evaluate MODEL --data SHARDS --out REPORT``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from hpcvae.config import add_options, options_from_args
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
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument(
        "--metrics", default=None, help="metrics.jsonl for the loss curves (default: the run folder's)"
    )
    p.set_defaults(_table=add_options(p, EvalConfig))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = options_from_args(EvalConfig, args, args._table)
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
