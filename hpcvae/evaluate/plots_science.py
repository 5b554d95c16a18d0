"""Figures of the science sections: morphology histograms, power spectra, conditional response curves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from hpcvae.evaluate.morphology import MORPH_LABELS, MORPH_STATS
from hpcvae.evaluate.plots import density_hist


def plot_morphology(
    real: Mapping[str, np.ndarray],
    generated: Mapping[str, np.ndarray],
    stats: Mapping[str, Any],
    *,
    baseline: Mapping[str, np.ndarray] | None = None,
    bins: int = 30,
) -> Figure:
    """Histograms of statmorph's statistics, real against generated (and the single-Sérsic baseline),
    with W1 and the mean difference."""
    fig, axes = plt.subplots(
        1, len(MORPH_STATS), figsize=(3.3 * len(MORPH_STATS), 3.2), constrained_layout=True
    )
    for ax, key in zip(axes, MORPH_STATS):
        r, g = np.asarray(real[key], float), np.asarray(generated[key], float)
        r, g = r[np.isfinite(r)], g[np.isfinite(g)]
        ax.set_xlabel(MORPH_LABELS[key])
        ax.set_ylabel("probability density")
        both = np.concatenate([r, g])
        if both.size == 0:
            ax.text(0.5, 0.5, "no successful\nmeasurements", ha="center", va="center", transform=ax.transAxes)
            continue
        lo, hi = np.percentile(both, [1, 99])
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
        density_hist(ax, r, edges, histtype="stepfilled", alpha=0.4, label=f"real ({r.size})")
        density_hist(ax, g, edges, histtype="step", lw=1.5, label=f"generated ({g.size})")
        if baseline is not None:
            b = np.asarray(baseline[key], float)
            b = b[np.isfinite(b)]
            density_hist(ax, b, edges, histtype="step", lw=1.0, ls="--", color="0.3",
                         label=f"single Sérsic ({b.size})")  # fmt: skip
        c = stats.get(key, {})
        if c.get("w1") is not None:
            ci = c.get("mean_diff_ci")
            txt = f"W1={c['w1']:.3g}" + (
                f"\nΔmean {c['mean_diff']:+.3g}\n[{ci[0]:+.2g}, {ci[1]:+.2g}]" if ci else ""
            )
            ax.text(0.97, 0.97, txt, ha="right", va="top", fontsize=7, transform=ax.transAxes)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("statmorph morphology, real (val) against generated", fontsize=9)
    return fig


def plot_power_spectra(k: np.ndarray, power: Mapping[str, np.ndarray], pixel_scale: float) -> Figure:
    """Azimuthal power spectra (log-log) with the noise level, and residual / noise against k."""
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    styles = {"real": ("C0", "-"), "generated": ("C1", "-"), "reconstructed": ("C2", "--"),
              "residual": ("C3", ":"), "noise": ("k", "--"), "real_noise_free": ("C0", ":")}  # fmt: skip
    for name, p in power.items():
        color, ls = styles.get(name, ("C7", "-"))
        p = np.asarray(p, float)
        keep = p > 0
        ax.plot(k[keep], p[keep], color=color, ls=ls, label=name.replace("_", " "))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("spatial frequency k [cycles/pixel]")
    ax.set_ylabel("power [flux² per pixel]")
    sec = ax.secondary_xaxis("top", functions=(lambda x: x / pixel_scale, lambda x: x * pixel_scale))
    sec.set_xlabel("k [cycles/arcsec]")
    ax.legend(fontsize=7)
    if "noise" in power:
        ratio = np.asarray(power["residual"], float) / np.where(power["noise"] > 0, power["noise"], np.nan)
        axr.plot(k, ratio, color="C3", label="residual / noise")
        axr.axhline(1.0, color="k", lw=0.8)
        axr.axhspan(0.8, 1.2, color="0.85", label="±20%")
        axr.set_xscale("log")
        axr.set_xlabel("spatial frequency k [cycles/pixel]")
        axr.set_ylabel("power ratio")
        axr.legend(fontsize=7)
    else:
        axr.text(0.5, 0.5, "no noise spectrum\n(no clean corner patches)", ha="center", va="center",
                 transform=axr.transAxes)  # fmt: skip
    axr.set_title("reconstruction residuals against the noise (1 = noise only)", fontsize=9)
    return fig


def plot_response(conditions: Mapping[str, Any]) -> Figure:
    """Median HSM size and flux of fixed latents (and, with a conditional flow, fixed base noise through the
    prior) decoded across each condition, beside the real binned medians."""
    names = list(conditions)
    fig, axes = plt.subplots(
        len(names), 2, figsize=(10, 3.4 * len(names)), squeeze=False, constrained_layout=True
    )
    for row, name in zip(axes, names):
        c = conditions[name]
        x = np.asarray(c["grid"], float)
        for ax, key, label in ((row[0], "median_sigma_arcsec", "median HSM sigma [arcsec]"),
                               (row[1], "median_flux", "median pixel-sum flux [image units]")):  # fmt: skip
            gen = np.asarray(c["generated"][key], float)
            real = np.asarray([np.nan if v is None else v for v in c["real"][key]], float)
            ax.plot(x, gen, "o-", color="C1", label="generated, latents fixed")
            if "through_prior" in c:
                via = np.asarray(c["through_prior"]["generated"][key], float)
                ax.plot(x, via, "^-", color="C2", label="generated through the prior (base noise fixed)")
            ax.plot(x, real, "s--", color="C0", label="real, binned medians")
            ax.set_xlabel(f"{name} (10th to 90th training percentile)")
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        main = c.get("through_prior", c)
        row[0].set_title(f"{name}: size response {main['ratio_sigma'] if main['ratio_sigma'] is not None else float('nan'):.2f} "
                         f"of the data's ({'through the prior' if main is not c else 'latents fixed'})", fontsize=9)  # fmt: skip
    return fig
