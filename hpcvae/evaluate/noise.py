"""The sky noise of the real stamps, measured and redrawn, so noise-free images are judged like real ones.

A decoder's output is the mean image: it has no noise.  Statistics that a noisy image biases
(statmorph's asymmetry and M20, the segmentation behind all of them) are only comparable when the
generated (and baseline) stamps carry the same noise as the real ones, as galaxy2galaxy's comparisons
add COSMOS noise to theirs; and reconstruction residuals are judged against the noise's power spectrum.
The noise is learnt from the real stamps themselves:

* **Exactly, where the set is synthetic**: real stamp minus its noise-free truth is the noise itself
  (:meth:`NoiseModel.from_noise`).
* **Otherwise from blank patches**: the four corner squares of side S/4 of each real stamp, kept when
  no pixel of the stamp's source mask (3 robust sigma after a 1-pixel smoothing, 5 pixels or more, grown
  by 3) falls in them *and* their mean is within ``BLANK_MEAN`` of the galaxy's sky-noise sigma, each
  divided by that sigma.  The mask alone is relative to the stamp, so the faint wings
  of a galaxy that fills its stamp passed it: on COSMOS-like stamps the "noise" came out correlated at
  0.99 between neighbouring pixels where COSMOS's is 0.47, and its power spectrum 5-50x too high.
* **Correlation**: the patches' (or noise fields') mean autocorrelation at lags up to ``MAX_LAG``
  pixels, normalised to 1 at lag 0.  COSMOS's drizzled noise is correlated over ~2 pixels; white noise
  gives a delta.  Its 2-D Fourier transform is the noise power spectrum at any stamp size.
* **Draws**: white noise filtered by the square root of that power spectrum (negative power clipped),
  then scaled by each stamp's sigma, so a draw has the real noise's variance and correlation.  Without
  blank patches the noise is white, and the report says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_LAG = 6
"""Largest lag (pixels) of the measured correlation; COSMOS noise is negligible beyond ~4."""
DETECT = 3.0
"""Source pixels: the smoothed image above this many times the smoothed image's robust sigma."""
GROW = 3
"""Source masks are grown by this many pixels."""
BLANK_MEAN = 0.3
"""A blank patch's mean is at most this many of its galaxy's sky-noise sigma: COSMOS noise averages to
~0.1 sigma over a 16-pixel patch; the wings of a galaxy that fills its stamp do not."""


def source_mask(images: np.ndarray) -> np.ndarray:
    """Pixels of galaxy light, (N, S, S) bool: a 1-pixel Gaussian smoothing above ``DETECT`` times its own
    robust (MAD) sigma, which holds for correlated noise too, in groups of at least 5 pixels, grown by
    ``GROW`` pixels so faint wings stay out of the patches."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(images, sigma=(0, 1.0, 1.0), mode="constant")
    med = np.median(smooth, axis=(1, 2), keepdims=True)
    mad = 1.4826 * np.median(np.abs(smooth - med), axis=(1, 2), keepdims=True)
    hot = smooth - med > DETECT * mad
    mask = np.zeros_like(hot)
    for i in range(hot.shape[0]):
        lab, n = ndimage.label(hot[i])
        if n:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            mask[i] = sizes[lab] >= 5
    return ndimage.binary_dilation(mask, structure=np.ones((1, 2 * GROW + 1, 2 * GROW + 1), bool))


def blank_patches(images: Any, sigma: Any, normalise: bool = True) -> np.ndarray:
    """Corner patches (M, s, s) of side ``max(8, S // 4)`` free of galaxy light (over ``sigma`` if ``normalise``)."""
    a = np.asarray(images, dtype=np.float64)
    a = a[:, 0] if a.ndim == 4 else a
    s = max(8, a.shape[-1] // 4)
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (a.shape[0],)).copy()
    good = np.isfinite(sig) & (sig > 0)
    a, sig = a[good], sig[good]
    if not len(a):
        return np.zeros((0, s, s))
    mask = source_mask(a)
    out = []
    for rows in (slice(0, s), slice(-s, None)):
        for cols in (slice(0, s), slice(-s, None)):
            ok = ~mask[:, rows, cols].any(axis=(1, 2))
            ok &= np.abs(a[:, rows, cols].mean(axis=(1, 2))) <= BLANK_MEAN * sig
            c = a[ok][:, rows, cols]
            out.append(c / sig[ok][:, None, None] if normalise else c)
    return np.concatenate(out)


def correlation(images: Any, sigma: Any, max_lag: int = MAX_LAG) -> np.ndarray | None:
    """The noise autocorrelation (2 L + 1, 2 L + 1) from blank patches, 1 at the centre; None with fewer than 4."""
    p = blank_patches(images, sigma)
    return _acf(p, max_lag) if p.shape[0] >= 4 else None


def _acf(fields: np.ndarray, max_lag: int = MAX_LAG) -> np.ndarray | None:
    """Mean autocorrelation of noise fields (M, s, s) in sigma units, less their common mean (the sky).

    Not each field's own mean: that biases every lag low by ~(sum of the correlation) / s^2, which adds up
    to a quarter of COSMOS noise's power at the lowest frequencies."""
    p = fields - fields.mean()
    s = p.shape[-1]
    lag = min(max_lag, s // 2 - 1)
    f = np.fft.fft2(p, s=(2 * s, 2 * s))
    acf = np.fft.ifft2((np.abs(f) ** 2).sum(0)).real
    pairs = np.fft.ifft2(np.abs(np.fft.fft2(np.ones((s, s)), s=(2 * s, 2 * s))) ** 2).real * p.shape[0]
    acf = acf / np.maximum(pairs, 1.0)
    idx = np.arange(-lag, lag + 1) % (2 * s)
    out = acf[np.ix_(idx, idx)]
    return out / out[lag, lag] if out[lag, lag] > 0 else None


class NoiseModel:
    """Draws of the real stamps' sky noise (see the module doc); ``white`` when none could be measured."""

    def __init__(self, acf: np.ndarray | None, *, source: str = "given", n: int = 0) -> None:
        self.acf = acf
        self.white = acf is None
        self.source, self.n = source, n
        self._filters: dict[int, np.ndarray] = {}

    @classmethod
    def from_stamps(cls, images: Any, sigma: Any) -> NoiseModel:
        """From the blank corner patches of real stamps (sets without a noise-free truth)."""
        p = blank_patches(images, sigma)
        acf = _acf(p) if p.shape[0] >= 4 else None
        return cls(
            acf,
            source=f"{p.shape[0]} blank corner patches of side {p.shape[-1]} of the real stamps",
            n=p.shape[0],
        )

    @classmethod
    def from_noise(cls, fields: Any, sigma: Any) -> NoiseModel:
        """From noise fields themselves (real stamps minus their noise-free truth, on synthetic sets)."""
        a = np.asarray(fields, dtype=np.float64)
        a = a[:, 0] if a.ndim == 4 else a
        sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (a.shape[0],))
        good = np.isfinite(sig) & (sig > 0)
        acf = _acf(a[good] / sig[good][:, None, None]) if good.sum() >= 1 else None
        return cls(
            acf, source=f"{int(good.sum())} real stamps minus their noise-free truth", n=int(good.sum())
        )

    def power(self, size: int) -> np.ndarray:
        """The (size, size) 2-D power spectrum of unit-variance noise (``|FFT|^2 / Npix``, mean 1)."""
        return self._filter(size) ** 2

    def _filter(self, size: int) -> np.ndarray:
        if size not in self._filters:
            if self.acf is None:
                self._filters[size] = np.ones((size, size))
            else:
                lag = self.acf.shape[0] // 2
                grid = np.zeros((size, size))
                idx = np.arange(-lag, lag + 1) % size
                grid[np.ix_(idx, idx)] = self.acf
                power = np.clip(np.fft.fft2(grid).real, 0.0, None)
                self._filters[size] = np.sqrt(power / power.mean())  # unit variance
        return self._filters[size]

    def draw(self, n: int, size: int, sigma: Any, rng: np.random.Generator) -> np.ndarray:
        """(n, size, size) noise fields, field i of standard deviation ``sigma[i]`` (or a scalar)."""
        white = rng.standard_normal((n, size, size))
        field = np.fft.ifft2(np.fft.fft2(white) * self._filter(size)).real
        sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (n,))
        return field * np.nan_to_num(sig, nan=0.0)[:, None, None]

    def describe(self) -> dict[str, Any]:
        if self.acf is None:
            return {"kind": "white", "why": "no blank corner patches in the real stamps", "from": self.source}
        lag = self.acf.shape[0] // 2
        return {"kind": "correlated", "from": self.source, "max_lag": lag, "rho_1px_x": float(self.acf[lag, lag + 1]),
                "rho_1px_y": float(self.acf[lag + 1, lag]), "rho_diag": float(self.acf[lag + 1, lag + 1])}  # fmt: skip
