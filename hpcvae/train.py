"""``python -m hpcvae.train``: parse -> build -> train -> clean up.

Runs as one process, under ``torchrun`` and under ``srun`` (ranks from the environment,
see ``hpcvae.dist``).  Exit code 0 when the run completed, 3 when it was stopped
(SIGUSR2/SIGTERM) and checkpointed, 2 for bad input.

    python -m hpcvae.train --config configs/debug.toml --data shards/synth-debug --out runs/debug
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence

from hpcvae.cli import EXIT_COMPLETED, EXIT_PREEMPTED, run_cli
from hpcvae.config import JobConfig, add_options, options_from_args
from hpcvae.dist import cleanup, init_distributed, read_env
from hpcvae.errors import ConfigError
from hpcvae.trainer import RunResult, Trainer

_FLAGS = {  # CLI flag -> config key; every other option is --set section.key=value
    "arch": "model.arch",
    "flavour": "model.flavour",
    "data": "data.path",
    "out": "out",
    "epochs": "train.epochs",
    "engine": "train.engine",
    "precision": "train.precision",
    "resume": "checkpoint.resume",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "device": "train.device",
    "zero_stage": "deepspeed.zero_stage",
    "seed": "train.seed",
    "compile": "train.compile",
    "channels_last": "train.channels_last",
    "deterministic": "train.deterministic",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcvae.train", description="Train a galaxy VAE (DDP or DeepSpeed).")
    p.set_defaults(_table=add_options(p, JobConfig, flags=_FLAGS, skip=("name",)))
    return p


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """Config file, then ``--set``, then the named flags (most specific wins)."""
    return options_from_args(JobConfig, args, args._table)


def _per_rank_batch(cfg: JobConfig, world_size: int) -> JobConfig:
    """Resolve ``data.global_batch_size`` into the per-rank ``data.batch_size``."""
    g = cfg.data.global_batch_size
    if g == 0:
        return cfg
    if g % world_size:
        raise ConfigError(
            f"data.global_batch_size = {g} does not divide over {world_size} ranks; use a multiple of {world_size}"
        )
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=g // world_size))


def run(cfg: JobConfig, *, on_start: Callable[[Trainer], None] | None = None) -> RunResult:
    """Train ``cfg`` in this process (one rank of however many the environment says).

    ``on_start`` receives the Trainer before the first step, so a launcher can call
    ``trainer.request_stop()`` from another thread.
    """
    _, _, world = read_env()
    cfg = _per_rank_batch(cfg, world)
    dist = init_distributed(device=None if cfg.train.device == "auto" else cfg.train.device)
    try:
        trainer = Trainer(cfg, dist)
        if on_start is not None:
            on_start(trainer)
        return trainer.train()
    finally:
        cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:  # the same argv on every rank: the same error on every rank
        exc.collective = True
        raise
    result = run(cfg)
    if result.status == "completed":
        return EXIT_COMPLETED
    return EXIT_PREEMPTED


if __name__ == "__main__":
    run_cli(main, "hpcvae.train")
