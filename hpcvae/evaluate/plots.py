"""One function per report figure; each returns a matplotlib Figure for notebooks.

The functions take plain arrays (not models) so a notebook can re-plot saved numbers
and the report code decides once how to run the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from hpcvae.evaluate.moments import STAT_LABELS, STATS

CMAP = "inferno"


def density_hist(ax: Any, x: np.ndarray, edges: np.ndarray, **kw: Any) -> None:
    """``ax.hist(x, density=True)`` that draws nothing (instead of warning) when no value is in ``edges``."""
    x = np.asarray(x, float)
    inside = x[(x >= edges[0]) & (x <= edges[-1])]
    if inside.size:
        ax.hist(inside, bins=edges, density=True, **kw)


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim >= 3 and a.shape[-3] == 1:
        a = a[..., 0, :, :]
    return a


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a run's ``metrics.jsonl``; torn or non-JSON lines (a killed job) are skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def loss_series(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """``{kind: {"x": [...], "recon": [...], "kl": [...], "loss": [...]}}`` from metric records.

    The x axis is the optimizer step where recorded, else the epoch, so resumed runs
    (which repeat no step) plot as one line.
    """
    series: dict[str, dict[str, list[float]]] = {}
    for rec in records:
        kind = rec.get("kind", rec.get("split"))
        if kind not in ("train", "val"):
            continue
        x = rec.get("step", rec.get("global_step", rec.get("epoch")))
        if x is None:
            continue
        s = series.setdefault(kind, {"x": [], "recon": [], "kl": [], "loss": []})
        s["x"].append(float(x))
        for key, alts in (("recon", ("recon",)), ("kl", ("kl",)), ("loss", ("loss", "total"))):
            v = next((rec[a] for a in alts if a in rec and rec[a] is not None), None)
            s[key].append(float(v) if v is not None else float("nan"))
    return series


def plot_losses(
    metrics: str | Path | Sequence[Mapping[str, Any]], prior: Sequence[Mapping[str, Any]] = ()
) -> Figure:
    """Train and val total, reconstruction and KL terms against optimizer step, and the flow prior's NLL.

    ``prior`` holds the flow prior's metric records (``RUN/prior/metrics.jsonl``), drawn in a fourth panel.
    """
    records = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    series = loss_series(records)
    panels = [("loss", "total loss", "loss per galaxy (recon + β KL)"), ("recon", "reconstruction",
              "reconstruction term per galaxy"), ("kl", "KL", "KL per galaxy [nats]")]  # fmt: skip
    fig, axes = plt.subplots(
        1, 4 if prior else 3, figsize=(17 if prior else 13, 3.6), constrained_layout=True
    )
    for ax, (key, title, ylabel) in zip(axes, panels):
        for kind, style in (("train", "-"), ("val", "o-")):
            s = series.get(kind)
            if not s:
                continue
            y = np.asarray(s[key])
            if not np.isfinite(y).any():
                continue
            ax.plot(s["x"], y, style, ms=3, label=kind)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if ax.lines:
            ys = np.concatenate([ln.get_ydata() for ln in ax.lines])
            if np.all(ys[np.isfinite(ys)] > 0):
                ax.set_yscale("log")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    if prior:
        ax = axes[3]
        for kind, style in (("train", "-"), ("val", "o-")):
            pts = [
                (r["step"], r.get("nll")) for r in prior if r.get("kind") == kind and r.get("nll") is not None
            ]
            if pts:
                ax.plot(*zip(*pts), style, ms=3, label=kind)
        ax.set_title("flow prior")
        ax.set_xlabel("optimizer step (flow)")
        ax.set_ylabel("NLL per galaxy latent [nats]")
        if ax.lines:
            ax.legend()
    return fig


def asinh_stretch(img: np.ndarray, soft: float | None = None, vmax: float | None = None) -> np.ndarray:
    """asinh(x / soft) scaled to [0, 1] at ``vmax`` (default its 99.5th percentile): the faint isophotes stay
    visible; ``soft`` is the noise sigma (else a linear stretch from 0)."""
    finite = np.isfinite(img)
    if not finite.any():
        return np.zeros_like(img)
    x = np.nan_to_num(img, nan=0.0)
    if soft and soft > 0:
        x = np.arcsinh(x / soft)
        vmax = np.arcsinh(vmax / soft) if vmax is not None else None
    top = float(np.percentile(x[finite], 99.5)) if vmax is None else float(vmax)
    lo = min(0.0, float(np.min(x[finite])))
    return np.clip((x - lo) / max(top - lo, 1e-12), 0.0, 1.0)


def stretch_note(soft: float | None) -> str:
    return (f"stretch: asinh(flux / {soft:.3g}) (noise sigma), each stamp to its 99.5th percentile"
            if soft and soft > 0 else "stretch: linear, each stamp from 0 to its 99.5th percentile")  # fmt: skip


def scale_bar(ax: Any, pixel_scale: float | None, x0: float, y0: float, arcsec: float = 0.5) -> None:
    """A white bar of ``arcsec`` at the image's pixel scale, labelled."""
    if not pixel_scale:
        return
    length = arcsec / pixel_scale
    ax.plot([x0, x0 + length], [y0, y0], color="white", lw=2)
    ax.text(x0 + length / 2, y0 - 1.5, f'{arcsec:g}"', color="white", ha="center", va="bottom", fontsize=7)


def plot_reconstructions(
    real: Any,
    recon: Any,
    redshift: Any | None = None,
    z_pred: Any | None = None,
    *,
    n: int = 8,
    keys: Sequence[str] | None = None,
    pixel_scale: float | None = None,
    noise_sigma: float | None = None,
) -> Figure:
    """Real galaxies (top), reconstructions (middle, same stretch per pair), residuals in noise sigma (bottom)."""
    real = _np(real)[:n]
    recon = _np(recon)[:n]
    n = len(real)
    h, w = real.shape[-2:]
    tiles = np.zeros((2, n, h, w))
    for i in range(n):
        vmax = float(np.nanpercentile(real[i], 99.5))
        tiles[0, i] = asinh_stretch(real[i], noise_sigma, vmax)
        tiles[1, i] = asinh_stretch(recon[i], noise_sigma, vmax)
    resid = (real - recon) / (noise_sigma if noise_sigma and noise_sigma > 0 else 1.0)
    fig, (ax, axr) = plt.subplots(2, 1, figsize=(1.6 * n + 1.6, 5.6), height_ratios=[2, 1])
    im = ax.imshow(mosaic(tiles), origin="upper", cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([h / 2, h + 1 + h / 2])
    ax.set_yticklabels(["real", "recon"])
    ax.set_xticks([])
    scale_bar(ax, pixel_scale, 2, h - 3)
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label="stretched flux (0-1)")
    unit = "noise sigma" if noise_sigma else "flux"
    rim = axr.imshow(
        mosaic(resid[None]), origin="upper", cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest"
    )
    axr.set_yticks([h / 2])
    axr.set_yticklabels(["real - recon"])
    axr.set_xticks([])
    fig.colorbar(rim, ax=axr, fraction=0.02, pad=0.01, label=f"residual [{unit}]")
    zs = _np(redshift) if redshift is not None else None
    zp = _np(z_pred) if z_pred is not None else None
    for i in range(n):
        x = i * (w + 1) + w / 2
        top = [str(keys[i])] if keys is not None else []
        if zs is not None:
            top.append(f"z={float(zs[i]):.2f}")
        if top:
            ax.text(x, -2, "\n".join(top), ha="center", va="bottom", fontsize=7)
        if zp is not None:
            ax.text(x, 2 * h + 3, f"ẑ={float(zp[i]):.2f}", ha="center", va="top", fontsize=7)
    ax.set_title(
        f"real over reconstruction, one {stretch_note(noise_sigma).split(',')[0]} per pair", fontsize=9
    )
    fig.tight_layout()
    return fig


def _stretch(img: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """Map an image to [0, 1] for display: 0 (or the minimum, if negative) to its 99.5th percentile."""
    return asinh_stretch(img, None, vmax)


def mosaic(tiles: np.ndarray, gap: int = 1) -> np.ndarray:
    """(rows, cols, H, W) display-ready tiles -> one (rows*(H+gap), cols*(W+gap)) image.

    One imshow of a mosaic is ~50x faster to draw than a subplot per galaxy, which
    matters for a report with several 8x8 grids.
    """
    rows, cols, h, w = tiles.shape
    out = np.ones((rows * (h + gap) - gap, cols * (w + gap) - gap))
    for r in range(rows):
        for c in range(cols):
            out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tiles[r, c]
    return out


def plot_generation_grid(
    images: Any, *, title: str | None = None, nrow: int | None = None, noise_sigma: float | None = None,
    pixel_scale: float | None = None,
) -> Figure:  # fmt: skip
    """A grid of generated galaxies (physical units), each on its own stretch, stated under the title."""
    images = _np(images)
    n = len(images)
    ncol = int(np.ceil(np.sqrt(n))) if nrow is None else int(np.ceil(n / min(nrow, n)))
    rows = int(np.ceil(n / ncol))
    h, w = images.shape[-2:]
    tiles = np.ones((rows, ncol, h, w))
    for i in range(n):
        tiles[i // ncol, i % ncol] = asinh_stretch(images[i], noise_sigma)
    fig, ax = plt.subplots(figsize=(max(1.1 * ncol, 3.2), 1.1 * rows + 0.7))
    ax.imshow(mosaic(tiles), origin="upper", cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    scale_bar(ax, pixel_scale, 2, h - 3)
    ax.set_title((title + "\n" if title else "") + stretch_note(noise_sigma), fontsize=8)
    fig.tight_layout()
    return fig


def plot_redshift_sweep(images: Any, redshifts: Sequence[float], held: str = "the latent") -> Figure:
    """Rows: one galaxy each (``held``: what stays fixed along the row); columns: increasing redshift.

    Each row shares one stretch so changes in size and brightness with z stay visible.
    """
    images = _np(images)  # (rows, cols, H, W)
    nrows, ncols, h, w = images.shape
    tiles = np.zeros_like(images)
    for r in range(nrows):
        vmax = float(np.nanpercentile(images[r], 99.5))
        for c in range(ncols):
            tiles[r, c] = _stretch(images[r, c], vmax)
    fig, ax = plt.subplots(figsize=(1.2 * ncols, 1.2 * nrows + 0.6))
    ax.imshow(mosaic(tiles), origin="upper", cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([c * (w + 1) + w / 2 for c in range(ncols)])
    ax.set_xticklabels([f"{z:.2g}" for z in redshifts])
    ax.set_yticks([])
    ax.set_xlabel("redshift")
    ax.set_title(f"one galaxy per row ({held} held) across redshift; one stretch per row", fontsize=9)
    fig.tight_layout()
    return fig


def plot_latent_corner(mu: Any, *, dims: int = 6, bins: int = 40, prior_draws: Any | None = None) -> Figure:
    """Corner plot of encoder means against the prior samples are drawn from (the flow's draws, or N(0, I))."""
    mu = _np(mu)
    pd = _np(prior_draws) if prior_draws is not None else None
    d = min(dims, mu.shape[1])
    fig, axes = plt.subplots(d, d, figsize=(1.8 * d + 0.5, 1.8 * d + 0.5), squeeze=False)
    lim = max(3.0, float(np.nanpercentile(np.abs(mu[:, :d]), 99.5))) if mu.size else 3.0
    edges = np.linspace(-lim, lim, bins + 1)
    grid = np.linspace(-lim, lim, 200)
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            if i == j:
                density_hist(ax, mu[:, i], edges, color="C0", alpha=0.8)
                if pd is not None:
                    density_hist(ax, pd[:, i], edges, histtype="step", color="k", lw=0.8)
                else:
                    ax.plot(grid, np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi), "k--", lw=0.8)
                ax.set_yticks([])
            else:
                ax.hist2d(mu[:, j], mu[:, i], bins=[edges, edges], cmap="Blues")
            if i == d - 1:
                ax.set_xlabel(f"μ{j}")
            else:
                ax.set_xticklabels([])
            if j == 0 and i > 0:
                ax.set_ylabel(f"μ{i}")
            elif i != j:
                ax.set_yticklabels([])
    what = "black: draws of the flow prior samples come from" if pd is not None else "dashed: prior N(0, 1)"
    fig.suptitle(f"encoder means (blue), first {d} of {mu.shape[1]} dims; {what}; density per unit latent")
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.08, top=0.93, wspace=0.08, hspace=0.08)
    return fig


def plot_population(
    real: Mapping[str, np.ndarray],
    generated: Mapping[str, np.ndarray],
    comparison: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    bins: int = 40,
) -> Figure:
    """Overlaid histograms of the HSM statistics of real and generated galaxies."""
    fig, axes = plt.subplots(1, len(STATS), figsize=(3.3 * len(STATS), 3.2), constrained_layout=True)
    for ax, key in zip(axes, STATS):
        r = np.asarray(real[key], dtype=float)
        g = np.asarray(generated[key], dtype=float)
        r, g = r[np.isfinite(r)], g[np.isfinite(g)]
        both = np.concatenate([r, g])
        if both.size == 0:
            ax.text(0.5, 0.5, "no successful\nmeasurements", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel(STAT_LABELS[key])
            continue
        lo, hi = np.percentile(both, [0.5, 99.5])
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        if r.size:
            density_hist(ax, r, edges, histtype="stepfilled", alpha=0.4, label=f"real ({r.size})")
        if g.size:
            density_hist(ax, g, edges, histtype="step", lw=1.5, label=f"generated ({g.size})")
        ax.set_xlabel(STAT_LABELS[key])
        ax.set_ylabel("probability density")
        if comparison and key in comparison and comparison[key].get("w1") is not None:
            c = comparison[key]
            txt = f"W1={c['w1']:.3g}"
            if c.get("mean_diff") is not None and c.get("mean_diff_se") is not None:
                txt += f"\nΔmean={c['mean_diff']:.3g}±{c['mean_diff_se']:.2g}"
            ax.text(0.97, 0.97, txt, ha="right", va="top", fontsize=8, transform=ax.transAxes)
        ax.legend(fontsize=7, loc="upper left")
    return fig


def plot_redshift_trends(
    z_real: Any,
    real: Mapping[str, np.ndarray],
    z_gen: Any,
    generated: Mapping[str, np.ndarray],
    truth: Mapping[str, Any] | None = None,
    slopes: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    stats: Sequence[str] = ("sigma_arcsec", "flux"),
) -> Figure:
    """log10 of size and flux against redshift: real, generated and (if known) the true relation.

    The true relation is drawn through the real galaxies' mean, because the measured
    quantity (HSM σ of a PSF-convolved, noisy stamp) differs from the generator's parameter
    (half-light radius, total flux) by a factor; the slopes are what is compared.
    """
    z_real = _np(z_real)
    z_gen = _np(z_gen)
    fig, axes = plt.subplots(1, len(stats), figsize=(5 * len(stats), 3.8), constrained_layout=True)
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, stats):
        for z, st, label, color in ((z_real, real, "real", "C0"), (z_gen, generated, "generated", "C1")):
            v = np.asarray(st[key], dtype=float)
            with np.errstate(invalid="ignore", divide="ignore"):
                y = np.log10(v)
            keep = np.isfinite(y) & np.isfinite(z)
            ax.scatter(z[keep], y[keep], s=4, alpha=0.35, color=color, label=label)
            s = (slopes or {}).get(key, {}).get(label)
            if s and s.get("slope") is not None:
                zz = np.linspace(np.nanmin(z[keep]), np.nanmax(z[keep]), 50)
                ax.plot(
                    zz,
                    s["intercept"] + s["slope"] * zz,
                    color=color,
                    lw=2,
                    label=f"{label} fit: {s['slope']:.3f}±{s['slope_se']:.3f} dex/unit z",
                )
        if truth is not None and key in truth:
            zt = np.asarray(truth["z"], dtype=float)
            yt = np.log10(np.asarray(truth[key], dtype=float))
            v = np.asarray(real[key], dtype=float)
            with np.errstate(invalid="ignore", divide="ignore"):
                yr = np.log10(v)
            keep = np.isfinite(yr) & np.isfinite(z_real)
            offset = (
                float(np.mean(yr[keep]) - np.interp(np.mean(z_real[keep]), zt, yt)) if keep.any() else 0.0
            )
            order = np.argsort(zt)
            s = (slopes or {}).get(key, {}).get("truth")
            lab = "true relation, moved to the real mean (slopes compare)"
            if s and s.get("slope") is not None:
                lab += f": {s['slope']:.3f} dex/unit z"
            ax.plot(zt[order], yt[order] + offset, "k--", lw=1.5, label=lab)
        ax.set_xlabel("zphot")
        ax.set_ylabel(
            "log10 HSM sigma [arcsec]" if key == "sigma_arcsec" else "log10 pixel-sum flux [image units]"
        )
        ax.legend(fontsize=7)
    return fig


def write_samples(run_dir: Path, n: int = 64, seed: int = 0) -> Path:
    """An 8x8 grid of galaxies from the model files, drawn from the prior ``sample()`` uses (the flow once fitted),
    at the training median conditions; the title states the prior, seed and stretch."""
    import torch

    from hpcvae.model_files import load_model

    model = load_model(run_dir)
    g = torch.Generator().manual_seed(seed)
    known = not model.conditional or all(
        model.conditioning.median(c) is not None for c in model.conditioning.names
    )
    imgs = model.sample(n, generator=g, redshift=None if known else 0.7, extrapolate=True).float().numpy()
    phys = (getattr(model, "model_info", None) or {}).get("physics") or {}
    where = ""
    if model.conditional:
        c = model.conditioning
        where = (
            " at the training medians ("
            + ", ".join(f"{k} {c.median(k):.3g}" for k in c.names if c.median(k))
            + ")"
        )
    fig = plot_generation_grid(imgs, title=f"{model.config['arch']}{where}, {model.default_prior} prior, seed {seed}",
                               noise_sigma=phys.get("noise_std"), pixel_scale=phys.get("pixel_scale_arcsec"))  # fmt: skip
    path = Path(run_dir) / "samples.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
