"""Does a model fit a shard set?  One check for training, the prior fit and evaluation.

A model meets data in three commands; each used to check a different subset (size here,
redshift there), so a mismatch could surface as a shape error at the first step or as a
model conditioned on zeros.  Every requirement a model has of its data is checked here,
before anything is built or written, and each is a one-line error naming the set.
"""

from __future__ import annotations

from typing import Any

from hpcvae.errors import HpcvaeError, ModelError


def check_model_fits(
    model: Any,
    manifest: Any,
    *,
    where: str,
    error: type[HpcvaeError] = ModelError,
    collective: bool = False,
) -> None:
    """Raise ``error`` (one line, starting ``where``) if ``model`` cannot train on or read ``manifest``.

    Checked: image size; the conditions the model is conditioned on (a redshift for the seed's
    conditional models, each named condition for the multi-condition ones); and what its
    likelihood or forward model needs per galaxy (noise variance, the galaxy's PSF).
    """
    arch = (
        model.config.get("arch") if isinstance(getattr(model, "config", None), dict) else type(model).__name__
    )
    size, have = int(model.image_size), manifest.image_size

    def fail(msg: str) -> None:
        kwargs = {"collective": collective} if collective else {}
        raise error(f"{where}: {msg}", **kwargs)

    if size != have:
        fail(f"{arch} expects {size}x{size} images but shard set {manifest.path} holds {have}x{have}; "
             "use shards made at the model's size")  # fmt: skip
    if getattr(model, "multi_condition", False):
        carried = manifest.condition_names or ((manifest.data.get("redshift_column") or "zphot",)
                                               if manifest.has_redshift else ())  # fmt: skip
        missing = [c for c in model.spec.conditions if c not in carried]
        if missing:
            fail(f"model {arch} is conditioned on {missing[0]!r} but shard set {manifest.path} carries "
                 f"{', '.join(carried) or 'none'}; re-shard with --conditions")  # fmt: skip
    elif getattr(model, "conditional", False) and not manifest.has_redshift:
        fail(f"model {arch} is conditioned on redshift but shard set {manifest.path} has none; "
             "use vae128/vae158 or re-shard with redshifts")  # fmt: skip
    needs = getattr(getattr(model, "likelihood", None), "needs", ())
    if "noise_var" in needs and not manifest.has_noise_variance:
        fail(f"model.likelihood = {model.spec.likelihood!r} needs each galaxy's noise variance, but shard set "
             f"{manifest.path} carries none (the catalog had no NOISE_VARIANCE); use 'calibrated' or 'mse'")  # fmt: skip
    spec = getattr(model, "spec", None)
    if getattr(spec, "psf_forward", False) and not (manifest.data.get("physics") or {}).get("psf", {}).get(
        "per_galaxy"
    ):
        fail(f"model.psf_forward needs each galaxy's PSF, but shard set {manifest.path} carries none; "
             "re-shard from a catalog with PSF_FILENAME/PSF_HDU columns")  # fmt: skip
