"""Survey-scale use: catalog conditions at shard time, sample(catalog), generate --catalog, the GalSim input type."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helpers import cli

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
CONDITIONS = "zphot,mag_auto,flux_radius"

pytestmark = pytest.mark.slow


def _one_line_error(p: subprocess.CompletedProcess, prog: str) -> str:
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stdout[-500:], err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: ")
    return err


@pytest.fixture(scope="module")
def cosmos_cat(tmp_path_factory) -> Path:
    from hpcvae.synth import make_synthetic

    root = tmp_path_factory.mktemp("survey")
    return make_synthetic(160, SIZE, root / "synth", seed=2, workers=1, progress=False, family="cosmos")


@pytest.fixture(scope="module")
def shards(cosmos_cat: Path) -> Path:
    from hpcvae.shards import build_shards

    out = cosmos_cat.parent.parent / "shards"
    build_shards(cosmos_cat, out, size=SIZE, val_fraction=0.25, conditions=CONDITIONS.split(","))
    return out


@pytest.fixture(scope="module")
def run(shards: Path, tmp_path_factory) -> Path:
    from hpcvae.train import main as train_main

    out = tmp_path_factory.mktemp("survey-run") / "film"
    rc = train_main(["--arch", "galaxy_film", "--flavour", "debug", "--data", str(shards), "--out", str(out),
                     "--epochs", "2", "--batch-size", "16", "--set", "data.num_workers=0",
                     "--set", "data.persistent_workers=false"])  # fmt: skip
    assert rc == 0
    return out


def test_the_manifest_records_each_condition_with_its_training_range(shards: Path) -> None:
    from hpcvae.shards import Manifest, iter_samples

    m = Manifest.load(shards)
    assert m.condition_names == ("zphot", "mag_auto", "flux_radius")
    for c in m.conditions:
        t = c["train"]
        assert (
            t["min"] <= t["percentiles"]["10"] <= t["percentiles"]["50"] <= t["percentiles"]["90"] <= t["max"]
        )
        assert t["n"] == m.count("train")
    assert m.conditions[0]["role"] == "redshift" and m.conditions[1]["role"] == "catalog"
    phys = m.physics()
    assert phys["zeropoint"] == pytest.approx(26.02, abs=0.01) and "ZEROPT" in phys["zeropoint_source"]
    assert phys["bunit"] == "count s-1" and phys["bunit_original"] == "ELECTRONS/S"
    _, _, meta = next(iter_samples(m, "train"))
    assert set(meta["conditions"]) == {"zphot", "mag_auto", "flux_radius"}


@pytest.mark.parametrize(("column", "value", "why"), [
    ("zphot", -99.0, "a missing-value sentinel"),
    ("zphot", -0.5, "not a redshift"),
    ("mag_auto", float("nan"), "not finite"),
    ("flux_radius", 0.0, "not a radius"),
])  # fmt: skip
def test_bad_condition_values_are_row_errors_or_recorded_skips(
    cosmos_cat, tmp_path, column, value, why
) -> None:
    import fitsio

    from hpcvae.synth import FITS_CATALOG_NAME

    folder = tmp_path / "cat"
    folder.mkdir()
    for f in cosmos_cat.parent.iterdir():  # the catalogs copied (they are resolved), the images linked
        if f.name in (cosmos_cat.name, FITS_CATALOG_NAME):
            shutil.copy(f, folder / f.name)
        else:
            (folder / f.name).symlink_to(f)
    fits = folder / FITS_CATALOG_NAME
    fits.unlink()
    t = fitsio.read(str(cosmos_cat.parent / FITS_CATALOG_NAME), ext=1)
    t[column][7] = value
    fitsio.write(str(fits), t)
    args = ["-m", "hpcvae.shard", "--catalog", str(folder / cosmos_cat.name), "--size", str(SIZE),
            "--conditions", CONDITIONS]  # fmt: skip
    err = _one_line_error(cli(*args, "--out", str(tmp_path / "a")), "hpcvae.shard")
    assert f"{fits}, row 7" in err and column in err and why in err and "--skip-bad" in err
    assert not (tmp_path / "a").exists()
    p = cli(*args, "--out", str(tmp_path / "b"), "--skip-bad")
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["n_skipped"] == 1 and m["skipped"][0]["row"] == 7 and why in m["skipped"][0]["reason"]


def test_an_unknown_condition_column_is_one_line(cosmos_cat, tmp_path) -> None:
    p = cli("-m", "hpcvae.shard", "--catalog", str(cosmos_cat), "--size", str(SIZE), "--out", str(tmp_path / "x"),
             "--conditions", "zphot,nope")  # fmt: skip
    assert "no column 'nope' for --conditions" in _one_line_error(p, "hpcvae.shard")


def test_the_model_is_conditioned_on_the_catalog_columns(run: Path, shards: Path) -> None:
    import hpcvae
    from hpcvae.shards import Manifest

    model = hpcvae.load_model(run)
    info = json.loads((run / "model.json").read_text())
    assert model.arch == "galaxy_film" and model.conditioning.names == ("zphot", "mag_auto", "flux_radius")
    assert [c["name"] for c in info["conditions"]] == ["zphot", "mag_auto", "flux_radius"]
    assert info["model_config"]["likelihood"] == "calibrated_noise" and info["beta_schedule"]["value"] == 1.0
    m = Manifest.load(shards)
    lo, hi = m.conditions[1]["train"]["min"], m.conditions[1]["train"]["max"]
    with pytest.raises(
        hpcvae.errors.ModelError, match=r"row 1, condition 'mag_auto' = .* outside the training range"
    ):
        model.sample(3, conditions={"zphot": 0.5, "mag_auto": [21.0, hi + 5, 21.0], "flux_radius": 8.0})
    with pytest.raises(hpcvae.errors.ModelError, match="row 0, condition 'zphot' is nan"):
        model.sample(2, conditions={"zphot": [float("nan"), 0.5]}, extrapolate=True)
    assert model.sample(2, conditions={"mag_auto": hi + 5}, extrapolate=True).shape == (2, 1, SIZE, SIZE)
    assert lo < hi


def test_decoder_means_become_flux_with_the_training_noise(run: Path, shards: Path) -> None:
    """The calibrated likelihood learns E[asinh(noisy pixel)]: model.json records the noise-aware inverse."""
    import hpcvae
    from hpcvae.shards import Manifest

    info = json.loads((run / "model.json").read_text())
    sigma = Manifest.load(shards).physics()["noise_std"]
    assert info["transform"]["name"] == "asinh"
    assert info["output"] == {"inverse": "noise_mean", "noise_std": pytest.approx(sigma)}
    model = hpcvae.load_model(run)
    assert model.output_noise_std == pytest.approx(sigma)
    out = model.sample(4, seed=0, normalized=True)
    faint = model.transform.mean_inverse(out, sigma)
    np.testing.assert_allclose(model.sample(4, seed=0).numpy(), faint.numpy(), rtol=1e-6)
    plain = model.transform.inverse(out)
    assert float(faint.sum()) > float(plain.sum())  # the wings' flux the plain inverse lost


def test_sample_of_a_catalog_is_the_same_for_any_batch_size(run: Path) -> None:
    """One galaxy per row of an astropy Table, a structured array, a dict or a DataFrame-like; row i fixed by seed."""
    from astropy.table import Table

    import hpcvae

    model = hpcvae.load_model(run)
    cat = {"zphot": np.linspace(0.3, 0.9, 7), "mag_auto": np.linspace(20.5, 22.0, 7),
           "flux_radius": np.linspace(6.0, 12.0, 7), "ra": np.zeros(7)}  # fmt: skip
    a = model.sample(cat, seed=5, batch_size=7)
    b = model.sample(Table(cat), seed=5, batch_size=2)
    structured = np.zeros(7, dtype=[(k, "f8") for k in cat])
    for k, v in cat.items():
        structured[k] = v
    c = model.sample(structured, seed=5, batch_size=3)
    assert a.shape == (7, 1, SIZE, SIZE)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.numpy(), c.numpy(), rtol=1e-5, atol=1e-6)
    first3 = model.sample({k: v[:3] for k, v in cat.items()}, seed=5)
    np.testing.assert_allclose(first3.numpy(), a[:3].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(hpcvae.errors.ConfigError, match="no column 'flux_radius'"):
        model.sample({"zphot": [0.5], "mag_auto": [21.0]})


def _catalog_file(tmp_path: Path, n: int = 40) -> Path:
    from astropy.table import Table

    rng = np.random.default_rng(0)
    t = Table({"zphot": rng.uniform(0.3, 0.9, n), "mag_auto": rng.uniform(20.5, 22.0, n),
               "flux_radius": rng.uniform(6.0, 12.0, n), "RA": rng.uniform(150.0, 150.2, n),
               "DEC": rng.uniform(2.1, 2.3, n), "name": [f"g{i}" for i in range(n)]})  # fmt: skip
    path = tmp_path / "cat.fits"
    t.write(path)
    return path


def test_generate_from_a_catalog_writes_cube_table_and_psf(run: Path, tmp_path: Path) -> None:
    from astropy import units as u
    from astropy.io import fits
    from astropy.wcs import WCS

    cat = _catalog_file(tmp_path)
    out = tmp_path / "gen.fits"
    p = cli("-m", "hpcvae.generate", str(run), "--catalog", str(cat), "--out", str(out), "--batch-size", "16")
    assert p.returncode == 0, p.stderr
    cube = fits.getdata(out)
    assert cube.shape == (40, SIZE, SIZE) and np.isfinite(cube).all()
    with fits.open(out, checksum=True) as hdul:
        hdul.verify("exception")
        assert [h.name for h in hdul][1:] == ["GALAXIES", "PSF"]
        hdr = hdul[0].header
        wcs = WCS(hdr).celestial
        assert wcs.wcs.ctype[0] == "RA---TAN" and hdr["RADESYS"] == "ICRS" and "DATE" in hdr
        assert abs(wcs.proj_plane_pixel_scales()[0].to_value(u.arcsec) - 0.03) < 1e-9
        u.Unit(hdr["BUNIT"], format="fits")  # parses in the FITS standard
        assert "/" not in str(hdr["MODEL"])  # no path of the training machine
        table = hdul["GALAXIES"].data
        assert list(table["index"]) == list(range(40)) and np.allclose(
            table["zphot"], fits.getdata(cat)["zphot"]
        )
        flux = cube.reshape(40, -1).sum(axis=1)
        np.testing.assert_allclose(table["flux"], flux, rtol=1e-4)
        np.testing.assert_allclose(table["mag"], hdr["ZEROPT"] - 2.5 * np.log10(flux), rtol=1e-6)
        assert np.isfinite(table["hsm_sigma_arcsec"]).mean() > 0.8
        psf = hdul["PSF"].data
        assert psf.ndim == 2 and min(psf.shape) >= 30 and psf.sum() == pytest.approx(1.0, abs=1e-4)
    again = tmp_path / "gen2.fits"
    p = cli(
        "-m", "hpcvae.generate", str(run), "--catalog", str(cat), "--out", str(again), "--batch-size", "40"
    )
    assert p.returncode == 0 and np.array_equal(
        fits.getdata(again), cube
    )  # batch size never changes a galaxy


def test_generate_rgc_round_trips_through_galsim_and_hpcvae_shard(run: Path, tmp_path: Path) -> None:
    import galsim
    from astropy.io import fits

    from hpcvae.generate_io import RGC_CATALOG
    from hpcvae.shards import Manifest, build_shards

    cat = _catalog_file(tmp_path, n=24)
    out = tmp_path / "gen-rgc"
    p = cli("-m", "hpcvae.generate", str(run), "--catalog", str(cat), "--out", str(out), "--format", "rgc")
    assert p.returncode == 0, p.stderr
    rgc = galsim.RealGalaxyCatalog(str(out / RGC_CATALOG))
    assert rgc.nobjects == 24
    cube = fits.getdata(_generate_cube(run, cat, tmp_path))
    np.testing.assert_allclose(rgc.getGalImage(3).array, cube[3], rtol=1e-6)
    m = build_shards(out / RGC_CATALOG, tmp_path / "re-shards", size=SIZE, conditions=["zphot", "mag_auto"],
                     val_fraction=0.0)  # fmt: skip
    assert Manifest.load(tmp_path / "re-shards").count("train") == 24 and m.has_redshift


def _generate_cube(run: Path, cat: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cube.fits"
    assert cli("-m", "hpcvae.generate", str(run), "--catalog", str(cat), "--out", str(out)).returncode == 0
    return out


@pytest.mark.parametrize(("args", "message"), [
    (["--center", "999,999"], "center must be RA in [0, 360)"),
    (["--seed", "-1"], "seed must be in [0, 2**63)"),
    (["--seed", "99999999999999999999"], "seed must be in [0, 2**63)"),
    (["--n", "0"], "n must be in [1,"),
    (["--device", "cuda"], "--device cuda asked for, but this machine has no such CUDA device"),
    (["--redshift", "nan"], "redshift: nan is not a finite number"),
])  # fmt: skip
def test_generate_bad_options_are_one_line(run: Path, tmp_path: Path, args: list[str], message: str) -> None:
    p = cli("-m", "hpcvae.generate", str(run), "--out", str(tmp_path / "g.fits"), *args)
    assert message in _one_line_error(p, "hpcvae.generate")
    assert not list(tmp_path.iterdir())


def test_generate_out_of_range_catalog_row_is_one_line(run: Path, tmp_path: Path) -> None:
    from astropy.table import Table

    path = tmp_path / "far.csv"
    Table({"zphot": [0.5, 50.0], "mag_auto": [21.0, 21.0], "flux_radius": [8.0, 8.0]}).write(path)
    p = cli("-m", "hpcvae.generate", str(run), "--catalog", str(path), "--out", str(tmp_path / "g.fits"))
    err = _one_line_error(p, "hpcvae.generate")
    assert "row 1, condition 'zphot' = 50 is outside the training range" in err and "extrapolate" in err
    assert not (tmp_path / "g.fits").exists()


def test_sigterm_during_generate_leaves_no_file(run: Path, tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "big.fits"
    env = {k: v for k, v in os.environ.items() if k != "HPCVAE_TRACEBACK"}
    proc = subprocess.Popen([sys.executable, "-m", "hpcvae.generate", str(run), "--redshift", "0.5", "--n", "200000",
                             "--batch-size", "256", "--out", str(out)], cwd=REPO, env=env, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".big.fits.tmp") for p in tmp_path.iterdir()):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode != 0 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp


def test_a_cube_grows_with_its_batches_so_a_sigterm_is_taken_at_once(run: Path, tmp_path: Path) -> None:
    """fitsio's create_image_hdu wrote all n stamps of zeros first, in one C call a SIGTERM waits out
    (3.3 GB for the test above, over a minute on a slow CI disk)."""
    import signal

    from hpcvae.generate import GenerateConfig, batches, plan
    from hpcvae.generate_io import write_fits_cube
    from hpcvae.safe_io import Interrupted

    cfg = GenerateConfig(model=run, redshift=0.5, n=20_000, batch_size=64, out=tmp_path / "cube.fits")
    p = plan(cfg)
    on_disk: list[int] = []

    def three_then_sigterm():
        for i, b in enumerate(batches(cfg, p)):
            on_disk.append(sum(f.stat().st_size for f in tmp_path.iterdir()))
            if i == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield b

    with pytest.raises(Interrupted, match="SIGTERM"):
        write_fits_cube(cfg, p, three_then_sigterm())
    stamp = 4 * p.model.image_size**2
    assert 0 < on_disk[0] < 3 * 2880 and on_disk[3] == on_disk[0] + 3 * 64 * stamp, on_disk
    assert list(tmp_path.iterdir()) == []


def test_the_batched_galsim_input_draws_the_same_field_for_any_batch_and_nproc(
    run: Path, tmp_path: Path
) -> None:
    from astropy.io import fits

    cat = _catalog_file(tmp_path, n=16)
    images = {}
    for batch, nproc in ((16, 1), (3, 1), (5, 2)):
        yaml = tmp_path / f"f{batch}-{nproc}.yaml"
        yaml.write_text(f"""
modules: [hpcvae.galsim]
input:
  hpcvae_model: {{file_name: {run}, catalog: {cat}, batch: {batch}, seed: 4}}
gal: {{type: HpcvaeGalaxy}}
psf: {{type: Moffat, beta: 3.0, fwhm: 0.7}}
image: {{type: Tiled, nx_tiles: 4, ny_tiles: 4, stamp_size: 24, pixel_scale: 0.2, random_seed: 7, nproc: {nproc}}}
output: {{file_name: {tmp_path}/f{batch}-{nproc}.fits}}
""")
        p = subprocess.run(
            ["galsim", "-v", "1", str(yaml)], capture_output=True, text=True, cwd=REPO, timeout=600
        )
        assert p.returncode == 0, p.stderr[-2000:]
        images[(batch, nproc)] = fits.getdata(tmp_path / f"f{batch}-{nproc}.fits")
    ref = images[(16, 1)]
    assert ref.sum() > 0
    for key, img in images.items():
        np.testing.assert_allclose(img, ref, rtol=1e-5, atol=1e-7, err_msg=str(key))


def test_the_yaml_route_refuses_a_sharper_target_psf_like_the_python_api(run: Path, tmp_path: Path) -> None:
    yaml = tmp_path / "sharp.yaml"
    yaml.write_text(f"""
modules: [hpcvae.galsim]
gal: {{type: HpcvaeGalaxy, model: {run}, redshift: 0.5}}
psf: {{type: Gaussian, fwhm: 0.01}}
image: {{type: Single, size: 32, pixel_scale: 0.03, random_seed: 1}}
output: {{file_name: {tmp_path}/sharp.fits}}
""")
    p = subprocess.run(
        ["galsim", "-v", "1", str(yaml)], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert p.returncode != 0 and "must be larger than the training PSF" in p.stderr
    assert not (tmp_path / "sharp.fits").exists()


def test_evaluation_on_cosmos_like_galaxies_has_the_single_sersic_baseline(run: Path, shards: Path, tmp_path):
    """The bar a generative model must clear, measured with the same (correlated) noise as the real stamps."""
    from hpcvae.evaluate import EvalConfig, evaluate

    rep = evaluate(
        run, shards, tmp_path / "rep", config=EvalConfig(n=40, morph_n=16, n_boot=20, response_latents=4)
    )
    mo = rep["morphology"]
    nm = mo[
        "noise_model"
    ]  # COSMOS noise (0.47 between neighbours), measured exactly: real minus noise-free truth
    assert nm["kind"] == "correlated" and 0.35 < nm["rho_1px_x"] < 0.6 and "noise-free truth" in nm["from"]
    base = mo["baseline"]
    assert set(base["stats"]) == set(mo["stats"]) and set(base["generated_beats_baseline"]) <= set(
        mo["stats"]
    )
    w1 = [c["w1"] for c in base["stats"].values() if c.get("w1") is not None]
    assert w1 and all(np.isfinite(w1))  # a 2-epoch model's blobs may fail statmorph; the baseline's do not
    if base["generated_beats_baseline"]:
        assert "single-Sérsic" in rep["verdict"]["morphology"]["line"]
    for k, d in base["w1_difference"].items():  # paired: the interval holds the point, and says what it means
        if d["value"] is not None and d["value_ci"] is not None:
            assert d["value_ci"][0] <= d["value"] <= d["value_ci"][1] and d["says"], k
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Single-Sérsic baseline" in md and "Noise added to generated stamps: correlated" in md


def test_a_flow_prior_on_several_conditions_is_evaluated(run: Path, shards: Path, tmp_path) -> None:
    """The latent section drew the flow's samples with the redshift alone: a (n,) context for a 3-condition flow."""
    from hpcvae.evaluate import EvalConfig, evaluate
    from hpcvae.train_prior import main as prior_main

    out = tmp_path / "flow"
    assert prior_main([str(run), "--data", str(shards), "--out", str(out), "--epochs", "1", "--batch-size", "16",
                       "--encode-batch-size", "8", "--transforms", "2", "--hidden", "16,16"]) == 0  # fmt: skip
    rep = evaluate(
        out, shards, tmp_path / "rep", config=EvalConfig(n=24, morph_n=0, n_boot=10, response_latents=2)
    )
    assert rep["latent"]["prior_drawn"] == "flow" and rep["population"]["prior"] == "flow"
    assert (tmp_path / "rep" / "latent_corner.png").is_file()
