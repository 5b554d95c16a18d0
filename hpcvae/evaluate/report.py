"""The evaluation report: run a trained model over a shard split, write PNGs + numbers.

Everything streams in batches (real galaxies are read, encoded, decoded and measured one
batch at a time), so ``--n`` can be large without holding every stamp in memory.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcvae.errors import ConfigError, ModelError, ShardError
from hpcvae.evaluate import plots
from hpcvae.evaluate.moments import (
    LANUSSE2021,
    STATS,
    border_median,
    compare,
    fit_slope,
    moments,
    orientation_agreement,
)
from hpcvae.metrics import json_safe
from hpcvae.shards.format import iter_samples
from hpcvae.shards.manifest import Manifest

DEFAULT_PIXEL_SCALE = 0.03
"""HST ACS arcsec/pixel; used when neither the shard meta nor the manifest records one."""

SYNTH_CATALOG_MARK = "synth"
"""``hpcvae.synth`` names its catalogs ``real_galaxy_catalog_synth*.fits``."""


@dataclass(kw_only=True)
class EvalConfig:
    split: str = "val"
    """Shard split to compare against (held-out galaxies by default)."""
    n: int = 2048
    """Real galaxies read (and as many generated) for the population statistics."""
    device: str = "cpu"
    """Torch device for inference."""
    seed: int = 0
    """Seeds the latents of every generated image."""
    batch_size: int = 256
    """Inference batch size."""
    grid_redshifts: tuple[float, ...] = (0.3, 0.7, 1.5, 2.5)
    """Redshifts of the 8x8 generation grids of conditional models."""
    sweep_redshifts: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0)
    """Columns of the redshift sweep."""
    sweep_rows: int = 6
    """Latents (rows) in the redshift sweep."""
    n_recon: int = 8
    """Real/reconstruction pairs shown."""
    latent_dims: int = 6
    """Latent dimensions in the corner plot."""
    grid_size: int = 8
    """Side of the generation grids."""
    dpi: int = 110
    """PNG resolution."""
    prior: str | None = None
    """Latent prior of generated galaxies: ``flow``, ``normal``, or ``None`` = the model's default (its flow if fitted)."""

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ConfigError(f"evaluate: n must be >= 2, got {self.n}")
        if self.batch_size < 1:
            raise ConfigError(f"evaluate: batch_size must be >= 1, got {self.batch_size}")
        if self.sweep_rows < 1 or self.n_recon < 1 or self.latent_dims < 1 or self.grid_size < 1:
            raise ConfigError("evaluate: sweep_rows, n_recon, latent_dims and grid_size must be >= 1")
        if not self.grid_redshifts or not self.sweep_redshifts:
            raise ConfigError("evaluate: grid_redshifts and sweep_redshifts must not be empty")
        if self.prior not in (None, "flow", "normal"):
            raise ConfigError(f"evaluate: prior must be 'flow' or 'normal', got {self.prior!r}")


@dataclass(kw_only=True)
class _Accum:
    """Per-galaxy numbers gathered while streaming the real split."""

    keys: list[str] = field(default_factory=list)
    redshift: list[np.ndarray] = field(default_factory=list)
    mu: list[np.ndarray] = field(default_factory=list)
    mse: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    z_pred: list[np.ndarray] = field(default_factory=list)
    stats: list[dict[str, np.ndarray]] = field(default_factory=list)
    recon_stats: list[dict[str, np.ndarray]] = field(default_factory=list)
    border: list[np.ndarray] = field(default_factory=list)
    show_real: list[np.ndarray] = field(default_factory=list)
    show_recon: list[np.ndarray] = field(default_factory=list)


# ----------------------------------------------------------------------------------------
# Reading a split


def _batches(
    manifest: Manifest, split: str, n: int, bs: int, need_redshift: bool, skipped: list[dict[str, Any]]
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, list[dict[str, Any]]]]:
    keys: list[str] = []
    imgs: list[np.ndarray] = []
    zs: list[float] = []
    metas: list[dict[str, Any]] = []
    taken = 0
    for key, img, meta in iter_samples(manifest, split):
        if taken >= n:
            break
        z = meta.get("zphot")
        if need_redshift and (z is None or not math.isfinite(float(z))):
            skipped.append({"key": key, "reason": "no zphot (conditional model needs one)"})
            continue
        if not np.all(np.isfinite(img)):
            skipped.append({"key": key, "reason": "non-finite pixels"})
            continue
        keys.append(key)
        imgs.append(img)
        zs.append(float(z) if z is not None else float("nan"))
        metas.append(meta)
        taken += 1
        if len(keys) == bs:
            yield keys, np.stack(imgs), np.asarray(zs, dtype=np.float32), metas
            keys, imgs, zs, metas = [], [], [], []
    if keys:
        yield keys, np.stack(imgs), np.asarray(zs, dtype=np.float32), metas


# ----------------------------------------------------------------------------------------
# Model and data resolution


def _resolve_model(model: Any, device: str) -> tuple[Any, Path | None]:
    """A loaded model and the folder its run lives in (for metrics.jsonl), if any."""
    if isinstance(model, (str, Path)):
        from hpcvae import load_model

        path = Path(model)
        if not path.exists():
            raise ModelError(f"{path}: no such model file or run folder")
        m = load_model(path, device=device)  # refuses non-finite weights
        return m, (path if path.is_dir() else path.parent)
    from hpcvae.consolidate import check_finite

    check_finite(model.state_dict(), where=f"model {model.config.get('arch')}")
    return model.to(device), None


def _transform(model: Any, manifest: Manifest, notes: list[str]) -> Any:
    """The normalisation the model was trained with; the manifest's minmax only as a noted fallback."""
    t = getattr(model, "transform", None)
    if t is not None:
        return t
    from hpcvae.transforms import get_transform

    notes.append(
        "model carries no normalisation; used minmax with the shard set's train stats "
        "(flux-unit numbers are only right if the model was trained that way)"
    )
    return get_transform("minmax", manifest.stats("train"))


def _is_synthetic(manifest: Manifest) -> bool:
    d = manifest.data
    if d.get("synthetic") or d.get("source", {}).get("synthetic"):
        return True
    cat = str(d.get("source", {}).get("catalog") or "")
    return SYNTH_CATALOG_MARK in Path(cat).name


def _check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"evaluate: --device {device} requested but CUDA is not available")
    return device


# ----------------------------------------------------------------------------------------
# The report


def evaluate(
    model: Any,
    data_dir: str | Path,
    out: str | Path,
    split: str = "val",
    n: int = 2048,
    *,
    device: str = "cpu",
    seed: int = 0,
    config: EvalConfig | None = None,
    metrics: str | Path | None = None,
) -> dict[str, Any]:
    """Write the report's PNGs, ``report.json`` and ``report.md`` under ``out``; return the numbers.

    ``model`` is a loaded model or a path (consolidated model or run folder). ``metrics``
    overrides where the loss curves come from (default: the run folder's metrics.jsonl).
    """
    import torch

    cfg = config or EvalConfig(split=split, n=n, device=device, seed=seed)
    _check_device(cfg.device)
    t0 = time.time()
    out = Path(out)
    notes: list[str] = []
    figures: dict[str, str] = {}

    model_path = Path(model) if isinstance(model, (str, Path)) else None
    m, run_dir = _resolve_model(model, cfg.device)
    m.eval()
    manifest = Manifest.load(data_dir)
    if cfg.split not in manifest.splits:
        raise ShardError(f"{manifest.path}: no split {cfg.split!r} (have {', '.join(manifest.splits)})")
    where = model_path or f"model {m.config.get('arch')}"
    if int(m.image_size) != manifest.image_size:
        raise ModelError(
            f"{where}: model expects {m.image_size}x{m.image_size} images but shard set {manifest.path} "
            f"holds {manifest.image_size}x{manifest.image_size}; evaluate on shards made at the model's size"
        )
    conditional = bool(m.conditional)
    if conditional and not manifest.has_redshift:
        raise ModelError(
            f"{where}: {m.config.get('arch')} is conditional on redshift but shard set {manifest.path} has none"
        )
    transform = _transform(m, manifest, notes)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(cfg.device)
    dtype = next(m.parameters()).dtype

    def save(fig: Any, name: str) -> str:
        import matplotlib.pyplot as plt

        fig.savefig(out / name, dpi=cfg.dpi)
        plt.close(fig)
        figures[name.removesuffix(".png")] = name
        return name

    # -- 1. stream the real split: reconstruct, encode, measure ---------------------------
    acc = _Accum()
    skipped: list[dict[str, Any]] = []
    pixel_scales: set[float] = set()
    with torch.no_grad():
        for keys, phys, zs, metas in _batches(
            manifest, cfg.split, cfg.n, cfg.batch_size, conditional, skipped
        ):
            for meta in metas:
                if meta.get("pixel_scale") is not None:
                    pixel_scales.add(round(float(meta["pixel_scale"]), 9))
            x = torch.as_tensor(phys, dtype=torch.float32).unsqueeze(1)
            xn = transform.forward(x).to(dev, dtype)
            r = torch.as_tensor(zs, device=dev) if conditional else None
            o = m(xn, r, sample_latent=False)
            recon = o.recon.float()
            xn32 = xn.float()
            acc.keys += keys
            acc.redshift.append(zs)
            acc.mu.append(o.mu.float().cpu().numpy())
            acc.mse.append(((recon - xn32) ** 2).mean(dim=(1, 2, 3)).cpu().numpy())
            lv = o.logvar.float()
            acc.kl.append((-0.5 * (1 + lv - o.mu.float() ** 2 - lv.exp()).sum(dim=1)).cpu().numpy())
            if o.z_pred is not None:
                acc.z_pred.append(o.z_pred.float().reshape(-1).cpu().numpy())
            acc.stats.append(moments(phys, 1.0))  # pixels now; scaled to arcsec below
            acc.recon_stats.append(moments(transform.inverse(recon.cpu()).numpy(), 1.0))
            acc.border.append(border_median(phys))
            shown = sum(len(a) for a in acc.show_real)
            if shown < cfg.n_recon:
                k = cfg.n_recon - shown
                acc.show_real.append(xn32[:k, 0].cpu().numpy())
                acc.show_recon.append(recon[:k, 0].cpu().numpy())
    n_real = len(acc.keys)
    if n_real < 2:
        raise ShardError(
            f"{manifest.path}: split {cfg.split!r} has {n_real} usable galaxies; need at least 2"
        )
    if n_real < cfg.n:
        notes.append(f"split {cfg.split!r} has {n_real} usable galaxies, fewer than the {cfg.n} asked for")
    if skipped:
        notes.append(f"{len(skipped)} galaxies of split {cfg.split!r} skipped (see report.json data.skipped)")

    if len(pixel_scales) == 1:
        pixel_scale, ps_source = pixel_scales.pop(), "shard meta.json"
    elif len(pixel_scales) > 1:
        pixel_scale, ps_source = (
            float(np.median(sorted(pixel_scales))),
            "median of differing shard meta values",
        )
        notes.append(f"shard meta holds several pixel scales {sorted(pixel_scales)}; used their median")
    elif manifest.data.get("pixel_scale") is not None:
        pixel_scale, ps_source = float(manifest.data["pixel_scale"]), "manifest"
    else:
        pixel_scale, ps_source = DEFAULT_PIXEL_SCALE, "default (not recorded in the shards)"
        notes.append(f"no pixel scale recorded in the shards; assumed {DEFAULT_PIXEL_SCALE} arcsec/pixel")

    z_real = np.concatenate(acc.redshift)
    mu = np.concatenate(acc.mu)
    real_stats = _merge(acc.stats, pixel_scale)

    # -- 2. generate as many galaxies, following the real redshifts ----------------------
    # Through model.sample, so a fitted flow prior is used unless cfg.prior says otherwise.
    prior = cfg.prior or getattr(m, "default_prior", "normal")
    gen = torch.Generator().manual_seed(cfg.seed)
    gen_stats_parts, gen_border = [], []
    with torch.no_grad():
        for start in range(0, n_real, cfg.batch_size):
            b = min(cfg.batch_size, n_real - start)
            r = torch.as_tensor(z_real[start : start + b], device=dev) if conditional else None
            imgs = m.sample(b, redshift=r, generator=gen, normalized=True, prior=prior)
            img = transform.inverse(imgs.float().cpu())
            gen_stats_parts.append(moments(img.numpy(), 1.0))
            gen_border.append(border_median(img.numpy()))
    gen_stats = _merge(gen_stats_parts, pixel_scale)
    recon_stats = _merge(acc.recon_stats, pixel_scale)

    comparison = {k: compare(real_stats[k], gen_stats[k]) for k in STATS}
    population = {
        "n_real": n_real,
        "n_generated": n_real,
        "generated_redshifts": "the real galaxies' zphot, one each" if conditional else None,
        "latent_seed": cfg.seed,
        "prior": prior,
        "hsm_failures": {
            "real": int((~real_stats["ok"]).sum()),
            "generated": int((~gen_stats["ok"]).sum()),
            "real_examples": [
                f"{acc.keys[int(e.split(':')[0])]}:{e.split(':', 1)[1]}" for e in real_stats["errors"][:5]
            ],
            "generated_examples": list(gen_stats["errors"][:5]),
        },
        "measured_in": "flux units (model normalisation inverted); sizes in arcsec",
        "stats": comparison,
        "reference_lanusse2021": LANUSSE2021,
    }
    save(plots.plot_population(real_stats, gen_stats, comparison), "population.png")

    # -- 3. loss curves -------------------------------------------------------------------
    metrics_path = Path(metrics) if metrics is not None else (run_dir / "metrics.jsonl" if run_dir else None)
    losses: dict[str, Any] = {"metrics_file": metrics_path}
    if metrics_path is not None and metrics_path.is_file():
        records = plots.read_metrics(metrics_path)
        series = plots.loss_series(records)
        losses["records"] = len(records)
        losses["final"] = {
            kind: {k: s[k][-1] for k in ("loss", "recon", "kl")} | {"step": s["x"][-1]}
            for kind, s in series.items()
            if s["x"]
        }
        save(plots.plot_losses(records), "losses.png")
    else:
        why = "no metrics.jsonl next to the model (a bare model file or a model object)"
        losses["skipped"] = why
        notes.append(f"loss curves skipped: {why}")

    # -- 4. reconstructions ---------------------------------------------------------------
    mse = np.concatenate(acc.mse)
    kl = np.concatenate(acc.kl)
    orient = orientation_agreement(real_stats, recon_stats)
    reconstruction: dict[str, Any] = {
        "n": n_real,
        "mse_per_pixel_mean": float(mse.mean()),
        "mse_per_pixel_median": float(np.median(mse)),
        "kl_per_galaxy_mean": float(kl.mean()),
        "space": "normalised [0, 1]",
        "hsm": {k: compare(real_stats[k], recon_stats[k]) for k in ("sigma_arcsec", "g")},
        "hsm_failures": int((~recon_stats["ok"]).sum()),
        "orientation_cos2dphi": orient["mean"],
        "orientation": {**orient, "of": "mean cos 2(phi_real - phi_reconstructed); 1 = kept, 0 = lost"},
    }
    background = _background(np.concatenate(acc.border), np.concatenate(gen_border), manifest)
    z_pred = np.concatenate(acc.z_pred) if acc.z_pred else None
    if z_pred is not None:
        d = z_pred - z_real
        reconstruction["redshift_prediction"] = {
            "rmse": float(np.sqrt(np.mean(d**2))),
            "bias": float(d.mean()),
            "nmad": float(1.4826 * np.median(np.abs(d - np.median(d)) / (1 + z_real))),
        }
    n_show = sum(len(a) for a in acc.show_real)
    save(
        plots.plot_reconstructions(
            np.concatenate(acc.show_real),
            np.concatenate(acc.show_recon),
            redshift=z_real[:n_show] if manifest.has_redshift else None,
            z_pred=z_pred[:n_show] if z_pred is not None else None,
            keys=acc.keys[:n_show],
        ),
        "reconstructions.png",
    )

    # -- 5. generation grids --------------------------------------------------------------
    n_grid = cfg.grid_size * cfg.grid_size

    def grid_sample(redshift: float | None) -> Any:
        g = torch.Generator().manual_seed(cfg.seed + 1)  # the same base noise in every grid
        return m.sample(n_grid, redshift=redshift, generator=g, normalized=True, prior=prior).float().cpu()

    generation: dict[str, Any] = {
        "n_per_grid": n_grid,
        "prior": prior,
        "latents": "N(0, I), the same latents in every grid"
        if prior == "normal"
        else "flow prior: the same base noise in every grid, mapped through the flow",
    }
    with torch.no_grad():
        if conditional:
            generation["grids"] = {}
            for zval in cfg.grid_redshifts:
                imgs = grid_sample(float(zval))
                name = save(
                    plots.plot_generation_grid(imgs, title=f"generated at z = {zval:g}", nrow=cfg.grid_size),
                    f"generations_z{zval:g}.png",
                )
                generation["grids"][f"{zval:g}"] = name
        else:
            imgs = grid_sample(None)
            generation["grids"] = {
                "unconditional": save(
                    plots.plot_generation_grid(imgs, title="generated", nrow=cfg.grid_size), "generations.png"
                )
            }

    # -- 6. redshift sweep ----------------------------------------------------------------
    sweep: dict[str, Any]
    if conditional:
        zs_sweep = torch.as_tensor(cfg.sweep_redshifts, dtype=torch.float32)
        g = torch.Generator().manual_seed(cfg.seed + 2)
        lat = m.sample_latent(cfg.sweep_rows, generator=g, prior=prior).float().cpu()  # flow if fitted
        ncol = len(zs_sweep)
        zz = lat.repeat_interleave(ncol, 0).to(dev, dtype)
        rr = zs_sweep.repeat(cfg.sweep_rows).to(dev)
        with torch.no_grad():
            imgs = m.decode(zz, rr).float().cpu().reshape(cfg.sweep_rows, ncol, m.image_size, m.image_size)
        phys = transform.inverse(imgs).numpy()
        flux = phys.reshape(cfg.sweep_rows, ncol, -1).sum(-1)
        sweep = {
            "redshifts": list(cfg.sweep_redshifts),
            "rows": cfg.sweep_rows,
            "prior": prior,
            "mean_pixel_sum_flux_per_column": flux.mean(0),
            "figure": save(plots.plot_redshift_sweep(imgs, cfg.sweep_redshifts), "redshift_sweep.png"),
        }
    else:
        sweep = {"skipped": f"{m.config.get('arch')} is unconditional: no redshift to sweep"}
        notes.append("redshift sweep skipped: the model does not take a redshift")

    # -- 7. latent corner -----------------------------------------------------------------
    latent = {
        "z_dim": int(m.z_dim),
        "dims_shown": int(min(cfg.latent_dims, m.z_dim)),
        "mu_mean": mu.mean(0),
        "mu_std": mu.std(0),
        "active_dims": int((mu.std(0) > 0.1).sum()),
        "active_threshold": "std of mu over galaxies > 0.1",
    }
    save(plots.plot_latent_corner(mu, dims=cfg.latent_dims), "latent_corner.png")

    # -- 8. redshift trends against the synthetic truth ----------------------------------
    synthetic = _is_synthetic(manifest)
    trends: dict[str, Any]
    if not conditional:
        trends = {"skipped": "model does not take a redshift"}
    elif not synthetic:
        trends = {"skipped": "data is not synthetic: the true size/flux-redshift relation is unknown"}
    else:
        trends = _trends(z_real, real_stats, gen_stats)
        truth = {"z": np.sort(z_real)}
        from hpcvae import cosmology

        truth["sigma_arcsec"] = cosmology.expected_hlr_arcsec(truth["z"])
        truth["flux"] = cosmology.expected_flux(truth["z"])
        save(
            plots.plot_redshift_trends(z_real, real_stats, z_real, gen_stats, truth, trends["slopes_vs_z"]),
            "redshift_trends.png",
        )
    if "skipped" in trends:
        notes.append(f"redshift trends skipped: {trends['skipped']}")

    report: dict[str, Any] = {
        "hpcvae_evaluate": 1,
        "model": {
            "path": model_path,
            "config": m.config,
            "conditional": conditional,
            "predicts_redshift": bool(m.predicts_redshift),
            "normalisation": transform.to_dict() if hasattr(transform, "to_dict") else repr(transform),
        },
        "data": {
            "path": manifest.root,
            "manifest_sha256": manifest.digest,
            "split": cfg.split,
            "n_requested": cfg.n,
            "n_used": n_real,
            "image_size": manifest.image_size,
            "has_redshift": manifest.has_redshift,
            "synthetic": synthetic,
            "pixel_scale_arcsec": pixel_scale,
            "pixel_scale_source": ps_source,
            "n_skipped": len(skipped),
            "skipped": skipped[:50],
            "redshift": _summary(z_real) if manifest.has_redshift else None,
        },
        "seed": cfg.seed,
        "device": cfg.device,
        "losses": losses,
        "reconstruction": reconstruction,
        "generation": generation,
        "redshift_sweep": sweep,
        "latent": latent,
        "population": population,
        "background": background,
        "redshift_trends": trends,
        "verdict": verdict(population["stats"], reconstruction, background, trends),
        "figures": figures,
        "notes": notes,
        "seconds": round(time.time() - t0, 2),
    }
    report = json_safe(report)
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    return report


def _background(real: np.ndarray, generated: np.ndarray, manifest: Manifest) -> dict[str, Any]:
    """Border medians (the sky level a stamp sits on) of generated against real stamps."""
    noise = manifest.stats("train").get("noise_std")
    diff = float(np.median(generated) - np.median(real))
    return {
        "of": "median of each stamp's outer 2-pixel frame, flux units",
        "real_median": float(np.median(real)),
        "generated_median": float(np.median(generated)),
        "difference": diff,
        "noise_std": noise,
        "difference_in_noise_sigma": diff / noise if noise else None,
    }


TOLERANCE = {
    "g": (0.02, 0.05),
    "sigma_rel": (0.05, 0.15),
    "orientation": (0.95, 0.9),
    "background_sigma": (0.5, 1.0),
}
"""(as close as galaxy2galaxy, close) thresholds behind the verdict words ``ok`` / ``close`` / ``off``."""


def verdict(
    stats: dict[str, Any], recon: dict[str, Any], background: dict[str, Any], trends: dict[str, Any]
) -> dict[str, Any]:
    """One line per quantity: ours against the real galaxies, beside Lanusse et al. 2021's."""
    ref = LANUSSE2021
    lines: dict[str, Any] = {}

    def word(value: float | None, ok: float, close: float, higher_is_better: bool = False) -> str:
        if value is None:
            return "n/a"
        if higher_is_better:
            return "ok" if value >= ok else "close" if value >= close else "off"
        return "ok" if value <= ok else "close" if value <= close else "off"

    g = stats["g"]
    if g["mean_diff"] is not None:
        d = g["mean_diff"]
        ref_d = ref["generated"]["mean_g"] - ref["real"]["mean_g"]
        lines["shape"] = {
            "verdict": word(abs(d), *TOLERANCE["g"]), "delta": d,
            "line": f"mean |g| generated {g['mean_generated']:.3f} vs real {g['mean_real']:.3f} (delta {d:+.3f}); "
                    f"galaxy2galaxy {ref['generated']['mean_g']:.3f} vs {ref['real']['mean_g']:.3f} (delta {ref_d:+.3f})",
        }  # fmt: skip
    sg = stats["sigma_arcsec"]
    if sg["mean_diff"] is not None and sg["mean_real"]:
        rel = sg["mean_diff"] / sg["mean_real"]
        ref_rel = ref["generated"]["mean_sigma_arcsec"] / ref["real"]["mean_sigma_arcsec"] - 1
        lines["size"] = {
            "verdict": word(abs(rel), *TOLERANCE["sigma_rel"]), "relative_delta": rel,
            "line": f"mean sigma generated {sg['mean_generated']:.4f}\" vs real {sg['mean_real']:.4f}\" ({rel:+.1%}); "
                    f"galaxy2galaxy {ref['generated']['mean_sigma_arcsec']:.4f}\" vs "
                    f"{ref['real']['mean_sigma_arcsec']:.4f}\" ({ref_rel:+.1%})",
        }  # fmt: skip
    o = recon.get("orientation_cos2dphi")
    lines["orientation"] = {
        "verdict": word(o, *TOLERANCE["orientation"], higher_is_better=True), "value": o,
        "line": f"reconstructions keep position angles: <cos 2 dphi> = {o:.3f} (1 = kept, 0 = random)"
        if o is not None else "no galaxy with real |g| > 0.1 to measure orientation on",
    }  # fmt: skip
    b = background.get("difference_in_noise_sigma")
    lines["background"] = {
        "verdict": word(abs(b), *TOLERANCE["background_sigma"]) if b is not None else "n/a", "value": b,
        "line": f"border median generated - real = {background['difference']:+.3g} flux units"
        + (f" ({b:+.2f} noise sigma)" if b is not None else ""),
    }  # fmt: skip
    slopes = trends.get("slopes_vs_z", {}).get("sigma_arcsec") if isinstance(trends, dict) else None
    if (
        slopes
        and slopes.get("real", {}).get("slope")
        and slopes.get("generated", {}).get("slope") is not None
    ):
        # Judged against the real galaxies measured the same way: HSM sizes include the PSF, which
        # flattens the observed slope below the intrinsic truth for real and generated stamps alike.
        real, gen, t = slopes["real"]["slope"], slopes["generated"]["slope"], slopes["truth"]["slope"]
        rel = gen / real - 1
        lines["size_redshift_slope"] = {
            "verdict": word(abs(rel), 0.2, 0.5), "relative_error": rel,
            "line": f"d log10 sigma / dz generated {gen:+.3f} vs real {real:+.3f} ({rel:+.0%}, real "
                    f"+/- {slopes['real']['slope_se'] / abs(real):.0%}); intrinsic truth {t:+.3f} (HSM sizes include the PSF)",
        }  # fmt: skip
    lines["thresholds"] = {k: {"ok": v[0], "close": v[1]} for k, v in TOLERANCE.items()}
    return lines


def _merge(parts: Sequence[dict[str, np.ndarray]], pixel_scale: float) -> dict[str, np.ndarray]:
    """Concatenate per-batch moment results (measured in pixels) and convert sizes to arcsec."""
    merged: dict[str, np.ndarray] = {}
    offset = 0
    errors: list[str] = []
    for p in parts:
        errors += [f"{int(e.split(':')[0]) + offset}:{e.split(':', 1)[1]}" for e in p["errors"]]
        offset += len(p["ok"])
    for k in (*STATS, "ok"):
        merged[k] = np.concatenate([p[k] for p in parts])
    merged["sigma_arcsec"] = merged["sigma_arcsec"] * pixel_scale
    merged["errors"] = np.asarray(errors, dtype=object)
    return merged


def _summary(a: np.ndarray) -> dict[str, float]:
    a = a[np.isfinite(a)]
    if not a.size:
        return {}
    return {
        "min": float(a.min()),
        "median": float(np.median(a)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def _trends(z: np.ndarray, real: dict[str, np.ndarray], gen: dict[str, np.ndarray]) -> dict[str, Any]:
    """Slopes of log10 size and flux against zphot: real galaxies, generated ones, the truth.

    Two views: d log10(X)/dz (dex per unit redshift), and the response d log10(X) /
    d log10(X_true(z)) which is 1 when a population follows the true relation exactly,
    whatever the constant factor between the measured and the generating quantity.
    """
    from hpcvae import cosmology

    true_fn = {"sigma_arcsec": cosmology.expected_hlr_arcsec, "flux": cosmology.expected_flux}
    vs_z: dict[str, dict[str, Any]] = {}
    response: dict[str, dict[str, Any]] = {}
    for key, fn in true_fn.items():
        log_true = np.log10(np.asarray(fn(z), dtype=float))
        vs_z[key] = {"truth": fit_slope(z, log_true)}
        response[key] = {"truth": {"slope": 1.0, "slope_se": 0.0, "n": int(np.isfinite(log_true).sum())}}
        for label, st in (("real", real), ("generated", gen)):
            with np.errstate(invalid="ignore", divide="ignore"):
                y = np.log10(np.asarray(st[key], dtype=float))
            vs_z[key][label] = fit_slope(z, y)
            response[key][label] = fit_slope(log_true, y)
    return {
        "quantities": {
            "sigma_arcsec": "HSM σ vs expected_hlr_arcsec(z)",
            "flux": "HSM amplitude vs expected_flux(z)",
        },
        "slopes_vs_z": vs_z,
        "response_vs_log_truth": response,
        "z_range": _summary(z),
    }


# ----------------------------------------------------------------------------------------
# Markdown


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def render_markdown(r: dict[str, Any]) -> str:
    """report.md: every figure with the numbers that belong to it."""
    md: list[str] = []
    mcfg = r["model"]["config"]
    d = r["data"]
    md.append(f"# Evaluation: {mcfg.get('arch')} on {Path(d['path']).name} ({d['split']})\n")
    md.append("| | |\n|---|---|")
    md.append(f"| model | `{r['model']['path'] or 'in-memory model'}` |")
    md.append(
        f"| architecture | {mcfg.get('arch')} ({mcfg.get('flavour')}), {mcfg.get('image_size')} px, "
        f"z_dim {mcfg.get('z_dim')}, nf {mcfg.get('nf')} |"
    )
    md.append(f"| conditional on redshift | {r['model']['conditional']} |")
    md.append(
        f"| data | `{d['path']}` split `{d['split']}`: {d['n_used']} galaxies used "
        f"({d['n_skipped']} skipped), {d['image_size']} px |"
    )
    md.append(f"| pixel scale | {d['pixel_scale_arcsec']} arcsec ({d['pixel_scale_source']}) |")
    md.append(f"| synthetic data (truth known) | {d['synthetic']} |")
    md.append(f"| seed / device | {r['seed']} / {r['device']} |\n")
    v = {k: x for k, x in r.get("verdict", {}).items() if k != "thresholds"}
    if v:
        md.append("## Verdict\n")
        md += [f"- **{k}**: {x['verdict']}: {x['line']}" for k, x in v.items()]
        th = r["verdict"]["thresholds"]
        md.append(
            "\n_ok = as close as galaxy2galaxy gets (|Δ mean |g|| ≤ "
            f"{th['g']['ok']}, |Δ mean σ| ≤ {th['sigma_rel']['ok']:.0%}, orientation ≥ {th['orientation']['ok']}); "
            f"close = |Δg| ≤ {th['g']['close']}, |Δσ| ≤ {th['sigma_rel']['close']:.0%}, orientation ≥ "
            f"{th['orientation']['close']}._\n"
        )
    if r["notes"]:
        md.append("**Notes**\n")
        md += [f"- {n}" for n in r["notes"]]
        md.append("")

    md.append("## Loss curves\n")
    lo = r["losses"]
    if "skipped" in lo:
        md.append(f"Skipped: {lo['skipped']}.\n")
    else:
        md.append("![losses](losses.png)\n")
        md.append("| | step | loss | recon | KL |\n|---|---|---|---|---|")
        for kind, f in lo.get("final", {}).items():
            md.append(
                f"| last {kind} | {_fmt(f['step'])} | {_fmt(f['loss'])} | {_fmt(f['recon'])} | {_fmt(f['kl'])} |"
            )
        md.append("")

    rc = r["reconstruction"]
    md.append("## Reconstructions\n")
    md.append("![reconstructions](reconstructions.png)\n")
    md.append(
        f"Mean per-pixel MSE (normalised space): {_fmt(rc['mse_per_pixel_mean'])}; "
        f"mean KL per galaxy: {_fmt(rc['kl_per_galaxy_mean'])}."
    )
    if "redshift_prediction" in rc:
        p = rc["redshift_prediction"]
        md.append(
            f" Predicted redshift: RMSE {_fmt(p['rmse'])}, bias {_fmt(p['bias'])}, NMAD {_fmt(p['nmad'])}."
        )
    md.append("")
    md.append("| HSM, real vs reconstructed | mean real | mean reconstructed | W1 |\n|---|---|---|---|")
    for k, c in rc["hsm"].items():
        md.append(f"| {k} | {_fmt(c['mean_real'])} | {_fmt(c['mean_generated'])} | {_fmt(c['w1'])} |")
    o = rc["orientation"]
    md.append(
        f"\nOrientation kept: ⟨cos 2Δφ⟩ = {_fmt(o['mean'], 3)} over {o['n']} galaxies with real |g| > "
        f"{o['min_real_g']} (1 = kept, 0 = lost).\n"
    )

    md.append("## Generations\n")
    for label, name in r["generation"]["grids"].items():
        title = "unconditional" if label == "unconditional" else f"z = {label}"
        md.append(f"**{title}**\n\n![{title}]({name})\n")

    md.append("## Redshift sweep\n")
    sw = r["redshift_sweep"]
    if "skipped" in sw:
        md.append(f"Skipped: {sw['skipped']}.\n")
    else:
        md.append("![redshift sweep](redshift_sweep.png)\n")
        md.append("| z | " + " | ".join(_fmt(z, 3) for z in sw["redshifts"]) + " |")
        md.append("|---" * (len(sw["redshifts"]) + 1) + "|")
        md.append(
            "| mean pixel-sum flux | "
            + " | ".join(_fmt(f, 3) for f in sw["mean_pixel_sum_flux_per_column"])
            + " |\n"
        )

    la = r["latent"]
    md.append("## Latent space\n")
    md.append("![latent corner](latent_corner.png)\n")
    md.append(f"{la['active_dims']} of {la['z_dim']} latent dims active ({la['active_threshold']}).\n")

    po = r["population"]
    md.append("## Population statistics (HSM adaptive moments)\n")
    md.append("![population](population.png)\n")
    hf = po["hsm_failures"]
    md.append(
        f"{po['n_real']} real and {po['n_generated']} generated galaxies"
        + (" (generated at the real galaxies' redshifts)" if po["generated_redshifts"] else "")
        + f", latents from the {po.get('prior', 'normal')} prior"
        + f"; measured in {po['measured_in']}. HSM failures: real {hf['real']}, generated "
        f"{hf['generated']}.\n"
    )
    md.append("| statistic | mean real | mean generated | Δmean ± s.e. | W1 |\n|---|---|---|---|---|")
    for k, c in po["stats"].items():
        diff = "n/a" if c["mean_diff"] is None else f"{_fmt(c['mean_diff'])} ± {_fmt(c['mean_diff_se'], 2)}"
        md.append(
            f"| {k} | {_fmt(c['mean_real'])} | {_fmt(c['mean_generated'])} | {diff} | {_fmt(c['w1'])} |"
        )
    ref = po["reference_lanusse2021"]
    md.append(
        f"\nFor context, {ref['source']}: real mean |g| = {ref['real']['mean_g']}, "
        f"σ = {ref['real']['mean_sigma_arcsec']}″; their generated: {ref['generated']['mean_g']} and "
        f"{ref['generated']['mean_sigma_arcsec']}″.\n"
    )

    md.append("## Size and flux against redshift (synthetic truth)\n")
    tr = r["redshift_trends"]
    if "skipped" in tr:
        md.append(f"Skipped: {tr['skipped']}.\n")
    else:
        md.append("![redshift trends](redshift_trends.png)\n")
        md.append("| quantity | fit | truth | real | generated |\n|---|---|---|---|---|")
        for key in tr["slopes_vs_z"]:
            for fit_name, table in (
                ("d log10 / dz", tr["slopes_vs_z"]),
                ("response (1 = true relation)", tr["response_vs_log_truth"]),
            ):
                cells = []
                for who in ("truth", "real", "generated"):
                    s = table[key][who]
                    cells.append(
                        "n/a" if s["slope"] is None else f"{_fmt(s['slope'])} ± {_fmt(s['slope_se'], 2)}"
                    )
                md.append(f"| {key} | {fit_name} | " + " | ".join(cells) + " |")
        md.append("")
    md.append(f"_Written by hpcvae.evaluate in {r['seconds']} s._\n")
    return "\n".join(md)


# ----------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpcvae.evaluate",
        description="Evaluate a trained model: reconstructions, generations, redshift sweeps, latent maps "
        "and HSM population statistics against real galaxies, in one report (PNGs + report.json + report.md).",
    )
    p.add_argument("model", help="consolidated model (model.safetensors / model.json) or a run folder")
    p.add_argument("--data", required=True, help="shard set folder (with manifest.json)")
    p.add_argument("--split", default="val", help="split to compare against (default: val)")
    p.add_argument(
        "--n", type=int, default=2048, help="real galaxies used, and as many generated (default 2048)"
    )
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated latents")
    p.add_argument("--batch-size", type=int, default=256, help="inference batch size")
    p.add_argument(
        "--prior", choices=("flow", "normal"), default=None,
        help="latent prior of generated galaxies (default: the model's flow prior if it has one, else normal)",
    )  # fmt: skip
    p.add_argument(
        "--metrics", default=None, help="metrics.jsonl for the loss curves (default: the run folder's)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = EvalConfig(
        split=args.split, n=args.n, device=args.device, seed=args.seed, batch_size=args.batch_size,
        prior=args.prior,
    )  # fmt: skip
    rep = evaluate(args.model, args.data, args.out, config=cfg, metrics=args.metrics)
    out = Path(args.out)
    pop = rep["population"]
    print(
        f"hpcvae.evaluate: {rep['data']['n_used']} galaxies, {pop['prior']} prior; "
        f"HSM failures real {pop['hsm_failures']['real']}, "
        f"generated {pop['hsm_failures']['generated']}"
    )
    for k, c in pop["stats"].items():
        print(
            f"  {k:13s} real {_fmt(c['mean_real'])}  generated {_fmt(c['mean_generated'])}  W1 {_fmt(c['w1'])}"
        )
    print(f"hpcvae.evaluate: wrote {out / 'report.md'}, {out / 'report.json'} and {len(rep['figures'])} PNGs")
    return 0
