"""hpcvae: train and use VAEs of HST galaxy images on SLURM GPU clusters."""

from __future__ import annotations

from hpcvae._version import __version__

__all__ = ["__version__", "load_model"]


def load_model(path, device="cpu", **kwargs):
    """Load a consolidated model (``model.safetensors`` + ``model.json``, or a run folder)."""
    from hpcvae.model_files import load_model as _load

    return _load(path, device=device, **kwargs)
