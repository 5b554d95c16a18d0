"""The interface every hpcvae model shares, and the size-generic conv stacks.

The seed had one notebook per model, each with its own calling convention (2-channel
inputs built in the training loop, ``.squeeze()``-ed outputs, the KL stored on the
encoder).  Here every architecture is a :class:`GalaxyVAE`: the same ``forward``,
losses and generation API, so the trainer, the evaluation and the users never branch
on the architecture name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hpcvae.errors import ModelError
from hpcvae.models.conditions import Conditioning
from hpcvae.models.likelihoods import get_likelihood
from hpcvae.models.spec import MIN_IMAGE_SIZE, ModelSpec, Reduction, VAEOutput  # noqa: F401  (re-exported)
from hpcvae.models.stacks import (  # noqa: F401  (the architectures' building blocks, re-exported)
    MIN_LATENT_SIDE,
    Geometry,
    build_decoder,
    build_encoder,
    down_kernel,
    geometry_halving,
    geometry_valid_head,
)

# ----------------------------------------------------------------------------------------
# The shared interface


class GalaxyVAE(nn.Module):
    """Base class of the five architectures.

    Subclasses build their layers and implement ``_encode(x, r) -> (mu, logvar)`` and
    ``_decode(z, r) -> (logits_image, z_pred | None)``; everything users call lives here.
    Images are (B, 1, H, W) in normalised [0, 1] space unless a transform is attached with
    :meth:`set_normalisation`.
    """

    arch: ClassVar[str] = ""
    conditional: ClassVar[bool] = False
    predicts_redshift: ClassVar[bool] = False
    geometry_rule: ClassVar[str] = "halving"
    seed_image_size: ClassVar[int | None] = None
    """The seed's image size for this architecture; only there may the bottleneck be below z_dim."""

    multi_condition: ClassVar[bool] = False
    """Takes a vector of conditions (``spec.conditions``) instead of the seed's one redshift."""
    has_margin: ClassVar[bool] = False
    """Draws ``spec.margin`` pixels beyond the stamp and crops them, and takes ``spec.padding`` (galaxy_film)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.margin and not self.has_margin:
            raise ModelError(
                f"model {spec.arch}: margin = {spec.margin} is galaxy_film's; this architecture takes 0"
            )
        if spec.padding != "zeros" and not self.has_margin:
            raise ModelError(
                f"model {spec.arch}: padding = {spec.padding!r} is galaxy_film's; this architecture takes 'zeros'"
            )
        self.spec = spec
        self.transform: Any = None
        self.output_noise_std: float | None = None
        """Set (model.json ``output``): decoder means go to flux with the noise-aware inverse."""
        self.flow_prior: nn.Module | None = None
        self.conditioning = Conditioning.from_records(None, spec.conditions or ("zphot",))
        self.likelihood = get_likelihood(spec.likelihood)
        self.geometry = self._make_geometry()
        self._check_bottleneck(self.bottleneck)

    def _make_geometry(self) -> Geometry | None:
        """The seed's conv-stack geometry for this image size (architectures of their own return None)."""
        size = self.spec.image_size
        return geometry_valid_head(size) if self.geometry_rule == "valid_head" else geometry_halving(size)

    @property
    def bottleneck(self) -> int:
        """Numbers the encoder hands to Linear -> z (the redshift not counted)."""
        return self.geometry.n_features

    def _check_bottleneck(self, n: int) -> None:
        """A latent wider than what feeds it is starved: its extra dimensions can only carry noise.

        The seed's own models at their own sizes are kept as they are (vae158: 25 numbers for
        z_dim 32); anywhere else it is an error, not a silent loss of shape information.
        """
        s = self.spec
        if n < s.z_dim and s.image_size != self.seed_image_size:
            raise ModelError(
                f"model {s.arch} at {s.image_size}px: its encoder hands {n} numbers to Linear -> z, fewer than "
                f"z_dim = {s.z_dim}; use galaxy_vae (an 8nf x k x k feature map), a larger image, or z_dim <= {n}"
            )

    # -- configuration ----------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """``build_model(**model.config)`` rebuilds this architecture (weights not included)."""
        return self.spec.to_dict()

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def z_dim(self) -> int:
        return self.spec.z_dim

    def set_normalisation(self, transform: Any, noise_std: float | None = None) -> GalaxyVAE:
        """Attach a ``hpcvae.transforms`` transform (or ``None`` to detach).

        With one attached, ``sample``/``reconstruct``/``interpolate`` speak physical flux,
        which is what astronomers compare against catalogs; ``normalized=True`` opts out.
        ``noise_std`` (the training pixels' noise sigma) makes :meth:`to_physical` noise-aware.
        """
        if transform is not None and not (hasattr(transform, "forward") and hasattr(transform, "inverse")):
            raise ModelError(
                f"set_normalisation: {type(transform).__name__} has no forward/inverse; "
                "pass a transform from hpcvae.transforms.get_transform"
            )
        self.transform = transform
        if noise_std is not None and not (math.isfinite(noise_std) and noise_std > 0):
            raise ModelError(
                f"set_normalisation: noise_std must be a finite positive number, got {noise_std}"
            )
        self.output_noise_std = noise_std
        return self

    def to_physical(self, images: torch.Tensor) -> torch.Tensor:
        """Decoder output (normalised) in flux units: the noise-free mean the decoder stands for.

        A likelihood in normalised units teaches the decoder E[forward(x)] of noisy pixels, which
        the plain inverse maps to too little flux near the noise (``Transform.mean_inverse``).
        """
        if self.output_noise_std and not self.likelihood.physical:
            return self.transform.mean_inverse(images, self.output_noise_std)
        return self.transform.inverse(images)

    def set_conditions(self, records: list[dict[str, Any]] | None) -> GalaxyVAE:
        """Attach the conditions' records (names, roles, train statistics: the shard manifest's ``conditions``).

        They set the training ranges that ``sample``/``interpolate`` check, the defaults of conditions a caller
        leaves out (the training median), and, for multi-condition models, the standardisation of the inputs.
        """
        if not self.conditional:
            return self
        names = self.spec.conditions if self.multi_condition else ()
        cond = Conditioning.from_records(records, names)
        if not self.multi_condition:  # the seed's one redshift: keep only that record
            z = cond.redshift_name or (cond.names[0] if cond.names else "zphot")
            cond = Conditioning.from_records([r for r in cond.records if r["name"] == z] or None, (z,))
            cond.redshift_name = z
        self.conditioning = cond
        self._conditioning_changed()
        return self

    def _conditioning_changed(self) -> None:
        """Subclasses that standardise their inputs refresh their constants here."""

    # -- argument checks --------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _check_image(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x):
            raise ModelError(f"{self.arch}: images must be a torch tensor, got {type(x).__name__}")
        if x.dim() == 3:  # (B, H, W), as the seed's loaders produced
            x = x.unsqueeze(1)
        s = self.spec.image_size
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != s or x.shape[3] != s:
            raise ModelError(f"{self.arch}: expected images of shape (B, 1, {s}, {s}), got {tuple(x.shape)}")
        return x

    def _redshift(
        self, redshift: Any, n: int, device: torch.device, what: str, *, conditions: Any = None,
        extrapolate: bool = True,
    ) -> torch.Tensor | None:  # fmt: skip
        """Validate the condition against the architecture: (n,) redshifts, or (n, k) conditions, or None.

        ``extrapolate=False`` (the generation entry points' default) refuses values outside the training
        range recorded by :meth:`set_conditions`; NaN is always refused.
        """
        if not self.conditional:
            if redshift is not None or conditions is not None:
                raise ModelError(
                    f"{self.arch} is unconditional but {what} was given a redshift; "
                    "use cvae, cvae2 or fancy_cvae to condition on redshift"
                )
            return None
        if self.multi_condition:
            if redshift is not None and conditions is None and not isinstance(redshift, (int, float)):
                t = torch.as_tensor(redshift)
                if t.dim() == 2 or (t.dim() == 1 and len(self.conditioning.names) > 1 and t.shape[0] == len(
                        self.conditioning.names) and n != t.shape[0]):  # fmt: skip
                    conditions, redshift = redshift, None  # a condition matrix passed positionally
            if redshift is None and conditions is None and any(self.conditioning.median(c) is None
                                                               for c in self.conditioning.names):  # fmt: skip
                raise ModelError(f"{self.arch} is conditional: {what} needs its conditions "
                                 f"({', '.join(self.conditioning.names)})")  # fmt: skip
            return self.conditioning.values(conditions, n, device, what, self.arch, extrapolate=extrapolate,
                                            redshift=redshift)  # fmt: skip
        if redshift is None and isinstance(conditions, dict):
            redshift = conditions.get(self.conditioning.redshift_name or "zphot")
        elif redshift is None and conditions is not None:  # the one condition, as an array
            redshift = conditions
        if redshift is None and what in ("sample", "interpolate"):  # the training median, when recorded
            redshift = self.conditioning.median(self.conditioning.redshift_name or "")
        if redshift is None:
            raise ModelError(f"{self.arch} is conditional: {what} needs a redshift (one value per image)")
        r = torch.as_tensor(redshift, dtype=torch.float32, device=device)
        if r.dim() == 0:
            r = r.expand(n)
        elif r.dim() == 2 and r.shape[1] == 1:
            r = r[:, 0]
        if r.dim() != 1 or r.shape[0] != n:
            raise ModelError(
                f"{self.arch}: {what} needs a redshift of shape ({n},) or ({n}, 1), got {tuple(r.shape)}"
            )
        if not (what == "forward" or what == "compute_loss"):  # the hot path skips the host sync
            self.conditioning.check(r[:, None], what, self.arch, extrapolate=extrapolate)
        return r.to(dtype=torch.float32)

    # -- the model --------------------------------------------------------------------

    def _encode(self, x: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _decode(self, z: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, redshift: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mu, logvar), each (B, z_dim), for normalised images."""
        x = self._check_image(x)
        r = self._redshift(redshift, x.shape[0], x.device, "encode")
        return self._encode(x, r)

    def decode(self, z: torch.Tensor, redshift: Any = None) -> torch.Tensor:
        """Normalised images (B, 1, H, W) for latents (B, z_dim)."""
        if z.dim() != 2 or z.shape[1] != self.spec.z_dim:
            raise ModelError(
                f"{self.arch}: decode expects latents of shape (B, {self.spec.z_dim}), got {tuple(z.shape)}"
            )
        r = self._redshift(redshift, z.shape[0], z.device, "decode")
        logits, _ = self._decode(z, r)
        return torch.sigmoid(logits)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + exp(logvar/2) * eps; eps from the global RNG of mu's device (torch.manual_seed)."""
        eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(self, x: torch.Tensor, redshift: Any = None, sample_latent: bool | None = None) -> VAEOutput:
        """Encode, draw z, decode.

        ``sample_latent=None`` draws z in training mode and uses z = mu in eval mode, so
        validation losses are deterministic; pass ``True`` for the seed's stochastic
        validation loss.
        """
        x = self._check_image(x)
        r = self._redshift(redshift, x.shape[0], x.device, "forward")
        mu, logvar = self._encode(x, r)
        draw = self.training if sample_latent is None else sample_latent
        z = self.reparameterize(mu, logvar) if draw else mu
        logits, z_pred = self._decode(z, r)
        return VAEOutput(torch.sigmoid(logits), mu, logvar, z_pred)

    # -- losses -----------------------------------------------------------------------

    def compute_loss(
        self,
        out: VAEOutput,
        x: torch.Tensor,
        redshift: Any = None,
        beta: float | torch.Tensor = 0.1,
        noise_var: torch.Tensor | None = None,
        psf: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The training objective, always in fp32 (autocast outputs are upcast first).

        With ``spec.psf_forward`` the reconstruction is first taken to physical units, convolved
        with each galaxy's PSF (``psf``: (B, 1, P, P), the loader's ``batch["psf"]``) and brought
        back, so the likelihood compares like with like while the decoder stays PSF-free.

        The reconstruction term is ``spec.likelihood``, an entry of
        :data:`hpcvae.models.likelihoods.LIKELIHOODS` (``mse``, the seed's; ``gaussian``, the chi^2
        in physical units; ``calibrated``, the sigma-VAE's analytic per-galaxy variance).

        kl = -0.5 * sum(1 + logvar - mu^2 - exp(logvar)) over batch and latents, total = recon +
        beta * kl (+ k * redshift for fancy_cvae, redshift = summed squared error of z_pred).
        ``recon_reduction = "mean"`` divides every term by the number of pixels in the batch:
        the same optimum, and a loss scale that does not grow with image size or batch.
        """
        x = self._check_image(x).float()
        recon = out.recon.float()
        mu, logvar = out.mu.float(), out.logvar.float()
        if self.spec.psf_forward:
            recon = self._observed(recon, psf)
        recon_sum = self.likelihood.nll(self, recon, x, {"noise_var": noise_var})
        kl_sum = -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp())
        scale = 1.0 if self.spec.recon_reduction == "sum" else 1.0 / x.numel()
        losses = {"recon": recon_sum * scale, "kl": kl_sum * scale}
        total = losses["recon"] + beta * losses["kl"]
        if self.predicts_redshift:
            r = self._redshift(redshift, x.shape[0], x.device, "compute_loss")
            if out.z_pred is None:
                raise ModelError(f"{self.arch}: compute_loss needs the z_pred of forward's output")
            losses["redshift"] = F.mse_loss(out.z_pred.float(), r, reduction="sum") * scale
            total = total + self.spec.redshift_weight * losses["redshift"]
        losses["total"] = total
        return losses

    def loss(self, batch: dict[str, Any], beta: float | torch.Tensor = 0.1) -> dict[str, torch.Tensor]:
        """forward + compute_loss on a loader batch; unconditional models ignore its redshifts."""
        x = batch["image"]
        r = batch.get("redshift") if self.conditional else None
        out = self(x, r)
        return self.compute_loss(out, x, r, beta, noise_var=batch.get("noise_var"), psf=batch.get("psf"))

    def _observed(self, recon: torch.Tensor, psf: torch.Tensor | None) -> torch.Tensor:
        """A PSF-free normalised reconstruction as the telescope would see it, normalised again."""
        from hpcvae.psf import psf_convolve

        if self.transform is None or psf is None:
            raise ModelError(
                f"{self.arch}: model.psf_forward needs the normalisation attached (set_normalisation) and each "
                "galaxy's PSF (batch['psf'], from shards made from a catalog with PSF_FILENAME/PSF_HDU)"
            )
        phys = psf_convolve(self.transform.inverse(recon), psf)
        return self.transform.forward(phys)

    # -- generation -------------------------------------------------------------------

    @contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode (BatchNorm running stats) and no autograd, restoring the caller's mode."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def _physical(self, normalized: bool | None) -> bool:
        """Whether to speak physical flux: the default once a transform is attached."""
        if normalized is None:
            return self.transform is not None
        if not normalized and self.transform is None:
            raise ModelError(
                f"{self.arch}: normalized=False needs a transform; attach one with model.set_normalisation(t)"
            )
        return not normalized

    def _out(self, images: torch.Tensor, physical: bool) -> torch.Tensor:
        images = images.contiguous()  # NCHW for the caller, whatever layout the model runs in
        return self.to_physical(images) if physical else images

    def _chunk(self) -> int:
        """Images per decoder call on this device (``hpcvae.hardware.generation_chunk``)."""
        from hpcvae.hardware import generation_chunk

        return generation_chunk(self._device(), self.spec.nf, self.spec.image_size)

    def _decode_chunked(self, z: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """``decode`` in device-sized chunks: one call of 1024 on a CPU is 3-6x slower than 16 of 64."""
        step = self._chunk()
        if z.shape[0] <= step:
            return self.decode(z, r)
        return torch.cat([self.decode(z[i : i + step], None if r is None else r[i : i + step])
                          for i in range(0, z.shape[0], step)])  # fmt: skip

    @property
    def conditional_flow(self) -> bool:
        """A fitted flow prior that takes the conditions: its latents move with them (hold its base noise, not z)."""
        return self.flow_prior is not None and bool(self.flow_prior.conditional)

    @property
    def default_prior(self) -> str:
        """``flow`` once a fitted flow prior is attached (``hpcvae.train_prior``), else ``normal``."""
        return "normal" if self.flow_prior is None else "flow"

    def _prior_sample(
        self, n: int, r: torch.Tensor | None, generator: torch.Generator | None, prior: str | None,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Latents from the prior; ``eps`` (n, z_dim) is the base noise when the caller fixes it per row."""
        device = self._device()
        dtype = self._dtype()
        kind = prior or self.default_prior
        if eps is not None and tuple(eps.shape) != (n, self.spec.z_dim):
            raise ModelError(
                f"{self.arch}: eps must have shape ({n}, {self.spec.z_dim}), got {tuple(eps.shape)}"
            )
        if kind == "normal":
            if eps is not None:
                return eps.to(device=device, dtype=dtype)
            gen_device = generator.device if generator is not None else device
            z = torch.randn(n, self.spec.z_dim, generator=generator, device=gen_device, dtype=dtype)
            return z.to(device)
        if kind == "flow":
            if self.flow_prior is None:
                raise ModelError(
                    f"{self.arch}: prior='flow' but this model has no flow prior; fit one with "
                    "`python -m hpcvae.train_prior MODEL --data SHARDS` or use prior='normal'"
                )
            # The flow owns its base distribution; it gets the condition for conditional models.
            return self.flow_prior.sample(n, redshift=r, generator=generator, eps=eps).to(
                device=device, dtype=dtype
            )
        raise ModelError(f"{self.arch}: unknown prior {kind!r} (choices: normal, flow)")

    def sample_latent(
        self,
        n: int,
        redshift: Any = None,
        generator: torch.Generator | None = None,
        prior: str | None = None,
    ) -> torch.Tensor:
        """``n`` latents (n, z_dim) from the prior ``sample`` would use, for sweeps that reuse them.

        For a conditional flow prior the latents are drawn at ``redshift`` (default 0.7, near
        the peak of the COSMOS n(z)); they can then be decoded at any other redshift.
        """
        if n < 1:
            raise ModelError(f"{self.arch}: sample_latent needs n >= 1, got {n}")
        r = None
        if self.conditional:
            z0 = (
                self.conditioning.median(self.conditioning.redshift_name or "")
                if redshift is None
                else redshift
            )
            r = self._redshift(
                0.7 if z0 is None else float(z0), n, self._device(), "sample_latent", extrapolate=True
            )
        with self._inference():
            return self._prior_sample(n, r, generator, prior)

    def sample(
        self,
        n: Any,
        redshift: Any = None,
        generator: torch.Generator | None = None,
        normalized: bool | None = None,
        prior: str | None = None,
        *,
        conditions: Any = None,
        extrapolate: bool = False,
        seed: int | None = None,
        batch_size: int = 1024,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New galaxies (n, 1, H, W) from z ~ prior.

        ``n`` is a count, or a catalog (astropy Table, numpy structured array, pandas DataFrame, dict of
        columns, or a FITS/CSV path): one galaxy per row, conditioned on the row's columns named like the
        model's conditions, drawn in batches of ``batch_size`` with row i's noise fixed by ``seed`` (default 0).
        Conditional models take ``redshift`` (a float or one per galaxy) and, for a model of several
        conditions, ``conditions`` (a dict of columns or an (n, k) array); a condition left out is its
        training median.  Values outside the training range are refused unless ``extrapolate=True``.
        ``prior``: ``"flow"`` (the fitted flow prior; the default when the model has one) or ``"normal"``.
        ``seed`` fixes each row's noise whatever the batching; ``generator`` draws all rows from one stream.
        """
        from hpcvae import catalog

        if catalog.is_table(n):
            cols = catalog.columns(n)
            names = self.conditioning.names if self.conditional else ()
            cond = catalog.pick(cols, names, "catalog") if names else None
            rows = len(next(iter(cols.values()))) if cols else 0
            if rows < 1:
                raise ModelError(f"{self.arch}: the catalog has no rows")
            parts = [img for _, img in catalog.sample_rows(self, cond, rows, seed=seed or 0, batch_size=batch_size,
                                                           prior=prior, normalized=normalized, extrapolate=extrapolate)]  # fmt: skip
            return torch.cat(parts)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ModelError(f"{self.arch}: sample needs n >= 1 (an integer) or a catalog, got {n!r}")
        if seed is not None and eps is None:
            eps = catalog.row_latents(catalog.check_seed(seed), 0, n, self.spec.z_dim)
        physical = self._physical(normalized)
        with self._inference():
            r = self._redshift(
                redshift, n, self._device(), "sample", conditions=conditions, extrapolate=extrapolate
            )
            z = self._prior_sample(
                n, r, generator, prior, eps
            )  # all at once: row i is the same for any chunking
            return self._out(self._decode_chunked(z, r), physical)

    def reconstruct(
        self, x: torch.Tensor, redshift: Any = None, normalized: bool | None = None
    ) -> torch.Tensor:
        """Decode the posterior mean (no noise): the model's best guess of ``x``."""
        physical = self._physical(normalized)
        with self._inference():
            if physical:
                x = self.transform.forward(x)
            x = self._check_image(torch.as_tensor(x, device=self._device(), dtype=self._dtype()))
            r = self._redshift(redshift, x.shape[0], x.device, "reconstruct")
            step = self._chunk()
            parts = []
            for i in range(0, x.shape[0], step):
                ri = None if r is None else r[i : i + step]
                parts.append(self.decode(self._encode(x[i : i + step], ri)[0], ri))
            return self._out(torch.cat(parts), physical)

    def to_galsim(
        self, n: int, redshift: Any = None, rng: Any = None, prior: str | None = None, **kwargs: Any
    ) -> list[Any]:
        """``n`` generated galaxies as ``galsim.InterpolatedImage`` objects at the training pixel scale.

        ``rng`` is a ``galsim.BaseDeviate`` (or an int seed), so draws follow the simulation's seed;
        ``psf=`` convolves with a target PSF (deconvolving the training PSF first, which must
        then be the smaller one).  See :func:`hpcvae.galsim.to_galsim`.
        """
        from hpcvae.galsim import to_galsim

        return to_galsim(self, n, redshift=redshift, rng=rng, prior=prior, **kwargs)

    def interpolate(
        self,
        redshifts: Sequence[float] | torch.Tensor,
        z: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        normalized: bool | None = None,
        extrapolate: bool = False,
    ) -> torch.Tensor:
        """One galaxy at each redshift, other conditions at their training medians: (len, 1, H, W).

        Without ``z`` the galaxy is one draw of the default prior's base noise, held fixed: with a conditional
        flow prior each redshift gets the latent the prior gives that noise there, as ``sample`` would (a
        latent held fixed barely follows the redshift, since it carries what the encoder learnt from it).
        With ``z`` that latent is decoded at every redshift.
        """
        if not self.conditional:
            raise ModelError(f"{self.arch} is unconditional: interpolate needs cvae, cvae2 or fancy_cvae")
        physical = self._physical(normalized)
        with self._inference():
            r = torch.as_tensor(redshifts, dtype=torch.float32, device=self._device()).reshape(-1)
            if r.numel() == 0:
                raise ModelError(f"{self.arch}: interpolate needs at least one redshift")
            r = self._redshift(r, r.numel(), self._device(), "interpolate", extrapolate=extrapolate)
            if z is None:
                if not self.conditional_flow:
                    z = self._prior_sample(1, r[:1], generator, None)  # N(0, I) or an unconditional flow
                else:
                    gen_device = generator.device if generator is not None else self._device()
                    eps = torch.randn(1, self.spec.z_dim, generator=generator, device=gen_device)
                    zs = self._prior_sample(r.shape[0], r, None, "flow", eps=eps.expand(r.shape[0], -1))
                    return self._out(self._decode_chunked(zs.to(self._dtype()), r), physical)
            z = torch.as_tensor(z, device=self._device()).reshape(-1)
            if z.numel() != self.spec.z_dim:
                raise ModelError(
                    f"{self.arch}: interpolate needs one latent of size {self.spec.z_dim}, got {z.numel()}"
                )
            zs = z.to(self._dtype()).unsqueeze(0).expand(r.shape[0], -1)
            return self._out(self._decode_chunked(zs, r), physical)

    def extra_repr(self) -> str:
        s = self.spec
        return f"arch={s.arch}, flavour={s.flavour}, image_size={s.image_size}, nf={s.nf}, z_dim={s.z_dim}"
