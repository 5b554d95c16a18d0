"""hpcvae.evaluate: HSM moments, the full report on tiny trained models, and its errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcvae.evaluate import EvalConfig, compare, evaluate, fit_slope, main, moments

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
EXPECTED_PNGS = {"losses.png", "reconstructions.png", "latent_corner.png", "population.png"}


def _train(shards: Path, out: Path, arch: str) -> Path:
    from hpcvae.train import main as train_main

    rc = train_main([
        "--arch", arch, "--flavour", "debug", "--data", str(shards), "--out", str(out), "--epochs", "2",
        "--batch-size", "16", "--seed", "0",
        "--set", "data.num_workers=0", "--set", "data.persistent_workers=false", "--set", "train.log_every=1",
    ])  # fmt: skip
    assert rc == 0
    assert (out / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    return out


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory) -> Path:
    """A synthetic shard set (known zphot -> size/flux relation), 32 px, ~50 val galaxies."""
    from hpcvae.shards.__main__ import main as shard_main
    from hpcvae.synth import make_synthetic

    root = tmp_path_factory.mktemp("evaldata")
    cat = make_synthetic(120, SIZE, root / "synth", seed=1, workers=1, progress=False)
    assert "synth" in cat.name
    rc = shard_main(["--catalog", str(cat), "--out", str(root / "shards"), "--size", str(SIZE),
                     "--val-fraction", "0.4"])  # fmt: skip
    assert rc in (0, None)
    return root / "shards"


@pytest.fixture(scope="module")
def cvae2_run(synth_shards, tmp_path_factory) -> Path:
    return _train(synth_shards, tmp_path_factory.mktemp("runs") / "cvae2", "cvae2")


@pytest.fixture(scope="module")
def vae_run(synth_shards, tmp_path_factory) -> Path:
    return _train(synth_shards, tmp_path_factory.mktemp("runs") / "vae158", "vae158")


def _numbers(obj, path=""):
    """Every (json-path, value) leaf of a report."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    else:
        yield path, obj


# -- HSM moments ----------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.12, 0.25])
def test_hsm_recovers_gaussian_sigma_and_shape(sigma):
    import galsim

    flux, g1, g2 = 2.5, 0.15, -0.1
    gal = galsim.Gaussian(sigma=sigma, flux=flux).shear(g1=g1, g2=g2)
    img = gal.drawImage(nx=96, ny=96, scale=0.03, method="no_pixel").array
    res = moments(img, pixel_scale=0.03)
    assert res["ok"].tolist() == [True]
    # A shear keeps the area, so det(M)^(1/4) is the round sigma.
    assert res["sigma_arcsec"][0] == pytest.approx(sigma, rel=0.01)
    assert res["e1"][0] == pytest.approx(g1, abs=0.005)
    assert res["e2"][0] == pytest.approx(g2, abs=0.005)
    assert res["g"][0] == pytest.approx(math.hypot(g1, g2), abs=0.005)
    assert res["flux"][0] == pytest.approx(flux, rel=0.01)


def test_hsm_failures_are_kept_and_counted():
    import galsim

    good = galsim.Gaussian(sigma=0.2).drawImage(nx=48, ny=48, scale=0.03, method="no_pixel").array
    bad = np.zeros_like(good)
    nan = good.copy()
    nan[3, 3] = np.nan
    res = moments(np.stack([good, bad, nan])[:, None], pixel_scale=0.03)  # (N, 1, H, W) like a batch
    assert res["ok"].tolist() == [True, False, False]
    assert np.isnan(res["sigma_arcsec"][1:]).all()
    assert len(res["errors"]) == 2 and res["errors"][1].startswith("2:")


def test_compare_and_slope_follow_their_definitions():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 500)
    b = a + 0.3  # a pure shift: W1 equals the shift
    c = compare(a, np.concatenate([b, [np.nan]]))
    assert c["w1"] == pytest.approx(0.3)
    assert c["mean_diff"] == pytest.approx(0.3)
    assert c["n_generated"] == 500
    assert c["mean_diff_se"] == pytest.approx(math.sqrt(2 * a.var(ddof=1) / 500))
    x = np.linspace(0, 3, 50)
    s = fit_slope(x, 0.7 - 0.25 * x + rng.normal(0, 0.01, 50))
    assert s["slope"] == pytest.approx(-0.25, abs=3 * s["slope_se"] + 1e-3)
    assert compare([], [1.0])["w1"] is None


# -- the report -----------------------------------------------------------------------------


@pytest.mark.slow
def test_report_for_conditional_run_folder(cvae2_run, synth_shards, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(
        [
            str(cvae2_run),
            "--data",
            str(synth_shards),
            "--n",
            "64",
            "--out",
            str(out),
            "--seed",
            "3",
            "--morph-n",
            "16",
            "--n-boot",
            "100",
            "--batch-size",
            "16",
        ]
    )  # fmt: skip  (several batches)
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    pngs = {p.name for p in out.glob("*.png")}
    grids = {p for p in pngs if p.startswith("generations_z")}  # the 10th, 50th and 90th training percentile
    assert len(grids) == 3 and len(rep["generation"]["grids"]) == 3
    science = {"morphology.png", "power_spectra.png", "conditional_response.png"}
    assert EXPECTED_PNGS | science | {"redshift_sweep.png", "redshift_trends.png"} <= pngs
    assert set(rep["figures"].values()) == pngs
    md = (out / "report.md").read_text()
    for name in pngs:
        assert f"]({name})" in md

    n_val = rep["data"]["n_used"]
    assert n_val == min(
        64, json.loads((synth_shards / "manifest.json").read_text())["splits"]["val"]["count"]
    )
    assert rep["data"]["synthetic"] is True and rep["data"]["pixel_scale_arcsec"] == pytest.approx(0.03)
    # Every number is finite (JSON has no NaN); undefined ones are null only where HSM had no data.
    for where, v in _numbers(rep):
        if isinstance(v, float):
            assert math.isfinite(v), where
    pop = rep["population"]
    assert pop["n_real"] == pop["n_generated"] == n_val
    assert pop["hsm_failures"]["real"] < n_val and pop["hsm_failures"]["generated"] < n_val
    for stat, c in pop["stats"].items():
        assert c["w1"] is not None and c["w1"] >= 0, stat
        assert c["mean_diff_se"] is not None, stat
    assert pop["reference_lanusse2021"]["real"]["mean_g"] == 0.248
    assert "0.248" in md and "0.189" in md
    assert rep["reconstruction"]["mse_per_pixel_mean"] >= 0
    recon = rep["reconstruction"]
    for stat in ("sigma_arcsec", "g"):
        assert recon["hsm"][stat]["w1"] >= 0 and math.isfinite(recon["hsm"][stat]["mean_real"]), stat
    assert -1 <= recon["orientation_cos2dphi"] <= 1 and recon["orientation"]["n"] > 0
    bg = rep["background"]
    assert bg["difference"] == pytest.approx(bg["generated_median"] - bg["real_median"])
    assert bg["difference_in_noise_sigma"] is not None
    for key in ("shape", "size", "orientation", "background", "size_redshift_slope"):
        assert rep["verdict"][key]["verdict"] in ("ok", "close", "off"), key
        assert rep["verdict"][key]["line"], key
    assert "## Verdict" in md and rep["verdict"]["shape"]["line"] in md
    assert rep["losses"]["final"]["train"]["step"] > 0
    for key in ("sigma_arcsec", "flux"):
        for who in ("truth", "real", "generated"):
            assert rep["redshift_trends"]["slopes_vs_z"][key][who]["slope"] is not None
    # The true relation: sizes and fluxes of synthetic galaxies fall with redshift.
    assert rep["redshift_trends"]["slopes_vs_z"]["sigma_arcsec"]["truth"]["slope"] < 0
    assert rep["redshift_trends"]["slopes_vs_z"]["flux"]["truth"]["slope"] < 0
    assert len(rep["redshift_sweep"]["mean_pixel_sum_flux_per_column"]) == len(
        rep["redshift_sweep"]["redshifts"]
    )
    # issue 20: every mean, W1 and slope carries a 95% interval; failures are counted, never NaN
    for section in (pop["stats"], rep["morphology"]["stats"], {"flux": rep["flux"]["flux"]}):
        for name, c in section.items():
            for key in ("mean_real", "mean_generated", "mean_diff", "w1"):
                assert c[f"{key}_ci"] is None or c[f"{key}_ci"][0] <= c[key] <= c[f"{key}_ci"][1], (name, key)
            if (
                min(c["n_real"], c["n_generated"]) >= 10
            ):  # else failures are counted, and no interval is made up
                assert c["mean_diff_ci"] is not None and c["w1_ci"] is not None, name
    mo = rep["morphology"]
    assert set(mo["stats"]) == {"gini", "m20", "concentration", "asymmetry", "smoothness"}
    assert 0 <= mo["failures"]["real"]["failure_rate"] <= 1 and mo["seconds"] > 0
    ps = rep["power_spectra"]
    assert set(ps["ratios"]["residual_over_noise"]) == {"low", "mid", "high"} and ps["noise"]["n"] > 0
    assert rep["reconstruction"]["reduced_chi2"]["median"] > 0
    art = rep["artefacts"]
    assert art["reference_is"].startswith("real galaxies without noise") and art["streak_ratio"] > 0
    # the synthetic truth is known, so the decoder's lopsidedness is measured
    lop = art["asymmetry_noise_free"]
    assert lop["n"] == min(rep["morphology"]["n_real"], rep["data"]["n_used"]) and lop["real_mean"] >= 0
    lo, hi = lop["reconstructed_minus_real_ci"]
    assert lo <= lop["reconstructed_minus_real"] <= hi
    resp = rep["conditional_response"]["conditions"]["zphot"]
    assert resp["real"]["dlog10_sigma"] < 0 and resp["generated"]["dlog10_sigma"] is not None
    assert rep["flux"]["zeropoint"] is not None and "magnitude" in rep["flux"]
    sl = rep["redshift_trends"]["slopes_vs_z"]["sigma_arcsec"]
    assert sl["real"]["slope_ci"] and sl["generated"]["slope_ci"] and sl["truth"]["slope"] < 0
    for key in ("flux", "residual_power", "artefacts", "conditioning", "morphology", "reconstruction_sizes"):
        v = rep["verdict"][key]["verdict"]
        unmeasured = key == "morphology" and all(c["w1"] is None for c in mo["stats"].values())
        assert v in ("ok", "close", "off") or (v == "n/a" and unmeasured), key  # a 2-step model's blobs
    for section in (
        "Morphology (statmorph)",
        "Power spectra",
        "Artefacts",
        "Conditional response",
        "Flux and magnitude",
    ):
        assert f"## {section}" in md
    assert "Lopsidedness without noise" in md


@pytest.mark.slow
def test_unconditional_bare_model_skips_redshift_parts(vae_run, synth_shards, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "model.json"):
        shutil.copy(vae_run / name, bare / name)
    out = tmp_path / "report"
    cfg = EvalConfig(n=40, seed=0, morph_n=8, n_boot=50)  # statmorph is ~0.4 s a stamp; not what this tests
    rep = evaluate(bare / "model.safetensors", synth_shards, out, config=cfg)
    pngs = {p.name for p in out.glob("*.png")}
    assert {"generations.png", "reconstructions.png", "latent_corner.png", "population.png"} <= pngs
    assert not pngs & {"redshift_sweep.png", "redshift_trends.png", "losses.png"}
    assert "unconditional" in rep["redshift_sweep"]["skipped"]
    assert "redshift" in rep["redshift_trends"]["skipped"]
    assert "metrics.jsonl" in rep["losses"]["skipped"]
    md = (out / "report.md").read_text()
    assert md.count("Skipped:") == 4  # losses, sweep, trends, conditional response
    assert rep["population"]["generated_redshifts"] is None
    assert rep["population"]["n_generated"] == 40


@pytest.mark.slow
def test_fancy_cvae_in_memory_model_reports_predicted_redshift(synth_shards, tmp_path):
    """A model object (no file): uses its attached normalisation; fancy_cvae adds z_pred numbers."""
    import torch

    from hpcvae.models import build_model
    from hpcvae.shards.manifest import Manifest
    from hpcvae.transforms import get_transform

    torch.manual_seed(0)
    m = build_model("fancy_cvae", flavour="debug", image_size=SIZE)
    m.set_normalisation(get_transform("minmax", Manifest.load(synth_shards).stats("train")))
    cfg = EvalConfig(
        n=24, grid_redshifts=(0.5,), sweep_redshifts=(0.3, 1.0, 2.0), sweep_rows=2, morph_n=4, n_boot=50
    )
    rep = evaluate(m, synth_shards, tmp_path / "r", config=cfg)
    p = rep["reconstruction"]["redshift_prediction"]
    assert p["rmse"] >= 0 and p["bias"] is not None
    assert rep["model"]["path"] is None and rep["model"]["predicts_redshift"] is True
    assert (tmp_path / "r" / "generations_z0.5.png").is_file()
    assert "Predicted redshift" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.slow
def test_image_size_mismatch_is_a_one_line_cli_error(synth_shards, tmp_path):
    from hpcvae.model_files import ModelInfo, write_model
    from hpcvae.models import build_model

    m = build_model("cvae2", flavour="debug", image_size=48)
    write_model(tmp_path / "m48", m.state_dict(), ModelInfo(model_config=m.config))
    env = {k: v for k, v in os.environ.items() if k != "HPCVAE_TRACEBACK"}
    proc = subprocess.run(
        [sys.executable, "-m", "hpcvae.evaluate", str(tmp_path / "m48"), "--data", str(synth_shards),
         "--n", "8", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("hpcvae.evaluate: error:")
    assert "48x48" in err and f"{SIZE}x{SIZE}" in err and "manifest.json" in err
    assert not (tmp_path / "r").exists()


def test_missing_shard_set_is_a_shard_error(tmp_path):
    from hpcvae.errors import ShardError
    from hpcvae.models import build_model

    with pytest.raises(ShardError, match="does not exist"):
        evaluate(
            build_model("vae158", flavour="debug", image_size=SIZE), tmp_path / "nope", tmp_path / "r", n=8
        )


def test_real_style_data_skips_truth_trends_and_survives_hsm_failures(tmp_path):
    """Non-synthetic shards (truth unknown) of pure noise: HSM fails often; the report says so, no NaN."""
    import torch
    from helpers_shards import write_shard_set

    from hpcvae.models import build_model
    from hpcvae.transforms import MinMax

    write_shard_set(tmp_path / "s", train_counts=[8], val_counts=[7, 5], size=16)
    torch.manual_seed(0)
    m = build_model("cvae2", flavour="debug", image_size=16)
    m.set_normalisation(MinMax(lo=-0.03, hi=0.03))
    cfg = EvalConfig(n=64, grid_size=2, grid_redshifts=(1.0,), sweep_redshifts=(0.5, 2.0), sweep_rows=1)
    rep = evaluate(m, tmp_path / "s", tmp_path / "r", config=cfg)
    assert rep["data"]["n_used"] == 12 and rep["data"]["synthetic"] is False
    trends = rep["redshift_trends"]["slopes_vs_z"]  # slopes on any data with redshifts; no truth line here
    assert "truth" not in trends["sigma_arcsec"] and set(trends["sigma_arcsec"]) == {"real", "generated"}
    assert any("fewer than the 64" in n for n in rep["notes"])
    fails = rep["population"]["hsm_failures"]
    assert 0 <= fails["real"] <= 12 and 0 <= fails["generated"] <= 12
    text = (tmp_path / "r" / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert "## Size and flux against redshift" in (tmp_path / "r" / "report.md").read_text()


def _sheared_galaxies(angles_deg: list[float], g: float = 0.3, size: int = 48) -> np.ndarray:
    import galsim

    out = []
    for a in angles_deg:
        gal = galsim.Gaussian(sigma=0.12).shear(g=g, beta=a * galsim.degrees)
        out.append(gal.drawImage(nx=size, ny=size, scale=0.03).array)
    return np.stack(out)


def test_orientation_agreement_is_one_when_kept_and_minus_one_when_turned():
    """HSM on real GalSim ellipses: cos 2 dphi is 1 for the same angles, -1 for a 90 degree turn."""
    from hpcvae.evaluate.moments import orientation_agreement

    angles = [0.0, 30.0, 75.0, 120.0, 160.0]
    real = moments(_sheared_galaxies(angles))
    same = orientation_agreement(real, moments(_sheared_galaxies(angles)))
    turned = orientation_agreement(real, moments(_sheared_galaxies([a + 90 for a in angles])))
    assert same["n"] == len(angles) and same["mean"] == pytest.approx(1.0, abs=1e-3)
    assert turned["mean"] == pytest.approx(-1.0, abs=1e-3)
    # round galaxies carry no angle and are left out
    assert orientation_agreement(real, moments(_sheared_galaxies(angles, g=0.0)))["n"] == len(angles)
    assert orientation_agreement(moments(_sheared_galaxies(angles, g=0.0)), real)["n"] == 0


def _report(g_d=0.01, s_d=-0.02, s_ci=None, recon_bins=None, resp=None):
    def c(mr, d, ci=None, rel=False):
        base = {"mean_real": mr, "mean_generated": mr + d, "mean_diff": d, "mean_diff_ci": ci,
                "mean_rel_diff": d / mr, "mean_rel_diff_ci": [x / mr for x in ci] if ci else None}  # fmt: skip
        return base

    return {
        "population": {"stats": {"g": c(0.24, g_d), "sigma_arcsec": c(0.19, s_d, s_ci)}},
        "reconstruction": {"orientation_cos2dphi": 0.93, "size_bins": recon_bins or []},
        "background": {"difference": 0.001, "difference_in_noise_sigma": 2.0},
        "redshift_trends": {"slopes_vs_z": {"sigma_arcsec": {"real": {"slope": -0.2, "slope_se": 0.02},
                                                             "generated": {"slope": -0.17}, "truth": {"slope": -0.3}}}},
        "conditional_response": {"conditions": {"zphot": resp}} if resp else {},
    }  # fmt: skip


def test_verdict_judges_intervals_not_points():
    from hpcvae.evaluate.verdict import TOLERANCE, judge

    assert judge(0.01, [0.005, 0.015], "g") == "ok"  # inside the ok band
    assert judge(0.03, [-0.01, 0.045], "g") == "ok"  # holds 0 and stays within the close band
    assert judge(0.03, [0.025, 0.035], "g") == "close"  # clearly non-zero but within close
    assert judge(0.08, [0.06, 0.1], "g") == "off"  # wholly outside close
    assert judge(0.01, None, "g") == "ok" and judge(None, None, "g") == "n/a"
    assert TOLERANCE["g"] == (0.02, 0.05)


def test_verdict_names_the_cause_and_never_repeats_advice():
    from hpcvae.evaluate.verdict import verdict

    facts = {"has_flow": False, "prior": "normal", "likelihood": "mse"}
    v = verdict(_report(), facts)
    assert v["shape"]["verdict"] == "ok" and "galaxy2galaxy 0.258 vs 0.248" in v["shape"]["line"]
    assert v["size"]["verdict"] == "close" and v["size"]["relative_delta"] == pytest.approx(-0.02 / 0.19)
    assert v["size"]["cause"] == "prior" and "fit the flow prior" in v["size"]["hint"]
    fitted = verdict(_report(), {**facts, "has_flow": True, "prior": "flow", "flow_latents": "mean"})["size"]
    assert (
        fitted["cause"] == "prior"
        and "fit the flow prior (" not in fitted["hint"]
        and "--latents posterior" in fitted["hint"]
    )
    bins = [{"sigma_range_arcsec": [0.0, 0.15], "n": 40, "sigma_rel_diff": 0.18, "sigma_rel_diff_ci": [0.16, 0.21]},
            {"sigma_range_arcsec": [0.15, 0.25], "n": 40, "sigma_rel_diff": 0.01, "sigma_rel_diff_ci": [-0.02, 0.03]}]  # fmt: skip
    d = verdict(_report(recon_bins=bins), facts)
    assert d["size"]["cause"] == "decoder" and '0.0-0.15": +18.0%' in d["size"]["hint"]
    cal = verdict(_report(recon_bins=bins), {**facts, "likelihood": "calibrated"})["size"]["hint"]
    assert "'calibrated_noise' (bright cores" in cal
    assert d["reconstruction_sizes"]["verdict"] == "off"
    deaf = {
        "grid": [0.3, 1.5],
        "ratio_sigma": 0.05,
        "generated": {"dlog10_sigma": -0.01},
        "real": {"dlog10_sigma": -0.2},
    }
    c = verdict(_report(resp=deaf), facts)
    assert c["size"]["cause"] == "conditioning" and c["conditioning"]["verdict"] == "off"
    assert c["orientation"]["verdict"] == "close" and c["background"]["verdict"] == "off"
    assert c["size_redshift_slope"]["verdict"] == "ok"
    # statmorph failed on every stamp: no "ok" for a morphology that was not measured
    failed = {"stats": {"gini": {"n_real": 3, "n_generated": 0, "w1": None}}}
    m = verdict({**_report(), "morphology": failed}, facts)["morphology"]
    assert m["verdict"] == "n/a" and "measured no statistic" in m["line"]


@pytest.mark.slow
def test_conditional_response_detects_a_decoder_that_ignores_its_condition(cvae2_run, synth_shards, tmp_path):
    """A decoder that follows its redshift exactly (a Gaussian whose size goes as 1/(1+z)) against the same
    decoder with its redshift input zeroed: the section measures the known response, and zero."""
    import torch

    from hpcvae import load_model

    cfg = EvalConfig(n=48, morph_n=8, n_boot=20, response_latents=8)
    yy, xx = torch.meshgrid(
        torch.arange(SIZE) - SIZE / 2 + 0.5, torch.arange(SIZE) - SIZE / 2 + 0.5, indexing="ij"
    )

    def analytic(z: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, None]:
        sig = (4.0 * 1.8 / (1 + r.float()) * torch.exp(0.05 * z[:, 0].float()))[:, None, None, None]
        img = 0.02 + 0.9 * torch.exp(-(xx**2 + yy**2) / (2 * sig**2))
        return torch.logit(img.clamp(1e-4, 1 - 1e-4)), None

    used, deaf = load_model(cvae2_run), load_model(cvae2_run)
    used._decode = analytic
    deaf._decode = lambda z, r: analytic(z, torch.zeros_like(r))  # the condition never reaches the decoder
    a = evaluate(used, synth_shards, tmp_path / "used", config=cfg)
    b = evaluate(deaf, synth_shards, tmp_path / "deaf", config=cfg)
    ra, rb = (x["conditional_response"]["conditions"]["zphot"] for x in (a, b))
    lo, hi = ra["grid"][0], ra["grid"][-1]
    assert ra["generated"]["dlog10_sigma"] == pytest.approx(np.log10((1 + lo) / (1 + hi)), abs=0.03)
    assert rb["generated"]["dlog10_sigma"] == pytest.approx(
        0.0, abs=1e-9
    )  # identical images across the range
    assert rb["ratio_sigma"] == pytest.approx(0.0, abs=1e-6) and ra["ratio_sigma"] > 0.5
    assert (
        a["verdict"]["conditioning"]["verdict"] in ("ok", "close")
        and b["verdict"]["conditioning"]["verdict"] == "off"
    )


@pytest.mark.slow
def test_the_response_through_a_conditional_flow_is_what_generation_does(cvae2_run, synth_shards, tmp_path):
    """A decoder blind to its redshift input whose latent carries the redshift (as an encoder's does), with a
    conditional flow prior that learnt it: latents held fixed do not follow the redshift, generation does."""
    import torch

    from hpcvae import load_model
    from hpcvae.prior import FlowSpec, build_flow

    cfg = EvalConfig(n=48, morph_n=8, n_boot=20, response_latents=8)
    yy, xx = torch.meshgrid(
        torch.arange(SIZE) - SIZE / 2 + 0.5, torch.arange(SIZE) - SIZE / 2 + 0.5, indexing="ij"
    )

    def blind(z: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, None]:
        sig = (4.0 * 1.8 * torch.exp(0.5 * z[:, 0].float()))[:, None, None, None]  # z0 = -2 ln(1+z): 1/(1+z)
        img = 0.02 + 0.9 * torch.exp(-(xx**2 + yy**2) / (2 * sig**2))
        return torch.logit(img.clamp(1e-4, 1 - 1e-4)), None

    m = load_model(cvae2_run)
    m._decode = blind
    g = torch.Generator().manual_seed(0)
    r = 0.2 + 2.3 * torch.rand(2048, generator=g)
    lat = torch.randn(2048, m.z_dim, generator=g)
    lat[:, 0] = -2 * torch.log1p(r) + 0.05 * lat[:, 0]
    torch.manual_seed(0)
    flow = build_flow(FlowSpec(z_dim=m.z_dim, conditional=True, transforms=2, hidden_features=(32, 32)))
    flow.set_standardisation(lat.mean(0), lat.std(0), r.mean(), r.std())
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(300):
        loss = flow(lat, r)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.flow_prior = flow.eval()
    rep = evaluate(m, synth_shards, tmp_path / "blind", config=cfg)
    c = rep["conditional_response"]["conditions"]["zphot"]
    lo, hi = c["grid"][0], c["grid"][-1]
    assert c["generated"]["dlog10_sigma"] == pytest.approx(0.0, abs=1e-9)  # the held latent ignores z
    via = c["through_prior"]
    assert via["generated"]["dlog10_sigma"] == pytest.approx(np.log10((1 + lo) / (1 + hi)), abs=0.05)
    assert via["ratio_sigma"] > 0.5 and rep["verdict"]["conditioning"]["ratio"] == via["ratio_sigma"]
    assert "through the flow prior" in rep["verdict"]["conditioning"]["line"]
    sweep = m.interpolate([lo, hi], generator=torch.Generator().manual_seed(1), normalized=True)
    sizes = (sweep > 0.5).float().sum(dim=(1, 2, 3))  # one galaxy, smaller at the higher redshift
    assert sizes[1] < 0.7 * sizes[0]
