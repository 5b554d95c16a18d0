"""Every reliance on DeepSpeed internals, in one place, with the versions it is tested on.

Tested range: deepspeed 0.14 - 0.19 (0.19.8 here).  If an upgrade breaks something here,
this file and ``tests/test_untrusted.py`` are what to change.

DeepSpeed loads its checkpoint files with ``torch.load(..., weights_only=False)``, i.e. it
unpickles them with no restriction: a crafted checkpoint folder could run any code on the
cluster.  :func:`weights_only_loads` makes every ``torch.load`` DeepSpeed performs inside it
run with ``weights_only=True``, allowing only the DeepSpeed types its own checkpoints hold
(:data:`SAFE_TYPES`); anything else is refused with a one-line error naming the file.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import re
from collections.abc import Iterator
from typing import Any

import torch

from hpcvae.errors import CheckpointError

TESTED_DEEPSPEED = (">=0.14", "<0.20")

SAFE_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # optimizer states (ZeRO >= 1)
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # ... with fp16
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""Data-only classes found in DeepSpeed's checkpoint files (ZeRO 0-3, fp32/fp16); nothing executable."""


def safe_types() -> list[Any]:
    out = []
    for name in SAFE_TYPES:
        mod, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError):  # moved in another DeepSpeed version: then it is not allowed
            continue
    return out


def safe_load(path: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)`` with the DeepSpeed allow-list; CheckpointError otherwise."""
    kwargs["weights_only"] = True
    with torch.serialization.safe_globals(safe_types()):
        try:
            return _TORCH_LOAD(path, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = found.group(1) if found else "an unknown object"
            raise CheckpointError(
                f"{path}: refused to load: it asks to run {what}, which is not allowed in a checkpoint; "
                "it was not written by hpcvae or DeepSpeed, or was tampered with"
            ) from None


_TORCH_LOAD = torch.load


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside: every ``torch.load`` (DeepSpeed's included) goes through :func:`safe_load`."""

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("weights_only", None)
        return safe_load(f, *args, **kwargs)

    torch.load = load  # DeepSpeed looks up torch.load at call time
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD
