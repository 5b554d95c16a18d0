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
        md += [
            f"- **{k}**: {x['verdict']}: {x['line']}" + (f" ({x['hint']})" if "hint" in x else "")
            for k, x in v.items()
        ]
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
