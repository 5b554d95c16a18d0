"""``python -m hpcvae.generate RUN --n 64 --redshift 0.7 --out gen.fits``: generated galaxies as files.

``--catalog cat.fits|cat.csv`` draws one galaxy per catalog row, conditioned on the row's columns
named like the model's conditions (``zphot``, ``mag_auto``, ...); rows outside the training range
are refused unless ``--extrapolate``.  Row i's galaxy depends only on ``--seed`` and i, never on
``--batch-size``.  Generation runs in batches and streams to disk, so ``--n`` can be millions.

Formats (``--format``, default from the suffix of ``--out``):

* ``fits`` (``--layout cube``, default): one file holding an image cube (NAXIS3 = galaxies) with a
  celestial TAN WCS (astropy.wcs) at the training pixel scale, ``BUNIT`` in FITS-standard form, a
  ``GALAXIES`` binary table (the catalog's columns, index, flux, magnitude with the model's zeropoint,
  HSM size and shape of each stamp), and the training PSF as a ``PSF`` image; every HDU carries a
  CHECKSUM.  ``--layout hdus`` writes one image HDU per galaxy instead (its CRVAL the row's RA/DEC
  when the catalog has them).
* ``rgc``: a RealGalaxyCatalog folder (catalog, image and PSF files) that ``galsim.RealGalaxyCatalog``
  and ``hpcvae.shard`` read back.
* ``npy``: the (n, H, W) float32 cube; ``png``: a grid (at most 1024 galaxies).

Every write goes to a temp file renamed at the end; SIGTERM or Ctrl-C leaves no partial file.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hpcvae.cli import run_cli
from hpcvae.config import add_options, options_from_args
from hpcvae.errors import ConfigError

MAX_N = 1_000_000_000
PNG_MAX = 1024


@dataclass(kw_only=True)
class GenerateConfig:
    model: Path
    """Run folder, model.safetensors or model.json."""
    out: Path
    """Output file (.fits, .npy or .png), or a folder for ``--format rgc``."""
    n: int = 64
    """Number of galaxies (ignored with ``--catalog``: one per row)."""
    catalog: Path | None = None
    """FITS or CSV catalog: one galaxy per row, conditioned on its columns named like the model's conditions."""
    redshift: float | None = None
    """Redshift to generate at (without ``--catalog``; a model's other conditions take their training medians)."""
    extrapolate: bool = False
    """Generate at conditions outside the training range instead of refusing them."""
    prior: Literal["flow", "normal"] | None = None
    """Latent prior; default: the fitted flow when the model has one, else N(0, I)."""
    seed: int = 0
    """Seed of the latent noise: galaxy i depends only on it and i. Recorded in the file."""
    format: Literal["fits", "npy", "png", "rgc"] | None = None
    """Output format; default: from the suffix of ``out`` (a folder: ``rgc``)."""
    layout: Literal["cube", "hdus"] = "cube"
    """FITS layout: one image cube + table + PSF (default), or one image HDU per galaxy."""
    center: tuple[float, float] = (150.1, 2.2)
    """RA, Dec (degrees) of the stamps' centres in the WCS when the catalog gives no RA/DEC (the default is in
    the COSMOS field)."""
    batch_size: int = 1024
    """Galaxies per decoder batch (only memory and speed: the output does not depend on it)."""
    device: str = "cpu"
    """Device to run the decoder on."""
    overwrite: bool = False
    """Replace ``out`` if it exists."""

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise ConfigError(f"n must be in [1, {MAX_N}], got {self.n}", key="n")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}", key="seed")
        if not 1 <= self.batch_size <= 65536:
            raise ConfigError(f"batch_size must be in [1, 65536], got {self.batch_size}", key="batch_size")
        ra, dec = self.center
        if not (0 <= ra < 360 and -90 <= dec <= 90):
            raise ConfigError(
                f"center must be RA in [0, 360) and Dec in [-90, 90] degrees, got {ra},{dec}", key="center"
            )
        if self.redshift is not None and not math.isfinite(self.redshift):
            raise ConfigError(f"redshift must be finite, got {self.redshift}", key="redshift")
        if self.catalog is not None and self.redshift is not None:
            raise ConfigError(
                "--redshift and --catalog exclude each other: the catalog's rows give the conditions"
            )
        if len(str(self.out)) > 4000 or len(self.out.name) > 255:
            raise ConfigError(
                f"--out: a file name of {len(self.out.name)} characters is longer than a file system allows"
            )
        if self.format is None:
            suffix = self.out.suffix.lower().lstrip(".")
            self.format = {"fits": "fits", "fit": "fits", "npy": "npy", "png": "png"}.get(suffix)  # type: ignore[assignment]
            if self.format is None and (not suffix or self.out.is_dir()):
                self.format = "rgc"
            if self.format is None:
                raise ConfigError(
                    f"{self.out}: unknown suffix; use .fits, .npy or .png, a folder, or pass --format"
                )


@dataclass(kw_only=True)
class Plan:
    """What to draw: the model, how many, each row's conditions and the catalog's other columns."""

    model: Any
    n: int
    conditions: dict[str, np.ndarray] | None
    columns: dict[str, np.ndarray]
    positions: tuple[np.ndarray, np.ndarray] | None


def plan(cfg: GenerateConfig) -> Plan:
    from hpcvae import catalog as cat
    from hpcvae.hardware import choose_device
    from hpcvae.model_files import load_model

    model = load_model(cfg.model, device=choose_device(cfg.device, "generate"))
    names = model.conditioning.names if model.conditional else ()
    if cfg.catalog is not None:
        cols = cat.columns(cfg.catalog)
        n = len(next(iter(cols.values()))) if cols else 0
        if n < 1:
            raise ConfigError(f"{cfg.catalog}: the catalog has no rows with numeric columns")
        conds = cat.pick(cols, names, str(cfg.catalog)) if names else None
        lower = {k.lower(): k for k in cols}
        pos = (cols[lower["ra"]], cols[lower["dec"]]) if "ra" in lower and "dec" in lower else None
        if pos is not None and not (np.all((pos[0] >= 0) & (pos[0] < 360)) and np.all(np.abs(pos[1]) <= 90)):
            raise ConfigError(f"{cfg.catalog}: RA must be in [0, 360) and DEC in [-90, 90] degrees")
        return Plan(model=model, n=n, conditions=conds, columns=cols, positions=pos)
    if (
        model.conditional
        and cfg.redshift is None
        and model.conditioning.median(model.conditioning.redshift_name or "") is None
    ):
        raise ConfigError(f"{cfg.model}: {model.arch} is conditional; pass --redshift or --catalog")
    if not model.conditional and cfg.redshift is not None:
        raise ConfigError(f"{cfg.model}: {model.arch} is not conditioned on redshift; drop --redshift")
    conds = None
    if model.conditional:
        z = (
            cfg.redshift
            if cfg.redshift is not None
            else model.conditioning.median(model.conditioning.redshift_name)
        )
        conds = {model.conditioning.redshift_name: np.full(cfg.n, float(z))}
    return Plan(model=model, n=cfg.n, conditions=conds, columns={}, positions=None)


def batches(cfg: GenerateConfig, p: Plan) -> Iterator[tuple[int, np.ndarray]]:
    """(first index, (b, H, W) float32 physical images) per batch: the same galaxies for any batch size."""
    from hpcvae.catalog import sample_rows

    for start, imgs in sample_rows(p.model, p.conditions, p.n, seed=cfg.seed, batch_size=cfg.batch_size,
                                   prior=cfg.prior, extrapolate=cfg.extrapolate):  # fmt: skip
        yield start, imgs[:, 0].detach().to("cpu").float().numpy()


def generate(cfg: GenerateConfig) -> tuple[np.ndarray, Any]:
    """(images (n, H, W) float32 in the model's flux units, the loaded model): all in memory, for small n."""
    p = plan(cfg)
    return np.concatenate([imgs for _, imgs in batches(cfg, p)]), p.model


def write(cfg: GenerateConfig) -> tuple[Path, int]:
    """Generate and write in the chosen format, atomically; returns (path, galaxies written)."""
    from hpcvae import generate_io

    out = cfg.out
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out}: exists; pass --overwrite to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"{out}: its parent {out.parent} is a file, not a folder")
    p = plan(cfg)
    if cfg.format == "png" and p.n > PNG_MAX:
        raise ConfigError(
            f"--format png draws at most {PNG_MAX} galaxies in a grid, got {p.n}; use fits or npy"
        )
    writer = generate_io.WRITERS[cfg.format if cfg.format != "fits" else f"fits-{cfg.layout}"]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        writer(cfg, p, batches(cfg, p))
    except PermissionError as exc:
        raise ConfigError(f"{out}: cannot write there ({exc.strerror})") from None
    except OSError as exc:
        if exc.errno in (28, 122):  # ENOSPC, EDQUOT
            raise ConfigError(f"{out}: the disk is full ({exc.strerror}); nothing was written") from None
        raise ConfigError(f"{out}: cannot write ({exc.strerror or exc})") from None
    return out, p.n


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcvae.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="run folder, model.safetensors or model.json")
    table = add_options(p, GenerateConfig, skip=("model",))
    args = p.parse_args(argv)
    cfg = options_from_args(GenerateConfig, args, table, model=args.model)
    t0 = time.perf_counter()
    path, n = write(cfg)
    dt = time.perf_counter() - t0
    print(
        f"hpcvae.generate: wrote {n} galaxies to {path} ({cfg.format}) in {dt:.1f} s ({n / max(dt, 1e-9):.0f}/s)"
    )
    return 0


if __name__ == "__main__":
    run_cli(main, "hpcvae.generate")
