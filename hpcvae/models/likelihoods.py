"""Reconstruction likelihoods, one entry each in :data:`LIKELIHOODS`.

A likelihood turns (reconstruction, image) into the summed negative log-likelihood the loss adds
to ``beta * KL``.  It names the per-galaxy batch inputs it needs (``needs``: batch keys such as
``noise_var``); the loader and trainer ask for those instead of testing likelihood names, so a new
likelihood is one class here plus its registration line (and its name in ``LikelihoodName``).

* ``mse`` (the seed's): squared error of the normalised images, summed.  As a Gaussian likelihood it
  has variance beta/2 per normalised pixel, so the right beta depends on the data set's noise level
  and normalisation: 0.03 suits ``hpcvae.synth``'s simple set, not another.
* ``gaussian``: the chi^2 in physical units with each galaxy's sky-noise variance (galaxy2galaxy's).
* ``calibrated`` (sigma-VAE, Rybkin et al. 2021): a Gaussian whose variance is set analytically, per
  galaxy, to the maximum-likelihood value sigma_i^2 = mean((x - x_hat)^2) of its own reconstruction.
  The NLL is then (D/2) log sigma_i^2 (+ const), a proper likelihood for any noise level and
  normalisation, so beta = 1 is the ELBO and nothing needs tuning per data set.  sigma_i^2 is floored
  at ``CALIBRATED_FLOOR`` (normalised units) so a perfect fit cannot diverge.
* ``calibrated_noise``: each pixel's variance is its sky noise carried through the normalisation (the
  galaxy's noise variance times the squared slope of the normalisation at the reconstruction) plus one
  misfit variance per galaxy, set analytically to its maximum-likelihood value.  ``calibrated`` gives
  every normalised pixel the same variance, so under asinh a bright core, whose noise the log compresses,
  weighs no more than a sky pixel and the decoder misses small galaxies' cores (their sizes come out
  10-17% too big); here a core weighs what its noise says until the model's own misfit dominates.  A model
  that fits to the noise makes it galaxy2galaxy's chi^2, a poor one sigma-VAE's; beta = 1 stays the ELBO.
  The slope is taken at the reconstruction, not the data: weights from noisy pixels favour upward
  fluctuations (a 10-16% flux bias, measured).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from hpcvae.errors import ModelError

LikelihoodName = Literal["mse", "gaussian", "calibrated", "calibrated_noise"]
CALIBRATED_FLOOR = 1e-6
"""Smallest per-galaxy variance of ``calibrated`` (normalised units; asinh-normalised noise is ~1e-3)."""


class Likelihood:
    """One reconstruction term; subclasses set ``name``, ``needs`` and implement :meth:`nll`."""

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    """Batch keys (besides ``image``) this likelihood reads: the loader must provide them."""
    physical: ClassVar[bool] = False
    """Compares physical pixels: the model needs its normalisation attached."""
    default_beta: ClassVar[float | None] = None
    """The KL weight that makes the loss a proper ELBO, where one exists (``calibrated``: 1)."""
    without_noise: ClassVar[str | None] = None
    """Where this is an architecture's default and the shard set carries no noise variance, the likelihood
    used instead (``calibrated_noise`` -> ``calibrated``); an explicit choice is never replaced."""

    def nll(self, model: Any, recon: torch.Tensor, x: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """Summed negative log-likelihood (over batch and pixels) of ``x`` given ``recon`` (normalised, fp32)."""
        raise NotImplementedError


class MSE(Likelihood):
    name = "mse"

    def nll(self, model: Any, recon: torch.Tensor, x: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return F.mse_loss(recon, x, reduction="sum")


class Gaussian(Likelihood):
    name = "gaussian"
    needs = ("noise_var",)
    physical = True

    def nll(self, model: Any, recon: torch.Tensor, x: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        var = _noise_var(model, inputs.get("noise_var"), x, self.name)
        resid = model.transform.inverse(recon) - model.transform.inverse(x)
        return 0.5 * (resid.square() / var).sum()


class Calibrated(Likelihood):
    name = "calibrated"
    default_beta = 1.0

    def nll(self, model: Any, recon: torch.Tensor, x: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        d = x[0].numel()
        mse = (recon - x).square().flatten(1).mean(dim=1)
        # At sigma^2 = mse the Gaussian NLL is (D/2)(log(2 pi sigma^2) + 1): the constant keeps it a true NLL.
        return 0.5 * d * (torch.log(mse.clamp_min(CALIBRATED_FLOOR)) + math.log(2 * math.pi) + 1).sum()


def _noise_var(model: Any, var: Any, x: torch.Tensor, name: str) -> torch.Tensor:
    """Each galaxy's physical noise variance as (B, 1, 1, 1), or the one-line error saying what is missing."""
    if model.transform is None or var is None:
        raise ModelError(
            f"{model.arch}: likelihood {name!r} needs the normalisation attached (set_normalisation) "
            "and each galaxy's noise variance (batch['noise_var'], from the shards' NOISE_VARIANCE)"
        )
    return torch.as_tensor(var, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1).clamp_min(1e-30)


class CalibratedNoise(Likelihood):
    name = "calibrated_noise"
    needs = ("noise_var",)
    default_beta = 1.0
    without_noise = "calibrated"
    steps: ClassVar[int] = 24
    """Bisection steps for log m^2 (range ~20 nats / 2^24: far below anything that moves the loss)."""

    def nll(self, model: Any, recon: torch.Tensor, x: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        sd = _noise_var(model, inputs.get("noise_var"), x, self.name).sqrt()
        with torch.no_grad():
            t, rd = model.transform, recon.detach().float()
            mid = t.inverse(rd)
            s2 = (0.5 * (t.forward(mid + sd) - t.forward(mid - sd))).square().flatten(1)
            m2 = self.misfit(s2, (rd - x).square().flatten(1))
            var = (s2 + m2).reshape(recon.shape)
        return 0.5 * ((recon - x).square() / var + torch.log(2 * math.pi * var)).sum()

    @classmethod
    def misfit(cls, s2: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
        """Per row, the m^2 >= floor that maximises the likelihood of residuals r^2 with variances s^2 + m^2.

        d NLL / d log m^2 = m^2 sum((v - r^2) / v^2), v = s^2 + m^2; its sign is found by bisection in log m^2
        (no host sync; a closed form exists only for s = 0, sigma-VAE's).  Returns (B, 1).
        """
        lo = torch.full_like(r2[:, :1], math.log(CALIBRATED_FLOOR))
        hi = torch.maximum(torch.log(r2.amax(dim=1, keepdim=True).clamp_min(CALIBRATED_FLOOR)), lo) + 1.0
        for _ in range(cls.steps):
            mid = 0.5 * (lo + hi)
            v = s2 + mid.exp()
            rising = ((v - r2) / v.square()).sum(dim=1, keepdim=True) < 0  # the NLL still falls as m^2 grows
            lo, hi = torch.where(rising, mid, lo), torch.where(rising, hi, mid)
        return (0.5 * (lo + hi)).exp()


LIKELIHOODS: dict[str, Likelihood] = {
    lk.name: lk for lk in (MSE(), Gaussian(), Calibrated(), CalibratedNoise())
}


def get_likelihood(name: str) -> Likelihood:
    if name not in LIKELIHOODS:
        raise ModelError(f"unknown likelihood {name!r} (choices: {', '.join(LIKELIHOODS)})")
    return LIKELIHOODS[name]
