"""``report.md``: every figure of the evaluation report with the numbers that belong to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def _ci(c: dict[str, Any], key: str, nd: int = 3) -> str:
    ci = c.get(f"{key}_ci")
    return f" [{_fmt(ci[0], nd)}, {_fmt(ci[1], nd)}]" if ci else ""


def _cmp_table(rows: dict[str, dict[str, Any]], label: str) -> list[str]:
    """A table of means, the difference and W1, each with its 95% interval."""
    out = [f"| {label} | mean real | mean generated | Δmean [95%] | W1 [95%] |", "|---|---|---|---|---|"]
    for k, c in rows.items():
        out.append(
            f"| {k} | {_fmt(c.get('mean_real'))} | {_fmt(c.get('mean_generated'))} | "
            f"{_fmt(c.get('mean_diff'))}{_ci(c, 'mean_diff')} | {_fmt(c.get('w1'))}{_ci(c, 'w1')} |"
        )
    return out


def _header(r: dict[str, Any], md: list[str]) -> None:
    mcfg, d = r["model"]["config"], r["data"]
    md.append(f"# Evaluation: {mcfg.get('arch')} on {Path(str(d['path'])).name} ({d['split']})\n")
    md.append("| | |\n|---|---|")
    md.append(f"| model | `{r['model']['path'] or 'in-memory model'}` |")
    md.append(f"| architecture | {mcfg.get('arch')} ({mcfg.get('flavour')}), {mcfg.get('image_size')} px, "
              f"z_dim {mcfg.get('z_dim')}, nf {mcfg.get('nf')}, likelihood {mcfg.get('likelihood')} |")  # fmt: skip
    md.append(f"| conditional on redshift | {r['model']['conditional']} |")
    md.append(f"| data | `{d['path']}` split `{d['split']}`: {d['n_used']} stamps of {d.get('n_galaxies', d['n_used'])} "
              f"galaxies ({d['n_skipped']} skipped), {d['image_size']} px |")  # fmt: skip
    md.append(f"| pixel scale | {d['pixel_scale_arcsec']} arcsec ({d['pixel_scale_source']}) |")
    md.append(f"| synthetic data (truth known) | {d['synthetic']} |")
    po = r["population"]
    md.append(
        f"| generated draw | {po['n_generated']} galaxies, latent seed {po['latent_seed']}, {po['prior']} prior |"
    )
    md.append(f"| intervals | {po.get('intervals', 'none')} |")
    md.append(f"| device | {r['device']} |\n")


def _verdict(r: dict[str, Any], md: list[str]) -> None:
    v = {k: x for k, x in r.get("verdict", {}).items() if k != "thresholds"}
    if not v:
        return
    md.append("## Verdict\n")
    md += [
        f"- **{k}**: {x['verdict']}: {x['line']}" + (f" ({x['hint']})" if "hint" in x else "")
        for k, x in v.items()
    ]
    th = r["verdict"]["thresholds"]
    md.append(
        "\n_Judged on 95% intervals: ok = the interval lies within the ok tolerance, or holds 0 within the close one; "
        "off = it lies wholly outside the close tolerance. ok tolerances are galaxy2galaxy's level: |Δ mean |g|| ≤ "
        f"{th['g']['ok']}, |Δ mean σ| ≤ {th['sigma_rel']['ok']:.0%}, orientation ≥ {th['orientation']['ok']}; close: "
        f"|Δg| ≤ {th['g']['close']}, |Δσ| ≤ {th['sigma_rel']['close']:.0%}._\n"
    )


def verdict_table(r: dict[str, Any]) -> str:
    """The verdict as one table (the README's demo table is this, pasted by ``scripts/update_readme.py``)."""
    po = r["population"]
    # a "|" in a line (mean |g|) would split its cell
    cell = {k: x["line"].replace("|", "\\|") for k, x in r.get("verdict", {}).items() if k != "thresholds"}
    rows = [f"| {k.replace('_', ' ')} | {r['verdict'][k]['verdict']} | {line} |" for k, line in cell.items()]
    return "\n".join([
        f"{r['data']['n_used']} val stamps of {r['data'].get('n_galaxies', r['data']['n_used'])} galaxies against "
        f"{po['n_generated']} generated ({po['prior']} prior, latent seed {po['latent_seed']}); intervals: "
        f"{po.get('intervals', 'none')}.", "",
        "| check | verdict | measured [95% interval] |", "|---|---|---|", *rows,
    ])  # fmt: skip


def render_markdown(r: dict[str, Any]) -> str:
    """report.md: every figure with the numbers that belong to it."""
    md: list[str] = []
    _header(r, md)
    _verdict(r, md)
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
    md.append(f"Mean per-pixel MSE (normalised space): {_fmt(rc['mse_per_pixel_mean'])}; mean KL per galaxy: "
              f"{_fmt(rc['kl_per_galaxy_mean'])}; reduced χ² (real − reconstruction against each galaxy's noise "
              f"variance, 1 = noise only): mean {_fmt(rc['reduced_chi2']['mean'])}, median "
              f"{_fmt(rc['reduced_chi2']['median'])}.")  # fmt: skip
    if "redshift_prediction" in rc:
        p = rc["redshift_prediction"]
        md.append(
            f" Predicted redshift: RMSE {_fmt(p['rmse'])}, bias {_fmt(p['bias'])}, NMAD {_fmt(p['nmad'])}."
        )
    md.append("")
    md += _cmp_table(rc["hsm"], "HSM, real vs reconstructed").copy()
    md.append("\n| real σ bin | n | reconstructed σ / real − 1 [95%] | Δ|g| |\n|---|---|---|---|")
    for b in rc["size_bins"]:
        lo_, hi_ = b["sigma_range_arcsec"]
        rel = b.get("sigma_rel_diff")
        ci = b.get("sigma_rel_diff_ci")
        cell = "n/a" if rel is None else f"{rel:+.1%}" + (f" [{ci[0]:+.1%}, {ci[1]:+.1%}]" if ci else "")
        md.append(f"| {lo_}–{hi_ or '∞'}″ | {b['n']} | {cell} | {_fmt(b.get('g_diff'), 3)} |")
    o = rc["orientation"]
    md.append(f"\nOrientation kept: ⟨cos 2Δφ⟩ = {_fmt(o['mean'], 3)} over {o['n']} galaxies with real |g| > "
              f"{o['min_real_g']} (1 = kept, 0 = lost).\n")  # fmt: skip

    md.append("## Generations\n")
    g = r["generation"]
    md.append(f"Prior {g['prior']}, seed {g.get('seed')}; {g['latents']}.\n")
    for label, name in g["grids"].items():
        title = "unconditional" if label == "unconditional" else f"z = {label}"
        md.append(f"**{title}**\n\n![{title}]({name})\n")

    md.append("## Redshift sweep\n")
    sw = r["redshift_sweep"]
    if "skipped" in sw:
        md.append(f"Skipped: {sw['skipped']}.\n")
    else:
        md.append("![redshift sweep](redshift_sweep.png)\n")
        md.append(f"One galaxy per row ({sw['rows']} rows, the {sw['prior']} prior), {sw.get('held', 'the latent')} "
                  "held across the redshifts, as `interpolate()` draws it.\n")  # fmt: skip
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
    md.append(f"{la['active_dims']} of {la['z_dim']} latent dims active ({la['active_threshold']}); the corner plot "
              f"draws the {la.get('prior_drawn', 'normal')} prior beside the encoder means.\n")  # fmt: skip

    po = r["population"]
    md.append("## Population statistics (HSM adaptive moments)\n")
    md.append("![population](population.png)\n")
    hf = po["hsm_failures"]
    md.append(f"{po['n_real']} real and {po['n_generated']} generated galaxies"
              + (" (generated at the real galaxies' redshifts)" if po["generated_redshifts"] else "")
              + f", latents from the {po.get('prior', 'normal')} prior (seed {po['latent_seed']}); measured in "
              f"{po['measured_in']}. HSM failures: real {hf['real']}, generated {hf['generated']}.\n")  # fmt: skip
    md += _cmp_table(po["stats"], "statistic")
    md.append("\n| σ bin | real fraction | generated fraction |\n|---|---|---|")
    for b in po.get("size_bins", []):
        lo_, hi_ = b["sigma_range_arcsec"]
        md.append(
            f"| {lo_}–{hi_ or '∞'}″ | {_fmt(b['real_fraction'], 3)} | {_fmt(b['generated_fraction'], 3)} |"
        )
    ref = po["reference_lanusse2021"]
    md.append(f"\nFor context, {ref['source']}: real mean |g| = {ref['real']['mean_g']}, σ = "
              f"{ref['real']['mean_sigma_arcsec']}″; their generated: {ref['generated']['mean_g']} and "
              f"{ref['generated']['mean_sigma_arcsec']}″.\n")  # fmt: skip

    _flux(r, md)
    _morphology(r, md)
    _spectra(r, md)
    _artefacts(r, md)
    _trends(r, md)
    _response(r, md)
    md.append(f"_Written by hpcvae.evaluate in {r['seconds']} s._\n")
    return "\n".join(md)


def _flux(r: dict[str, Any], md: list[str]) -> None:
    fl = r["flux"]
    md.append("## Flux and magnitude\n")
    md.append(f"Pixel-sum flux in {fl['unit']}; magnitude = zeropoint − 2.5 log10(flux) with zeropoint "
              f"{_fmt(fl['zeropoint'])} ({fl['zeropoint_source']}).\n")  # fmt: skip
    rows = {"flux": fl["flux"]} | ({"magnitude": fl["magnitude"]} if "magnitude" in fl else {})
    md += _cmp_table(rows, "quantity")
    bt = fl.get("bright_tail")
    if bt:
        md.append(f"\nBrightest 5% ({bt['n_real']} real, {bt['n_generated']} generated): mean σ "
                  f"{_fmt(bt['sigma_arcsec']['mean_real'])}″ real vs {_fmt(bt['sigma_arcsec']['mean_generated'])}″ "
                  f"generated; mean |g| {_fmt(bt['g']['mean_real'], 3)} vs {_fmt(bt['g']['mean_generated'], 3)}.")  # fmt: skip
    md.append("")


def _morphology(r: dict[str, Any], md: list[str]) -> None:
    mo = r["morphology"]
    md.append("## Morphology (statmorph)\n")
    if "skipped" in mo:
        md.append(f"Skipped: {mo['skipped']}.\n")
        return
    md.append("![morphology](morphology.png)\n")
    f = mo["failures"]
    md.append(f"{mo['n_real']} real and {mo['n_generated']} generated stamps, {mo['seconds']} s on {mo['workers']} "
              f"processes. Failures (flag ≥ 2): real {f['real']['failed']}, generated {f['generated']['failed']}; "
              f"suspect (flag 1): {f['real']['suspect_flag1']} and {f['generated']['suspect_flag1']}. "
              f"Method: {mo['method']}.\n")  # fmt: skip
    md += _cmp_table(mo["stats"], "statistic")
    base = mo.get("baseline")
    if base:
        md.append(f"\nSingle-Sérsic baseline ({base['what']}):\n")
        md.append(
            "| statistic | W1 generated [95%] | W1 baseline [95%] | generated closer | difference [95%, paired] |"
        )
        md.append("|---|---|---|---|---|")
        for k, c in base["stats"].items():
            g, d = mo["stats"][k], (base.get("w1_difference") or {}).get(k) or {}
            diff = (
                f"{_fmt(d.get('value'))}{_ci(d, 'value')}: {d['says']}"
                if d.get("says")
                else _fmt(d.get("value"))
            )
            md.append(f"| {k} | {_fmt(g.get('w1'))}{_ci(g, 'w1')} | {_fmt(c.get('w1'))}{_ci(c, 'w1')} | "
                      f"{'yes' if base['generated_beats_baseline'].get(k) else 'no'} | {diff} |")  # fmt: skip
    nm = mo.get("noise_model") or {}
    if nm:
        md.append(f"\nNoise added to generated stamps: {nm['kind']}"
                  + (f" (neighbour correlation x {nm['rho_1px_x']:.2f}, y {nm['rho_1px_y']:.2f})" if nm["kind"] == "correlated"
                     else f" ({nm.get('why')})") + f", measured from {nm.get('from', 'blank corner patches')}.")  # fmt: skip
    md.append("")


def _spectra(r: dict[str, Any], md: list[str]) -> None:
    ps = r["power_spectra"]
    md.append("## Power spectra\n")
    md.append("![power spectra](power_spectra.png)\n")
    md.append(f"Azimuthal mean of |FFT|² / Npix ({ps['unit']}); bands in cycles/pixel: "
              + ", ".join(f"{k} {lo}–{hi}" for k, (lo, hi) in ps["bands_cycles_per_pixel"].items()) + ".\n")  # fmt: skip
    md.append("| ratio | " + " | ".join(ps["bands_cycles_per_pixel"]) + " |")
    md.append("|---" * (len(ps["bands_cycles_per_pixel"]) + 1) + "|")
    for name, bands in ps["ratios"].items():
        md.append(f"| {name.replace('_', ' ')} | " + " | ".join(_fmt(v, 3) for v in bands.values()) + " |")
    if "noise" in ps:
        md.append(f"\nNoise spectrum: {ps['noise']['how']}, measured from {ps['noise']['from']}.")
    md.append("")


def _artefacts(r: dict[str, Any], md: list[str]) -> None:
    a = r["artefacts"]
    md.append("## Artefacts\n")
    md.append(f"{a['of']} (outer band {a['band_width_px']} px).\n")
    md.append("| stamps | streak rows | streak columns | axis power ratio |\n|---|---|---|---|")
    for name, m in (("generated", a["generated"]), (a["reference_is"], a["reference"]),
                    ("real, with noise", a["real_with_noise"])):  # fmt: skip
        md.append(f"| {name} | {_fmt(m['streak_rows_median'], 3)} | {_fmt(m['streak_cols_median'], 3)} | "
                  f"{_fmt(m['axis_power_ratio'], 3)} |")  # fmt: skip
    md.append(f"\nGenerated streaks are {_fmt(a['streak_ratio'], 3)}× the reference's.\n")
    lop = a.get("asymmetry_noise_free")
    if lop:
        md.append(f"Lopsidedness without noise ({lop['of']}; {lop['n']} stamps each): real "
                  f"{_fmt(lop['real_mean'], 3)}, generated {_fmt(lop['generated_mean'], 3)} "
                  f"({lop['generated_minus_real']:+.4f}{_ci(lop, 'generated_minus_real')}), reconstructed "
                  f"{_fmt(lop['reconstructed_mean'], 3)} ({lop['reconstructed_minus_real']:+.4f}"
                  f"{_ci(lop, 'reconstructed_minus_real')}, paired: what the decoder adds).\n")  # fmt: skip


def _trends(r: dict[str, Any], md: list[str]) -> None:
    md.append("## Size and flux against redshift\n")
    tr = r["redshift_trends"]
    if "skipped" in tr:
        md.append(f"Skipped: {tr['skipped']}.\n")
        return
    md.append("![redshift trends](redshift_trends.png)\n")
    md.append(f"Fit: {tr['fit']}; ± is the standard error, [ ] the 95% bootstrap interval.\n")
    md.append("| quantity | real | generated | truth |\n|---|---|---|---|")
    for key, row in tr["slopes_vs_z"].items():
        cells = []
        for who in ("real", "generated", "truth"):
            s = row.get(who)
            cells.append("–" if not s or s["slope"] is None else f"{_fmt(s['slope'])} ± {_fmt(s['slope_se'], 2)}"
                         + _ci(s, "slope"))  # fmt: skip
        md.append(f"| d log10 {tr['quantities'][key]} / dz | " + " | ".join(cells) + " |")
    md.append("")


def _response(r: dict[str, Any], md: list[str]) -> None:
    rs = r["conditional_response"]
    md.append("## Conditional response\n")
    if "skipped" in rs:
        md.append(f"Skipped: {rs['skipped']}.\n")
        return
    md.append("![conditional response](conditional_response.png)\n")
    md.append(f"{rs['latents']} latents from the {rs['prior']} prior (seed {rs['seed']}), held fixed while one "
              "condition goes from its 10th to its 90th percentile (the others following the real galaxies): what "
              "decoding one given latent at other conditions does. With a conditional flow prior, a second sweep "
              "holds the flow's base noise fixed and draws each latent from the prior at the sweep's conditions: "
              "what generation (`sample`, `hpcvae.generate --catalog`, `interpolate()` without a latent) does. "
              "The real change is between binned medians of the real galaxies at the ends of the range.\n")  # fmt: skip
    md.append(
        "| condition | range | sweep | d log10 σ generated | real | ratio | d log10 flux generated | real | ratio |"
    )
    md.append("|---|---|---|---|---|---|---|---|---|")
    for name, c in rs["conditions"].items():
        sweeps = [("latents fixed", c)] + (
            [("through the prior", c["through_prior"])] if "through_prior" in c else []
        )
        for what, sw in sweeps:
            md.append(f"| {name} | {_fmt(c['grid'][0], 3)}–{_fmt(c['grid'][-1], 3)} ({c['range_from']}) | {what} | "
                      f"{_fmt(sw['generated']['dlog10_sigma'], 3)} | {_fmt(c['real']['dlog10_sigma'], 3)} | "
                      f"{_fmt(sw['ratio_sigma'], 3)} | {_fmt(sw['generated']['dlog10_flux'], 3)} | "
                      f"{_fmt(c['real']['dlog10_flux'], 3)} | {_fmt(sw['ratio_flux'], 3)} |")  # fmt: skip
    md.append("")
