"""Normalisation transforms: invertibility, numpy/torch parity, dtype keeping, serialisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcvae.errors import ConfigError
from hpcvae.shards.manifest import Manifest
from hpcvae.transforms import Asinh, MinMax, get_transform, transform_from_dict

STATS = {
    "min": -0.05,
    "max": 4.0,
    "p0.1": -0.03,
    "p1": -0.02,
    "p50": 0.001,
    "p99": 0.3,
    "p99.9": 1.2,
    "mad_std": 0.01,
    "noise_std": 0.008,
}


@pytest.mark.parametrize("name", ["minmax", "asinh", "identity"])
def test_round_trip_numpy_and_torch(name: str) -> None:
    t = get_transform(name, STATS)
    lo = STATS["p0.1"]
    hi = STATS["p99.9"] if name == "minmax" else STATS["max"]
    x = np.linspace(lo, hi, 5001)
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        xs = x.astype(dtype)
        y = t.forward(xs)
        assert y.dtype == dtype and y.shape == xs.shape
        if name != "identity":
            assert y.min() >= 0 and y.max() <= 1 and y[0] == pytest.approx(0, abs=1e-6)
            assert np.all(np.diff(y) >= 0)  # monotonic
        np.testing.assert_allclose(t.inverse(y), xs, rtol=tol * 10, atol=tol * (hi - lo))
        xt = torch.from_numpy(xs)
        yt = t.forward(xt)
        assert isinstance(yt, torch.Tensor) and yt.dtype == xt.dtype
        np.testing.assert_allclose(yt.numpy(), y, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(t.inverse(yt), xt, rtol=tol * 10, atol=tol * (hi - lo))


def test_dtype_and_layout_kept() -> None:
    t = get_transform("asinh", STATS)
    x = torch.rand(2, 1, 8, 8) * 0.5
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        y = t.forward(x.to(dtype))
        assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    half = np.full((3, 3), 0.1, np.float16)
    assert t.forward(half).dtype == np.float16
    assert t.forward(np.arange(4, dtype=np.int16)).dtype == np.float32


def test_forward_clips_outliers_only() -> None:
    t = get_transform("minmax", STATS)
    y = t.forward(np.array([-10.0, STATS["p0.1"], STATS["p99.9"], 10.0]))
    np.testing.assert_array_equal(y, [0.0, 0.0, 1.0, 1.0])
    assert t.inverse(np.array([1.0]))[0] == pytest.approx(STATS["p99.9"])


def test_asinh_is_linear_near_zero_and_compresses_bright() -> None:
    t = get_transform("asinh", STATS)
    assert t.a == STATS["noise_std"]
    y = t.forward(np.array([0.0, t.a * 0.01, t.a * 0.02, 1.0, 2.0, 3.0]))
    assert (y[2] - y[1]) == pytest.approx(y[1] - y[0], rel=1e-3)
    assert (y[4] - y[3]) > (y[5] - y[4]) * 1.5  # log-like: equal flux steps shrink
    no_noise = {k: v for k, v in STATS.items() if k != "noise_std"}
    assert get_transform("asinh", no_noise).a == STATS["mad_std"]


def test_dict_round_trip_is_json_safe() -> None:
    for name in ("minmax", "asinh", "identity"):
        t = get_transform(name, STATS)
        d = json.loads(json.dumps(t.to_dict()))
        assert d["name"] == name
        t2 = transform_from_dict(d)
        assert t2 == t and type(t2) is type(t)
    assert get_transform("minmax", STATS, lo="min", hi=2.0) == MinMax(lo=-0.05, hi=2.0)
    assert transform_from_dict({"name": "asinh", "params": {"a": 1, "lo": 0, "hi": 3}}) == Asinh(
        a=1, lo=0, hi=3
    )


def test_errors() -> None:
    with pytest.raises(ConfigError, match="unknown transform 'log'"):
        get_transform("log", STATS)
    with pytest.raises(ConfigError, match="needs stat 'p99.9' or 'max'"):
        get_transform("minmax", {"p0.1": 0.0})
    with pytest.raises(ConfigError, match="needs stat 'p9'"):
        get_transform("minmax", STATS, hi="p9")
    # stats without percentiles (older / hand-made manifests) fall back to min/max and std
    bare = {"min": -0.05, "max": 0.05, "mean": 0.0, "std": 0.01}
    assert get_transform("minmax", bare) == MinMax(lo=-0.05, hi=0.05)
    assert get_transform("asinh", bare) == Asinh(a=0.01, lo=-0.05, hi=0.05)
    with pytest.raises(ConfigError, match="lo < hi"):
        MinMax(lo=1.0, hi=1.0)
    with pytest.raises(ConfigError, match="a > 0"):
        Asinh(a=0.0, lo=0.0, hi=1.0)
    with pytest.raises(ConfigError, match="bad parameters for transform 'minmax'"):
        transform_from_dict({"name": "minmax", "params": {"lo": 0.0}})


def test_from_real_manifest_stats(aegis_shards: Path) -> None:
    stats = Manifest.load(aegis_shards).stats("train")
    for name in ("minmax", "asinh"):
        t = get_transform(name, stats)
        x = np.linspace(stats["p0.1"], stats["p99.9"], 100, dtype=np.float32)
        np.testing.assert_allclose(t.inverse(t.forward(x)), x, rtol=1e-4, atol=1e-6)


def test_mean_inverse_returns_the_noise_free_flux_of_faint_pixels():
    """A decoder learns E[asinh(x)] of noisy pixels; the plain inverse of that is 20% faint at 1 sigma."""
    sigma = 0.003
    t = Asinh(a=sigma, lo=-3 * sigma, hi=30.0)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=400_000) * sigma
    for mu in (0.3 * sigma, sigma, 3 * sigma, 0.5, 20.0):
        y = float(t.forward(mu + noise).mean())
        plain = float(t.inverse(np.float64(y)))
        fixed = float(t.mean_inverse(np.array([y]), sigma)[0])
        assert fixed == pytest.approx(mu, rel=0.01)
        if mu <= sigma:
            assert plain < 0.85 * mu  # the bias this corrects
        on_torch = float(t.mean_inverse(torch.tensor([y], dtype=torch.float32), sigma)[0])
        assert on_torch == pytest.approx(fixed, rel=1e-4)
    y = np.linspace(0.0, 1.0, 7, dtype=np.float32)
    np.testing.assert_array_equal(t.mean_inverse(y, None), t.inverse(y))
    assert t.mean_inverse(y, sigma).dtype == np.float32
