"""hpcvae: train and use VAEs of HST galaxy images on SLURM GPU clusters."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(path, device="cpu", **kwargs):
    """Load a consolidated model (``model.safetensors`` + ``model.json``, or a run folder)."""
    from hpcvae.consolidate import load_model as _load

    return _load(path, device=device, **kwargs)
