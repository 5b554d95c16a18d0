"""Named, invertible normalisations between physical flux and the model's [0, 1] range.

Shards keep physical pixels; the transform is part of a trained model (saved with
``to_dict``), so samples can be mapped back to flux units with ``inverse``.  The only
non-invertible step is the final clip to [0, 1] in ``forward``: values outside the
``[lo, hi]`` range of the training data (a few outlier pixels by construction of the
robust percentiles) are saturated.  Everything in between round-trips to float precision.

Works on numpy arrays and torch tensors of any floating dtype and device, and returns the
input's dtype (half-precision inputs are computed in float32 internally; integer inputs
return float32).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from hpcvae.errors import ConfigError


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _work(x: Any) -> tuple[Any, Any]:
    """(array in a compute dtype, output dtype): float32 at least, float64 kept."""
    if _is_torch(x):
        import torch

        out = x.dtype if x.is_floating_point() else torch.float32
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.to(work), out
    a = np.asarray(x)
    out = a.dtype if a.dtype.kind == "f" else np.dtype(np.float32)
    work = np.float64 if a.dtype == np.float64 else np.float32
    return a.astype(work, copy=False), out


def _back(x: Any, dtype: Any) -> Any:
    return x.to(dtype) if _is_torch(x) else x.astype(dtype, copy=False)


def _clip01(x: Any) -> Any:
    return x.clamp(0.0, 1.0) if _is_torch(x) else np.clip(x, 0.0, 1.0)


def _asinh(x: Any) -> Any:
    return x.asinh() if _is_torch(x) else np.arcsinh(x)


def _sinh(x: Any) -> Any:
    return x.sinh() if _is_torch(x) else np.sinh(x)


def _stat(stats: dict[str, float], key: str | float | tuple[str, ...], name: str) -> float:
    """A number, a stat key, or a tuple of keys tried in order (robust percentile, then the fallback)."""
    if isinstance(key, int | float):
        return float(key)
    keys = (key,) if isinstance(key, str) else tuple(key)
    for k in keys:
        if k in stats and stats[k] is not None:
            return float(stats[k])
    have = ", ".join(sorted(stats)) or "none"
    raise ConfigError(
        f"transform {name!r} needs stat {' or '.join(repr(k) for k in keys)}, which the manifest stats lack (have: {have})"
    )


@dataclass(kw_only=True)
class Transform:
    name: ClassVar[str] = ""

    def forward(self, x: Any) -> Any:
        raise NotImplementedError

    def inverse(self, y: Any) -> Any:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": {k: float(v) for k, v in asdict(self).items()}}

    def __call__(self, x: Any) -> Any:
        return self.forward(x)

    def mean_inverse(self, y: Any, noise_std: float | None) -> Any:
        """The physical mean whose noisy pixels (mean + N(0, noise_std^2)) average to ``y`` after :meth:`forward`.

        A decoder trained on noisy images in normalised units learns E[forward(x)], not
        forward(E[x]).  For a non-linear transform the two differ within a few noise sigma of
        zero (asinh with a = sigma returns 80% of a wing pixel's flux through :meth:`inverse`),
        so faint galaxies came out too faint; inverting the noise-averaged map returns the
        noise-free mean.  ``noise_std`` None or 0 is :meth:`inverse`.
        """
        if not noise_std or noise_std <= 0:
            return self.inverse(y)
        tables = self.__dict__.setdefault("_mean_tables", {})
        if noise_std not in tables:
            tables[noise_std] = _mean_table(self, float(noise_std))
        ys, mus = tables[noise_std]
        return _interp(y, ys, mus)


def _mean_table(t: Transform, sigma: float, n: int = 2049, nodes: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(E[forward(mu + noise)], mu) on a grid even in normalised units, strictly increasing in both.

    Gauss-Hermite quadrature over the noise; the grid runs a little past [0, 1] so that means
    near the clip still invert.
    """
    mu = np.asarray(t.inverse(np.linspace(-0.1, 1.1, n)), dtype=np.float64)
    nodes_t, weights = np.polynomial.hermite.hermgauss(nodes)
    pts = mu[:, None] + sigma * math.sqrt(2.0) * nodes_t[None, :]
    y = (np.asarray(t.forward(pts), dtype=np.float64) * weights).sum(1) / math.sqrt(math.pi)
    y = np.maximum.accumulate(y)
    keep = np.diff(y, prepend=-np.inf) > 1e-6  # strictly increasing, also in float32
    return y[keep], mu[keep]


def _interp(y: Any, xp: np.ndarray, fp: np.ndarray) -> Any:
    """Piecewise-linear ``fp(xp)`` at ``y``, for numpy arrays and torch tensors (on their device)."""
    w, dt = _work(y)
    if _is_torch(w):
        import torch

        xt = torch.as_tensor(xp, dtype=w.dtype, device=w.device)
        ft = torch.as_tensor(fp, dtype=w.dtype, device=w.device)
        flat = w.reshape(-1).clamp(xt[0], xt[-1])
        i = torch.searchsorted(xt, flat).clamp(1, len(xt) - 1)
        x0, x1, f0, f1 = xt[i - 1], xt[i], ft[i - 1], ft[i]
        out = (f0 + (flat - x0) / (x1 - x0) * (f1 - f0)).reshape(w.shape)
    else:
        out = np.interp(w, xp, fp).astype(w.dtype, copy=False)
    return _back(out, dt)


@dataclass(kw_only=True)
class Identity(Transform):
    """Physical pixels unchanged: for models with an unbounded (non-Sigmoid) output."""

    name: ClassVar[str] = "identity"

    def forward(self, x: Any) -> Any:
        w, dt = _work(x)
        return _back(w, dt)

    def inverse(self, y: Any) -> Any:
        return self.forward(y)


@dataclass(kw_only=True)
class MinMax(Transform):
    """The seed's normalisation: y = (x - lo) / (hi - lo), clipped to [0, 1] for a Sigmoid decoder.

    lo/hi default to the 0.1 and 99.9 percentiles of the train pixels rather than the
    min/max (used only when a manifest lacks percentiles), so one hot pixel in 300k
    galaxies does not squash every image towards 0.
    """

    name: ClassVar[str] = "minmax"
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.hi > self.lo):
            raise ConfigError(f"minmax transform needs finite lo < hi, got lo={self.lo}, hi={self.hi}")

    @classmethod
    def from_stats(
        cls,
        stats: dict[str, float],
        *,
        lo: str | float | tuple[str, ...] = ("p0.1", "min"),
        hi: str | float | tuple[str, ...] = ("p99.9", "max"),
    ) -> MinMax:
        return cls(lo=_stat(stats, lo, cls.name), hi=_stat(stats, hi, cls.name))

    def forward(self, x: Any) -> Any:
        w, dt = _work(x)
        return _back(_clip01((w - self.lo) / (self.hi - self.lo)), dt)

    def inverse(self, y: Any) -> Any:
        w, dt = _work(y)
        return _back(w * (self.hi - self.lo) + self.lo, dt)


@dataclass(kw_only=True)
class Asinh(Transform):
    """y = (asinh(x/a) - asinh(lo/a)) / (asinh(hi/a) - asinh(lo/a)), clipped to [0, 1].

    Linear within ~a of zero (the sky noise keeps its shape), logarithmic above, so faint
    outskirts and bright cores both use the [0, 1] range.  ``a`` defaults to the typical
    sky-noise sigma (``noise_std`` from NOISE_VARIANCE, else the robust ``mad_std``); hi
    defaults to the max since the log compression makes rare bright pixels cheap.
    """

    name: ClassVar[str] = "asinh"
    a: float
    lo: float
    hi: float

    def __post_init__(self) -> None:
        vals = (self.a, self.lo, self.hi)
        if not (all(math.isfinite(v) for v in vals) and self.a > 0 and self.hi > self.lo):
            raise ConfigError(
                f"asinh transform needs finite a > 0 and lo < hi, got a={self.a}, lo={self.lo}, hi={self.hi}"
            )

    @classmethod
    def from_stats(
        cls,
        stats: dict[str, float],
        *,
        a: str | float | tuple[str, ...] | None = None,
        lo: str | float | tuple[str, ...] = ("p0.1", "min"),
        hi: str | float | tuple[str, ...] = "max",
    ) -> Asinh:
        if a is None:
            # std is a last resort (for stats without robust estimates): it overestimates the noise.
            a = next((k for k in ("noise_std", "mad_std", "std") if (stats.get(k) or 0) > 0), None)
            if a is None:
                raise ConfigError(
                    "asinh transform: the shard set's train stats (manifest.json stats.train) have no positive "
                    'noise_std, mad_std or std; re-shard the set, or use --set data.transform="minmax"'
                )
        return cls(a=_stat(stats, a, cls.name), lo=_stat(stats, lo, cls.name), hi=_stat(stats, hi, cls.name))

    @property
    def _f_lo(self) -> float:
        return math.asinh(self.lo / self.a)

    @property
    def _span(self) -> float:
        return math.asinh(self.hi / self.a) - self._f_lo

    def forward(self, x: Any) -> Any:
        w, dt = _work(x)
        return _back(_clip01((_asinh(w / self.a) - self._f_lo) / self._span), dt)

    def inverse(self, y: Any) -> Any:
        w, dt = _work(y)
        return _back(_sinh(w * self._span + self._f_lo) * self.a, dt)


TRANSFORMS: dict[str, type[Transform]] = {t.name: t for t in (Identity, MinMax, Asinh)}


def get_transform(name: str, stats: dict[str, float] | None = None, **options: Any) -> Transform:
    """Build a transform from manifest stats (``manifest.stats("train")``); options override stat keys/values."""
    cls = TRANSFORMS.get(name)
    if cls is None:
        raise ConfigError(f"unknown transform {name!r} (choose from: {', '.join(TRANSFORMS)})")
    if cls is Identity:
        return Identity()
    return cls.from_stats(dict(stats or {}), **options)  # type: ignore[attr-defined]


def transform_from_dict(d: dict[str, Any]) -> Transform:
    """Inverse of ``Transform.to_dict``: rebuilds the exact transform a model was trained with."""
    if not isinstance(d, dict) or "name" not in d:
        raise ConfigError(f"not a transform dict: {d!r}")
    cls = TRANSFORMS.get(d["name"])
    if cls is None:
        raise ConfigError(f"unknown transform {d['name']!r} (choose from: {', '.join(TRANSFORMS)})")
    try:
        return cls(**{k: float(v) for k, v in dict(d.get("params", {})).items()})
    except TypeError as exc:
        raise ConfigError(f"bad parameters for transform {d['name']!r}: {exc}") from None
