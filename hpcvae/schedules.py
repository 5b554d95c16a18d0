"""Schedules over training time: the KL weight β (per epoch) and, below, the learning rate.

The seed fixed β = 0.1 and also tried per-epoch β arrays; warm-up and cyclical
annealing are the usual cures for posterior collapse when β is larger.  β is a function
of the epoch only, so a resumed run gets the same β without saving schedule state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from hpcvae.config import BetaConfig, SchedulerConfig, to_dict
from hpcvae.errors import ConfigError

# ----------------------------------------------------------------------------------------
# β schedules


class BetaSchedule:
    """β for an epoch, ``schedule(epoch) -> float``; built by :func:`beta_schedule`."""

    def __init__(self, cfg: BetaConfig, default: float = 0.1) -> None:
        if (
            cfg.value is None
        ):  # unset: the likelihood's ELBO weight (the caller's default), else the seed's 0.1
            import dataclasses

            cfg = dataclasses.replace(cfg, value=float(default))
        if cfg.kind == "cyclical" and cfg.cycle_epochs < 2:
            raise ConfigError(
                f"beta.cycle_epochs = {cfg.cycle_epochs}: a cyclical β needs a period of at least 2 epochs "
                "(ramp for half, hold for half)"
            )
        self.cfg = cfg

    def __call__(self, epoch: int) -> float:
        if epoch < 0:
            raise ConfigError(f"β schedule: epoch must be >= 0, got {epoch}")
        c = self.cfg
        if c.kind == "constant":
            return float(c.value)
        if c.kind == "list":
            return float(c.values[min(int(epoch), len(c.values) - 1)])
        if c.kind == "linear_warmup":
            if c.warmup_epochs == 0:
                return float(c.value)
            frac = min(1.0, epoch / c.warmup_epochs)
            return float(c.start + (c.value - c.start) * frac)
        if c.kind == "cyclical":
            # Cyclical annealing (Fu et al. 2019): ramp start -> value over the first half
            # of each period, hold value for the rest, then restart.
            ramp = math.ceil(c.cycle_epochs / 2)
            pos = epoch % c.cycle_epochs
            return float(c.start + (c.value - c.start) * min(1.0, pos / ramp))
        raise ConfigError(f"unknown beta.kind {c.kind!r} (choices: constant, list, linear_warmup, cyclical)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for model.json; ``beta_schedule(BetaConfig(**d))`` rebuilds it."""
        return to_dict(self.cfg)

    def __repr__(self) -> str:
        return f"BetaSchedule({self.to_dict()})"


def beta_schedule(cfg: BetaConfig | float | Sequence[float], default: float = 0.1) -> BetaSchedule:
    """A β schedule from a config, a plain number (constant β) or a per-epoch list (the seed's arrays).

    ``default`` is the β of a config that leaves ``value`` unset (the likelihood's ELBO weight, else 0.1).
    """
    if isinstance(cfg, BetaConfig):
        return BetaSchedule(cfg, default)
    if hasattr(cfg, "tolist"):  # numpy / torch arrays, as the seed passed them
        cfg = cfg.tolist()
    if isinstance(cfg, bool):
        raise ConfigError(f"β must be a number, a list of numbers or a BetaConfig, got {cfg!r}")
    if isinstance(cfg, (int, float)):
        return BetaSchedule(BetaConfig(kind="constant", value=float(cfg)))
    if isinstance(cfg, Sequence) and not isinstance(cfg, str):
        try:
            values = [float(v) for v in cfg]
        except (TypeError, ValueError):
            raise ConfigError(f"β list must hold numbers, got {list(cfg)!r}") from None
        return BetaSchedule(BetaConfig(kind="list", values=values))
    raise ConfigError(f"β must be a number, a list of numbers or a BetaConfig, got {cfg!r}")


# ----------------------------------------------------------------------------------------
# LR schedules (per optimizer step)


def lr_factor(step: int, cfg: SchedulerConfig, *, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of ``optim.lr`` after ``step`` optimizer steps.

    A pure function of the step, so a resumed run continues the curve exactly.  Warm-up is
    linear from ``1/warmup_steps`` (never 0: a zero LR would waste the first step); then
    ``constant``, ``cosine`` (to ``min_lr_ratio`` at ``total_steps``) or ``step`` (times
    ``gamma`` every ``step_epochs`` epochs).
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.kind == "step":
        epoch = step // max(1, steps_per_epoch)
        return cfg.gamma ** (epoch // cfg.step_epochs)
    raise ConfigError(f"unknown scheduler.kind {cfg.kind!r} (choices: constant, cosine, step)")


def lr_scheduler(optimizer: Any, cfg: SchedulerConfig, *, total_steps: int, steps_per_epoch: int) -> Any:
    """A ``LambdaLR`` over :func:`lr_factor`; its state_dict is just the step count."""
    from functools import partial

    from torch.optim.lr_scheduler import LambdaLR

    fn = partial(lr_factor, cfg=cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    return LambdaLR(optimizer, lr_lambda=fn)
