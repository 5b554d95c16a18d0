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
from typing import Any

from hpcvae.cli import run_cli
from hpcvae.config import JobConfig, apply_overrides, load_config
from hpcvae.dist import cleanup, init_distributed, read_env
from hpcvae.errors import ConfigError
from hpcvae.trainer import RunResult, Trainer

EXIT_COMPLETED = 0
EXIT_PREEMPTED = 3

_FLAGS = {  # CLI flag -> config key
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
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcvae.train", description="Train a galaxy VAE (DDP or DeepSpeed).")
    p.add_argument("--config", help="TOML file from configs/ (defaults if omitted)")
    p.add_argument("--arch", help="vae128, vae158, cvae, cvae2 or fancy_cvae")
    p.add_argument("--flavour", help="default (the seed's model) or debug (tiny, CPU-friendly)")
    p.add_argument("--data", help="shard set folder (shards/NAME)")
    p.add_argument("--out", help="run folder (runs/NAME)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--engine", help="ddp or deepspeed")
    p.add_argument("--zero-stage", type=int, help="DeepSpeed ZeRO stage 0-3")
    p.add_argument("--precision", help="fp32, bf16 or fp16")
    p.add_argument(
        "--resume", help="auto (latest checkpoint in --out, if any), none, or a checkpoint/run path"
    )
    p.add_argument("--batch-size", type=int, help="per-rank batch size")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--channels-last", action="store_true", default=None, help="NHWC memory format")
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic kernels")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. --set scheduler.kind=cosine (repeatable)")  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """Config file, then ``--set``, then the named flags (most specific wins)."""
    cfg = load_config(args.config, list(args.set) or None)
    flags: dict[str, Any] = {
        key: getattr(args, name) for name, key in _FLAGS.items() if getattr(args, name) is not None
    }
    for name, key in (("compile", "train.compile"), ("channels_last", "train.channels_last"),
                      ("deterministic", "train.deterministic")):  # fmt: skip
        if getattr(args, name):
            flags[key] = True
    return apply_overrides(cfg, flags) if flags else cfg


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
