"""``MODEL_CARD.md``: what a model is, what it was trained on, how good it is, what not to use it for.

Written into the run folder from ``model.json`` (at the end of training) and again with the
evaluation numbers when ``hpcvae.evaluate`` reports on that run, in the Hugging Face model
card layout (a YAML header, then prose and tables), so a model shared outside the group
carries its own description.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hpcvae.model_files import MODEL_JSON, read_model_json

CARD = "MODEL_CARD.md"


def _v(x: Any, fmt: str = "{}") -> str:
    return "–" if x is None or x == "" else fmt.format(x)


def _header(meta: dict[str, Any]) -> list[str]:
    data = meta.get("data") or {}
    src = data.get("source") or {}
    dataset = Path(src.get("catalog") or src.get("h5") or "unknown").name
    return [
        "---",
        "license: mit",
        "library_name: hpcvae",
        "tags: [astronomy, galaxies, hst, vae, generative-model, galsim]",
        f"datasets: [{json.dumps(dataset)}]",
        "---",
    ]


def _training_data(meta: dict[str, Any]) -> list[str]:
    data = meta.get("data") or {}
    src = data.get("source") or {}
    counts = data.get("counts") or {}
    return [
        "## Training data",
        "",
        "| | |",
        "|---|---|",
        f"| source | {_v(src.get('kind'))}: `{_v(src.get('catalog') or src.get('h5'))}` |",
        f"| catalog sha256 | `{_v(src.get('catalog_sha256'))}` |",
        f"| synthetic | {_v(data.get('synthetic'))} |",
        f"| galaxies | train {_v(counts.get('train'))}, val {_v(counts.get('val'))} "
        f"(val fraction {_v(data.get('val_fraction'))}, split by a hash of each galaxy's identity) |",
        f"| skipped rows | {_v(data.get('n_skipped'))} (listed in the shard set's manifest.json) |",
        f"| shard set digest | `{_v(meta.get('manifest_digest'))}` |",
        f"| stamp size | {_v(data.get('image_size'))} px |",
        "",
    ]


def _physics(meta: dict[str, Any]) -> list[str]:
    p = meta.get("physics") or {}
    psf = p.get("psf") or {}
    return [
        "## Pixels",
        "",
        "| | |",
        "|---|---|",
        f'| pixel scale | {_v(p.get("pixel_scale_arcsec"), "{}")}"/pixel |',
        f"| band, instrument | {_v(p.get('band'))}, {_v(p.get('instrument'))} |",
        f"| flux unit (BUNIT) | {_v(p.get('bunit'))} |",
        f"| noise σ | {_v(p.get('noise_std'), '{:.4g}')} |",
        f"| PSF | {'in the images' if psf.get('in_images') else 'not recorded'}"
        f"{'; the model is PSF-free (forward-modelled through each galaxy PSF)' if p.get('psf_free') else ''}"
        f"{', FWHM ' + format(psf['fwhm_arcsec'], '.3f') + chr(34) if psf.get('fwhm_arcsec') else ''} |",
        "",
    ]


def _model(meta: dict[str, Any]) -> list[str]:
    cfg = meta.get("model_config") or {}
    t = meta.get("training") or {}
    tr = meta.get("transform") or {}
    flow = meta.get("flow_prior")
    return [
        "## Model and training",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{meta.get('arch')}` (flavour {_v(cfg.get('flavour'))}), {_v(cfg.get('image_size'))} px, "
        f"z_dim {_v(cfg.get('z_dim'))}, nf {_v(cfg.get('nf'))}, conditional on redshift: {_v(cfg.get('conditional'))} |",
        f"| likelihood, normalisation | {_v(cfg.get('likelihood'))}, {_v(tr.get('name'))} |",
        f"| β | {_v((meta.get('beta_schedule') or {}).get('value'))} ({_v((meta.get('beta_schedule') or {}).get('kind'))}) |",
        f"| latent prior | {'flow (' + str(flow.get('spec', {}).get('kind', '')) + ')' if flow else 'N(0, I)'} |",
        f"| engine, precision, world size | {_v(t.get('engine'))}, {_v(t.get('precision'))}, {_v(t.get('world_size'))} |",
        f"| epochs, steps, images seen | {_v(t.get('epochs'))}, {_v(t.get('steps'))}, {_v(t.get('images_seen'))} |",
        f"| training wall time | {_v(t.get('train_time_s'), '{:.0f}')} s |",
        f"| hpcvae | {_v(meta.get('hpcvae_version'))}, config sha256 `{_v(meta.get('config_sha256'))}` |",
        "",
    ]


def _evaluation(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return [
            "## Evaluation",
            "",
            "Not evaluated yet: run `python -m hpcvae.evaluate RUN --data SHARDS --out REPORT`.",
            "",
        ]
    from hpcvae.evaluate.moments import LANUSSE2021

    stats = (report.get("population") or {}).get("stats") or {}
    ref = LANUSSE2021
    g, s = stats.get("g") or {}, stats.get("sigma_arcsec") or {}
    lines = [
        "## Evaluation",
        "",
        f"HSM moments of {_v((report.get('population') or {}).get('n_generated'))} generated galaxies against the "
        f"same number of real val galaxies (prior: {_v((report.get('population') or {}).get('prior'))}), beside "
        "galaxy2galaxy (Lanusse et al. 2021, COSMOS):",
        "",
        "| quantity | real | generated | g2g real | g2g generated |",
        "|---|---|---|---|---|",
        f"| mean \\|g\\| | {_v(g.get('mean_real'), '{:.3f}')} | {_v(g.get('mean_generated'), '{:.3f}')} | "
        f"{ref['real']['mean_g']} | {ref['generated']['mean_g']} |",
        f"| mean σ (″) | {_v(s.get('mean_real'), '{:.4f}')} | {_v(s.get('mean_generated'), '{:.4f}')} | "
        f"{ref['real']['mean_sigma_arcsec']} | {ref['generated']['mean_sigma_arcsec']} |",
        "",
    ]
    verdict = {k: v for k, v in (report.get("verdict") or {}).items() if k != "thresholds"}
    lines += [f"- **{k}** ({v['verdict']}): {v['line']}" for k, v in verdict.items()]
    return [*lines, ""]


def _use(meta: dict[str, Any]) -> list[str]:
    p = meta.get("physics") or {}
    data = meta.get("data") or {}
    limits = [
        "trained on PSF-convolved pixels: generated galaxies carry the training PSF; `model.to_galsim(psf=...)` "
        "deconvolves it, and the target PSF must be larger"
        if not p.get("psf_free")
        else "PSF-free: generated galaxies are unconvolved profiles; convolve them with the target PSF",
        "trained on synthetic GalSim galaxies, not real ones: a pipeline check, not a science model"
        if data.get("synthetic")
        else "reflects the selection of its training catalog (magnitude limit, stamp size, masking)",
        "sizes and shapes are only as good as the evaluation above; check it at the redshifts you use",
    ]
    return [
        "## Intended use",
        "",
        "Drawing realistic galaxy light profiles into image simulations (GalSim: `model.to_galsim()` or "
        "`type: HpcvaeGalaxy` with `modules: [hpcvae.galsim]`), generating FITS stamps "
        "(`python -m hpcvae.generate`), and studying the population in its latent space.",
        "",
        "## Limitations",
        "",
        *[f"- {x}" for x in limits],
        "",
    ]


def model_card(meta: dict[str, Any], report: dict[str, Any] | None = None) -> str:
    """The card's Markdown for a model.json body and, optionally, its evaluation report."""
    title = [f"# hpcvae model: `{meta.get('arch')}`", ""]
    body = _model(meta) + _training_data(meta) + _physics(meta) + _evaluation(report) + _use(meta)
    return "\n".join(_header(meta) + [""] + title + body)


def write_model_card(folder: str | Path, report: dict[str, Any] | None = None) -> Path:
    """Write ``folder/MODEL_CARD.md`` from ``folder/model.json`` (atomically)."""
    folder = Path(folder)
    meta = read_model_json(folder / MODEL_JSON)
    path = folder / CARD
    tmp = folder / f".{CARD}.tmp-{os.getpid()}"
    tmp.write_text(model_card(meta, report))
    os.replace(tmp, path)
    return path
