"""The report's verdict: one line per quantity, judged on 95% intervals, with the cause of a miss.

A quantity's difference (generated - real) is judged on its bootstrap interval, not its point value:

* **ok**: the interval lies within the ``ok`` tolerance, or it holds 0 (the populations agree as far
  as the data can tell) while lying within the ``close`` tolerance;
* **off**: the interval lies wholly outside the ``close`` tolerance;
* **close**: anything between.

Without an interval (``n_boot = 0``) the point value is judged alone.  Tolerances: ``ok`` is what
galaxy2galaxy reaches on COSMOS (Lanusse et al. 2021), ``close`` a few times that.

A size or shape miss names its cause: the **decoder** when the reconstructions are already off in a
size bin, the **conditioning** when the generated response to redshift is far below the data's,
else the **prior**; the advice never repeats what was already done (a fitted flow prior).
"""

from __future__ import annotations

from typing import Any

from hpcvae.evaluate.moments import LANUSSE2021

TOLERANCE = {
    "g": (0.02, 0.05),
    "sigma_rel": (0.05, 0.15),
    "flux_rel": (0.05, 0.15),
    "orientation": (0.95, 0.9),
    "background_sigma": (0.5, 1.0),
    "slope_rel": (0.2, 0.5),
    "residual_power": (0.2, 0.5),
    "streak_ratio": (2.0, 4.0),
    "response_ratio": (0.5, 0.25),
    "recon_sigma_rel": (0.05, 0.15),
}
"""(ok, close) per quantity; ``orientation`` and ``response_ratio`` are better when higher."""


def _response(report: dict[str, Any], facts: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None, str]:
    """(condition, the sweep to judge, how it was made) for the redshift, else the first condition.

    With a conditional flow prior the judged sweep holds the flow's base noise fixed, as generation does; a
    fixed latent decoded at other conditions (the other sweep) need not follow them, since the latent
    carries what the encoder learnt from the condition.
    """
    conds = (report.get("conditional_response") or {}).get("conditions", {})
    name = (
        facts.get("redshift_condition")
        if facts.get("redshift_condition") in conds
        else next(iter(conds), None)
    )
    c = conds.get(name) if name else None
    if c and c.get("through_prior"):
        return name, c["through_prior"], "generated through the flow prior, its base noise fixed"
    return name, c, "with latents fixed"


def judge(value: float | None, ci: list[float] | None, key: str) -> str:
    """ok / close / off for a difference whose ideal is 0 (see the module doc)."""
    if value is None:
        return "n/a"
    ok, close = TOLERANCE[key]
    lo, hi = ci if ci else (value, value)
    if (-ok <= lo and hi <= ok) or (lo <= 0 <= hi and -close <= lo and hi <= close):
        return "ok"
    if hi < -close or lo > close:
        return "off"
    return "close"


def _higher(value: float | None, key: str) -> str:
    if value is None:
        return "n/a"
    ok, close = TOLERANCE[key]
    return "ok" if value >= ok else "close" if value >= close else "off"


def _lower(value: float | None, key: str) -> str:
    if value is None:
        return "n/a"
    ok, close = TOLERANCE[key]
    return "ok" if value <= ok else "close" if value <= close else "off"


def _ci(c: dict[str, Any], key: str) -> str:
    ci = c.get(f"{key}_ci")
    return f" [{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else ""


def _rel(c: dict[str, Any]) -> tuple[float | None, list[float] | None]:
    return c.get("mean_rel_diff"), c.get("mean_rel_diff_ci")


def cause(report: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """Why generated sizes or shapes miss: decoder (per size bin), conditioning, or prior."""
    bins = report.get("reconstruction", {}).get("size_bins") or []
    off_bins = [b for b in bins if b.get("sigma_rel_diff") is not None
                and judge(b["sigma_rel_diff"], b.get("sigma_rel_diff_ci"), "recon_sigma_rel") != "ok"]  # fmt: skip
    if off_bins:
        where = ", ".join(f"{b['sigma_range_arcsec'][0]}-{b['sigma_range_arcsec'][1] or 'inf'}\": "
                          f"{b['sigma_rel_diff']:+.1%}" for b in off_bins)  # fmt: skip
        fix = {"mse": "a calibrated likelihood (model.likelihood = 'calibrated_noise', or 'calibrated' on shards "
                       "without noise variances) or a smaller beta.value",
               "calibrated": "model.likelihood = 'calibrated_noise' (bright cores weighed by their noise)",
               }.get(facts.get("likelihood"), "more epochs or a wider decoder")  # fmt: skip
        return {"cause": "decoder", "bins": off_bins,
                "hint": f"the reconstructions are already off in size ({where}), so the decoder sets the miss: try {fix}"}  # fmt: skip
    _, resp, how = _response(report, facts)
    ratio = resp.get("ratio_sigma") if resp else None
    if ratio is not None and ratio < TOLERANCE["response_ratio"][0]:
        return {"cause": "conditioning", "response_ratio": ratio,
                "hint": f"{how}, sizes change {ratio:.0%} as much as the real galaxies' across redshift: "
                        "the model ignores its condition (FiLM-conditioned decoders with a conditional flow prior do not)"}  # fmt: skip
    if not facts.get("has_flow"):
        hint = "the reconstructions match, so the samples miss: fit the flow prior (hpcvae.train_prior)"
    elif facts.get("prior") != "flow":
        hint = "the reconstructions match: sample from the fitted flow prior (prior='flow'), not N(0, I)"
    elif facts.get("flow_latents") != "posterior":
        hint = ("the reconstructions match and the flow prior is fitted to the encoder means: refit it to the "
                "aggregate posterior (hpcvae.train_prior --latents posterior) or give it more epochs")  # fmt: skip
    else:
        hint = ("the reconstructions match and the flow prior is fitted to the aggregate posterior: give it more "
                "epochs or capacity (--kind nsf), or the VAE more epochs")  # fmt: skip
    return {"cause": "prior", "hint": hint}


def verdict(report: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """One line per quantity: ours against the real galaxies (95% intervals), beside Lanusse et al. 2021's."""
    ref = LANUSSE2021
    stats = report["population"]["stats"]
    lines: dict[str, Any] = {}
    g = stats["g"]
    if g.get("mean_diff") is not None:
        d = g["mean_diff"]
        ref_d = ref["generated"]["mean_g"] - ref["real"]["mean_g"]
        lines["shape"] = {"verdict": judge(d, g.get("mean_diff_ci"), "g"), "delta": d, "ci": g.get("mean_diff_ci"),
                          "line": f"mean |g| generated {g['mean_generated']:.3f} vs real {g['mean_real']:.3f} (delta "
                                  f"{d:+.3f}{_ci(g, 'mean_diff')}); galaxy2galaxy {ref['generated']['mean_g']:.3f} "
                                  f"vs {ref['real']['mean_g']:.3f} (delta {ref_d:+.3f})"}  # fmt: skip
    sg = stats["sigma_arcsec"]
    rel, rel_ci = _rel(sg)
    if rel is not None:
        ref_rel = ref["generated"]["mean_sigma_arcsec"] / ref["real"]["mean_sigma_arcsec"] - 1
        ci = f" [{rel_ci[0]:+.1%}, {rel_ci[1]:+.1%}]" if rel_ci else ""
        lines["size"] = {"verdict": judge(rel, rel_ci, "sigma_rel"), "relative_delta": rel, "ci": rel_ci,
                         "line": f"mean sigma generated {sg['mean_generated']:.4f}\" vs real {sg['mean_real']:.4f}\" "
                                 f"({rel:+.1%}{ci}); galaxy2galaxy {ref['generated']['mean_sigma_arcsec']:.4f}\" vs "
                                 f"{ref['real']['mean_sigma_arcsec']:.4f}\" ({ref_rel:+.1%})"}  # fmt: skip
    for key in ("shape", "size"):
        if key in lines and lines[key]["verdict"] != "ok":
            lines[key].update(cause(report, facts))
    fl = (report.get("flux") or {}).get("flux") or {}
    rel, rel_ci = _rel(fl)
    if rel is not None:
        ci = f" [{rel_ci[0]:+.1%}, {rel_ci[1]:+.1%}]" if rel_ci else ""
        lines["flux"] = {"verdict": judge(rel, rel_ci, "flux_rel"), "relative_delta": rel, "ci": rel_ci,
                         "line": f"mean pixel-sum flux generated {fl['mean_generated']:.4g} vs real "
                                 f"{fl['mean_real']:.4g} ({rel:+.1%}{ci})"}  # fmt: skip
    rec = report.get("reconstruction", {})
    o = rec.get("orientation_cos2dphi")
    lines["orientation"] = {"verdict": _higher(o, "orientation"), "value": o,
                            "line": f"reconstructions keep position angles: <cos 2 dphi> = {o:.3f} (1 = kept, 0 = random)"
                            if o is not None else "no galaxy with real |g| > 0.1 to measure orientation on"}  # fmt: skip
    bins = [b for b in rec.get("size_bins", []) if b.get("sigma_rel_diff") is not None]
    if bins:
        words = [judge(b["sigma_rel_diff"], b.get("sigma_rel_diff_ci"), "recon_sigma_rel") for b in bins]
        worst = "off" if "off" in words else "close" if "close" in words else "ok"
        lines["reconstruction_sizes"] = {"verdict": worst, "line": "reconstructed sigma vs real, per size bin: " + "; ".join(
            f"{b['sigma_range_arcsec'][0]}-{b['sigma_range_arcsec'][1] or 'inf'}\" {b['sigma_rel_diff']:+.1%} (n {b['n']})"
            for b in bins)}  # fmt: skip
    b = report.get("background", {}).get("difference_in_noise_sigma")
    lines["background"] = {"verdict": _lower(abs(b), "background_sigma") if b is not None else "n/a", "value": b,
                           "line": f"border median generated - real = {report['background']['difference']:+.3g} flux "
                                   "units" + (f" ({b:+.2f} noise sigma)" if b is not None else "")}  # fmt: skip
    sl = ((report.get("redshift_trends") or {}).get("slopes_vs_z") or {}).get("sigma_arcsec")
    if sl and sl["real"].get("slope") and sl["generated"].get("slope") is not None:
        real, gen = sl["real"]["slope"], sl["generated"]["slope"]
        rel = gen / real - 1
        t = sl.get("truth", {}).get("slope")
        lines["size_redshift_slope"] = {"verdict": _lower(abs(rel), "slope_rel"), "relative_error": rel,
                                        "line": f"d log10 sigma / dz generated {gen:+.3f}{_ci(sl['generated'], 'slope')} vs "
                                                f"real {real:+.3f}{_ci(sl['real'], 'slope')} ({rel:+.0%})"
                                                + (f"; intrinsic truth {t:+.3f} (HSM sizes include the PSF)" if t else "")}  # fmt: skip
    ps = report.get("power_spectra") or {}
    dev = ps.get("residual_over_noise_max_deviation")
    if dev is not None:
        bands = ps["ratios"]["residual_over_noise"]
        lines["residual_power"] = {"verdict": _lower(dev, "residual_power"), "max_deviation": dev,
                                   "line": "reconstruction residual power / noise power: " + ", ".join(
                                       f"{k} {v:.2f}" for k, v in bands.items() if v is not None)
                                   + f" (the worst frequency's ratio is {dev:.3g} from 1)"}  # fmt: skip
    art = report.get("artefacts") or {}
    if art.get("streak_ratio") is not None:
        lines["artefacts"] = {"verdict": _lower(art["streak_ratio"], "streak_ratio"), "ratio": art["streak_ratio"],
                              "line": f"row/column streaks of generated stamps {art['streak_ratio']:.2f}x those of the "
                                      f"{art['reference_is'].split(' (')[0]}; axis power ratio "
                                      f"{art['generated'].get('axis_power_ratio') or float('nan'):.2f} (1 = isotropic)"}  # fmt: skip
    zname, resp, how = _response(report, facts)
    if resp and resp.get("ratio_sigma") is not None:
        r, c = resp["ratio_sigma"], report["conditional_response"]["conditions"][zname]
        walk = " (the other conditions following the real galaxies)" if c.get("other_conditions") else ""
        fixed = (f"; with latents fixed {c['ratio_sigma']:.0%}" if resp is not c and c.get("ratio_sigma") is not None
                 else "")  # fmt: skip
        lines["conditioning"] = {"verdict": _higher(r, "response_ratio"), "ratio": r,
                                 "line": f"{how}{walk}, d log10 sigma across {zname} {c['grid'][0]:.2f}-"
                                         f"{c['grid'][-1]:.2f} is {resp['generated']['dlog10_sigma']:+.3f}, "
                                         f"the real galaxies' {c['real']['dlog10_sigma']:+.3f} ({r:.0%}){fixed}"}  # fmt: skip
    measured = (report.get("morphology") or {}).get("stats") or {}
    mo = {k: c for k, c in measured.items() if c.get("w1") is not None}
    if measured and not mo:  # statmorph measured nothing: say so, never "ok"
        lines["morphology"] = {"verdict": "n/a", "differ": [],
                               "line": "statmorph measured no statistic on enough stamps (see the morphology section)"}  # fmt: skip
    if mo:
        worst = [
            k
            for k, c in mo.items()
            if c.get("mean_diff_ci") and not (c["mean_diff_ci"][0] <= 0 <= c["mean_diff_ci"][1])
        ]
        lines["morphology"] = {"verdict": "ok" if not worst else "close" if len(worst) <= 2 else "off",
                               "differ": worst, "line": "W1 " + ", ".join(f"{k} {c['w1']:.3g}" for k, c in mo.items()
                                                                          if c.get("w1") is not None)
                               + (f"; means differ (95%) in {', '.join(worst)}" if worst else "; no mean differs (95%)")}  # fmt: skip
        beats = ((report.get("morphology") or {}).get("baseline") or {}).get("generated_beats_baseline")
        if beats:
            lost = [k for k, v in beats.items() if not v]
            lines["morphology"]["beats_single_sersic"] = not lost
            lines["morphology"]["line"] += (
                "; closer than the single-Sérsic baseline in every statistic"
                if not lost
                else f"; the single-Sérsic baseline is closer in {', '.join(lost)}"
            )
            if lost and lines["morphology"]["verdict"] == "ok":
                lines["morphology"]["verdict"] = "close"
    lines["thresholds"] = {k: {"ok": v[0], "close": v[1]} for k, v in TOLERANCE.items()}
    return lines
