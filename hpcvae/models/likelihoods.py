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
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from hpcvae.errors import ModelError

LikelihoodName = Literal["mse", "gaussian", "calibrated"]
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
        var = inputs.get("noise_var")
        if model.transform is None or var is None:
            raise ModelError(
                f"{model.arch}: likelihood 'gaussian' needs the normalisation attached (set_normalisation) "
                "and each galaxy's noise variance (batch['noise_var'], from the shards' NOISE_VARIANCE)"
            )
        var = torch.as_tensor(var, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        resid = model.transform.inverse(recon) - model.transform.inverse(x)
        return 0.5 * (resid.square() / var.clamp_min(1e-30)).sum()


class Calibrated(Likelihood):
    name = "calibrated"
    default_beta = 1.0

    def nll(self, model: Any, recon: torch.Tensor, x: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        d = x[0].numel()
        mse = (recon - x).square().flatten(1).mean(dim=1)
        # At sigma^2 = mse the Gaussian NLL is (D/2)(log(2 pi sigma^2) + 1): the constant keeps it a true NLL.
        return 0.5 * d * (torch.log(mse.clamp_min(CALIBRATED_FLOOR)) + math.log(2 * math.pi) + 1).sum()


LIKELIHOODS: dict[str, Likelihood] = {lk.name: lk for lk in (MSE(), Gaussian(), Calibrated())}


def get_likelihood(name: str) -> Likelihood:
    if name not in LIKELIHOODS:
        raise ModelError(f"unknown likelihood {name!r} (choices: {', '.join(LIKELIHOODS)})")
    return LIKELIHOODS[name]
