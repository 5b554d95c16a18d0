"""The model card: what a model is, what it was trained on, how good it is, what not to use it for.

Built with ``huggingface_hub``'s ``ModelCard``/``ModelCardData``, so the metadata header (licence,
library, tags, datasets) and the ``model-index`` of the evaluation's numbers are the Hugging Face
Hub's own format: ``ModelCard.load`` reads them back and the Hub renders them.  Training writes it
as ``MODEL_CARD.md`` into the run folder; ``hpcvae.evaluate`` adds its numbers; ``hpcvae.export``
writes it as ``README.md``, the name the Hub shows.  No absolute path of the training machine
appears in it: catalogs are named by file name and sha256.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hpcvae._version import __version__
from hpcvae.model_files import MODEL_JSON, read_model_json

CARD = "MODEL_CARD.md"
LICENSE = "mit"
CITATIONS = """```bibtex
@article{lanusse2021galaxy2galaxy,
  title   = {Deep generative models for galaxy image simulations},
  author  = {Lanusse, Fran{\\c{c}}ois and Mandelbaum, Rachel and Ravanbakhsh, Siamak and Li, Chun-Liang
             and Freeman, Peter and P{\\'o}czos, Barnab{\\'a}s},
  journal = {Monthly Notices of the Royal Astronomical Society}, volume = {504}, pages = {5543--5555}, year = {2021}
}
@software{hpcvae,
  title = {hpcvae: train and use generative models of HST galaxy images on SLURM GPU clusters},
  version = {VERSION}, note = {see CITATION.cff}
}
```
The architecture follows the β-VAE study of HST (COSMOS) galaxies this package grew from (β = 0.1, 128² and 158²
cutouts, redshift-conditioned VAEs), cited in the package's CITATION.cff."""


def _v(x: Any, fmt: str = "{}") -> str:
    return "–" if x is None or x == "" else fmt.format(x)


def dataset_name(meta: dict[str, Any]) -> str:
    """A name for the training set (a family or a catalog name), never a path."""
    data = meta.get("data") or {}
    src = data.get("source") or {}
    name = Path(str(src.get("catalog") or src.get("h5") or "unknown")).name
    return ("hpcvae-synth/" if data.get("synthetic") else "") + name.removesuffix(".fits").removesuffix(".h5")


def _eval_results(report: dict[str, Any] | None, meta: dict[str, Any]) -> list[Any]:
    """The evaluation's headline numbers as ``EvalResult`` entries of the model-index."""
    from huggingface_hub import EvalResult

    if not report:
        return []
    stats = (report.get("population") or {}).get("stats") or {}
    flux = (report.get("flux") or {}).get("flux") or {}
    morph = (report.get("morphology") or {}).get("stats") or {}
    rows = [("mean |g| difference (generated - real)", "delta_mean_g", (stats.get("g") or {}).get("mean_diff")),
            ("mean HSM sigma relative difference", "delta_mean_sigma_rel",
             (stats.get("sigma_arcsec") or {}).get("mean_rel_diff")),
            ("W1 of HSM sigma [arcsec]", "w1_sigma", (stats.get("sigma_arcsec") or {}).get("w1")),
            ("mean flux relative difference", "delta_mean_flux_rel", flux.get("mean_rel_diff")),
            ("reconstruction orientation <cos 2 dphi>", "orientation", (report.get("reconstruction") or {})
             .get("orientation_cos2dphi"))]  # fmt: skip
    rows += [(f"W1 of {k}", f"w1_{k}", c.get("w1")) for k, c in morph.items()]
    out = []
    for name, mtype, value in rows:
        if isinstance(value, (int, float)):
            out.append(EvalResult(task_type="image-generation", task_name="galaxy image generation",
                                  dataset_type=dataset_name(meta), dataset_name=dataset_name(meta),
                                  dataset_split=(report.get("data") or {}).get("split", "val"),
                                  metric_type=mtype, metric_name=name, metric_value=float(value)))  # fmt: skip
    return out


def card_data(meta: dict[str, Any], report: dict[str, Any] | None) -> Any:
    from huggingface_hub import ModelCardData

    results = _eval_results(report, meta)
    return ModelCardData(
        license=LICENSE, library_name="hpcvae", pipeline_tag="unconditional-image-generation",
        tags=["astronomy", "galaxies", "hst", "vae", "generative-model", "galsim", meta.get("arch") or "model"],
        datasets=[dataset_name(meta)], model_name=f"hpcvae-{meta.get('arch')}",
        eval_results=results or None,
    )  # fmt: skip


def _section_model(meta: dict[str, Any]) -> str:
    cfg, t, tr = meta.get("model_config") or {}, meta.get("training") or {}, meta.get("transform") or {}
    flow = meta.get("flow_prior")
    conds = [c.get("name") for c in meta.get("conditions") or []]
    beta = meta.get("beta_schedule") or {}
    return "\n".join([
        "## Model and training", "", "| | |", "|---|---|",
        f"| architecture | `{meta.get('arch')}` (flavour {_v(cfg.get('flavour'))}), {_v(cfg.get('image_size'))} px, "
        f"z_dim {_v(cfg.get('z_dim'))}, nf {_v(cfg.get('nf'))} |",
        f"| conditioned on | {', '.join(conds) if conds else 'nothing (unconditional)'} |",
        f"| likelihood, normalisation | {_v(cfg.get('likelihood'))}, {_v(tr.get('name'))} |",
        f"| β | {_v(beta.get('value'))} ({_v(beta.get('kind'))}) |",
        f"| latent prior | {'flow (' + str(flow.get('spec', {}).get('kind', '')) + ')' if flow else 'N(0, I)'} |",
        f"| engine, precision, world size | {_v(t.get('engine'))}, {_v(t.get('precision'))}, {_v(t.get('world_size'))} |",
        f"| epochs, steps, images seen | {_v(t.get('epochs'))}, {_v(t.get('steps'))}, {_v(t.get('images_seen'))} |",
        f"| hpcvae | {_v(meta.get('hpcvae_version'))}, config sha256 `{_v(meta.get('config_sha256'))}` |", "",
    ])  # fmt: skip


def _section_data(meta: dict[str, Any]) -> str:
    data, p = meta.get("data") or {}, meta.get("physics") or {}
    src, counts, psf = data.get("source") or {}, data.get("counts") or {}, p.get("psf") or {}
    ranges = [f"{c['name']} {c['train']['min']:.3g}–{c['train']['max']:.3g}" for c in meta.get("conditions") or []
              if isinstance(c.get("train"), dict) and "min" in c["train"]]  # fmt: skip
    return "\n".join([
        "## Training data", "", "| | |", "|---|---|",
        f"| set | `{dataset_name(meta)}` ({_v(src.get('kind'))}), catalog sha256 `{_v(src.get('catalog_sha256'))}` |",
        f"| synthetic | {_v(data.get('synthetic'))} |",
        f"| galaxies | train {_v(counts.get('train'))}, val {_v(counts.get('val'))} (split by a hash of each "
        "galaxy's identity) |",
        f"| condition ranges (train) | {'; '.join(ranges) or '–'} |",
        f"| pixels | {_v(p.get('pixel_scale_arcsec'))}\"/pixel, {_v(p.get('band'))}, {_v(p.get('instrument'))}, "
        f"BUNIT {_v(p.get('bunit'))}, noise σ {_v(p.get('noise_std'), '{:.3g}')}, zeropoint {_v(p.get('zeropoint'))} |",
        f"| PSF | {'in the images' if psf.get('in_images') else 'not recorded'}"
        f"{'; the model is PSF-free' if p.get('psf_free') else ''} |", "",
    ])  # fmt: skip


def _section_evaluation(report: dict[str, Any] | None) -> str:
    if not report:
        return "## Evaluation\n\nNot evaluated yet: `python -m hpcvae.evaluate RUN --data SHARDS --out REPORT`.\n"
    from hpcvae.evaluate.moments import LANUSSE2021

    stats = (report.get("population") or {}).get("stats") or {}
    g, s = stats.get("g") or {}, stats.get("sigma_arcsec") or {}

    def ci(c: dict[str, Any], key: str, fmt: str) -> str:
        v = c.get(f"{key}_ci")
        return f" [{fmt.format(v[0])}, {fmt.format(v[1])}]" if v else ""

    pop = report.get("population") or {}
    lines = ["## Evaluation", "",
             f"{_v(pop.get('n_generated'))} generated galaxies ({_v(pop.get('prior'))} prior, seed {_v(pop.get('latent_seed'))}) "
             "against as many real val galaxies; 95% bootstrap intervals. galaxy2galaxy (Lanusse et al. 2021, COSMOS) "
             "for context.", "",
             "| quantity | real | generated | g2g real | g2g generated |", "|---|---|---|---|---|",
             f"| mean \\|g\\| | {_v(g.get('mean_real'), '{:.3f}')} | {_v(g.get('mean_generated'), '{:.3f}')}"
             f"{ci(g, 'mean_generated', '{:.3f}')} | {LANUSSE2021['real']['mean_g']} | {LANUSSE2021['generated']['mean_g']} |",
             f"| mean σ (″) | {_v(s.get('mean_real'), '{:.4f}')} | {_v(s.get('mean_generated'), '{:.4f}')}"
             f"{ci(s, 'mean_generated', '{:.4f}')} | {LANUSSE2021['real']['mean_sigma_arcsec']} | "
             f"{LANUSSE2021['generated']['mean_sigma_arcsec']} |", ""]  # fmt: skip
    verdict = {k: v for k, v in (report.get("verdict") or {}).items() if k != "thresholds"}
    lines += [f"- **{k}** ({v['verdict']}): {v['line']}" for k, v in verdict.items()]
    return "\n".join([*lines, ""])


def _section_use(meta: dict[str, Any]) -> str:
    p, data = meta.get("physics") or {}, meta.get("data") or {}
    conds = [c.get("name") for c in meta.get("conditions") or []]
    example = ", ".join(f'"{c}": [...]' for c in conds) if conds else ""
    limits = [
        "trained on PSF-convolved pixels: generated galaxies carry the training PSF; `model.to_galsim(psf=...)` "
        "deconvolves it, and the target PSF must be larger" if not p.get("psf_free")
        else "PSF-free: generated galaxies are unconvolved profiles; convolve them with the target PSF",
        "trained on synthetic GalSim galaxies: a pipeline check and a population model of that generator, not of "
        "the sky" if data.get("synthetic") else "reflects the selection of its training catalog (magnitude limit, "
        "stamp size, masking)",
        "conditions outside the training ranges above are refused unless `extrapolate=True`; there the model is "
        "untested",
    ]  # fmt: skip
    return "\n".join([
        "## How to use", "", "```python", "import hpcvae", "",
        'model = hpcvae.load_model("path/to/this/folder")      # or a Hugging Face repo id',
        f"images = model.sample({{{example}}}, seed=0)            # one galaxy per catalog row, flux units" if conds
        else "images = model.sample(64, seed=0)                         # flux units",
        (f"gals = model.to_galsim({{{example}}}, psf=galsim.Moffat(beta=3, fwhm=0.7), seed=1)  # GalSim objects"
         if conds else "gals = model.to_galsim(64, psf=galsim.Moffat(beta=3, fwhm=0.7), rng=1)    # GalSim objects"),
        "```", "",
        "## Intended use", "",
        "Drawing realistic galaxy light profiles into image simulations (GalSim: `model.to_galsim()`, or the "
        "`hpcvae_model` input type with `modules: [hpcvae.galsim]`), generating FITS stamps from a catalog "
        "(`python -m hpcvae.generate --catalog`), and studying the population in its latent space.", "",
        "## Out of scope", "",
        "- measuring shear or photometry of real galaxies with it: it is a population model, not an estimator;",
        "- other bands, instruments or pixel scales than the training data's without retraining;",
        "- single-galaxy truth: a generated galaxy is a draw, not a reconstruction of a catalog object.", "",
        "## Limitations", "", *[f"- {x}" for x in limits], "",
        "## Citation", "", CITATIONS.replace("VERSION", __version__), "",
    ])  # fmt: skip


def model_card(meta: dict[str, Any], report: dict[str, Any] | None = None) -> Any:
    """A ``huggingface_hub.ModelCard`` for a model.json body and, optionally, its evaluation report."""
    from huggingface_hub import ModelCard

    body = "\n".join([f"# hpcvae model: `{meta.get('arch')}`", "", _section_model(meta), _section_data(meta),
                      _section_evaluation(report), _section_use(meta)])  # fmt: skip
    return ModelCard(f"---\n{card_data(meta, report).to_yaml()}\n---\n\n{body}")


def write_model_card(folder: str | Path, report: dict[str, Any] | None = None, name: str = CARD) -> Path:
    """Write ``folder/<name>`` from ``folder/model.json`` (atomically, mode 0644 less the umask)."""
    from hpcvae.model_files import shareable

    folder = Path(folder)
    meta = read_model_json(folder / MODEL_JSON)
    path = folder / name
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    tmp.write_text(str(model_card(meta, report)))
    shareable(tmp)
    os.replace(tmp, path)
    return path
