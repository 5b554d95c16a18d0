"""The redshift relations behind the synthetic galaxies, as pure functions.

``hpcvae.synth`` draws every galaxy from these relations, and the tests and the
evaluation compare measured sizes and fluxes against them, so they live apart from
the rendering code and take plain floats or numpy arrays.

Model (flat ΛCDM, H0 = 70 km/s/Mpc, Ωm = 0.3, via astropy's ``FlatLambdaCDM``):

* **Redshift.** Smail et al. (1994) n(z) ∝ z^α exp(-(z/z0)^β) with α = 2, β = 1.5
  and z0 chosen so that the mode is at z = 0.7, truncated to [0.05, 3].  Under
  x = (z/z0)^β it is a Gamma((α+1)/β) = Gamma(2) law, which is how it is sampled.
* **Size.** Physical circularised half-light radius R_e (kpc) is log-normal with
  median R_e0 (1+z)^-0.75 (R_e0 = 3.5 kpc; the slope is van der Wel et al. 2014's
  late-type size evolution) and ln-scatter 0.4.  The apparent radius is
  θ = R_e / D_A(z), so ``expected_hlr_arcsec(z) = R_e0 (1+z)^-0.75 / D_A(z)``
  (in arcsec) is the exact median at fixed z.  At the mode (z = 0.7) this is
  ≈ 0.33″ ≈ 11 px at 0.03″/px.
* **Flux.** Absolute magnitude M ~ Normal(-20.5, 1.0) (no K-correction, no
  evolution), apparent m = M + μ(z) with the distance modulus
  μ = 5 log10(D_L / 10 pc); that is flux ∝ L / (4π D_L²).  Like the COSMOS
  F814W < 23.5 training sample, only galaxies with m ≤ 23.5 are kept: M is drawn
  from the normal truncated at M_lim(z) = 23.5 - μ(z), so n(z) stays the Smail law
  while faint galaxies drop out at high z (Malmquist bias).  The median of that
  truncated normal gives ``expected_mag(z)``; fluxes are in image units with the
  COSMOS zeropoint 26.0 (mag = 26.0 - 2.5 log10 flux, measured on the real
  ``_fits`` catalog), so ``expected_flux(z) = 10**(-0.4 (expected_mag(z) - 26))``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.special import ndtr, ndtri

H0 = 70.0
OM0 = 0.3
ARCSEC_PER_RAD = 206264.80624709636

Z_MIN = 0.05
Z_MAX = 3.0
Z_PEAK = 0.7
SMAIL_ALPHA = 2.0
SMAIL_BETA = 1.5
SMAIL_Z0 = Z_PEAK / (SMAIL_ALPHA / SMAIL_BETA) ** (1.0 / SMAIL_BETA)

RE0_KPC = 3.5
SIZE_EVOLUTION = 0.75
SIGMA_LN_RE = 0.4

ABS_MAG_MEAN = -20.5
ABS_MAG_SIGMA = 1.0
MAG_LIMIT = 23.5
ZEROPOINT = 26.0

ArrayLike = float | np.ndarray


@lru_cache(maxsize=1)
def _cosmo():
    # astropy import is slow (~1 s); only pay it when a distance is needed.
    from astropy.cosmology import FlatLambdaCDM

    return FlatLambdaCDM(H0=H0, Om0=OM0)


def angular_diameter_distance_mpc(z: ArrayLike) -> np.ndarray:
    return np.asarray(_cosmo().angular_diameter_distance(np.asarray(z, dtype=float)).value)


def luminosity_distance_mpc(z: ArrayLike) -> np.ndarray:
    return np.asarray(_cosmo().luminosity_distance(np.asarray(z, dtype=float)).value)


def distance_modulus(z: ArrayLike) -> np.ndarray:
    """μ(z) = 5 log10(D_L / 10 pc)."""
    return 5.0 * np.log10(luminosity_distance_mpc(z) * 1e5)


def smail_pdf(z: ArrayLike) -> np.ndarray:
    """Normalised n(z) on [Z_MIN, Z_MAX] (zero outside)."""
    from scipy.special import gamma, gammainc

    z = np.asarray(z, dtype=float)
    k = (SMAIL_ALPHA + 1.0) / SMAIL_BETA
    xlo, xhi = (Z_MIN / SMAIL_Z0) ** SMAIL_BETA, (Z_MAX / SMAIL_Z0) ** SMAIL_BETA
    norm = (gammainc(k, xhi) - gammainc(k, xlo)) * gamma(k) * SMAIL_Z0 ** (SMAIL_ALPHA + 1) / SMAIL_BETA
    pdf = z**SMAIL_ALPHA * np.exp(-((np.clip(z, 0, None) / SMAIL_Z0) ** SMAIL_BETA)) / norm
    return np.where((z >= Z_MIN) & (z <= Z_MAX), pdf, 0.0)


def redshift_from_gamma(x: ArrayLike) -> np.ndarray:
    """Map a Gamma((α+1)/β) variate to z; callers reject z outside [Z_MIN, Z_MAX]."""
    return SMAIL_Z0 * np.asarray(x, dtype=float) ** (1.0 / SMAIL_BETA)


def median_re_kpc(z: ArrayLike) -> np.ndarray:
    return RE0_KPC * (1.0 + np.asarray(z, dtype=float)) ** (-SIZE_EVOLUTION)


def re_kpc_to_arcsec(re_kpc: ArrayLike, z: ArrayLike) -> np.ndarray:
    """θ = R_e / D_A(z)."""
    return np.asarray(re_kpc, dtype=float) / (angular_diameter_distance_mpc(z) * 1e3) * ARCSEC_PER_RAD


def expected_hlr_arcsec(z: ArrayLike) -> np.ndarray:
    """Median apparent half-light radius at redshift z (exact: size does not depend on flux)."""
    return re_kpc_to_arcsec(median_re_kpc(z), z)


def abs_mag_limit(z: ArrayLike) -> np.ndarray:
    """Faintest absolute magnitude that still passes the m ≤ MAG_LIMIT cut at z."""
    return MAG_LIMIT - distance_modulus(z)


def abs_mag_from_uniform(u: ArrayLike, z: ArrayLike) -> np.ndarray:
    """Inverse CDF of the absolute-magnitude normal truncated at the flux limit (u in (0, 1))."""
    b = (abs_mag_limit(z) - ABS_MAG_MEAN) / ABS_MAG_SIGMA
    return ABS_MAG_MEAN + ABS_MAG_SIGMA * ndtri(np.asarray(u, dtype=float) * ndtr(b))


def median_abs_mag(z: ArrayLike) -> np.ndarray:
    """Median absolute magnitude of the galaxies that pass the flux limit at z."""
    return abs_mag_from_uniform(0.5, z)


def expected_mag(z: ArrayLike) -> np.ndarray:
    return median_abs_mag(z) + distance_modulus(z)


def mag_to_flux(mag: ArrayLike) -> np.ndarray:
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - ZEROPOINT))


def flux_to_mag(flux: ArrayLike) -> np.ndarray:
    return ZEROPOINT - 2.5 * np.log10(np.asarray(flux, dtype=float))


def expected_flux(z: ArrayLike) -> np.ndarray:
    """Median total flux (image units) of the selected galaxies at redshift z."""
    return mag_to_flux(expected_mag(z))
