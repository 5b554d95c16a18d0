"""What a conditional model is conditioned on: names, training ranges, and the checks at the door.

A shard set records its conditions (``hpcvae.shard --conditions zphot,mag_auto,flux_radius``; the
redshift always) with their train statistics; training copies those records into model.json, and
:meth:`Conditioning.values` turns whatever a caller passes (a float, one value per galaxy, a dict
of columns, an (n, k) array) into the (n, k) tensor the network takes, refusing NaN and, unless
``extrapolate=True``, values outside the training range, with the row, column and range named.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hpcvae.errors import ModelError

RANGE_TOLERANCE = 1e-6
"""Relative slack on the training range (floats round-trip through JSON)."""


@dataclass(kw_only=True)
class Conditioning:
    """The conditions of one model: names in network order, each with its training statistics."""

    names: tuple[str, ...]
    records: list[dict[str, Any]] = field(default_factory=list)
    redshift_name: str | None = None
    """The condition that is the redshift (``redshift=`` fills it); None if there is none."""

    @classmethod
    def from_records(
        cls, records: Sequence[Mapping[str, Any]] | None, names: Sequence[str] = ()
    ) -> Conditioning:
        recs = [dict(r) for r in records or [] if isinstance(r, Mapping) and r.get("name")]
        order = tuple(names) or tuple(str(r["name"]) for r in recs)
        by_name = {str(r["name"]): r for r in recs}
        z = next((str(r["name"]) for r in recs if r.get("role") == "redshift"), None)
        if z is None and len(order) == 1:
            z = order[0]
        return cls(names=order, records=[by_name.get(n, {"name": n}) for n in order], redshift_name=z)

    def train(self, name: str) -> dict[str, Any]:
        rec = next((r for r in self.records if r["name"] == name), {})
        t = rec.get("train") if isinstance(rec, dict) else None
        return t if isinstance(t, dict) else {}

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Standardisation of each condition (train mean and std; 0 and 1 when unknown)."""
        means, stds = [], []
        for n in self.names:
            t = self.train(n)
            m, s = t.get("mean"), t.get("std")
            means.append(float(m) if isinstance(m, (int, float)) and math.isfinite(m) else 0.0)
            stds.append(float(s) if isinstance(s, (int, float)) and math.isfinite(s) and s > 0 else 1.0)
        return means, stds

    def median(self, name: str) -> float | None:
        p = self.train(name).get("percentiles") or {}
        v = p.get("50") if isinstance(p, dict) else None
        return float(v) if isinstance(v, (int, float)) else None

    def values(
        self, given: Any, n: int, device: torch.device, what: str, arch: str, *, extrapolate: bool = True,
        redshift: Any = None,
    ) -> torch.Tensor:  # fmt: skip
        """(n, k) float32 conditions from ``given`` (and ``redshift`` for the redshift condition)."""
        k = len(self.names)
        cols: dict[str, Any] = {}
        if isinstance(given, Mapping):
            lower = {str(c).lower(): c for c in given}
            unknown = [c for c in lower if c not in {n.lower() for n in self.names}]
            if unknown:
                raise ModelError(f"{arch}: {what}: unknown condition {unknown[0]!r} (this model takes "
                                 f"{', '.join(self.names)})")  # fmt: skip
            cols = {name: given[lower[name.lower()]] for name in self.names if name.lower() in lower}
            given = None
        if redshift is not None:
            if self.redshift_name is None:
                raise ModelError(
                    f"{arch}: {what} was given a redshift but the model takes {', '.join(self.names)}"
                )
            cols[self.redshift_name] = redshift
        if given is not None:
            t = torch.as_tensor(np.asarray(given, dtype=np.float64) if not torch.is_tensor(given) else given,
                                dtype=torch.float32, device=device)  # fmt: skip
            if t.dim() == 0 and k == 1:
                t = t.expand(n, 1)
            elif t.dim() == 1 and k == 1 and t.shape[0] == n:
                t = t[:, None]
            elif t.dim() == 1 and t.shape[0] == k:
                t = t[None].expand(n, k)
            if t.shape != (n, k):
                raise ModelError(f"{arch}: {what} needs conditions of shape ({n}, {k}) for "
                                 f"{', '.join(self.names)}, got {tuple(t.shape)}")  # fmt: skip
            out = t.clone()
        else:
            out = torch.empty(n, k, dtype=torch.float32, device=device)
            for j, name in enumerate(self.names):
                v = cols.get(name)
                if v is None:
                    med = self.median(name)
                    if med is None:
                        raise ModelError(f"{arch}: {what} needs the condition {name!r} (this model takes "
                                         f"{', '.join(self.names)})")  # fmt: skip
                    v = med
                col = torch.as_tensor(
                    np.asarray(v, dtype=np.float64), dtype=torch.float32, device=device
                ).reshape(-1)
                if col.numel() == 1:
                    col = col.expand(n)
                if col.numel() != n:
                    raise ModelError(
                        f"{arch}: {what} needs {n} values of {name!r} (one per galaxy), got {col.numel()}"
                    )
                out[:, j] = col
        self.check(out, what, arch, extrapolate=extrapolate)
        return out

    def check(self, values: torch.Tensor, what: str, arch: str, *, extrapolate: bool) -> None:
        """NaN/inf are always refused; values beyond the training range unless ``extrapolate``."""
        v = values.detach().to("cpu", torch.float64).numpy()
        bad = ~np.isfinite(v)
        if bad.any():
            i, j = map(int, np.argwhere(bad)[0])
            raise ModelError(
                f"{arch}: {what}: row {i}, condition {self.names[j]!r} is {v[i, j]} (not finite)"
            )
        if extrapolate:
            return
        for j, name in enumerate(self.names):
            t = self.train(name)
            lo, hi = t.get("min"), t.get("max")
            if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)):
                continue
            slack = RANGE_TOLERANCE * max(abs(lo), abs(hi), 1.0)
            out = np.flatnonzero((v[:, j] < lo - slack) | (v[:, j] > hi + slack))
            if out.size:
                i = int(out[0])
                raise ModelError(
                    f"{arch}: {what}: row {i}, condition {name!r} = {v[i, j]:g} is outside the training range "
                    f"[{lo:g}, {hi:g}] ({out.size} rows outside); pass extrapolate=True to generate there anyway"
                )


def from_batch(model: Any, batch: dict[str, Any], names: Sequence[str]) -> torch.Tensor | None:
    """A model's conditions from a loader batch: (B,) redshifts, or its (B, k) columns in its order.

    ``names`` are the shard set's conditions in the order of ``batch["cond"]``; a set from before
    conditions existed has only ``batch["redshift"]``, which is then the one condition.
    """
    if not model.conditional:
        return None
    if not model.multi_condition:
        return batch["redshift"]
    if "cond" not in batch:
        return batch["redshift"][:, None]
    index = {n: i for i, n in enumerate(names)}
    idx = [index[c] for c in model.spec.conditions]
    cond = batch["cond"]
    return cond if idx == list(range(cond.shape[1])) else cond[:, idx]
