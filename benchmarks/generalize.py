"""Does one recipe generalize? The same flags trained and judged on two populations, against the issue's bars.

``python -m benchmarks.generalize`` makes two sets (64x64 by default) with ``hpcvae.synth`` (``--family simple``, the
test population, and ``--family cosmos``, COSMOS-like galaxies from real COSMOS fits, real ACS PSFs and
COSMOS correlated noise), sharded with ``--conditions zphot,mag_auto,flux_radius --val-fraction 0.25`` so
that no galaxy is in both splits; trains each recipe on each set with the same flags; fits the flow prior;
evaluates on the val split (everything) and on the train split (the population against the galaxies the
model saw); and checks, with the report's 95% bootstrap intervals:

* population vs train: |delta mean |g|| <= 0.01 and |delta mean sigma| <= 3%;
* population vs val: the intervals contain 0 or lie within +-0.02 and +-5%;
* reconstructions within 5% in sigma in each size bin (<0.15", 0.15-0.25", >0.25") and <cos 2 dphi> >= 0.97;
* Gini, M20, concentration, asymmetry: W1 smaller than the single-Sersic baseline's (COSMOS set);
* streaks within 2x the noise-free real level; residual power within 20% of the noise power in every band;
* on the simple set: |delta |g|| <= 0.02 and |delta sigma| <= 5%.

Every step is the product's own command line, one thread each.  ``--collect`` only reads the reports
of runs already in ``--work`` (``runs/<set>-<recipe>``).  Results: ``benchmarks/results/generalize-*``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    env_md,
    environment,
    fmt,
    loadavg,
    result_stem,
    run_jobs,
    update_index,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
CONDITIONS = "zphot,mag_auto,flux_radius"
RECIPES: dict[str, list[str]] = {
    "galaxy_film": ["--arch", "galaxy_film", "--flavour", "debug"],
    "galaxy_film-calibrated": ["--arch", "galaxy_film", "--flavour", "debug", "--set", 'model.likelihood="calibrated"'],
    "galaxy_vae-beta0.03": ["--arch", "galaxy_vae", "--flavour", "debug", "--set", 'model.likelihood="mse"',
                            "--set", "beta.value=0.03"],
    "galaxy_film-margin8": ["--arch", "galaxy_film", "--flavour", "debug", "--set", "model.margin=8"],
    "galaxy_film-circular": ["--arch", "galaxy_film", "--flavour", "debug", "--set", 'model.padding="circular"'],
    "galaxy_film-reflect": ["--arch", "galaxy_film", "--flavour", "debug", "--set", 'model.padding="reflect"'],
    "galaxy_film-nf16": ["--arch", "galaxy_film", "--flavour", "debug", "--set", "model.nf=16"],
    "galaxy_film-nf32": ["--arch", "galaxy_film", "--flavour", "debug", "--set", "model.nf=32"],
}  # fmt: skip
"""The recommended recipe (galaxy_film: FiLM on every decoder block, the calibrated_noise likelihood, beta = 1,
conditioned on the three columns), galaxy_film with the sigma-VAE likelihood it had before (``calibrated``), the
previous best (galaxy_vae, MSE with beta tuned on the simple set), and
galaxy_film whose decoder draws 8 pixels beyond each edge and crops them (``model.margin``), and galaxy_film whose
decoder pads circularly or by reflection (``model.padding``), and galaxy_film at two and four times the
debug width (``model.nf`` 16 and 32, the default flavour's width: the CPU's steps towards the model a GPU trains)."""
MORPH = ("gini", "m20", "concentration", "asymmetry")


def make_data(work: Path, family: str, n: int, size: int) -> Path:
    shards = work / f"shards-{family}{size}"
    if (shards / "manifest.json").is_file():
        return shards
    raw, py, logs = work / f"{family}{size}", sys.executable, work / "logs"
    run_jobs([(f"synth {family}", [py, "-m", "hpcvae.synth", "--family", family, "--n", str(n), "--size", str(size),
                                   "--out", str(raw), "--seed", "7", "--no-progress", "--overwrite"],
               logs / f"synth-{family}.log")], 1)  # fmt: skip
    run_jobs([(f"shard {family}", [py, "-m", "hpcvae.shard", "--catalog", str(raw / "real_galaxy_catalog_synth.fits"),
                                   "--size", str(size), "--out", str(shards), "--pad", "noise", "--overwrite",
                                   "--val-fraction", "0.25", "--conditions", CONDITIONS],
               logs / f"shard-{family}.log")], 1)  # fmt: skip
    return shards


Jobs = list[tuple[str, list[str], Path]]


def recipe_jobs(
    work: Path, family: str, shards: Path, recipes: list[str], a: argparse.Namespace
) -> tuple[Jobs, Jobs, Jobs]:
    """The train, prior and evaluate jobs of every recipe on one set (stages run across sets, ``--jobs`` at a time)."""
    from hpcvae.shards.manifest import Manifest

    py, logs, epochs, dev = sys.executable, work / "logs", a.epochs, a.device
    man = Manifest.load(shards)
    n_val = man.count("val")  # the train-split report measures as many galaxies as val
    pb = 256 if man.count("train") >= 1024 else 16  # a toy set (the rehearsal) has fewer latents than 256
    train: Jobs = []
    prior: Jobs = []
    evaluate: Jobs = []
    for name, seed in ((n, sd) for n in recipes for sd in a.seed_list):
        tag = run_name(family, name, seed)
        out = work / "runs" / tag
        train.append((f"train {tag}", [py, "-m", "hpcvae.train", *RECIPES[name], "--data", str(shards), "--out",
                      str(out), "--epochs", str(epochs), "--batch-size", str(a.batch_size), "--resume", "none", "--device", dev,
                      "--flavour", a.flavour,
                      "--seed", str(seed), "--set", "train.sample_grid=false", "--set", "checkpoint.every_steps=0",
                      "--set", "data.num_workers=0"], logs / f"train-{tag}.log"))  # fmt: skip
        prior.append((f"prior {tag}", [py, "-m", "hpcvae.train_prior", str(out), "--data", str(shards), "--epochs",
                      str(a.prior_epochs), "--batch-size", str(pb), "--encode-batch-size", str(min(64, pb)), "--device", dev,
                      "--resume", "none"],
                      logs / f"prior-{tag}.log"))  # fmt: skip
        common = [py, "-m", "hpcvae.evaluate", str(out), "--data", str(shards), "--seed", "0", "--device", dev,
                  "--workers", "1"]  # fmt: skip
        evaluate.append((f"eval {tag}", [*common, "--out", str(out / "report"), "--n", "100000", *shlex.split(a.eval_extra)],
                         logs / f"eval-{tag}.log"))  # fmt: skip
        evaluate.append((f"evaltrain {tag}", [*common, "--out", str(out / "report-train"), "--split", "train",
                         "--n", str(n_val), "--morph-n", "0", "--response-latents", "2"],
                         logs / f"evaltrain-{tag}.log"))  # fmt: skip
    return train, prior, evaluate


def _ci_ok(ci: list[float] | None, bound: float) -> bool | None:
    """Contains 0, or lies within +-bound."""
    if not ci or None in ci:
        return None
    return bool(ci[0] <= 0 <= ci[1] or (abs(ci[0]) <= bound and abs(ci[1]) <= bound))


def run_name(family: str, recipe: str, seed: int) -> str:
    """``runs/<set>-<recipe>`` for seed 0 (the runs before --seeds existed), ``...-seed<N>`` for others."""
    return f"{family}-{recipe}" + (f"-seed{seed}" if seed else "")


def row(work: Path, family: str, name: str, seed: int = 0) -> dict[str, Any] | None:
    out = work / "runs" / run_name(family, name, seed)
    if not (out / "report" / "report.json").is_file():
        return None
    val = json.loads((out / "report" / "report.json").read_text())
    tr_path = out / "report-train" / "report.json"
    train = json.loads(tr_path.read_text()) if tr_path.is_file() else None
    st, rc, ver = val["population"]["stats"], val["reconstruction"], val["verdict"]
    g, s = st["g"], st["sigma_arcsec"]
    r: dict[str, Any] = {
        "set": family, "recipe": name + (f" (seed {seed})" if seed else ""), "seed": seed, "n_val": val["population"]["n_real"],
        "g_val": g["mean_diff"], "g_val_ci": g["mean_diff_ci"],
        "sigma_val": s["mean_rel_diff"], "sigma_val_ci": s["mean_rel_diff_ci"],
        "flux_val": st["flux"]["mean_rel_diff"], "flux_val_ci": st["flux"]["mean_rel_diff_ci"],
        "orientation": rc["orientation_cos2dphi"],
        "recon_bins": {_bin(b): b.get("sigma_rel_diff") for b in rc.get("size_bins", []) if b.get("n")},
        "streak_ratio": (val.get("artefacts") or {}).get("streak_ratio"),
        "residual_power_max_dev": (ver.get("residual_power") or {}).get("max_deviation"),
        "response": (ver.get("conditioning") or {}).get("ratio"),
        "kl": rc["kl_per_galaxy_mean"],
    }  # fmt: skip
    bt = (val.get("flux") or {}).get("bright_tail") or {}
    if bt.get("sigma_arcsec", {}).get("mean_real"):
        r["bright_sigma_rel"] = bt["sigma_arcsec"]["mean_diff"] / bt["sigma_arcsec"]["mean_real"]
        r["bright_g"] = bt["g"]["mean_diff"]
    if train is not None:
        ts = train["population"]["stats"]
        r |= {"g_train": ts["g"]["mean_diff"], "sigma_train": ts["sigma_arcsec"]["mean_rel_diff"]}
    mo = val.get("morphology") or {}
    base = (mo.get("baseline") or {}).get("stats") or {}
    diff = (mo.get("baseline") or {}).get("w1_difference") or {}
    r["morph"] = {k: {"w1": (mo.get("stats") or {}).get(k, {}).get("w1"), "w1_baseline": base.get(k, {}).get("w1"),
                      "difference_ci": (diff.get(k) or {}).get("value_ci")}
                  for k in MORPH}  # fmt: skip
    lop = (val.get("artefacts") or {}).get("asymmetry_noise_free") or {}
    r["lopsided"] = {k: lop.get(k) for k in ("generated_minus_real", "generated_minus_real_ci",
                                             "reconstructed_minus_real", "reconstructed_minus_real_ci")}  # fmt: skip
    r["checks"] = checks(r)
    return r


def _bin(b: dict[str, Any]) -> str:
    lo, hi = b["sigma_range_arcsec"]
    return (
        f"<{hi:g}"
        if lo == 0
        else (f">{lo:g}" if hi is None or hi == float("inf") or hi > 10 else f"{lo:g}-{hi:g}")
    )


def checks(r: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's bars (None: not measured)."""

    def le(x: float | None, bound: float) -> bool | None:
        return None if x is None else bool(abs(x) <= bound)

    c: dict[str, bool | None] = {}
    if r["set"] == "cosmos":
        c["train |dg| <= 0.01"] = le(r.get("g_train"), 0.01)
        c["train |dsigma| <= 3%"] = le(r.get("sigma_train"), 0.03)
        c["val dg CI ok (0 or +-0.02)"] = _ci_ok(r["g_val_ci"], 0.02)
        c["val dsigma CI ok (0 or +-5%)"] = _ci_ok(r["sigma_val_ci"], 0.05)
        bins = [v for v in r["recon_bins"].values() if v is not None]
        c["recon sigma within 5% in every bin"] = bool(bins) and all(abs(v) <= 0.05 for v in bins)
        c["orientation >= 0.97"] = None if r["orientation"] is None else r["orientation"] >= 0.97
        beats = [
            m["w1"] < m["w1_baseline"] for m in r["morph"].values() if None not in (m["w1"], m["w1_baseline"])
        ]
        c["morphology W1 below single-Sersic (all 4)"] = None if len(beats) < 4 else all(beats)
        c["streaks <= 2x noise-free real"] = le(r["streak_ratio"], 2.0)
        c["residual power within 20% of noise"] = le(r["residual_power_max_dev"], 0.2)
    else:
        c["val |dg| <= 0.02"] = le(r["g_val"], 0.02)
        c["val |dsigma| <= 5%"] = le(r["sigma_val"], 0.05)
    return c


def _ci(x: float | None, ci: list[float] | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    f = (lambda v: f"{100 * v:+.1f}%") if pct else (lambda v: f"{v:+.3f}")
    return f"{f(x)} [{f(ci[0])}, {f(ci[1])}]" if ci and None not in ci else f(x)


def markdown(p: dict[str, Any]) -> str:
    md = [f"# Generalization: one recipe on two populations ({p['plan']['size']}x{p['plan']['size']})\n", __doc__.split("\n\n")[1] + "\n",
          env_md(p["environment"]), ""]  # fmt: skip
    md.append("| set | recipe | Δ\\|g\\| val [95%] | Δσ val [95%] | Δflux val | Δ\\|g\\| train | Δσ train | "
              "recon Δσ per bin | ⟨cos 2Δφ⟩ | streaks × | resid. power dev | zphot response ratio (generation) | brightest 5%: Δσ, Δ\\|g\\| |")  # fmt: skip
    md.append("|" + "---|" * 13)
    for r in p["rows"]:
        bins = ", ".join(f"{k}: {100 * v:+.1f}%" for k, v in r["recon_bins"].items() if v is not None)
        md.append(f"| {r['set']} | {r['recipe']} | {_ci(r['g_val'], r['g_val_ci'])} | "
                  f"{_ci(r['sigma_val'], r['sigma_val_ci'], True)} | {_ci(r['flux_val'], r['flux_val_ci'], True)} | "
                  f"{fmt(r.get('g_train'))} | {_ci(r.get('sigma_train'), None, True)} | {bins} | {fmt(r['orientation'])} | "
                  f"{fmt(r['streak_ratio'])} | {fmt(r['residual_power_max_dev'])} | {fmt(r['response'])} | "
                  f"{_ci(r.get('bright_sigma_rel'), None, True)}, {fmt(r.get('bright_g'))} |")  # fmt: skip
    md.append("\n## Morphology: W1 distance to the real val galaxies (generated / single-Sérsic baseline)\n")
    md.append("In brackets, where measured: the 95% interval of W1 generated - W1 baseline, paired (each real galaxy "
              "resampled with its own Sérsic fit); below 0 is closer than the baseline beyond noise.\n")  # fmt: skip
    md.append("The last columns: CAS asymmetry without noise (the decoder's mean against the synthetic truth), "
              "generated minus real and reconstructed minus real (paired), with 95% intervals: the lopsidedness the "
              "decoder adds, which the noisy statmorph asymmetry sees only at thousands of stamps.\n")  # fmt: skip
    md.append(
        "| set | recipe | " + " | ".join(MORPH) + " | noise-free A: generated − real | reconstructed − real |"
    )
    md.append("|" + "---|" * (4 + len(MORPH)))
    for r in p["rows"]:
        cells = [f"{fmt(m['w1'])} / {fmt(m['w1_baseline'])}"
                 + (f" [{m['difference_ci'][0]:+.3g}, {m['difference_ci'][1]:+.3g}]" if m.get("difference_ci") else "")
                 for m in r["morph"].values()]  # fmt: skip
        lop = r.get("lopsided") or {}
        cells += [
            _ci(lop.get(f"{k}_minus_real"), lop.get(f"{k}_minus_real_ci"))
            for k in ("generated", "reconstructed")
        ]
        md.append(f"| {r['set']} | {r['recipe']} | " + " | ".join(cells) + " |")
    md.append("\n## The issue's bars\n")
    for r in p["rows"]:
        marks = "; ".join(
            f"{k}: {'yes' if v else ('–' if v is None else '**no**')}" for k, v in r["checks"].items()
        )
        md.append(f"- **{r['set']} / {r['recipe']}**: {marks}")
    md.append(f"\n_{p['note']}_\n")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.generalize", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results folder")
    ap.add_argument("--work", default="/tmp/hpcvae-generalize", help="data and runs (reused when present)")
    ap.add_argument("--n", type=int, default=4000, help="galaxies per set")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--size", type=int, default=64, help="stamp side in pixels")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--flavour", default="debug", help="model width: debug (CPU) or default (GPU)")
    ap.add_argument("--prior-epochs", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tag", default="", help="suffix of the results' file names")
    ap.add_argument(
        "--seeds", default="0", help="comma-separated training seeds: each recipe is trained once per seed"
    )
    ap.add_argument(
        "--eval-extra", default="", help="more hpcvae.evaluate options for the val report (quoted)"
    )
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated")
    ap.add_argument("--sets", default="cosmos,simple", help="comma-separated: cosmos, simple")
    ap.add_argument("--collect", action="store_true", help="only read the reports of runs in --work")
    ap.add_argument(
        "--note", default="", help="a line recorded with the results (what differs from the default)"
    )
    a = ap.parse_args(argv)
    recipes = [x for x in a.recipes.split(",") if x]
    sets = [x for x in a.sets.split(",") if x]
    bad = [x for x in recipes if x not in RECIPES] + [x for x in sets if x not in ("cosmos", "simple")]
    try:
        a.seed_list = sorted({int(x) for x in a.seeds.split(",") if x.strip()})
    except ValueError:
        a.seed_list = []
    if not a.seed_list or min(a.seed_list) < 0:
        print(
            f"benchmarks.generalize: error: --seeds must be comma-separated integers >= 0, got {a.seeds!r}",
            file=sys.stderr,
        )
        return 2
    if bad or a.n < 8 or a.epochs < 1 or a.jobs < 1 or a.size < 16 or a.batch_size < 1 or a.prior_epochs < 1:
        print(f"benchmarks.generalize: error: unknown recipe or set {bad[0]!r}" if bad else
              "benchmarks.generalize: error: needs --n >= 8, --size >= 16 and --epochs, --jobs, --batch-size, "
              "--prior-epochs >= 1", file=sys.stderr)  # fmt: skip
        return 2
    work, t0, env = Path(a.work), time.perf_counter(), environment(torch.device(a.device))
    if not a.collect:
        stages: tuple[Jobs, Jobs, Jobs] = ([], [], [])
        for family in sets:
            for stage, jobs in zip(
                stages, recipe_jobs(work, family, make_data(work, family, a.n, a.size), recipes, a)
            ):
                stage.extend(jobs)
        for stage in stages:  # one recipe on two sets still fills two cores
            run_jobs(stage, a.jobs)
    rows = [r for f in sets for n in recipes for sd in a.seed_list if (r := row(work, f, n, sd)) is not None]
    payload = {"benchmark": "generalize", "environment": env | {"loadavg_end": loadavg()}, "rows": rows,
               "plan": {"n": a.n, "size": a.size, "flavour": a.flavour, "batch_size": a.batch_size, "device": a.device, "epochs": a.epochs, "conditions": CONDITIONS, "recipes": RECIPES},
               "note": a.note or f"{a.n} galaxies per set at {a.size}x{a.size}, {a.epochs} epochs, batch {a.batch_size}, "
                                 f"{a.flavour} width, on {a.device}",
               "seconds": time.perf_counter() - t0}  # fmt: skip
    for r in rows:
        print(f"{r['set']}/{r['recipe']}: " + ", ".join(f"{k}={v}" for k, v in r["checks"].items()))
    stem = result_stem("generalize", torch.device(a.device)) + (f"-{a.tag}" if a.tag else "")
    paths = write_results(a.out, stem, payload, markdown(payload))
    update_index(a.out)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
