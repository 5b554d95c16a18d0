"""``python -m hpcvae.shard``: the command line of :mod:`hpcvae.shards` (kept under its first name)."""

from hpcvae.shards.__main__ import main

if __name__ == "__main__":
    from hpcvae.cli import run_cli

    run_cli(main, "hpcvae.shard")
