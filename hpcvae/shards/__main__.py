"""``python -m hpcvae.shard``: a catalog of stamps (any source in ``SOURCES``) -> WebDataset shards."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from hpcvae.config import add_options, options_from_args
from hpcvae.errors import ConfigError
from hpcvae.shards.ingest import SOURCES, ShardConfig, source_module


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpcvae.shard",
        description="Convert a RealGalaxyCatalog (FITS) or the seed's h5 file into WebDataset shards.",
    )
    select = p.add_mutually_exclusive_group(required=True)
    owned = {kind: source_module(kind).add_arguments(p, select) for kind in SOURCES}
    p.add_argument("--out", required=True, help="output folder (shards/NAME)")
    p.add_argument("--no-redshift", action="store_true", help="do not store redshifts")
    p.set_defaults(_table=add_options(p, ShardConfig), _owned=owned)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = options_from_args(ShardConfig, args, args._table)
    kind = next(k for k in SOURCES if getattr(args, source_module(k).SELECT))
    chosen = _flag(source_module(kind).SELECT)
    for other, dests in args._owned.items():
        given = [_flag(d) for d in dests if other != kind and getattr(args, d) not in (None, False)]
        if given:
            raise ConfigError(
                f"{' / '.join(given)} apply to {_flag(source_module(other).SELECT)}, not {chosen}"
            )
    t0 = time.perf_counter()
    m = source_module(kind).from_args(args, cfg)
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
