"""Per-stamp measurements gathered while the report streams its batches, one :class:`StampSet` per set.

The sets are the real galaxies, their reconstructions, the generated galaxies, the reconstruction
residuals (power spectrum only) and, for synthetic data, the real galaxies without noise.  Each
batch is measured and dropped, except the first ``keep`` stamps (for statmorph, which is too slow
to run on all of them) and the running sum of the 2-D power spectrum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpcvae.evaluate import spectra
from hpcvae.evaluate.moments import border_median, merge_moments, moments


@dataclass(kw_only=True)
class StampSet:
    """Streaming measurements of one set of physical-unit stamps."""

    name: str
    keep: int = 0
    """Stamps kept whole (for the morphology statistics)."""
    hsm: bool = True
    """Measure HSM moments (the residuals' set does not)."""
    n: int = 0
    parts: list[dict[str, np.ndarray]] = field(default_factory=list)
    flux: list[np.ndarray] = field(default_factory=list)
    border: list[np.ndarray] = field(default_factory=list)
    streak_rows: list[np.ndarray] = field(default_factory=list)
    streak_cols: list[np.ndarray] = field(default_factory=list)
    sigma: list[np.ndarray] = field(default_factory=list)
    kept: list[np.ndarray] = field(default_factory=list)
    ps_sum: np.ndarray | None = None

    def add(self, phys: Any, sigma: Any) -> None:
        """Measure a batch (B, H, W) of physical stamps whose sky-noise sigma is ``sigma`` (scalar or (B,))."""
        a = np.asarray(phys, dtype=np.float64)
        if a.ndim == 4:
            a = a[:, 0]
        b, size = a.shape[0], a.shape[-1]
        sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (b,)).copy()
        if self.hsm:
            self.parts.append(moments(a, 1.0))
            self.border.append(border_median(a))
        self.flux.append(a.reshape(b, -1).sum(axis=1))
        s = spectra.streaks(a, sig)
        self.streak_rows.append(s["streak_rows"])
        self.streak_cols.append(s["streak_cols"])
        self.sigma.append(sig)
        p2 = (np.abs(np.fft.fft2(a)) ** 2).sum(0) / (size * size)
        self.ps_sum = p2 if self.ps_sum is None else self.ps_sum + p2
        room = self.keep - sum(len(k) for k in self.kept)
        if room > 0:
            self.kept.append(a[:room].astype(np.float32))
        self.n += b

    def finish(self, pixel_scale: float) -> dict[str, Any]:
        """The set's arrays: HSM moments (sizes in arcsec), pixel-sum flux, borders, streaks, power spectrum."""
        out: dict[str, Any] = {"n": self.n}
        if self.hsm and self.parts:
            out["hsm"] = merge_moments(self.parts, pixel_scale)
            out["border"] = np.concatenate(self.border)
        out["flux"] = np.concatenate(self.flux) if self.flux else np.zeros(0)
        out["sigma"] = np.concatenate(self.sigma) if self.sigma else np.zeros(0)
        out["streak_rows"] = np.concatenate(self.streak_rows) if self.streak_rows else np.zeros(0)
        out["streak_cols"] = np.concatenate(self.streak_cols) if self.streak_cols else np.zeros(0)
        out["kept"] = np.concatenate(self.kept) if self.kept else np.zeros((0, 0, 0), np.float32)
        if self.ps_sum is not None:
            p2d = self.ps_sum / self.n
            k, p = spectra.azimuthal(p2d)
            out["ps"] = {"k": k, "p": p, "p2d": p2d}
        return out
