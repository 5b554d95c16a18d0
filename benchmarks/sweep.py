"""A measured sweep: cvae2 over β × LR schedule on synthetic data, then a flow prior for the best model.

End to end and unattended (``python -m benchmarks.sweep``):

1. synthetic galaxies (``hpcvae.synth``) -> shards (``hpcvae.shard``, noise padding), unless present;
2. one ``hpcvae.train`` run per β ∈ {0.01, 0.1, 1} × LR {constant, cosine} (1 process and
   1 thread each, ``--jobs`` at a time: on a shared 2-core CPU that is the fastest layout);
3. ``hpcvae.evaluate`` of each run on the held-out (val) split with the N(0, I) prior;
4. ``hpcvae.train_prior`` on every run, twice: fitted to the encoder means (the default) and to
   draws from q(z|x) (``--latents posterior``); ``hpcvae.evaluate`` of the best run (lowest val
   reconstruction loss, a prior-independent choice) with each flow;
5. the W1 comparison repeated over several generation seeds for every run (W1 of one
   385-galaxy draw is noisy), and the evidence behind it: the aggregate posterior's moments,
   the flows' val NLL against Gaussian ones, and the W1 "floors" of decoding the val galaxies'
   own latents;
6. ``docs/sweep.md`` (tables), ``docs/sweep.json`` (every number), ``docs/sweep_samples.png``
   (real vs normal vs flow) and ``docs/sweep_population.png`` (σ, |g|, flux histograms).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import environment, finite_or_none, loadavg, run_jobs
from benchmarks.sweep_report import PRIORS, render

REPO = Path(__file__).resolve().parents[1]
BETAS = (0.01, 0.1, 1.0)
LR_SCHEDULES = ("constant", "cosine")
W1_STATS = ("sigma_arcsec", "g", "flux")


def make_data(args: argparse.Namespace) -> Path:
    shards = Path(args.data)
    if (shards / "manifest.json").is_file():
        print(f"data: using {shards}")
        return shards
    raw = Path(args.raw)
    py = sys.executable
    run_jobs([("synth", [py, "-m", "hpcvae.synth", "--n", str(args.n), "--size", str(args.size), "--out", str(raw),
                         "--seed", "7", "--no-progress"], Path(args.out) / "logs" / "synth.log")], 1)  # fmt: skip
    run_jobs([("shard", [py, "-m", "hpcvae.shard", "--catalog", str(raw / "real_galaxy_catalog_synth.fits"),
                         "--size", str(args.size), "--out", str(shards), "--pad", "noise", "--overwrite"],
               Path(args.out) / "logs" / "shard.log")], 1)  # fmt: skip
    return shards


def run_name(beta: float, lr: str) -> str:
    return f"beta{beta:g}-{lr}"


def train_argv(args: argparse.Namespace, shards: Path, beta: float, lr: str) -> list[str]:
    return [sys.executable, "-m", "hpcvae.train", "--config", "configs/debug.toml", "--arch", "cvae2",
            "--flavour", "debug", "--data", str(shards), "--out", str(Path(args.out) / run_name(beta, lr)),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", "0", "--resume", "none",
            "--set", f"beta.value={beta}", "--set", f"scheduler.kind={lr}", "--set", "train.log_every=20",
            "--set", "checkpoint.every_steps=0", "--set", "train.sample_grid=false"]  # fmt: skip


def eval_argv(model: Path, shards: Path, out: Path, prior: str, n: int) -> list[str]:
    return [sys.executable, "-m", "hpcvae.evaluate", str(model), "--data", str(shards), "--out", str(out),
            "--n", str(n), "--prior", prior, "--seed", "0"]  # fmt: skip


def row_from_report(rep: dict[str, Any], model_json: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one table row: W1s, val loss, σ–z slopes (generated, real, truth)."""
    st = rep["population"]["stats"]
    tr = rep["redshift_trends"]["slopes_vs_z"]["sigma_arcsec"]
    resp = rep["redshift_trends"]["response_vs_log_truth"]["sigma_arcsec"]
    val = model_json["training"].get("val", {})
    row = {f"w1_{k}": st[k]["w1"] for k in W1_STATS}
    row |= {f"std_real_{k}": st[k]["std_real"] for k in W1_STATS}
    row |= {f"mean_gen_{k}": st[k]["mean_generated"] for k in W1_STATS}
    row |= {f"mean_real_{k}": st[k]["mean_real"] for k in W1_STATS}
    row |= {
        "prior": rep["population"]["prior"],
        "val_loss": val.get("loss"),
        "val_recon": val.get("recon"),
        "val_kl": val.get("kl"),
        "slope_gen": tr["generated"]["slope"],
        "slope_gen_se": tr["generated"]["slope_se"],
        "slope_real": tr["real"]["slope"],
        "slope_truth": tr["truth"]["slope"],
        "response_gen": resp["generated"]["slope"],
        "hsm_fail_gen": rep["population"]["hsm_failures"]["generated"],
        "n": rep["population"]["n_real"],
        "active_dims": rep["latent"]["active_dims"],
    }
    row["w1_score"] = score(row)
    return row


def score(row: dict[str, Any]) -> float:
    """Σ W1 / std(real) over σ, |g|, flux: scale-free, so no statistic dominates by its units."""
    parts = [row[f"w1_{k}"] / row[f"std_real_{k}"] for k in W1_STATS if row[f"w1_{k}"] is not None]
    return float(sum(parts)) if len(parts) == len(W1_STATS) else math.inf


# ----------------------------------------------------------------------------------------
# The flow-vs-normal evidence (in process, best model only)


def read_val(shards: Path) -> tuple[np.ndarray, np.ndarray, float]:
    from hpcvae.shards.manifest import Manifest, iter_samples

    imgs, zs, ps = [], [], set()
    for _, img, meta in iter_samples(Manifest.load(shards), "val"):
        imgs.append(img)
        zs.append(float(meta["zphot"]))
        ps.add(float(meta.get("pixel_scale") or 0.03))
    return np.stack(imgs), np.asarray(zs, dtype=np.float32), float(np.median(sorted(ps)))


def generate(model: Any, z: np.ndarray, prior: str, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, len(z), 256):
        r = torch.as_tensor(z[s : s + 256])
        out.append(model.sample(len(r), redshift=r, generator=g, prior=prior).float().numpy())  # flux units
    return np.concatenate(out)[:, 0]


"""N(0, I); the flow fitted to the encoder means (the spec's default); the flow fitted to draws from q(z|x)."""


def seed_repeats(
    models: dict[str, Any], real: dict[str, np.ndarray], z: np.ndarray, ps: float, seeds: int
) -> dict[str, Any]:
    """W1 (σ, |g|, flux) per prior over ``seeds`` generation seeds: mean, sd and the seeds each flow wins.

    One 385-galaxy draw gives a noisy W1; the spread over seeds says which differences are real.
    ``models`` maps a prior label to (model, prior argument of ``model.sample``).
    """
    from hpcvae.evaluate import compare, moments

    w1: dict[str, dict[str, list[float]]] = {p: {k: [] for k in W1_STATS} for p in models}
    for seed in range(seeds):
        for label, (model, prior) in models.items():
            st = moments(generate(model, z, prior, 1000 + seed), ps)
            for k in W1_STATS:
                w1[label][k].append(compare(real[k], st[k])["w1"])
    res: dict[str, Any] = {"seeds": seeds, "per_seed": w1, "summary": {}}
    n = {k: np.asarray(w1["normal"][k]) for k in W1_STATS}
    for label in models:
        res["summary"][label] = {}
        for k in W1_STATS:
            a = np.asarray(w1[label][k])
            res["summary"][label][k] = {"mean": a.mean(), "std": a.std(ddof=1) if len(a) > 1 else 0.0,
                                        "wins_vs_normal": int((a < n[k]).sum())}  # fmt: skip
    return res


@torch.no_grad()
def oracle_w1(
    model: Any, imgs: np.ndarray, z: np.ndarray, ps: float, real: dict[str, np.ndarray]
) -> dict[str, Any]:
    """W1 of the val galaxies decoded from their own latents: the floor any prior over that target can reach.

    ``means``: decode μ(x) (what a perfect flow over the means would give at best); ``posterior``: decode one
    draw z ~ q(z|x) (a perfect aggregate-posterior prior).  If these are far from 0, the decoder, not the
    prior, limits the statistic.
    """
    from hpcvae.evaluate import compare, moments

    x = model.transform.forward(torch.as_tensor(imgs)[:, None]).float()
    r = torch.as_tensor(z)
    mu, logvar = model.encode(x, r)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0))
    res: dict[str, Any] = {}
    for name, lat in (("means", mu), ("posterior", mu + torch.exp(0.5 * logvar) * eps)):
        st = moments(model.transform.inverse(model.decode(lat, r)).float().numpy(), ps)
        res[name] = {k: compare(real[k], st[k])["w1"] for k in W1_STATS}
        res[name]["mean_g"] = float(np.nanmean(st["g"]))
    res["real_mean_g"] = float(np.nanmean(real["g"]))
    return res


@torch.no_grad()
def latent_evidence(model: Any, imgs: np.ndarray, z: np.ndarray) -> dict[str, Any]:
    """Per-dim moments of the val encoder means and posterior variances: how far q(z) is from N(0, I)."""
    x = model.transform.forward(torch.as_tensor(imgs)[:, None])
    mu, logvar = model.encode(x.float(), torch.as_tensor(z))
    var_mu = mu.var(0)
    post_var = logvar.exp().mean(0)
    corr = torch.corrcoef(mu.T)
    off = corr[~torch.eye(corr.shape[0], dtype=torch.bool)].abs()
    zc = torch.as_tensor(z) - float(np.mean(z))
    corr_z = (mu - mu.mean(0)).mul(zc[:, None]).mean(0) / (mu.std(0) * zc.std() + 1e-12)
    return {"mu_mean": mu.mean(0).tolist(), "mu_var": var_mu.tolist(), "posterior_var_mean": post_var.tolist(),
            "aggregate_var": (var_mu + post_var).tolist(), "max_abs_offdiag_corr": float(off.max()),
            "corr_with_zphot": corr_z.tolist()}  # fmt: skip


# ----------------------------------------------------------------------------------------
# Figures


def fig_samples(rows: dict[str, np.ndarray], z: np.ndarray, path: Path) -> None:
    """One row per source (real first), one column per val galaxy; each column on the real galaxy's stretch."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpcvae.evaluate.plots import CMAP, _stretch, mosaic

    real = rows["real (val)"]
    ncol = real.shape[0]
    vmax = [float(np.percentile(real[i], 99.5)) for i in range(ncol)]
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.05 * ncol, 1.3 * len(rows)))
    for ax, (label, imgs) in zip(axes, rows.items()):
        tiles = np.stack([_stretch(imgs[i], vmax[i]) for i in range(ncol)])[None]
        ax.imshow(mosaic(tiles), cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, fontsize=8)
    axes[0].set_title(
        "each column: one val galaxy's zphot (" + ", ".join(f"{v:.2f}" for v in z) + ")", fontsize=7
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_population(
    stats: dict[str, dict[str, np.ndarray]], w1: dict[str, dict[str, float]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"sigma_arcsec": "size σ [arcsec]", "g": "|g|", "flux": "flux (HSM amplitude)"}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, k in zip(axes, W1_STATS):
        vals = [v[k][np.isfinite(v[k])] for v in stats.values()]
        lo, hi = np.percentile(np.concatenate(vals), [0.5, 99.5])
        bins = np.linspace(lo, hi, 40)
        for (name, v), style in zip(stats.items(), ("-", "--", "-", ":")):
            a = v[k][np.isfinite(v[k])]
            lab = name if name == "real" else f"{name} (W1 {w1[name][k]:.3g})"
            ax.hist(a, bins=bins, histtype="step", density=True, lw=1.6, ls=style, label=lab)
        ax.set_xlabel(labels[k])
        ax.legend(fontsize=7)
    fig.suptitle("held-out split: real vs generated at the real zphot (best sweep model)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="shards/synth-sweep", help="shard set (made if missing)")
    p.add_argument("--raw", default="data/synth-sweep", help="where synth writes, if the shards are made")
    p.add_argument("--n", type=int, default=4000, help="synthetic galaxies, if the shards are made")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", default="runs/sweep", help="run folders, reports and logs")
    p.add_argument("--docs", default="docs", help="where sweep.md/json/png go")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--jobs", type=int, default=2, help="processes at a time")
    p.add_argument("--prior-epochs", type=int, default=60)
    p.add_argument("--seeds", type=int, default=5, help="generation seeds for the flow-vs-normal repeat")
    p.add_argument("--reuse", action="store_true",
                   help="keep VAE runs and their reports already in --out (for re-running the analysis only)")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    t_start = time.perf_counter()
    env = environment(torch.device("cpu"))
    out, docs = Path(args.out), Path(args.docs)
    py = sys.executable
    stages: dict[str, float] = {}

    grid = [(b, lr) for b in BETAS for lr in LR_SCHEDULES]
    # A fresh sweep removes this script's own outputs of an earlier one (stale checkpoints, reports).
    if not args.reuse:
        own = [
            out / f"{run_name(b, lr)}{sfx}" for b, lr in grid for sfx in ("", "-flow-mean", "-flow-posterior")
        ]
        for path in [out / "reports", out / "logs", *own]:
            if path.is_dir():
                shutil.rmtree(path)

    t0 = time.perf_counter()
    shards = make_data(args)
    stages["data"] = time.perf_counter() - t0

    print(f"train: {len(BETAS) * len(LR_SCHEDULES)} runs, {args.epochs} epochs each, {args.jobs} at a time")
    t0 = time.perf_counter()

    def keep(path: Path) -> bool:
        return args.reuse and path.is_file()

    train_times = run_jobs([(run_name(b, lr), train_argv(args, shards, b, lr), out / "logs" / f"{run_name(b, lr)}.log")
                            for b, lr in grid if not keep(out / run_name(b, lr) / "model.json")], args.jobs)  # fmt: skip
    stages["train"] = time.perf_counter() - t0

    from hpcvae.shards.manifest import Manifest

    n_val = Manifest.load(shards).count("val")
    t0 = time.perf_counter()
    run_jobs([(f"eval {run_name(b, lr)}", eval_argv(out / run_name(b, lr), shards, out / "reports" / run_name(b, lr),
                                                     "normal", n_val), out / "logs" / f"eval-{run_name(b, lr)}.log")
              for b, lr in grid if not keep(out / "reports" / run_name(b, lr) / "report.json")], args.jobs)  # fmt: skip
    stages["evaluate"] = time.perf_counter() - t0

    rows = []
    for b, lr in grid:
        name = run_name(b, lr)
        rep = json.loads((out / "reports" / name / "report.json").read_text())
        mj = json.loads((out / name / "model.json").read_text())
        rows.append({"run": name, "beta": b, "lr": lr, "wall_s": train_times.get(name),
                     "train_s": mj["training"].get("train_time_s"), **row_from_report(rep, mj)})  # fmt: skip
    best = min(rows, key=lambda r: r["val_recon"])
    print(f"best (lowest val reconstruction loss): {best['run']} ({best['val_recon']:.4g})")

    # -- flow priors for every run: fitted to the means, and to draws from q(z|x) ----------------
    t0 = time.perf_counter()

    def flow_dir(name: str, target: str) -> Path:
        return out / f"{name}-flow-{target}"

    run_jobs([(f"train_prior {run_name(b, lr)} {t}",
               [py, "-m", "hpcvae.train_prior", str(out / run_name(b, lr)), "--data", str(shards),
                "--out", str(flow_dir(run_name(b, lr), t)), "--epochs", str(args.prior_epochs), "--latents", t,
                "--resume", "none"], out / "logs" / f"prior-{run_name(b, lr)}-{t}.log")
              for b, lr in grid for t in ("mean", "posterior")], args.jobs)  # fmt: skip
    stages["train_prior"] = time.perf_counter() - t0

    # -- the official report for the best run with each flow (its N(0, I) row is above) ---------
    t0 = time.perf_counter()
    run_jobs([(f"eval {best['run']} flow-{t}", eval_argv(flow_dir(best["run"], t), shards,
                                                          out / "reports" / f"{best['run']}-flow-{t}", "flow", n_val),
               out / "logs" / f"eval-best-flow-{t}.log") for t in ("mean", "posterior")], args.jobs)  # fmt: skip
    stages["evaluate_best"] = time.perf_counter() - t0
    prior_rows = [{**best, "run": f"{best['run']}", "prior": "normal"}]
    for t in ("mean", "posterior"):
        rep = json.loads((out / "reports" / f"{best['run']}-flow-{t}" / "report.json").read_text())
        mj = json.loads((flow_dir(best["run"], t) / "model.json").read_text())
        prior_rows.append({"run": best["run"], "beta": best["beta"], "lr": best["lr"],
                           **row_from_report(rep, mj), "prior": f"flow-{t}"})  # fmt: skip

    # -- every run: W1 over seeds per prior, latent moments, flow NLLs -------------------------
    t0 = time.perf_counter()
    from hpcvae import load_model
    from hpcvae.evaluate import compare, moments

    imgs, zval, ps = read_val(shards)
    real = moments(imgs, ps)
    per_run = []
    for b, lr in grid:
        name = run_name(b, lr)
        fm, fp = load_model(flow_dir(name, "mean")), load_model(flow_dir(name, "posterior"))
        models = {"normal": (fm, "normal"), "flow-mean": (fm, "flow"), "flow-posterior": (fp, "flow")}
        rep = seed_repeats(models, real, zval, ps, args.seeds)
        ev = latent_evidence(fm, imgs, zval)
        oracle = oracle_w1(fm, imgs, zval, ps, real)
        nll = {t: fm_json["flow_prior"]["evaluation"] for t, fm_json in
               (("mean", json.loads((flow_dir(name, "mean") / "model.json").read_text())),
                ("posterior", json.loads((flow_dir(name, "posterior") / "model.json").read_text())))}  # fmt: skip
        per_run.append({"run": name, "beta": b, "lr": lr, "w1_seeds": rep, "latent_evidence_val": ev,
                        "oracle_w1": oracle, "flow_eval": nll})  # fmt: skip
        print(f"  {name}: " + ", ".join(f"{lab} W1σ {rep['summary'][lab]['sigma_arcsec']['mean']:.4g}"
                                         for lab in PRIORS), flush=True)  # fmt: skip
    stages["seed_repeats"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    docs.mkdir(parents=True, exist_ok=True)
    fm, fp = load_model(flow_dir(best["run"], "mean")), load_model(flow_dir(best["run"], "posterior"))
    show = np.argsort(zval)[np.linspace(0, len(zval) - 1, 12).astype(int)]  # 12 galaxies across the z range
    fig_samples({"real (val)": imgs[show], "N(0, I)": generate(fm, zval[show], "normal", 0),
                 "flow (means)": generate(fm, zval[show], "flow", 0),
                 "flow (q(z|x))": generate(fp, zval[show], "flow", 0)}, zval[show], docs / "sweep_samples.png")  # fmt: skip
    pop = {"real": real, "N(0, I)": moments(generate(fm, zval, "normal", 0), ps),
           "flow (means)": moments(generate(fm, zval, "flow", 0), ps),
           "flow (q(z|x))": moments(generate(fp, zval, "flow", 0), ps)}  # fmt: skip
    w1 = {name: {k: compare(real[k], pop[name][k])["w1"] for k in W1_STATS} for name in pop if name != "real"}
    fig_population(pop, w1, docs / "sweep_population.png")
    stages["figures"] = time.perf_counter() - t0
    stages["total"] = time.perf_counter() - t_start
    env["loadavg_end"] = loadavg()

    fpj = json.loads((flow_dir(best["run"], "mean") / "model.json").read_text())["flow_prior"]
    payload = {"config": vars(args), "data": {"path": str(shards), "n_val": n_val, "pixel_scale": ps},
               "environment": env, "stages_s": stages, "rows": rows, "best": best["run"],
               "best_rule": "lowest val reconstruction loss (the recon term: comparable across β, independent of the prior)",
               "prior_rows": prior_rows, "per_run": per_run,
               "flow_prior": {k: fpj[k] for k in ("spec", "library", "library_version", "training")}}  # fmt: skip
    (docs / "sweep.json").write_text(json.dumps(finite_or_none(payload), indent=1, default=float) + "\n")
    (docs / "sweep.md").write_text(render(payload))
    print(f"sweep: wrote {docs / 'sweep.md'}, sweep.json and 2 PNGs in {stages['total']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
