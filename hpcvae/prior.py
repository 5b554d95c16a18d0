"""A learned latent prior: a normalizing flow fitted to the encoder means after VAE training.

A VAE trained with β < 1 leaves an aggregate posterior that is not N(0, I): some latent
dimensions are squeezed, shifted or correlated (and, for the conditional models, depend
on the redshift).  Decoding N(0, I) draws then lands partly where the decoder never saw
data, which shows up as wrong size/ellipticity distributions.  Sampling from a flow fitted
to where the encoder actually puts galaxies fixes that without retraining the VAE.

The flow comes from ``zuko`` (a maintained library); this module only adds what hpcvae
needs around it: fixed standardisation of latents and redshift (so the flow starts near
the identity), sampling from a caller's ``torch.Generator`` (reproducible samples), the
redshift as context for the conditional models, and a JSON description for ``model.json``
from which :func:`flow_from_meta` rebuilds the module without unpickling anything.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from hpcvae.errors import CheckpointError, ModelError

LIBRARY = "zuko"
PREFIX = "flow_prior."
"""Key prefix of the flow's tensors inside ``model.safetensors`` (it is ``model.flow_prior``)."""

FlowKind = Literal["maf", "nsf"]


@dataclass(kw_only=True)
class FlowSpec:
    """Architecture of the flow: enough to rebuild it before loading its weights."""

    z_dim: int
    """Latent size of the VAE (the flow's feature count)."""
    conditional: bool = False
    """Condition on the VAE's conditions (the redshift, or its vector of conditions), as the conditional VAEs are."""
    kind: FlowKind = "maf"
    """``maf``: affine masked autoregressive flow; ``nsf``: rational-quadratic splines (more flexible)."""
    transforms: int = 4
    """Autoregressive transforms stacked (orders alternate between them)."""
    hidden_features: tuple[int, ...] = (64, 64)
    """Hidden layer widths of each transform's masked MLP."""
    context_features: int = 1
    """Number of conditions the flow takes as context (1: the redshift)."""
    passes: int | None = None
    """Passes of each transform's inverse: ``None`` is fully autoregressive (z_dim passes, slow to sample: the
    flows of hpcvae 0.1), 2 a coupling transform (two passes: fast to sample and to fit)."""

    def __post_init__(self) -> None:
        if not isinstance(self.z_dim, int) or self.z_dim < 1:
            raise ModelError(f"flow prior: z_dim must be an integer >= 1, got {self.z_dim!r}")
        if self.kind not in ("maf", "nsf"):
            raise ModelError(f"flow prior: kind must be 'maf' or 'nsf', got {self.kind!r}")
        if not isinstance(self.transforms, int) or self.transforms < 1:
            raise ModelError(f"flow prior: transforms must be an integer >= 1, got {self.transforms!r}")
        self.hidden_features = tuple(int(h) for h in self.hidden_features)
        if not self.hidden_features or min(self.hidden_features) < 1:
            raise ModelError(
                f"flow prior: hidden_features must be positive widths, got {self.hidden_features}"
            )
        if not isinstance(self.context_features, int) or self.context_features < 1:
            raise ModelError(
                f"flow prior: context_features must be an integer >= 1, got {self.context_features!r}"
            )
        if self.passes is not None and (not isinstance(self.passes, int) or self.passes < 1):
            raise ModelError(f"flow prior: passes must be None or an integer >= 1, got {self.passes!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_features"] = list(self.hidden_features)
        return d


class FlowPrior(nn.Module):
    """p(z) or p(z | redshift) as a zuko flow over standardised latents.

    ``forward(z, redshift)`` returns the mean negative log-likelihood, so the module can be
    wrapped in DDP and trained by the same engine as the VAE.  The standardisation lives
    in buffers (part of the state dict), so a loaded flow reproduces its log-densities
    exactly; :meth:`log_prob` includes its Jacobian, so values are densities of raw latents.
    """

    def __init__(self, spec: FlowSpec) -> None:
        super().__init__()
        import zuko

        self.spec = spec
        cls = zuko.flows.MAF if spec.kind == "maf" else zuko.flows.NSF
        k = spec.context_features
        extra = {} if spec.passes is None else {"passes": spec.passes}
        self.flow = cls(
            features=spec.z_dim,
            context=k if spec.conditional else 0,
            transforms=spec.transforms,
            hidden_features=list(spec.hidden_features),
            **extra,
        )
        self.register_buffer("z_loc", torch.zeros(spec.z_dim))
        self.register_buffer("z_scale", torch.ones(spec.z_dim))
        self.register_buffer("c_loc", torch.zeros(k))
        self.register_buffer("c_scale", torch.ones(k))

    @property
    def conditional(self) -> bool:
        return self.spec.conditional

    def set_standardisation(
        self, z_mean: torch.Tensor, z_std: torch.Tensor, c_mean: Any = 0.0, c_std: Any = 1.0
    ) -> None:
        """Fix the affine map raw -> standardised (computed once from the train latents and conditions)."""
        z_std = torch.as_tensor(z_std, dtype=torch.float32).clamp_min(1e-6)
        self.z_loc.copy_(torch.as_tensor(z_mean, dtype=torch.float32))
        self.z_scale.copy_(z_std)
        self.c_loc.copy_(torch.as_tensor(c_mean, dtype=torch.float32).expand_as(self.c_loc))
        self.c_scale.copy_(
            torch.as_tensor(c_std, dtype=torch.float32).clamp_min(1e-6).expand_as(self.c_scale)
        )

    def _context(self, redshift: Any, n: int, device: torch.device) -> torch.Tensor | None:
        if not self.spec.conditional:
            if redshift is not None:
                raise ModelError("flow prior is unconditional but was given a redshift")
            return None
        if redshift is None:
            raise ModelError("flow prior is conditional: pass its conditions (one row per latent)")
        k = self.spec.context_features
        r = torch.as_tensor(redshift, dtype=torch.float32, device=device)
        r = r.reshape(-1, k) if r.dim() < 2 else r
        if r.shape[0] == 1 and n != 1:
            r = r.expand(n, k)
        if tuple(r.shape) != (n, k):
            raise ModelError(f"flow prior: needs conditions of shape ({n}, {k}), got {tuple(r.shape)}")
        return (r - self.c_loc) / self.c_scale

    def log_prob(self, z: torch.Tensor, redshift: Any = None) -> torch.Tensor:
        """log p(z [| redshift]) of raw latents (B, z_dim) -> (B,)."""
        if z.dim() != 2 or z.shape[1] != self.spec.z_dim:
            raise ModelError(
                f"flow prior: expects latents of shape (B, {self.spec.z_dim}), got {tuple(z.shape)}"
            )
        c = self._context(redshift, z.shape[0], z.device)
        u = (z.float() - self.z_loc) / self.z_scale
        return self.flow(c).log_prob(u) - torch.log(self.z_scale).sum()

    def forward(self, z: torch.Tensor, redshift: Any = None) -> torch.Tensor:
        """Mean negative log-likelihood: the training objective."""
        return -self.log_prob(z, redshift).mean()

    @torch.no_grad()
    def sample(
        self,
        n: int,
        redshift: Any = None,
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``n`` latents (n, z_dim); the base noise is ``eps``, or comes from ``generator``: reproducible samples."""
        if n < 1:
            raise ModelError(f"flow prior: sample needs n >= 1, got {n}")
        device = self.z_loc.device
        c = self._context(redshift, n, device)
        if eps is None:
            gen_device = generator.device if generator is not None else device
            eps = torch.randn(n, self.spec.z_dim, generator=generator, device=gen_device)
        eps = eps.to(device=device, dtype=torch.float32)
        dist = self.flow(c)
        u0 = dist.base.mean + dist.base.stddev * eps
        u = dist.transform.inv(u0)
        return self.z_loc + self.z_scale * u


def build_flow(spec: FlowSpec) -> FlowPrior:
    try:
        return FlowPrior(spec)
    except ImportError as exc:  # pragma: no cover - zuko is a dependency
        raise ModelError(f"flow prior needs the {LIBRARY} package: {exc}") from None


def flow_meta(
    spec: FlowSpec,
    flow: FlowPrior,
    *,
    training: dict[str, Any],
    evaluation: dict[str, Any],
    fitted_on: str = "encoder means (model in eval mode) of the train split",
) -> dict[str, Any]:
    """The ``flow_prior`` block of model.json: the rebuild recipe plus what it was fitted on and how well."""
    import zuko

    return {
        "library": LIBRARY,
        "library_version": zuko.__version__,
        "class": "zuko.flows.MAF" if spec.kind == "maf" else "zuko.flows.NSF",
        "spec": spec.to_dict(),
        "weights_prefix": PREFIX,
        "fitted_on": fitted_on,
        "latent_standardisation": {
            "mean": flow.z_loc.tolist(),
            "std": flow.z_scale.tolist(),
        },
        "context_standardisation": (
            {"mean": flow.c_loc.tolist(), "std": flow.c_scale.tolist()} if spec.conditional else None
        ),
        "training": training,
        "evaluation": evaluation,
    }


def flow_from_meta(meta: dict[str, Any], where: str) -> FlowPrior:
    """Rebuild the (untrained) flow described by a model.json ``flow_prior`` block; weights load after."""
    if not isinstance(meta, dict) or meta.get("library") != LIBRARY or not isinstance(meta.get("spec"), dict):
        raise CheckpointError(
            f"{where}: flow_prior block is not a {LIBRARY} flow description (needs library and spec)"
        )
    try:
        spec = FlowSpec(**meta["spec"])
    except (TypeError, ModelError) as exc:
        raise CheckpointError(f"{where}: flow_prior.spec is invalid: {exc}") from None
    return build_flow(spec)


def vae_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the VAE's tensors (names, dtypes, shapes, bytes), ignoring any flow.

    A flow checkpoint is only valid for the exact VAE whose latents it was fitted on; this
    identifies that VAE even after its model files gained (or replaced) a flow.
    """
    h = hashlib.sha256()
    for k in sorted(state_dict):
        if k.startswith(PREFIX):
            continue
        t = state_dict[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def gaussian_nll(
    z: torch.Tensor, mean: torch.Tensor | None = None, var: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row NLL of z under a diagonal Gaussian (N(0, I) by default): the baseline the flow must beat."""
    z = z.float()
    mean = torch.zeros(z.shape[1]) if mean is None else mean
    var = torch.ones(z.shape[1]) if var is None else var
    return 0.5 * (((z - mean) ** 2) / var + torch.log(2 * math.pi * var)).sum(dim=1)
