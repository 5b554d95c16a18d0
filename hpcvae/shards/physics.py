"""What a pixel means, for the manifest's ``physics``: scale, band, unit, noise, PSF, float16 rounding.

model.json copies it, so a generated galaxy's FITS header can say what its pixels are.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from hpcvae.shards.format import PSF, PSF_MEAN


def rounding(results: list[Any], noise_std: float | None) -> dict[str, Any]:
    """What storing float16 changed: the pixels' rounding error, absolute and against the sky noise."""
    n = sum(r.round_n for r in results)
    rms = math.sqrt(sum(r.round_sq for r in results) / n) if n else 0.0
    mx = max((r.round_max for r in results), default=0.0)
    return {"max_abs": mx, "rms": rms, "rms_over_noise_std": rms / noise_std if noise_std else None,
            "max_over_noise_std": mx / noise_std if noise_std else None}  # fmt: skip


def pad_psf(psf: np.ndarray, side: int) -> np.ndarray:
    """``psf`` zero-padded to ``side`` x ``side`` with its centre pixel, ((n - 1) // 2) per axis, kept centred.

    Why: a RealGalaxyCatalog's PSF images differ in shape (GalSim's COSMOS example holds 37x37, 37x39,
    39x37 and 39x39), but a batch stacks one shape and ``psf_convolve`` takes the centre at (P - 1) // 2.
    """
    ny, nx = psf.shape
    if side < max(ny, nx):
        raise ValueError(f"a {ny}x{nx} PSF does not fit in {side}x{side}")
    before = [(side - 1) // 2 - (n - 1) // 2 for n in (ny, nx)]
    return np.pad(psf, [(b, side - n - b) for b, n in zip(before, (ny, nx))])


def add_psf(total: np.ndarray | None, psf: np.ndarray) -> np.ndarray:
    """``total + psf``, both brought to the larger of their sides (the running sum behind the mean PSF)."""
    side = max(psf.shape[0], 0 if total is None else total.shape[0])
    out = pad_psf(total, side) if total is not None else np.zeros((side, side), np.float64)
    return out + pad_psf(psf, side)


def physics_record(
    src: Any, cfg: Any, results: list[Any], stats: dict[str, Any], out: Path
) -> dict[str, Any]:
    """The manifest's ``physics``: what a pixel means (scale, band, unit, noise, PSF); model.json copies it."""
    header = next((r.header for r in results if r.header), {})
    scales = [r.pixel_scale for r in src.rows if r.pixel_scale]
    scale = cfg.pixel_scale or (float(np.median(scales)) if scales else None)
    bands = sorted({r.band for r in src.rows if r.band})
    band = cfg.band or ("+".join(bands) if bands else header.get("FILTER"))
    instrument = cfg.instrument or (
        "/".join(x for x in (header.get("TELESCOP"), header.get("INSTRUME")) if x) or None
    )
    psf_n = sum(r.psf_n for r in results)
    psf: dict[str, Any] = {"in_images": src.psf_in_images, "per_galaxy": psf_n > 0}
    if psf_n:
        total = None
        for r in results:
            if r.psf_sum is not None:
                total = add_psf(total, r.psf_sum)
        assert total is not None
        shape = total.shape
        mean = (total / total.sum()).astype(np.float32)
        tmp = out / f".{PSF_MEAN}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, mean)
        os.replace(tmp, out / PSF_MEAN)
        psf |= {"member": PSF, "mean_file": PSF_MEAN, "n": psf_n, "shape": list(shape),
                "fwhm_arcsec": fwhm(mean, scale)}  # fmt: skip
    zp = (cfg.zeropoint, "--zeropoint") if cfg.zeropoint is not None else src.zeropoint
    return {
        "pixel_scale_arcsec": scale,
        "band": band,
        "instrument": instrument,
        "bunit": fits_unit(cfg.bunit or header.get("BUNIT")),
        "bunit_original": cfg.bunit or header.get("BUNIT"),
        "zeropoint": zp[0] if zp else None,
        "zeropoint_source": zp[1] if zp else None,
        "noise_std": stats.get("noise_std"),
        "psf": psf,
    }


ELECTRON_UNITS = ("electrons", "electron", "e-", "e")
"""How HST and other archives spell electrons; the FITS standard has no electron unit, so they become counts."""


def fits_unit(bunit: str | None) -> str | None:
    """BUNIT in the FITS standard's spelling, parseable by ``astropy.units.Unit(..., format="fits")``.

    HST stamps say ``ELECTRONS/S``, which the standard does not define: a detected electron is one count,
    so it becomes ``count s-1`` (the original spelling is kept in the manifest as ``bunit_original``).
    A unit astropy cannot read is kept as written.
    """
    if not bunit:
        return bunit
    from astropy import units as u

    text = str(bunit).strip()
    low = text.lower()
    for e in ELECTRON_UNITS:
        low = re.sub(rf"(?<![a-z]){re.escape(e)}(?![a-z])", "count", low)
    for candidate in (text, low):
        try:
            return u.Unit(candidate, format="fits").to_string("fits")
        except ValueError:
            continue
    return text


def fwhm(psf: np.ndarray, scale: float | None) -> float | None:
    if not scale:
        return None
    import galsim

    try:
        return float(galsim.ImageD(psf.astype(np.float64), scale=scale).calculateFWHM())
    except galsim.GalSimError:
        return None
