"""95% bootstrap intervals for the report's means, W1 distances, differences and slopes.

Real galaxies are resampled by group (all copies of one galaxy together, when the shards say that
several stamps are one galaxy: rotations, re-noised copies), generated stamps one by one; both
sides are resampled in every replicate, so an interval holds the real set's galaxy-to-galaxy
scatter and the generated draw's.  ``n_boot`` replicates (200 by default) from one seeded RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

N_BOOT = 200
LEVEL = 0.95


class Resampler:
    """Index draws for one real set (by group) and one generated set, shared by every statistic."""

    def __init__(
        self, groups: Sequence[Any], n_generated: int, *, n_boot: int = N_BOOT, seed: int = 0
    ) -> None:
        rng = np.random.default_rng(seed)
        _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)] if len(inverse) else []
        self.n_boot, self.n_real, self.n_generated = n_boot, len(groups), n_generated
        self.n_groups = len(members)
        self.real: list[np.ndarray] = []
        self.gen: list[np.ndarray] = []
        for _ in range(n_boot):
            picked = rng.integers(0, len(members), len(members)) if members else np.zeros(0, int)
            self.real.append(np.concatenate([members[g] for g in picked]) if members else np.zeros(0, int))
            self.gen.append(rng.integers(0, n_generated, n_generated) if n_generated else np.zeros(0, int))


def interval(values: Sequence[float]) -> list[float] | None:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size < 10:
        return None
    a = (1 - LEVEL) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


def _finite(a: np.ndarray) -> np.ndarray:
    return a[np.isfinite(a)]


def _w1(r: np.ndarray, g: np.ndarray) -> float | None:
    from scipy.stats import wasserstein_distance

    r, g = _finite(r), _finite(g)
    return float(wasserstein_distance(r, g)) if r.size and g.size else None


def _mean(a: np.ndarray) -> float | None:
    a = _finite(a)
    return float(a.mean()) if a.size else None


def compare(real: np.ndarray, gen: np.ndarray, rs: Resampler | None) -> dict[str, Any]:
    """Means, their difference (generated - real, also relative) and W1, each with its 95% interval."""
    real, gen = np.asarray(real, dtype=np.float64), np.asarray(gen, dtype=np.float64)

    def stats(r: np.ndarray, g: np.ndarray) -> dict[str, float | None]:
        mr, mg = _mean(r), _mean(g)
        d = mg - mr if mr is not None and mg is not None else None
        return {"mean_real": mr, "mean_generated": mg, "mean_diff": d,
                "mean_rel_diff": d / abs(mr) if d is not None and mr else None, "w1": _w1(r, g)}  # fmt: skip

    out: dict[str, Any] = {**stats(real, gen), "n_real": int(np.isfinite(real).sum()),
                           "n_generated": int(np.isfinite(gen).sum())}  # fmt: skip
    if rs is not None:
        reps = [stats(real[i], gen[j]) for i, j in zip(rs.real, rs.gen)]
        for key in ("mean_real", "mean_generated", "mean_diff", "mean_rel_diff", "w1"):
            out[f"{key}_ci"] = interval([r[key] for r in reps])
    return out


def boot_real(fn: Callable[[np.ndarray], float | None], rs: Resampler | None, n: int) -> list[float] | None:
    """Interval of ``fn(indices)`` over resamples of the real set (``fn`` gets an index array)."""
    if rs is None:
        return None
    return interval([fn(i) for i in rs.real])


def boot_gen(fn: Callable[[np.ndarray], float | None], rs: Resampler | None) -> list[float] | None:
    if rs is None:
        return None
    return interval([fn(j) for j in rs.gen])


def slope(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    """Least-squares slope of y on x and its standard error (finite pairs only)."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3 or np.ptp(x) == 0:
        return None, None
    xm = x - x.mean()
    sxx = float((xm**2).sum())
    b = float((xm * (y - y.mean())).sum() / sxx)
    resid = y - y.mean() - b * xm
    return b, float(math.sqrt((resid**2).sum() / (x.size - 2) / sxx))
