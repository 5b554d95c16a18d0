"""``python -m hpcvae.shard``: RealGalaxyCatalog FITS (or the seed's h5) -> WebDataset shards."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence

from hpcvae.config import add_options, options_from_args
from hpcvae.errors import ConfigError
from hpcvae.shards.h5 import build_shards_from_h5
from hpcvae.shards.ingest import ShardConfig
from hpcvae.shards.rgc import build_shards


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpcvae.shard",
        description="Convert a RealGalaxyCatalog (FITS) or the seed's h5 file into WebDataset shards.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--catalog", help="RealGalaxyCatalog FITS table (GAL_FILENAME is relative to its folder)"
    )
    src.add_argument("--from-h5", metavar="FILE", help="h5 file with N x H x W images and N redshifts")
    p.add_argument("--out", required=True, help="output folder (shards/NAME)")
    p.add_argument(
        "--fits-catalog", help="redshift catalog (default: <catalog stem>_fits.fits when it exists)"
    )
    p.add_argument(
        "--redshift-column",
        help="redshift column; when given it is required (default: zphot if the fits catalog has it)",
    )
    p.add_argument("--no-redshift", action="store_true", help="do not store redshifts")
    p.add_argument("--h5-images", help="image dataset name in --from-h5 (default: the only 3-D dataset)")
    p.add_argument(
        "--h5-redshifts", help="redshift dataset name in --from-h5 (default: the 1-D dataset of length N)"
    )
    p.set_defaults(_table=add_options(p, ShardConfig))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = options_from_args(ShardConfig, args, args._table)
    opts = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ShardConfig)}
    t0 = time.perf_counter()
    use_redshift = False if args.no_redshift else None
    if args.from_h5:
        if args.fits_catalog or args.redshift_column or cfg.pad != "zeros":
            raise ConfigError(
                "--fits-catalog, --redshift-column and --pad noise apply to --catalog, not --from-h5"
            )
        opts.pop("pad")
        m = build_shards_from_h5(args.from_h5, args.out, images=args.h5_images, redshifts=args.h5_redshifts,
                                 use_redshift=use_redshift, **opts)  # fmt: skip
    else:
        if args.h5_images or args.h5_redshifts:
            raise ConfigError("--h5-images / --h5-redshifts apply to --from-h5, not --catalog")
        if args.no_redshift and (args.redshift_column or args.fits_catalog):
            raise ConfigError("--no-redshift contradicts --redshift-column / --fits-catalog")
        m = build_shards(args.catalog, args.out, fits_catalog=args.fits_catalog,
                         redshift_column=args.redshift_column, use_redshift=use_redshift, **opts)  # fmt: skip
    dt = time.perf_counter() - t0
    d = m.data
    n = d["n_rows"]
    print(
        f"hpcvae.shard: wrote {m.count('train')} train + {m.count('val')} val galaxies "
        f"({len(m.shards('train'))}+{len(m.shards('val'))} shards, {d['n_skipped']} skipped of {n} rows, "
        f"redshift: {d['redshift_column'] if m.has_redshift else 'none'}) to {m.root} in {dt:.1f} s "
        f"({n / max(dt, 1e-9):.0f} rows/s)"
    )
    for s in d["skipped"][:5]:
        print(f"  skipped row {s['row']} ({s['file']}, HDU {s['hdu']}): {s['reason']}", file=sys.stderr)
    if d["n_skipped"] > 5:
        print(f"  ... {d['n_skipped'] - 5} more in {m.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from hpcvae.cli import run_cli

    run_cli(main, "hpcvae.shard")
