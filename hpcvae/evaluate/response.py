"""Conditional response: does the decoder do what its condition says?

With the latents held fixed, each condition is swept from its 10th to its 90th training percentile
(the other conditions at their medians) and the generated galaxies' HSM size and pixel-sum flux
are measured.  The response is the median, over the fixed latents, of the change in log10 size and
log10 flux across that range.  The real population's change over the same range comes from binned
medians (the real galaxies in the lowest and highest fifth of the condition).

A fixed latent need not follow its condition even in a good model: the encoder puts what it learns
from the condition into the latent too, and a conditional flow prior draws latents that depend on the
condition.  So with a conditional flow a second sweep holds the flow's base noise fixed instead, each
latent drawn from the prior at the sweep's conditions: what ``sample``, ``hpcvae.generate --catalog``
and ``interpolate()`` without a latent do, and what the verdict judges.  A response far below the
data's there means the model ignores its condition.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from hpcvae.evaluate.moments import moments

GRID = (10, 30, 50, 70, 90)
"""Percentiles of each condition's training range the sweep visits."""


def _nanmedian(a: Any, axis: int | None = None) -> Any:
    """np.nanmedian, quietly NaN where every value failed HSM (an untrained model's stamps)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=axis)


def _log10(a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, np.log10(np.where(a > 0, a, 1.0)), np.nan)


def sweep(
    decode: Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray],
    latents: np.ndarray,
    name: str,
    values: np.ndarray,
    medians: dict[str, float] | list[dict[str, float]],
    pixel_scale: float,
) -> dict[str, Any]:
    """Decode every latent at each of ``values`` of condition ``name``; sizes and fluxes per grid point.

    ``decode(z, conditions)`` returns physical (n, H, W) stamps for latents ``z`` (n, z_dim) and a
    dict of per-row condition arrays.  ``medians``: the other conditions' values, one dict for every grid
    point or one per grid point (see :func:`along_population`).
    """
    n = latents.shape[0]
    sigma = np.full((len(values), n), np.nan)
    flux = np.full((len(values), n), np.nan)
    for i, v in enumerate(values):
        at = medians[i] if isinstance(medians, list) else medians
        conds = {k: np.full(n, m, dtype=np.float32) for k, m in at.items()}
        conds[name] = np.full(n, v, dtype=np.float32)
        imgs = decode(latents, conds)
        st = moments(imgs, pixel_scale)
        sigma[i], flux[i] = st["sigma_arcsec"], imgs.reshape(n, -1).sum(axis=1)
    return {"values": [float(v) for v in values], "median_sigma_arcsec": _nanmedian(sigma, axis=1).tolist(),
            "median_flux": _nanmedian(flux, axis=1).tolist(),
            "dlog10_sigma": float(_nanmedian(_log10(sigma[-1]) - _log10(sigma[0]))),
            "dlog10_flux": float(_nanmedian(_log10(flux[-1]) - _log10(flux[0])))}  # fmt: skip


def along_population(conds: dict[str, np.ndarray], name: str, values: np.ndarray) -> list[dict[str, float]]:
    """The other conditions where the real galaxies are: their medians in each bin of ``name`` around the grid.

    Moving one condition with the others held at their global medians asks for galaxies the population does
    not have (a faint galaxy of a bright galaxy's size), and its response need not match the real galaxies'
    trend, which mixes all conditions.  Along the population it should.
    """
    edges = np.concatenate([[-np.inf], (values[1:] + values[:-1]) / 2, [np.inf]])
    x = conds[name]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (x >= lo) & (x < hi)
        out.append(
            {k: float(np.median(v[sel])) if sel.sum() >= 3 else float(np.median(v)) for k, v in conds.items()}
        )
    return out


def real_change(cond: np.ndarray, sigma: np.ndarray, flux: np.ndarray, values: np.ndarray) -> dict[str, Any]:
    """Binned medians of the real galaxies at the grid values, and the change from the first to the last."""
    edges = np.concatenate([[-np.inf], (values[1:] + values[:-1]) / 2, [np.inf]])
    med_s, med_f, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (cond >= lo) & (cond < hi)
        counts.append(int(sel.sum()))
        med_s.append(float(_nanmedian(sigma[sel])) if sel.sum() >= 3 else None)
        med_f.append(float(_nanmedian(flux[sel])) if sel.sum() >= 3 else None)

    def change(meds: list[float | None]) -> float | None:
        a, b = meds[0], meds[-1]
        return float(np.log10(b / a)) if a and b and a > 0 and b > 0 else None

    return {"bin_counts": counts, "median_sigma_arcsec": med_s, "median_flux": med_f,
            "dlog10_sigma": change(med_s), "dlog10_flux": change(med_f)}  # fmt: skip


def ratio(gen: float | None, real: float | None) -> float | None:
    """Generated response over the real change (1 = the decoder follows the data; 0 = it ignores the condition)."""
    if gen is None or real is None or abs(real) < 1e-3 or not np.isfinite(gen):
        return None
    return float(gen / real)
