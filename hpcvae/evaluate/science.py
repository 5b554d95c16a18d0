"""The report's science sections: morphology, power spectra, artefacts and the conditional response.

These are the measures the field compares generators by (Lanusse et al. 2021; Holzschuh et al.
2022: Gini, M20, asymmetry, the image power spectrum), beside the HSM moments of ``sections``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hpcvae.evaluate import morphology as morph
from hpcvae.evaluate import plots_science as plots
from hpcvae.evaluate import response, spectra

if TYPE_CHECKING:
    from hpcvae.evaluate.report import Run


def morphology(run: Run) -> dict[str, Any]:
    """statmorph's Gini, M20, C, A, S of real and generated stamps (a subset of ``morph_n`` each).

    Generated stamps (and the single-Sérsic baseline's, where the set has the fits) are noise-free;
    they get a draw of the real stamps' sky noise at their matched real galaxy's level first, since
    noise moves asymmetry, M20 and the segmentation (:mod:`hpcvae.evaluate.noise`).
    """
    import time

    from hpcvae.evaluate.bootstrap import Resampler
    from hpcvae.evaluate.sections import with_intervals

    n = min(run.cfg.morph_n, len(run.R["kept"]), len(run.G["kept"]))
    if n < 4:
        return {"skipped": f"morph_n = {run.cfg.morph_n}: fewer than 4 stamps to measure"}
    t0 = time.perf_counter()
    sig = run.R["sigma"][:n]
    rng = np.random.default_rng(run.cfg.seed + 13)
    size = run.R["kept"].shape[-1]

    def noisy(stamps: np.ndarray) -> np.ndarray:
        return stamps[:n] + run.noise.draw(n, size, sig, rng).astype(np.float32)

    real = morph.measure(run.R["kept"][:n], sig, workers=run.workers)
    gen = morph.measure(noisy(run.G["kept"]), sig, workers=run.workers)
    base = None
    if run.B is not None and len(run.B) >= n:
        base = morph.measure(noisy(run.B), sig, workers=run.workers)
    seconds = time.perf_counter() - t0
    sub = (
        Resampler(run.groups[:n], n, n_boot=run.cfg.n_boot, seed=run.cfg.seed + 11)
        if run.cfg.n_boot
        else None
    )
    saved, run.rs = run.rs, sub
    try:
        stats = {k: with_intervals(run, real[k], gen[k]) for k in morph.MORPH_STATS}
        bstats = {k: with_intervals(run, real[k], base[k]) for k in morph.MORPH_STATS} if base else None
    finally:
        run.rs = saved
    run.save(plots.plot_morphology(real, gen, stats, baseline=base), "morphology.png")

    def rates(m: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"failed": int((~m["ok"]).sum()), "failure_rate": float((~m["ok"]).mean()),
                "suspect_flag1": int((m["flag"] == 1).sum()), "examples": list(m["errors"][:3])}  # fmt: skip

    out = {"n_real": n, "n_generated": n, "stats": stats,
           "failures": {"real": rates(real), "generated": rates(gen)} | ({"baseline": rates(base)} if base else {}),
           "noise_model": run.noise.describe(),
           "seconds": round(seconds, 2), "seconds_per_stamp_per_worker": round(seconds * run.workers / ((2 + bool(base)) * n), 3),
           "workers": run.workers, "method": "statmorph on each stamp as is (sky-subtracted), segmentation: "
           "1.5 sigma above the noise after a 1-pixel Gaussian smoothing, the segment under the centre, other "
           "segments masked; weight map: each galaxy's sky-noise sigma (a generated galaxy: its matched real "
           "galaxy's); generated and baseline stamps get a draw of the real stamps' sky noise (measured "
           "correlation, matched level) first; statmorph flag >= 2 counts as a failure, flag 1 as suspect"}  # fmt: skip
    if bstats is not None:
        out["baseline"] = {
            "what": "each real galaxy's best-fit single Sérsic profile (its catalog fit), PSF-convolved as observed, "
                    "with the same noise: the bar a generative model must clear",
            "stats": bstats,
            "generated_beats_baseline": {k: stats[k]["w1"] < bstats[k]["w1"] for k in morph.MORPH_STATS
                                         if stats[k].get("w1") is not None and bstats[k].get("w1") is not None},
            "w1_difference": {k: baseline_difference(real[k], gen[k], base[k], sub) for k in morph.MORPH_STATS},
        }  # fmt: skip
    return out


def baseline_difference(real: np.ndarray, gen: np.ndarray, base: np.ndarray, rs: Any) -> dict[str, Any]:
    """W1(real, generated) - W1(real, baseline), with a paired 95% interval and what it says.

    Each real galaxy carries its baseline stamp (its own Sérsic fit), so a replicate resamples the two
    together and the generated stamps apart: the real set's scatter, common to both distances, cancels.
    """
    from hpcvae.evaluate.bootstrap import _w1, interval

    real, gen, base = (np.asarray(a, dtype=np.float64) for a in (real, gen, base))

    def diff(i: np.ndarray, j: np.ndarray) -> float | None:
        a, b = _w1(real[i], gen[j]), _w1(real[i], base[i])
        return None if a is None or b is None else a - b

    everyone = np.arange(len(real))
    d = diff(everyone, np.arange(len(gen)))
    ci = interval([diff(i, j) for i, j in zip(rs.real, rs.gen)]) if rs is not None else None
    says = ("closer than the baseline" if ci[1] < 0 else "farther than the baseline" if ci[0] > 0
            else "within noise of the baseline") if ci else None  # fmt: skip
    return {"value": d, "value_ci": ci, "says": says}


def power_spectra(run: Run) -> dict[str, Any]:
    """Azimuthal power spectra of real, generated and reconstructed stamps, and residuals against the noise."""
    k = run.R["ps"]["k"]
    p = {"real": run.R["ps"]["p"], "generated": run.G["ps"]["p"], "reconstructed": run.RC["ps"]["p"],
         "residual": run.RS["ps"]["p"]}  # fmt: skip
    noise = spectra.noise_spectrum(run.noise, run.R["sigma"], run.manifest.image_size)
    if run.T is not None:
        p["real_noise_free"] = run.T["ps"]["p"]
    out: dict[str, Any] = {"k_cycles_per_pixel": k, "k_per_arcsec": k / run.pixel_scale, "power": p,
                           "bands_cycles_per_pixel": spectra.BANDS, "unit": "flux^2 per pixel (|FFT|^2 / Npix)",
                           "ratios": {"generated_over_real": spectra.band_ratios(k, p["generated"], p["real"]),
                                      "reconstructed_over_real": spectra.band_ratios(k, p["reconstructed"], p["real"])}}  # fmt: skip
    if noise is not None:
        out["power"]["noise"] = noise["p"]
        out["noise"] = {"from": noise["from"], "n": noise["n"],
                        "how": "the Fourier transform of the measured noise autocorrelation at the stamps' mean noise variance"}  # fmt: skip
        out["ratios"]["residual_over_noise"] = spectra.band_ratios(k, p["residual"], noise["p"])
        r = p["residual"] / np.where(noise["p"] > 0, noise["p"], np.nan)
        out["residual_over_noise_max_deviation"] = float(np.nanmax(np.abs(r - 1)))
    else:
        run.notes.append(
            "noise power spectrum: no blank corner patch and no noise-free truth; residuals not judged"
        )
    if run.T is not None:
        out["ratios"]["generated_over_real_noise_free"] = spectra.band_ratios(
            k, p["generated"], p["real_noise_free"]
        )
    run.save(plots.plot_power_spectra(k, p, run.pixel_scale), "power_spectra.png")
    return out


def artefacts(run: Run) -> dict[str, Any]:
    """Row/column structure of generated stamps against real ones (noise-free where the truth is known)."""
    ref, ref_name = (run.T, "real galaxies without noise (synthetic truth)") if run.T is not None else (
        run.R, "real stamps (noise included: no noise-free truth for this set)")  # fmt: skip

    def measure(s: dict[str, Any]) -> dict[str, Any]:
        return {"streak_rows_median": float(np.nanmedian(s["streak_rows"])),
                "streak_cols_median": float(np.nanmedian(s["streak_cols"])),
                "axis_power_ratio": spectra.axis_power_ratio(s["ps"]["p2d"])}  # fmt: skip

    gen, refm = measure(run.G), measure(ref)
    worst = max(gen["streak_rows_median"], gen["streak_cols_median"])
    base = max(refm["streak_rows_median"], refm["streak_cols_median"], 1e-6)
    return {"generated": gen, "reference": refm, "reference_is": ref_name, "real_with_noise": measure(run.R),
            "streak_ratio": worst / base, "band_width_px": spectra.band_width(run.manifest.image_size),
            "of": "streak: RMS of second differences of the row (column) means in the outer band, in noise sigma; "
                  "axis power ratio: 2-D power on the kx = 0 / ky = 0 axes over the diagonals at the same |k|",
            "asymmetry_noise_free": lopsidedness(run)}  # fmt: skip


def lopsidedness(run: Run) -> dict[str, Any] | None:
    """Noise-free asymmetry of generated and reconstructed galaxies against the synthetic truth.

    The generated-minus-real interval resamples the two sets apart; the reconstructed one is paired (each
    reconstruction with its own real galaxy), so it isolates what the decoder adds.  None without truth.
    """
    from hpcvae.evaluate.bootstrap import interval

    if run.T is None:
        return None
    n = min(run.cfg.morph_n, len(run.T["kept"]), len(run.G["kept"]), len(run.RC["kept"]))
    if n < 4:
        return None
    real, gen, rec = (morph.noise_free_asymmetry(s["kept"][:n]) for s in (run.T, run.G, run.RC))
    rng = np.random.default_rng(run.cfg.seed + 17)
    draws = [(rng.integers(0, n, n), rng.integers(0, n, n)) for _ in range(run.cfg.n_boot)]
    ci_gen = interval([float(np.nanmean(gen[j]) - np.nanmean(real[i])) for i, j in draws]) if draws else None
    ci_rec = interval([float(np.nanmean(rec[i] - real[i])) for i, _ in draws]) if draws else None
    return {"n": n, "real_mean": float(np.nanmean(real)), "generated_mean": float(np.nanmean(gen)),
            "reconstructed_mean": float(np.nanmean(rec)),
            "generated_minus_real": float(np.nanmean(gen) - np.nanmean(real)), "generated_minus_real_ci": ci_gen,
            "reconstructed_minus_real": float(np.nanmean(rec - real)), "reconstructed_minus_real_ci": ci_rec,
            "of": "CAS asymmetry of the noise-free stamps (generated and reconstructed: the decoder's mean; real: "
                  "the synthetic truth) inside twice the half-light radius, minimised over the centre"}  # fmt: skip


def conditional_response(run: Run) -> dict[str, Any]:
    """Fixed latents decoded across each condition's 10th-90th percentile, against the real binned medians.

    With several conditions the others follow the real galaxies (their medians in each bin), so the sweep
    walks through the population whose binned medians it is compared with.
    """
    import torch

    if not run.conditional:
        return {"skipped": "model does not take a condition"}
    m, n = run.m, run.cfg.response_latents
    names = run.condition_names
    real = run.cond_real.reshape(len(run.cond_real), -1)
    conds = {name: real[:, j] for j, name in enumerate(names)}
    ranges = _training_ranges(run, conds)
    medians = {name: float(np.percentile(ranges[name]["values"], 50)) for name in conds}
    g = torch.Generator().manual_seed(run.cfg.seed + 5)
    z_name = m.conditioning.redshift_name
    lat = m.sample_latent(n, redshift=medians.get(z_name), generator=g, prior=run.prior).float()
    dtype = next(m.parameters()).dtype
    flow = run.prior == "flow" and m.conditional_flow

    def decode(z: np.ndarray, c: dict[str, np.ndarray], through_prior: bool = False) -> np.ndarray:
        with torch.no_grad():
            zz = torch.as_tensor(z, device=run.dev, dtype=dtype)
            cond = np.stack([c[name] for name in names], axis=1) if m.multi_condition else c[names[0]]
            cc = torch.as_tensor(cond, device=run.dev)
            # Through the prior, z is the flow's base noise: the latent follows the conditions, as in generation.
            if through_prior:
                zz = m._prior_sample(len(zz), cc, None, "flow", eps=zz)
            img = m.decode(zz, cc)
            return run.observed(run.physical(img.float().cpu())).numpy()[:, 0]

    base = torch.randn(n, m.spec.z_dim, generator=g).numpy() if flow else None
    out: dict[str, Any] = {"latents": n, "prior": run.prior, "seed": run.cfg.seed + 5, "conditions": {}}
    for name, values in conds.items():
        grid = np.asarray(ranges[name]["grid"], dtype=np.float64)
        others = response.along_population(conds, name, grid) if len(conds) > 1 else medians
        gen = response.sweep(decode, lat.numpy(), name, grid, others, run.pixel_scale)
        real = response.real_change(values, run.real_stats["sigma_arcsec"], run.R["flux"], grid)
        out["conditions"][name] = {
            "grid_percentiles": list(response.GRID), "grid": grid, "range_from": ranges[name]["from"],
            "generated": gen, "real": real,
            "other_conditions": "the real galaxies' medians in each bin" if len(conds) > 1 else None,
            "ratio_sigma": response.ratio(gen["dlog10_sigma"], real["dlog10_sigma"]),
            "ratio_flux": response.ratio(gen["dlog10_flux"], real["dlog10_flux"]),
        }  # fmt: skip
        if base is not None:
            via = response.sweep(lambda e, c: decode(e, c, True), base, name, grid, others, run.pixel_scale)
            out["conditions"][name]["through_prior"] = {
                "what": "the flow prior's base noise held fixed, each latent drawn from the prior at the sweep's "
                        "conditions (as hpcvae.generate draws a catalog row)",
                "generated": via,
                "ratio_sigma": response.ratio(via["dlog10_sigma"], real["dlog10_sigma"]),
                "ratio_flux": response.ratio(via["dlog10_flux"], real["dlog10_flux"]),
            }  # fmt: skip
    run.save(plots.plot_response(out["conditions"]), "conditional_response.png")
    return out


def _training_ranges(run: Run, conds: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Each condition's grid: the model's recorded training percentiles, else the evaluated galaxies'."""
    info = getattr(run.m, "model_info", None) or {}
    recorded = (info.get("conditions") or {}) if isinstance(info, dict) else {}
    out = {}
    for name, values in conds.items():
        rec = recorded.get(name) if isinstance(recorded, dict) else None
        pct = (rec or {}).get("percentiles") if isinstance(rec, dict) else None
        if isinstance(pct, dict) and all(str(q) in pct for q in response.GRID):
            grid, src = [float(pct[str(q)]) for q in response.GRID], "model.json (training set)"
        else:
            grid, src = [float(x) for x in np.percentile(values, response.GRID)], "the evaluated galaxies"
        out[name] = {"grid": grid, "values": values, "from": src}
    return out
