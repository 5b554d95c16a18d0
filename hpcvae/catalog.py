"""Generating from a catalog: one galaxy per row, its conditions from the row's columns, in batches.

An image simulation hands the model a survey catalog (magnitude, size, redshift per galaxy) and
draws millions of stamps.  :func:`columns` reads what such a catalog is (an astropy Table, a numpy
structured array, a pandas DataFrame, a dict of arrays, or a FITS/CSV/ECSV file) into arrays;
:func:`row_latents` gives row i the same latent noise however the rows are batched (the noise of
row i comes from a generator keyed by (seed, i // 1024)); :func:`sample_rows` decodes them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcvae.errors import ConfigError, ModelError

LATENT_BLOCK = 1024
"""Rows per latent-noise generator: row i's noise depends only on (seed, i), never on the batching."""
MAX_SEED = 2**63


def is_table(obj: Any) -> bool:
    """Whether ``obj`` is something :func:`columns` reads (not a plain count)."""
    if isinstance(obj, (int, np.integer)):
        return False
    return (isinstance(obj, (Mapping, str, Path)) or hasattr(obj, "colnames") or hasattr(obj, "columns")
            or (isinstance(obj, np.ndarray) and obj.dtype.names is not None))  # fmt: skip


def columns(catalog: Any, where: str = "catalog") -> dict[str, np.ndarray]:
    """The catalog's numeric columns as 1-D float arrays of one length (other columns are ignored)."""
    if isinstance(catalog, (str, Path)):
        from astropy.table import Table

        path = Path(catalog)
        if not path.is_file():
            raise ConfigError(f"{path}: catalog file not found")
        try:
            catalog = Table.read(str(path), format="csv" if path.suffix.lower() in (".csv", ".txt") else None)
        except Exception as exc:  # noqa: BLE001 - astropy raises many kinds; the user needs the one line
            raise ConfigError(f"{path}: cannot read the catalog: {str(exc).splitlines()[0]}") from None
        where = str(path)
    if hasattr(catalog, "colnames"):  # astropy Table
        raw = {name: np.asarray(catalog[name]) for name in catalog.colnames}
    elif hasattr(catalog, "columns") and hasattr(catalog, "to_numpy"):  # pandas DataFrame
        raw = {str(name): catalog[name].to_numpy() for name in catalog.columns}
    elif isinstance(catalog, np.ndarray) and catalog.dtype.names:
        raw = {name: np.asarray(catalog[name]) for name in catalog.dtype.names}
    elif isinstance(catalog, Mapping):
        raw = {str(k): np.asarray(v) for k, v in catalog.items()}
    else:
        raise ConfigError(
            f"{where}: not a catalog (an astropy Table, numpy structured array, DataFrame or dict)"
        )
    out = {k: v.astype(np.float64) for k, v in raw.items() if v.ndim == 1 and v.dtype.kind in "iuf"}
    lengths = {len(v) for v in out.values()}
    if len(lengths) > 1:
        raise ConfigError(f"{where}: columns of different lengths {sorted(lengths)}")
    return out


def pick(cols: dict[str, np.ndarray], names: tuple[str, ...], where: str) -> dict[str, np.ndarray]:
    """The model's conditions from the catalog's columns (names matched case-insensitively)."""
    lower = {k.lower(): k for k in cols}
    missing = [n for n in names if n.lower() not in lower]
    if missing:
        raise ConfigError(f"{where}: no column {missing[0]!r} for the model's condition (it takes "
                          f"{', '.join(names)}; the catalog has {', '.join(sorted(cols)) or 'no numeric column'})")  # fmt: skip
    return {n: cols[lower[n.lower()]] for n in names}


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < MAX_SEED:
        raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def row_latents(seed: int, start: int, stop: int, z_dim: int) -> torch.Tensor:
    """Standard-normal noise (stop - start, z_dim) for rows start..stop-1; row i depends only on (seed, i)."""
    out = []
    for block in range(start // LATENT_BLOCK, (stop - 1) // LATENT_BLOCK + 1):
        rng = np.random.default_rng(np.random.SeedSequence([seed, block]))
        noise = rng.standard_normal((LATENT_BLOCK, z_dim), dtype=np.float32)
        lo, hi = max(start, block * LATENT_BLOCK), min(stop, (block + 1) * LATENT_BLOCK)
        out.append(noise[lo - block * LATENT_BLOCK : hi - block * LATENT_BLOCK])
    return torch.from_numpy(np.concatenate(out))


def sample_rows(
    model: Any, conditions: dict[str, np.ndarray] | None, n: int, *, seed: int, batch_size: int = 1024,
    prior: str | None = None, normalized: bool | None = None, extrapolate: bool = False, start: int = 0,
) -> Iterator[tuple[int, torch.Tensor]]:  # fmt: skip
    """(first row, images) per batch of rows ``start..start+n-1``: the same images for any ``batch_size``."""
    if batch_size < 1:
        raise ModelError(f"batch_size must be >= 1, got {batch_size}")
    seed = check_seed(seed)
    if conditions is not None:  # check every row once, up front: an error names the catalog row
        full = {k: v[start : start + n] for k, v in conditions.items()}
        model._redshift(None, n, torch.device("cpu"), "sample", conditions=full, extrapolate=extrapolate)
    for a in range(start, start + n, batch_size):
        b = min(a + batch_size, start + n)
        cond = None if conditions is None else {k: v[a:b] for k, v in conditions.items()}
        eps = row_latents(seed, a, b, model.z_dim)
        yield (
            a,
            model.sample(
                b - a, conditions=cond, prior=prior, normalized=normalized, extrapolate=True, eps=eps
            ),
        )
