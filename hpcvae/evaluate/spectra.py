"""Image power spectra, reconstruction residuals against the noise, and row/column artefacts.

Power spectra are azimuthal averages of ``|FFT|^2 / Npix`` (so white noise of variance s^2 has a
flat spectrum at s^2), in bins of spatial frequency k [cycles/pixel, 0 to 0.5].  A model whose
reconstruction residuals (real - reconstruction) are pure noise leaves a residual spectrum equal to
the noise spectrum at every k; excess power at low k is structure the decoder missed.

The noise spectrum is the Fourier transform of the noise's measured autocorrelation
(:class:`hpcvae.evaluate.noise.NoiseModel`: real minus noise-free truth on synthetic sets, else blank corner
patches), at the stamps' mean noise variance, so correlated noise (COSMOS's) is handled like white noise.

Artefacts: a decoder that upsamples badly prints streaks along rows or columns and a cross-hatch.
Two measures, both in units of the sky-noise sigma or as ratios:

* ``streak_rows`` / ``streak_cols``: in the outer band (S * 3/16 pixels wide, 12 at 64 px) of each
  stamp, the mean of each row (top and bottom bands) or column (left and right), then the RMS of its
  second differences, over the noise sigma.  Smooth isophotes give ~0, a striped row gives a spike;
  white noise alone gives sqrt(6 / S).
* ``axis_power_ratio``: in the mean 2-D power spectrum, the power on the kx = 0 and ky = 0 axes
  over the power at the same |k| on the diagonals; 1 for anything isotropic (noise, randomly
  oriented galaxies), > 1 for row/column structure.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BANDS = {"low": (0.0, 0.1), "mid": (0.1, 0.25), "high": (0.25, 0.5)}
"""Frequency bands [cycles/pixel] the report gives ratios in."""


def _stack(images: Any) -> np.ndarray:
    a = np.asarray(images, dtype=np.float64)
    return a[:, 0] if a.ndim == 4 else a


def k_bins(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(|k| of every FFT pixel [cycles/pixel], bin index of each, 0..nbins-1 or -1 beyond 0.5)."""
    f = np.fft.fftfreq(size)
    k = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    nb = size // 2
    idx = np.minimum((k * size).round().astype(int), nb + 1) - 1  # bin i holds |k| ~ (i + 1) / size
    idx[k > 0.5] = -1
    return k, idx


def azimuthal(p2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k bin centres [cycles/pixel], azimuthal mean) of a 2-D power spectrum in FFT order."""
    size = p2d.shape[0]
    _, idx = k_bins(size)
    nb = size // 2
    return (np.arange(nb) + 1) / size, np.array([p2d[idx == i].mean() for i in range(nb)])


def power_spectrum(images: Any) -> dict[str, Any]:
    """Mean azimuthally averaged power spectrum of (N, S, S) stamps: ``k`` bin centres and ``p``."""
    a = _stack(images)
    size = a.shape[-1]
    p2d = (np.abs(np.fft.fft2(a)) ** 2).mean(0) / (size * size)
    k, p = azimuthal(p2d)
    return {"k": k, "p": p, "n": a.shape[0], "p2d": p2d}


def noise_spectrum(model: Any, sigma: Any, size: int) -> dict[str, Any] | None:
    """The noise power spectrum of ``size``-pixel stamps of sky-noise ``sigma`` (per stamp), from a
    :class:`~hpcvae.evaluate.noise.NoiseModel`; None where it measured nothing."""
    if model.acf is None:
        return None
    sig = np.asarray(sigma, dtype=np.float64).reshape(-1)
    sig = sig[np.isfinite(sig) & (sig > 0)]
    if not len(sig):
        return None
    k, p = azimuthal(model.power(size) * float((sig**2).mean()))
    return {"k": k, "p": p, "from": model.source, "n": model.n}


def band_ratios(k: np.ndarray, num: np.ndarray, den: np.ndarray) -> dict[str, float | None]:
    """Mean of num / den in each of :data:`BANDS`."""
    out: dict[str, float | None] = {}
    for name, (lo, hi) in BANDS.items():
        sel = (k > lo) & (k <= hi) & (den > 0)
        out[name] = float((num[sel] / den[sel]).mean()) if sel.any() else None
    return out


def reduced_chi2(real: Any, recon: Any, noise_var: Any) -> np.ndarray:
    """Per-galaxy sum((x - x_hat)^2 / var) / Npix with each galaxy's sky-noise variance: 1 = noise only."""
    r, m = _stack(real), _stack(recon)
    var = np.asarray(noise_var, dtype=np.float64).reshape(-1)
    return ((r - m) ** 2).mean(axis=(1, 2)) / np.where(var > 0, var, np.nan)


def band_width(size: int) -> int:
    return max(2, round(size * 3 / 16))


def streaks(images: Any, sigma: Any) -> dict[str, np.ndarray]:
    """Per-stamp ``streak_rows``, ``streak_cols`` (noise sigma) in the outer band; see the module doc."""
    a = _stack(images)
    size = a.shape[-1]
    w = band_width(size)
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (a.shape[0],))

    def rms_d2(profile: np.ndarray) -> np.ndarray:  # (N, L) -> (N,)
        d2 = profile[:, 2:] - 2 * profile[:, 1:-1] + profile[:, :-2]
        return np.sqrt((d2**2).mean(axis=1))

    rows = np.concatenate([a[:, :w, :].mean(axis=2), a[:, -w:, :].mean(axis=2)], axis=1)
    cols = np.concatenate([a[:, :, :w].mean(axis=1), a[:, :, -w:].mean(axis=1)], axis=1)
    rows_top, rows_bottom = rows[:, :w], rows[:, w:]
    cols_left, cols_right = cols[:, :w], cols[:, w:]
    sr = np.sqrt((rms_d2(rows_top) ** 2 + rms_d2(rows_bottom) ** 2) / 2)
    sc = np.sqrt((rms_d2(cols_left) ** 2 + rms_d2(cols_right) ** 2) / 2)
    return {"streak_rows": sr / sig, "streak_cols": sc / sig}


def axis_power_ratio(p2d: np.ndarray) -> float | None:
    """Power on the kx = 0 / ky = 0 axes over the diagonals' at the same |k| (0.1 < |k| < 0.5)."""
    size = p2d.shape[0]
    f = np.fft.fftfreq(size)
    kx, ky = np.meshgrid(f, f, indexing="ij")
    k = np.hypot(kx, ky)
    axis = ((kx == 0) | (ky == 0)) & (k > 0.1) & (k < 0.5)
    diag = (np.abs(np.abs(kx) - np.abs(ky)) < 1.0 / size) & (k > 0.1) & (k < 0.5)
    if not axis.any() or not diag.any():
        return None
    # Compare at matched |k|: fit each set's log-power against |k| on common bins.
    edges = np.linspace(0.1, 0.5, 6)
    ratios = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        a_sel, d_sel = axis & (k >= lo) & (k < hi), diag & (k >= lo) & (k < hi)
        if a_sel.any() and d_sel.any() and p2d[d_sel].mean() > 0:
            ratios.append(p2d[a_sel].mean() / p2d[d_sel].mean())
    return float(np.mean(ratios)) if ratios else None


def artefacts(images: Any, sigma: Any, p2d: np.ndarray | None = None) -> dict[str, Any]:
    """The artefact measures of one set of stamps (medians over stamps, and the 2-D power ratio)."""
    s = streaks(images, sigma)
    p2d = power_spectrum(images)["p2d"] if p2d is None else p2d
    return {
        "streak_rows_median": float(np.nanmedian(s["streak_rows"])),
        "streak_cols_median": float(np.nanmedian(s["streak_cols"])),
        "axis_power_ratio": axis_power_ratio(p2d),
        "per_stamp": s,
    }
