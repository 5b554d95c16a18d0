"""Galaxies per second from a catalog to drawn GalSim stamps, per path, with the flow prior and N(0, I).

``python -m benchmarks.generate [--model RUN] [--n 100] --out DIR``

Paths, all in this process after one warm-up (so imports and the model load are not counted), on the
same catalog of ``n`` rows (zphot, mag_auto, flux_radius drawn inside the model's training range):

* **python batched**: ``model.to_galsim(catalog, psf=Moffat)`` and ``drawImage`` of each object;
* **CLI to FITS**: ``hpcvae.generate.write`` of the catalog to a FITS cube + table + PSF (``--catalog``);
* **GalSim YAML, per stamp**: ``gal: {type: HpcvaeGalaxy, model: RUN, <conditions from the catalog>}``,
  one decode per object;
* **GalSim YAML, batched**: ``input: {hpcvae_model: {file_name: RUN, catalog: CAT, batch: B}}``.

Beside them, the flow prior against N(0, I): ``sample(1)`` (x20) and ``sample(1024)``.  Without
``--model`` a small COSMOS-like model is trained first (``hpcvae.synth --family cosmos`` -> shards with
conditions -> galaxy_film debug -> flow prior), which takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from hpcvae.cli import run_cli
from hpcvae.errors import ConfigError

STAMP = 24
"""Stamp side (pixels at 0.2"/pixel) each galaxy is drawn into."""


def build_model(work: Path, n_gal: int = 800, epochs: int = 4) -> Path:
    """A small COSMOS-like galaxy_film model with a flow prior, made with the product's own commands."""
    py = sys.executable
    raw, shards, run = work / "raw", work / "shards", work / "run"
    steps = [
        [py, "-m", "hpcvae.synth", "--family", "cosmos", "--n", str(n_gal), "--size", "64", "--out", str(raw),
         "--no-progress"],
        [py, "-m", "hpcvae.shard", "--catalog", str(raw / "real_galaxy_catalog_synth.fits"), "--size", "64",
         "--out", str(shards), "--conditions", "zphot,mag_auto,flux_radius"],
        [py, "-m", "hpcvae.train", "--arch", "galaxy_film", "--flavour", "debug", "--data", str(shards), "--out",
         str(run), "--epochs", str(epochs), "--batch-size", "32", "--set", "data.num_workers=0",
         "--set", "data.persistent_workers=false"],
        [py, "-m", "hpcvae.train_prior", str(run), "--data", str(shards), "--epochs", "20"],
    ]  # fmt: skip
    for cmd in steps:
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise ConfigError(
                f"benchmarks.generate: {cmd[2]} failed: {(p.stderr or p.stdout).strip().splitlines()[-1]}"
            )
    return run


def catalog(model: Any, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` rows whose conditions lie between each condition's 10th and 90th training percentile."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in model.conditioning.names:
        p = model.conditioning.train(name).get("percentiles") or {}
        lo, hi = float(p.get("10", 0.3)), float(p.get("90", 1.0))
        out[name] = rng.uniform(lo, hi, n)
    return out


def _timed(fn: Any, repeat: int = 1) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def python_batched(model: Any, cat: dict[str, np.ndarray], prior: str) -> float:
    import galsim

    psf = galsim.Moffat(beta=3.0, fwhm=0.7)

    def go() -> None:
        for obj in model.to_galsim(cat, psf=psf, prior=prior, seed=1):
            obj.drawImage(nx=STAMP, ny=STAMP, scale=0.2)

    return _timed(go)


def cli_fits(run: Path, cat_path: Path, out: Path, prior: str) -> float:
    from hpcvae.generate import GenerateConfig, write

    def go() -> None:
        write(GenerateConfig(model=run, out=out, catalog=cat_path, prior=prior, overwrite=True))  # type: ignore[arg-type]

    return _timed(go)


def yaml_field(run: Path, cat_path: Path, n: int, prior: str, batched: bool, out: Path) -> float:
    import galsim

    import hpcvae.galsim  # noqa: F401  (registers the types)

    # one row of n tiles: exactly one stamp per catalog row (GalSim's Tiled image has no object count)
    if batched:
        gal: dict[str, Any] = {"type": "HpcvaeGalaxy", "prior": prior}
        inp = {"hpcvae_model": {"file_name": str(run), "catalog": str(cat_path), "batch": 256, "seed": 1,
                                "prior": prior}}  # fmt: skip
    else:
        gal = {"type": "HpcvaeGalaxy", "model": str(run), "prior": prior, "extrapolate": True,
               "redshift": {"type": "Catalog", "col": "zphot"}}  # fmt: skip
        inp = {"catalog": {"file_name": str(cat_path)}}
    config = {"input": inp, "gal": gal, "psf": {"type": "Moffat", "beta": 3.0, "fwhm": 0.7},
              "image": {"type": "Tiled", "nx_tiles": n, "ny_tiles": 1, "stamp_size": STAMP, "pixel_scale": 0.2,
                        "random_seed": 7},
              "output": {"file_name": str(out)}}  # fmt: skip
    return _timed(lambda: galsim.config.Process({k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()},
                                                logger=None))  # fmt: skip


def flow_vs_normal(model: Any) -> dict[str, Any]:
    z = float(np.median(catalog(model, 64)[model.conditioning.redshift_name]))
    out: dict[str, Any] = {}
    for prior in ("normal", "flow"):
        one = _timed(lambda p=prior: model.sample(1, redshift=z, prior=p), repeat=20)
        many = _timed(lambda p=prior: model.sample(1024, redshift=z, prior=p))
        out[prior] = {"sample_1_s": one, "sample_1024_s": many, "per_galaxy_1024_s": many / 1024}
    out["flow_over_normal_1"] = out["flow"]["sample_1_s"] / out["normal"]["sample_1_s"]
    out["flow_over_normal_1024"] = out["flow"]["sample_1024_s"] / out["normal"]["sample_1024_s"]
    out["per_galaxy_1024_over_64"] = None
    return out


def fidelity(model: Any, truth: Path, n: int = 1000) -> dict[str, Any]:
    """Do generated galaxies follow the catalog they were asked for? (the survey issue's bar)

    The catalog is the first ``n`` rows of a synthetic set's truth table (``hpcvae.synth``'s ``_fits.fits``):
    zphot, mag_auto, flux_radius requested.  The real galaxy at those conditions is that row's galaxy redrawn
    without noise and cut to the model's stamp size, measured like the generated one (pixel-sum flux, HSM
    size).  Spearman rank correlations of requested against measured, and the medians of measured
    generated against real in quintiles of the requested value.
    """
    import fitsio
    from scipy.stats import spearmanr

    from hpcvae.evaluate.moments import moments

    t = fitsio.read(str(truth))[:n]
    names = list(model.conditioning.names)
    missing = [c for c in names if c not in t.dtype.names]
    if missing:
        raise ConfigError(f"{truth}: no column {missing[0]!r}, which the model is conditioned on")
    cat = {c: np.asarray(t[c], dtype=np.float64) for c in names}
    imgs = model.sample(cat, seed=0, prior="flow").float().numpy()[:, 0]
    phys = (getattr(model, "model_info", None) or {}).get("physics") or {}
    scale = float(phys.get("pixel_scale_arcsec") or 0.03)
    flux = imgs.reshape(len(imgs), -1).sum(1)
    sigma = moments(imgs, scale)["sigma_arcsec"]
    from hpcvae.shards.ingest import fit_to_size
    from hpcvae.synth import FAMILIES

    header = fitsio.read_header(str(truth), ext=1)
    family = FAMILIES[str(header.get("FAMILY", "simple")).strip()]
    real = np.stack([fit_to_size(family.noiseless(header, int(i)), imgs.shape[-1]) for i in t["IDENT"]])
    real_flux = real.reshape(len(real), -1).sum(1)
    real_sigma = moments(real, scale)["sigma_arcsec"]

    def binned(req: np.ndarray, gen: np.ndarray, real: np.ndarray) -> list[dict[str, Any]]:
        edges = np.nanquantile(req, np.linspace(0, 1, 6))
        out = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (req >= lo) & (req <= hi) & np.isfinite(gen) & np.isfinite(real)
            g, r = float(np.median(gen[sel])), float(np.median(real[sel]))
            out.append({"range": [float(lo), float(hi)], "n": int(sel.sum()), "generated": g, "real": r,
                        "rel_diff": g / r - 1})  # fmt: skip
        return out

    ok = np.isfinite(sigma)
    res = {
        "n": len(t), "catalog": truth.name, "hsm_failures": int((~ok).sum()),
        "spearman_flux": float(spearmanr(-t["mag_auto"], flux).statistic),
        "spearman_size": float(spearmanr(t["flux_radius"][ok], sigma[ok]).statistic),
        "flux_bins_by_mag_auto": binned(np.asarray(t["mag_auto"], float), flux, real_flux),
        "size_bins_by_flux_radius": binned(np.asarray(t["flux_radius"], float), sigma, real_sigma),
    }  # fmt: skip
    worst = max(abs(b["rel_diff"]) for b in res["flux_bins_by_mag_auto"] + res["size_bins_by_flux_radius"])
    res["worst_bin_rel_diff"] = worst
    res["meets"] = bool(res["spearman_flux"] >= 0.8 and res["spearman_size"] >= 0.6 and worst <= 0.10)
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    from astropy.table import Table

    import hpcvae

    device = common.pick_device("cpu")
    env = common.environment(device)
    with tempfile.TemporaryDirectory(prefix="hpcvae-gen-", dir=args.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        model_path = Path(args.model) if args.model else build_model(work)
        build_s = time.perf_counter() - t0 if not args.model else 0.0
        model = hpcvae.load_model(model_path)
        if model.flow_prior is None:
            raise ConfigError(f"{model_path}: the model has no flow prior (python -m hpcvae.train_prior)")
        cat = catalog(model, args.n)
        cat_path = work / "cat.fits"
        Table(cat).write(cat_path)
        rows: list[dict[str, Any]] = []
        for prior in ("normal", "flow"):
            paths = {
                "python batched (to_galsim)": lambda p=prior: python_batched(model, cat, p),
                "CLI to FITS (hpcvae.generate --catalog)": lambda p=prior: cli_fits(model_path, cat_path,
                                                                                    work / "g.fits", p),
                "GalSim YAML, per stamp": lambda p=prior: yaml_field(model_path, cat_path, args.n, p, False,
                                                                     work / "f1.fits"),
                "GalSim YAML, batched input": lambda p=prior: yaml_field(model_path, cat_path, args.n, p, True,
                                                                         work / "f2.fits"),
            }  # fmt: skip
            for name, fn in paths.items():
                s = fn()
                rows.append(
                    {"path": name, "prior": prior, "n": args.n, "seconds": s, "galaxies_per_s": args.n / s}
                )
                print(f"  {name:42s} {prior:6s} {s:7.2f} s  {args.n / s:8.1f} galaxies/s", flush=True)
        flows = flow_vs_normal(model)
        chunk64 = _timed(lambda: model.sample(64, redshift=float(np.median(cat[model.conditioning.redshift_name])),
                                              prior="normal"))  # fmt: skip
        flows["per_galaxy_1024_over_64"] = flows["normal"]["per_galaxy_1024_s"] / (chunk64 / 64)
    by = {(r["path"], r["prior"]): r["seconds"] for r in rows}
    ratios = {}
    for prior in ("normal", "flow"):
        py = by[("python batched (to_galsim)", prior)]
        ratios[prior] = {"yaml_per_stamp_over_batched": by[("GalSim YAML, per stamp", prior)] /
                         by[("GalSim YAML, batched input", prior)],
                         "yaml_batched_over_python_batched": by[("GalSim YAML, batched input", prior)] / py,
                         "cli_over_python_batched": by[("CLI to FITS (hpcvae.generate --catalog)", prior)] / py}  # fmt: skip
    fid = fidelity(model, Path(args.truth), min(args.n_fidelity, 100_000)) if args.truth else None
    env["loadavg_end"] = common.loadavg()
    payload = {"fidelity": fid, "benchmark": "generate", "environment": env, "n": args.n, "model": str(model_path.name),
               "model_arch": model.arch, "build_model_s": build_s, "results": rows, "ratios": ratios,
               "flow_vs_normal": flows}  # fmt: skip
    stem = common.result_stem("generate", device) + (f"-{args.tag}" if args.tag else "")
    common.write_results(args.out, stem, payload, render_md(payload))
    print(f"benchmarks.generate: wrote {Path(args.out) / stem}.json and .md")
    return payload


def render_md(p: dict[str, Any]) -> str:
    f, r = p["flow_vs_normal"], p["ratios"]
    lines = [
        f"# Generation — {p['environment']['device']} — {p['environment']['date'][:10]}", "",
        common.env_md(p["environment"]),
        f"- model: {p['model_arch']} ({p['model']}), catalog of {p['n']} rows (zphot, mag_auto, flux_radius inside the "
        f"training range); stamps {STAMP}x{STAMP} at 0.2\"/pixel with a Moffat PSF (FWHM 0.7\")", "",
        "## Catalog to drawn stamps", "",
        "All in one process after a warm-up: the model load and imports are not counted.", "",
        common.md_table(p["results"], [("path", "path"), ("prior", "prior"), ("seconds", "s"),
                                       ("galaxies_per_s", "galaxies/s")]), "",  # fmt: skip
        "| ratio | normal | flow |", "|---|---|---|",
        *[f"| {k.replace('_', ' ')} | {r['normal'][k]:.2f} | {r['flow'][k]:.2f} |" for k in r["normal"]], "",
        "## Flow prior against N(0, I)", "",
        "| prior | sample(1) s | sample(1024) s |", "|---|---|---|",
        *[f"| {k} | {f[k]['sample_1_s']:.4f} | {f[k]['sample_1024_s']:.3f} |" for k in ("normal", "flow")], "",
        f"flow / normal: {f['flow_over_normal_1']:.2f}x for sample(1), {f['flow_over_normal_1024']:.2f}x for "
        f"sample(1024); per galaxy, sample(1024) / sample(64) with N(0, I): {f['per_galaxy_1024_over_64']:.2f}",
    ]  # fmt: skip
    fid = p.get("fidelity")
    if fid:
        lines += ["", f"## Does a galaxy follow its catalog row? ({fid['n']} rows of {fid['catalog']})", "",
                  f"Spearman, requested against measured: flux {fid['spearman_flux']:.3f} (bar 0.8), HSM size "
                  f"{fid['spearman_size']:.3f} (bar 0.6); {fid['hsm_failures']} HSM failures. Medians of the generated "
                  "against the real galaxies (each row's galaxy without noise, cut to the model's stamp) in quintiles of the "
                  "requested value (bar: within 10%):", "",
                  "| quantity | requested range | n | generated | real | rel. diff |", "|---|---|---|---|---|---|"]  # fmt: skip
        for key, what in (
            ("flux_bins_by_mag_auto", "flux by mag_auto"),
            ("size_bins_by_flux_radius", "σ″ by flux_radius"),
        ):
            for b in fid[key]:
                lines.append(f"| {what} | {b['range'][0]:.2f}–{b['range'][1]:.2f} | {b['n']} | {b['generated']:.4g} | "
                             f"{b['real']:.4g} | {100 * b['rel_diff']:+.1f}% |")  # fmt: skip
        lines += ["", f"Worst bin {100 * fid['worst_bin_rel_diff']:.1f}%: {'meets' if fid['meets'] else 'misses'} "
                  "the bars."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.generate", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", help="run folder of a conditional model with a flow prior (default: train one)"
    )
    ap.add_argument("--n", type=int, default=100, help="catalog rows (galaxies per path)")
    ap.add_argument("--out", required=True, help="results folder (e.g. benchmarks/results)")
    ap.add_argument("--workdir", help="scratch folder (default: the system temp dir)")
    ap.add_argument("--tag", default="", help="suffix of the results' file names")
    ap.add_argument(
        "--truth", help="a synthetic set's truth table (_fits.fits): check the catalog fidelity on it"
    )
    ap.add_argument("--n-fidelity", type=int, default=1000, help="catalog rows for the fidelity check")
    args = ap.parse_args(argv)
    if not 1 <= args.n <= 100_000:
        raise ConfigError(f"--n must be in [1, 100000], got {args.n}")
    if args.truth and not Path(args.truth).is_file():
        raise ConfigError(f"--truth {args.truth}: no such file (a hpcvae.synth set's _fits.fits truth table)")
    if not 1 <= args.n_fidelity <= 100_000:
        raise ConfigError(f"--n-fidelity must be in [1, 100000], got {args.n_fidelity}")
    run(args)
    return 0


if __name__ == "__main__":
    run_cli(main, "benchmarks.generate")
