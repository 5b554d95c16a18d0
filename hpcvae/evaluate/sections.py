"""The report's sections: each is one function of the measurements (:class:`hpcvae.evaluate.report.Run`).

A section returns its part of ``report.json`` and saves its figure through ``run.save``; its table
is rendered by :mod:`hpcvae.evaluate.markdown`, and its verdict line (if it judges) comes from
:mod:`hpcvae.evaluate.verdict`.  Adding a section is one function here and one line in
:data:`SECTIONS`.  The science sections (morphology, power spectra, conditional response,
artefacts) live in :mod:`hpcvae.evaluate.science`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from hpcvae.evaluate import plots
from hpcvae.evaluate.bootstrap import boot_real, compare, slope
from hpcvae.evaluate.moments import LANUSSE2021, STATS, orientation_agreement
from hpcvae.evaluate.moments import compare as hsm_compare

if TYPE_CHECKING:
    from hpcvae.evaluate.report import Run

SIZE_BINS = ((0.0, 0.15), (0.15, 0.25), (0.25, float("inf")))
"""HSM sigma bins [arcsec] the reconstruction sizes are judged in (small, medium, large galaxies)."""


def with_intervals(run: Run, real: np.ndarray, gen: np.ndarray) -> dict[str, Any]:
    """Means, W1 and the difference's s.e., plus 95% bootstrap intervals of every mean, difference and W1."""
    return {**hsm_compare(real, gen), **compare(real, gen, run.rs)}


def losses(run: Run) -> dict[str, Any]:
    """Loss curves from the run's metrics.jsonl."""
    out: dict[str, Any] = {"metrics_file": run.metrics}
    if run.metrics is not None and run.metrics.is_file():
        records = plots.read_metrics(run.metrics)
        series = plots.loss_series(records)
        out["records"] = len(records)
        out["final"] = {kind: {k: s[k][-1] for k in ("loss", "recon", "kl")} | {"step": s["x"][-1]}
                        for kind, s in series.items() if s["x"]}  # fmt: skip
        prior_file = run.metrics.parent / "prior" / "metrics.jsonl"
        prior = plots.read_metrics(prior_file) if prior_file.is_file() else []
        if prior:
            out["prior_records"] = len(prior)
        run.save(plots.plot_losses(records, prior), "losses.png")
    else:
        why = "no metrics.jsonl next to the model (a bare model file or a model object)"
        out["skipped"] = why
        run.notes.append(f"loss curves skipped: {why}")
    return out


def _size_bins(run: Run, other: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Relative size and |g| differences of ``other`` against the real galaxies, per real-size bin."""
    sig = run.real_stats["sigma_arcsec"]
    out = []
    for lo, hi in SIZE_BINS:
        sel = np.flatnonzero((sig >= lo) & (sig < hi))
        row: dict[str, Any] = {
            "sigma_range_arcsec": [lo, None if hi == float("inf") else hi],
            "n": int(sel.size),
        }
        if sel.size >= 5:
            r, o = sig[sel], other["sigma_arcsec"][sel]
            keep = np.isfinite(r) & np.isfinite(o)

            def rel(idx: np.ndarray, r=r, o=o, keep=keep) -> float | None:
                k = keep[idx]
                return float(o[idx][k].mean() / r[idx][k].mean() - 1) if k.any() else None

            row["sigma_rel_diff"] = rel(np.arange(sel.size))
            row["sigma_rel_diff_ci"] = boot_real(rel, _sub(run, sel), sel.size)
            gr, go = run.real_stats["g"][sel], other["g"][sel]
            ok = np.isfinite(gr) & np.isfinite(go)
            row["g_diff"] = float(go[ok].mean() - gr[ok].mean()) if ok.any() else None
        out.append(row)
    return out


def _sub(run: Run, sel: np.ndarray) -> Any:
    """A resampler over the galaxies ``sel`` only (same seed), for per-bin intervals."""
    from hpcvae.evaluate.bootstrap import Resampler

    if run.rs is None:
        return None
    return Resampler([run.groups[i] for i in sel], len(sel), n_boot=run.cfg.n_boot, seed=run.cfg.seed + 7)


def reconstruction(run: Run) -> dict[str, Any]:
    """Reconstructions: errors, reduced chi^2, HSM of real against reconstructed (per size bin), orientation."""
    mse, kl = np.concatenate(run.mse_parts), np.concatenate(run.kl_parts)
    chi2 = np.concatenate(run.chi2_parts)
    orient = orientation_agreement(run.real_stats, run.recon_stats)
    out: dict[str, Any] = {
        "n": run.n_real,
        "mse_per_pixel_mean": float(mse.mean()),
        "mse_per_pixel_median": float(np.median(mse)),
        "kl_per_galaxy_mean": float(kl.mean()),
        "space": "normalised [0, 1]",
        "reduced_chi2": {"mean": float(np.nanmean(chi2)), "median": float(np.nanmedian(chi2)),
                         "of": "mean over pixels of (real - reconstruction)^2 / NOISE_VARIANCE; 1 = noise only"},
        "hsm": {k: with_intervals(run, run.real_stats[k], run.recon_stats[k]) for k in ("sigma_arcsec", "g")},
        "size_bins": _size_bins(run, run.recon_stats),
        "hsm_failures": int((~run.recon_stats["ok"]).sum()),
        "orientation_cos2dphi": orient["mean"],
        "orientation": {**orient, "of": "mean cos 2(phi_real - phi_reconstructed); 1 = kept, 0 = lost"},
    }  # fmt: skip
    z_pred = np.concatenate(run.z_pred_parts) if run.z_pred_parts else None
    if z_pred is not None:
        d = z_pred - run.z_real
        out["redshift_prediction"] = {"rmse": float(np.sqrt(np.mean(d**2))), "bias": float(d.mean()),
                                      "nmad": float(1.4826 * np.median(np.abs(d - np.median(d)) / (1 + run.z_real)))}  # fmt: skip
    n_show = sum(len(a) for a in run.show_real)
    run.save(plots.plot_reconstructions(np.concatenate(run.show_real), np.concatenate(run.show_recon),
                                        redshift=run.z_real[:n_show] if run.manifest.has_redshift else None,
                                        z_pred=z_pred[:n_show] if z_pred is not None else None,
                                        keys=run.keys[:n_show], pixel_scale=run.pixel_scale,
                                        noise_sigma=float(np.nanmedian(run.R["sigma"]))), "reconstructions.png")  # fmt: skip
    return out


def generation(run: Run) -> dict[str, Any]:
    """Generation grids, the same base noise in each, with their prior, seed and stretch stated."""
    import torch

    cfg, m = run.cfg, run.m
    n_grid = cfg.grid_size * cfg.grid_size

    def grid(redshift: float | None) -> Any:
        g = torch.Generator().manual_seed(cfg.seed + 1)  # the same base noise in every grid
        return (
            m.sample(n_grid, redshift=redshift, generator=g, prior=run.prior, extrapolate=True).float().cpu()
        )

    note = f"prior {run.prior}, seed {cfg.seed + 1}"
    out: dict[str, Any] = {"n_per_grid": n_grid, "prior": run.prior, "seed": cfg.seed + 1,
                           "latents": "N(0, I), the same latents in every grid" if run.prior == "normal"
                           else "flow prior: the same base noise in every grid, mapped through the flow",
                           "grids": {}}  # fmt: skip
    with torch.no_grad():
        for zval in run.redshifts(cfg.grid_redshifts, (10, 50, 90)) if run.conditional else (None,):
            title = f"generated at z = {zval:g}" if zval is not None else "generated"
            name = f"generations_z{zval:g}.png" if zval is not None else "generations.png"
            fig = plots.plot_generation_grid(grid(zval), title=f"{title} ({note})", nrow=cfg.grid_size,
                                             noise_sigma=float(np.nanmedian(run.R["sigma"])))  # fmt: skip
            out["grids"][f"{zval:g}" if zval is not None else "unconditional"] = run.save(fig, name)
    return out


def redshift_sweep(run: Run) -> dict[str, Any]:
    """One galaxy per row across redshifts, as ``interpolate()`` draws it: with a conditional flow prior the
    row holds the flow's base noise (its latent follows the redshift), else its latent."""
    import torch

    cfg, m = run.cfg, run.m
    if not run.conditional:
        run.notes.append("redshift sweep skipped: the model does not take a redshift")
        return {"skipped": f"{m.config.get('arch')} is unconditional: no redshift to sweep"}
    zlist = run.redshifts(cfg.sweep_redshifts, (5, 95))
    zs = torch.as_tensor(zlist, dtype=torch.float32)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    ncol, dtype = len(zs), next(m.parameters()).dtype
    n = cfg.sweep_rows * ncol
    cond = m._redshift(zs.repeat(cfg.sweep_rows).numpy(), n, run.dev, "sweep", extrapolate=True)
    through = run.prior == "flow" and m.conditional_flow
    with torch.no_grad():
        if through:
            eps = torch.randn(cfg.sweep_rows, m.z_dim, generator=g).repeat_interleave(ncol, 0)
            zz = m._prior_sample(n, cond, None, "flow", eps=eps.to(run.dev)).to(dtype)
        else:
            lat = m.sample_latent(cfg.sweep_rows, generator=g, prior=run.prior).float().cpu()
            zz = lat.repeat_interleave(ncol, 0).to(run.dev, dtype)
        imgs = m.decode(zz, cond)
    imgs = imgs.float().cpu().reshape(cfg.sweep_rows, ncol, m.image_size, m.image_size)
    flux = run.physical(imgs).numpy().reshape(cfg.sweep_rows, ncol, -1).sum(-1)
    held = "the flow prior's base noise" if through else "the latent"
    return {"redshifts": zlist, "rows": cfg.sweep_rows, "prior": run.prior, "held": held,
            "other_conditions": "their training medians" if m.multi_condition else None,
            "mean_pixel_sum_flux_per_column": flux.mean(0),
            "figure": run.save(plots.plot_redshift_sweep(imgs, zlist, held), "redshift_sweep.png")}  # fmt: skip


def latent(run: Run) -> dict[str, Any]:
    """The latent means: spread per dimension and a corner plot (beside draws of the prior samples come from)."""
    m, mu = run.m, run.mu
    prior_draws = None
    if run.prior == "flow":
        import torch

        g = torch.Generator().manual_seed(run.cfg.seed + 3)
        n = min(run.n_real, 2000)
        r = None
        if run.conditional:  # all the model's conditions (not only the redshift), checked as sample() does
            c = torch.as_tensor(run.cond_real[:n], dtype=torch.float32)
            r = m._redshift(None, n, run.dev, "sample", conditions=c, extrapolate=True)
        prior_draws = m._prior_sample(n, r, g, "flow").float().cpu().numpy()
    run.save(
        plots.plot_latent_corner(mu, dims=run.cfg.latent_dims, prior_draws=prior_draws), "latent_corner.png"
    )
    return {"z_dim": int(m.z_dim), "dims_shown": int(min(run.cfg.latent_dims, m.z_dim)), "mu_mean": mu.mean(0),
            "mu_std": mu.std(0), "active_dims": int((mu.std(0) > 0.1).sum()), "prior_drawn": run.prior,
            "active_threshold": "std of mu over galaxies > 0.1"}  # fmt: skip


def population(run: Run) -> dict[str, Any]:
    """HSM statistics of real against generated galaxies, each with 95% bootstrap intervals."""
    real, gen = run.real_stats, run.gen_stats
    comparison = {k: with_intervals(run, real[k], gen[k]) for k in STATS}
    run.save(plots.plot_population(real, gen, comparison), "population.png")
    return {
        "n_real": run.n_real, "n_generated": run.n_real, "n_real_galaxies": len(set(run.groups)),
        "generated_redshifts": "the real galaxies' zphot, one each" if run.conditional else None,
        "latent_seed": run.cfg.seed, "prior": run.prior,
        "intervals": f"95% bootstrap, {run.cfg.n_boot} replicates resampling real galaxies (by galaxy) and "
                     "generated stamps",
        "hsm_failures": {
            "real": int((~real["ok"]).sum()), "generated": int((~gen["ok"]).sum()),
            "real_examples": [f"{run.keys[int(e.split(':')[0])]}:{e.split(':', 1)[1]}" for e in real["errors"][:5]],
            "generated_examples": list(gen["errors"][:5]),
        },
        "measured_in": "flux units (model normalisation inverted); sizes in arcsec",
        "stats": comparison, "reference_lanusse2021": LANUSSE2021,
        "size_bins": _size_bins_population(run),
    }  # fmt: skip


def _size_bins_population(run: Run) -> list[dict[str, Any]]:
    """The fraction of real and generated galaxies in each size bin (does the model reach every size?)."""
    out = []
    for lo, hi in SIZE_BINS:
        r, g = run.real_stats["sigma_arcsec"], run.gen_stats["sigma_arcsec"]
        fr = float(np.mean((r >= lo) & (r < hi))) if r.size else None
        fg = float(np.mean((g >= lo) & (g < hi))) if g.size else None
        out.append({"sigma_range_arcsec": [lo, None if hi == float("inf") else hi], "real_fraction": fr,
                    "generated_fraction": fg})  # fmt: skip
    return out


def flux(run: Run) -> dict[str, Any]:
    """Pixel-sum flux and magnitude of generated against real galaxies (zeropoint from the data)."""
    zp, zp_source = _zeropoint(run)
    fr, fg = run.R["flux"], run.G["flux"]
    out: dict[str, Any] = {"unit": (run.manifest.physics().get("bunit") or "image units"),
                           "flux": with_intervals(run, fr, fg), "zeropoint": zp, "zeropoint_source": zp_source,
                           "of": "sum of each stamp's pixels in physical units"}  # fmt: skip
    if zp is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            mr = np.where(fr > 0, zp - 2.5 * np.log10(np.where(fr > 0, fr, 1.0)), np.nan)
            mg = np.where(fg > 0, zp - 2.5 * np.log10(np.where(fg > 0, fg, 1.0)), np.nan)
        out["magnitude"] = with_intervals(run, mr, mg)
        out["magnitude_failures"] = {"real": int((fr <= 0).sum()), "generated": int((fg <= 0).sum()),
                                     "why": "non-positive pixel sum"}  # fmt: skip
    top = _bright_tail(run)
    if top:
        out["bright_tail"] = top
    return out


def _zeropoint(run: Run) -> tuple[float | None, str]:
    phys = run.manifest.physics()
    if phys.get("zeropoint") is not None:
        return float(phys["zeropoint"]), "manifest physics"
    if run.manifest.synthetic:
        from hpcvae import cosmology

        return float(cosmology.ZEROPOINT), "hpcvae.synth's ZEROPT"
    return None, "none recorded (hpcvae.shard --zeropoint)"


def _bright_tail(run: Run) -> dict[str, Any] | None:
    """The brightest 5% of each side: sizes and |g| (do the bright ones look like the real bright ones?)."""
    fr, fg = run.R["flux"], run.G["flux"]
    if fr.size < 40:
        return None
    r_sel = fr >= np.quantile(fr, 0.95)
    g_sel = fg >= np.quantile(fg, 0.95)
    out: dict[str, Any] = {"quantile": 0.95, "n_real": int(r_sel.sum()), "n_generated": int(g_sel.sum())}
    for k in ("sigma_arcsec", "g"):
        r, g = run.real_stats[k][r_sel], run.gen_stats[k][g_sel]
        out[k] = hsm_compare(r, g)
    return out


def trends(run: Run) -> dict[str, Any]:
    """Size and flux against redshift on any data with redshifts: real against generated, with errors."""
    if not run.conditional:
        run.notes.append("redshift trends skipped: model does not take a redshift")
        return {"skipped": "model does not take a redshift"}
    z = run.z_real
    series = {"sigma_arcsec": (run.real_stats["sigma_arcsec"], run.gen_stats["sigma_arcsec"]),
              "flux": (run.R["flux"], run.G["flux"])}  # fmt: skip
    out: dict[str, Any] = {"quantities": {"sigma_arcsec": "HSM sigma [arcsec]", "flux": "pixel-sum flux"},
                           "slopes_vs_z": {}, "fit": "least squares of log10(quantity) on zphot"}  # fmt: skip
    truth: dict[str, Any] | None = None
    if run.manifest.synthetic:
        from hpcvae import cosmology

        zt = np.sort(z)
        truth = {
            "z": zt,
            "sigma_arcsec": cosmology.expected_hlr_arcsec(zt),
            "flux": cosmology.expected_flux(zt),
        }
    for key, (r, g) in series.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            lr, lg = np.log10(r), np.log10(g)
        row: dict[str, Any] = {}
        for label, y in (("real", lr), ("generated", lg)):
            b, se = slope(z, y)
            ci = boot_real(lambda i, y=y: slope(z[i], y[i])[0], run.rs, len(z))
            intercept = (
                float(np.nanmean(y[np.isfinite(y)]) - b * np.mean(z[np.isfinite(y)]))
                if b is not None
                else None
            )
            row[label] = {"slope": b, "slope_se": se, "slope_ci": ci, "intercept": intercept,
                          "n": int(np.isfinite(y).sum())}  # fmt: skip
        if truth is not None:
            b, se = slope(truth["z"], np.log10(truth[key]))
            row["truth"] = {
                "slope": b,
                "slope_se": se,
                "of": "the generating relation (intrinsic, before the PSF)",
            }
        out["slopes_vs_z"][key] = row
    run.save(plots.plot_redshift_trends(z, {"sigma_arcsec": series["sigma_arcsec"][0], "flux": series["flux"][0]},
                                        z, {"sigma_arcsec": series["sigma_arcsec"][1], "flux": series["flux"][1]},
                                        truth, out["slopes_vs_z"]), "redshift_trends.png")  # fmt: skip
    return out


def background(run: Run) -> dict[str, Any]:
    """Border medians (the sky level a stamp sits on) of generated against real stamps."""
    real, gen = run.R["border"], run.G["border"]
    noise = run.manifest.stats("train").get("noise_std")
    diff = float(np.median(gen) - np.median(real))
    return {"of": "median of each stamp's outer 2-pixel frame, flux units", "real_median": float(np.median(real)),
            "generated_median": float(np.median(gen)), "difference": diff, "noise_std": noise,
            "difference_in_noise_sigma": diff / noise if noise else None}  # fmt: skip


def _sections() -> dict[str, Callable[[Run], dict[str, Any]]]:
    from hpcvae.evaluate import science

    return {
        "losses": losses, "reconstruction": reconstruction, "generation": generation,
        "redshift_sweep": redshift_sweep, "latent": latent, "population": population, "flux": flux,
        "background": background, "redshift_trends": trends, "morphology": science.morphology,
        "power_spectra": science.power_spectra, "artefacts": science.artefacts,
        "conditional_response": science.conditional_response,
    }  # fmt: skip


SECTIONS = _sections()
"""report.json key -> section, in report order."""
