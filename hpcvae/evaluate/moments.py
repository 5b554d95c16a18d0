"""Population statistics of galaxy images from GalSim's HSM adaptive moments.

Adaptive moments are what the weak-lensing literature (e.g. Lanusse et al. 2021) uses to
compare generated galaxies with real ones, so the numbers here are comparable with theirs:
size ``sigma = det(M)^(1/4)`` and the ellipticity of the best-fit elliptical Gaussian.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

STATS = ("sigma_arcsec", "g", "e1", "e2", "flux")
"""The per-galaxy statistics :func:`moments` returns (plus the ``ok`` mask)."""

STAT_LABELS = {
    "sigma_arcsec": "size σ [arcsec]",
    "g": "|g|",
    "e1": "e1",
    "e2": "e2",
    "flux": "flux: HSM amplitude [image units]",
}

LANUSSE2021 = {
    "source": "Lanusse et al. 2021 (MNRAS 504, 5543), COSMOS 25.2 sample, HSM adaptive moments",
    "real": {"mean_g": 0.248, "mean_sigma_arcsec": 0.189},
    "generated": {"mean_g": 0.258, "mean_sigma_arcsec": 0.190},
}
"""Reference numbers on real COSMOS data, quoted in the report for context."""


def moments(images: Any, pixel_scale: float = 0.03, *, guess_sigma: float = 5.0) -> dict[str, np.ndarray]:
    """HSM adaptive moments of each image in ``images`` ((N, H, W), (N, 1, H, W) or (H, W)).

    Failures are kept, not dropped: their entries are NaN and ``ok`` is False, so callers
    can count them and the arrays stay aligned with the input (and its redshifts).

    ``e1``/``e2`` are the components of the reduced shear ``g`` (so ``|g| = hypot(e1, e2)``);
    ``flux`` is HSM's ``moments_amp``, the flux of the best-fit elliptical Gaussian.
    """
    import galsim

    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 4:
        if arr.shape[1] != 1:
            raise ValueError(f"moments: expected 1-channel images, got shape {arr.shape}")
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"moments: expected (N, H, W) images, got shape {arr.shape}")
    n = arr.shape[0]
    out = {k: np.full(n, np.nan) for k in STATS}
    ok = np.zeros(n, dtype=bool)
    errors: list[str] = []
    for i in range(n):
        a = arr[i]
        if not np.all(np.isfinite(a)):
            errors.append(f"{i}: non-finite pixels")
            continue
        img = galsim.Image(np.ascontiguousarray(a))
        try:
            res = galsim.hsm.FindAdaptiveMom(img, strict=False, guess_sig=guess_sigma)
        except (galsim.GalSimError, RuntimeError, ValueError) as exc:
            errors.append(f"{i}: {exc}")
            continue
        if res.moments_status != 0 or not (res.moments_sigma > 0):
            errors.append(f"{i}: {res.error_message.strip() or f'status {res.moments_status}'}")
            continue
        shape = res.observed_shape
        out["sigma_arcsec"][i] = res.moments_sigma * pixel_scale
        out["g"][i] = shape.g
        out["e1"][i] = shape.g1
        out["e2"][i] = shape.g2
        out["flux"][i] = res.moments_amp
        ok[i] = True
    out["ok"] = ok
    out["errors"] = np.asarray(errors, dtype=object)
    return out


def compare(real: np.ndarray, generated: np.ndarray) -> dict[str, float | int | None]:
    """W1 distance and mean difference (generated - real) with its standard error.

    NaNs (HSM failures) are dropped here; their number is reported separately.
    """
    from scipy.stats import wasserstein_distance

    r = np.asarray(real, dtype=np.float64)
    g = np.asarray(generated, dtype=np.float64)
    r = r[np.isfinite(r)]
    g = g[np.isfinite(g)]
    res: dict[str, float | int | None] = {
        "n_real": int(r.size),
        "n_generated": int(g.size),
        "mean_real": float(r.mean()) if r.size else None,
        "mean_generated": float(g.mean()) if g.size else None,
        "std_real": float(r.std(ddof=1)) if r.size > 1 else None,
        "std_generated": float(g.std(ddof=1)) if g.size > 1 else None,
        "w1": None,
        "mean_diff": None,
        "mean_diff_se": None,
        "mean_diff_z": None,
    }
    if r.size and g.size:
        res["w1"] = float(wasserstein_distance(r, g))
        res["mean_diff"] = float(g.mean() - r.mean())
    if r.size > 1 and g.size > 1:
        se = math.sqrt(r.var(ddof=1) / r.size + g.var(ddof=1) / g.size)
        res["mean_diff_se"] = se
        res["mean_diff_z"] = float(res["mean_diff"] / se) if se > 0 else None
    return res


def fit_slope(x: np.ndarray, y: np.ndarray) -> dict[str, float | int | None]:
    """Least-squares slope of ``y`` on ``x`` with its standard error, ignoring non-finite pairs."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    res: dict[str, float | int | None] = {
        "n": int(x.size),
        "slope": None,
        "slope_se": None,
        "intercept": None,
    }
    if x.size < 3 or np.ptp(x) == 0:
        return res
    xm = x - x.mean()
    sxx = float((xm**2).sum())
    slope = float((xm * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * x.mean())
    resid = y - (intercept + slope * x)
    res["slope"] = slope
    res["intercept"] = intercept
    res["slope_se"] = float(math.sqrt((resid**2).sum() / (x.size - 2) / sxx))
    return res


def orientation_agreement(
    real: dict[str, np.ndarray], other: dict[str, np.ndarray], min_g: float = 0.1
) -> dict[str, Any]:
    """Mean of cos 2(phi_real - phi_other) over galaxies whose real |g| exceeds ``min_g``.

    The position angle of an ellipse is phi = atan2(g2, g1) / 2, so cos 2 dphi = (g . g') / (|g| |g'|):
    1 when reconstructions keep each galaxy's orientation, 0 when it is lost (random angles).
    Round galaxies (|g| <= min_g) have no well-defined angle and are left out.
    """
    g1, g2, h1, h2 = real["e1"], real["e2"], other["e1"], other["e2"]
    gr, go = np.hypot(g1, g2), np.hypot(h1, h2)
    keep = np.isfinite(gr) & np.isfinite(go) & (gr > min_g) & (go > 0)
    cos = (g1[keep] * h1[keep] + g2[keep] * h2[keep]) / (gr[keep] * go[keep])
    return {"mean": float(cos.mean()) if cos.size else None, "n": int(cos.size), "min_real_g": min_g}


def border_median(images: Any, width: int = 2) -> np.ndarray:
    """Median of each stamp's outer ``width``-pixel frame: its background level (N, H, W) -> (N,)."""
    a = np.asarray(images, dtype=np.float64)
    if a.ndim == 4:
        a = a[:, 0]
    mask = np.ones(a.shape[1:], dtype=bool)
    mask[width:-width, width:-width] = False
    return np.median(a[:, mask], axis=1)


def merge_moments(parts: Sequence[dict[str, np.ndarray]], pixel_scale: float) -> dict[str, np.ndarray]:
    """Concatenate per-batch moment results (measured in pixels) and convert sizes to arcsec."""
    merged: dict[str, np.ndarray] = {}
    offset = 0
    errors: list[str] = []
    for p in parts:
        errors += [f"{int(e.split(':')[0]) + offset}:{e.split(':', 1)[1]}" for e in p["errors"]]
        offset += len(p["ok"])
    for k in (*STATS, "ok"):
        merged[k] = np.concatenate([p[k] for p in parts])
    merged["sigma_arcsec"] = merged["sigma_arcsec"] * pixel_scale
    merged["errors"] = np.asarray(errors, dtype=object)
    return merged


def summary(a: np.ndarray) -> dict[str, float]:
    a = a[np.isfinite(a)]
    if not a.size:
        return {}
    return {
        "min": float(a.min()),
        "median": float(np.median(a)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def redshift_trends(z: np.ndarray, real: dict[str, np.ndarray], gen: dict[str, np.ndarray]) -> dict[str, Any]:
    """Slopes of log10 size and flux against zphot: real galaxies, generated ones, the truth.

    Two views: d log10(X)/dz (dex per unit redshift), and the response d log10(X) /
    d log10(X_true(z)) which is 1 when a population follows the true relation exactly,
    whatever the constant factor between the measured and the generating quantity.
    """
    from hpcvae import cosmology

    true_fn = {"sigma_arcsec": cosmology.expected_hlr_arcsec, "flux": cosmology.expected_flux}
    vs_z: dict[str, dict[str, Any]] = {}
    response: dict[str, dict[str, Any]] = {}
    for key, fn in true_fn.items():
        log_true = np.log10(np.asarray(fn(z), dtype=float))
        vs_z[key] = {"truth": fit_slope(z, log_true)}
        response[key] = {"truth": {"slope": 1.0, "slope_se": 0.0, "n": int(np.isfinite(log_true).sum())}}
        for label, st in (("real", real), ("generated", gen)):
            with np.errstate(invalid="ignore", divide="ignore"):
                y = np.log10(np.asarray(st[key], dtype=float))
            vs_z[key][label] = fit_slope(z, y)
            response[key][label] = fit_slope(log_true, y)
    return {
        "quantities": {
            "sigma_arcsec": "HSM σ vs expected_hlr_arcsec(z)",
            "flux": "HSM amplitude vs expected_flux(z)",
        },
        "slopes_vs_z": vs_z,
        "response_vs_log_truth": response,
        "z_range": summary(z),
    }
