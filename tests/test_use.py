"""Using a trained model where astronomers work: model.json physics, FITS with WCS, GalSim, model card, wids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helpers import cli

REPO = Path(__file__).resolve().parents[1]
SIZE = 32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from hpcvae.shards.__main__ import main as shard_main
    from hpcvae.synth import make_synthetic

    root = tmp_path_factory.mktemp("use")
    cat = make_synthetic(120, SIZE, root / "synth", seed=3, workers=1, progress=False)
    assert shard_main(["--catalog", str(cat), "--out", str(root / "shards"), "--size", str(SIZE),
                       "--val-fraction", "0.3"]) in (0, None)  # fmt: skip
    return root / "shards"


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory) -> Path:
    from hpcvae.train import main as train_main

    out = tmp_path_factory.mktemp("use-run") / "cvae2"
    rc = train_main([
        "--arch", "cvae2", "--flavour", "debug", "--data", str(shards), "--out", str(out), "--epochs", "1",
        "--batch-size", "16", "--seed", "0", "--set", "data.num_workers=0", "--set", "data.persistent_workers=false",
    ])  # fmt: skip
    assert rc == 0
    return out


def test_shards_carry_the_physics_and_each_galaxy_its_psf(shards):
    from hpcvae.shards import Manifest, iter_samples
    from hpcvae.shards.format import read_shard

    m = Manifest.load(shards)
    phys = m.physics()
    assert phys["pixel_scale_arcsec"] == pytest.approx(0.03)
    assert phys["band"] == "F814W" and phys["instrument"] == "HST/ACS" and phys["bunit"]
    assert phys["noise_std"] > 0
    psf = np.asarray(phys["psf"]["image"])
    assert phys["psf"]["in_images"] is True and psf.shape == (37, 37)
    assert psf.sum() == pytest.approx(1.0, abs=1e-5) and 0.05 < phys["psf"]["fwhm_arcsec"] < 0.2
    _, files = next(read_shard(m.shard_paths("train")[0]))
    assert "psf.npy" in files
    key, img, meta = next(iter_samples(m, "train"))
    assert meta["psf_file"].startswith("real_galaxy_PSF_images") and meta["psf_hdu"] >= 0


def test_a_damaged_psf_hdu_is_a_one_line_error_or_a_recorded_skip(tmp_path):
    import fitsio

    from hpcvae.synth import make_synthetic

    cat = make_synthetic(12, SIZE, tmp_path / "synth", seed=4, workers=1, progress=False)
    rows = fitsio.read(str(cat))
    psf_file = cat.parent / rows["PSF_FILENAME"][0].strip()
    bad_hdu = int(rows["PSF_HDU"][0])
    with fitsio.FITS(str(psf_file), "rw") as f:  # a real damage: the PSF becomes NaN on disk
        f[bad_hdu].write(np.full((37, 37), np.nan, dtype=np.float32))
    p = cli("-m", "hpcvae.shard", "--catalog", str(cat), "--out", str(tmp_path / "s"), "--size", str(SIZE))
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert psf_file.name in err and f"HDU {bad_hdu}" in err and "PSF" in err
    p = cli("-m", "hpcvae.shard", "--catalog", str(cat), "--out", str(tmp_path / "s"), "--size", str(SIZE),
             "--skip-bad")  # fmt: skip
    assert p.returncode == 0, p.stderr
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["n_skipped"] == 1 and "PSF" in man["skipped"][0]["reason"]
    # --no-psfs ignores the PSF columns: nothing skipped, no PSF in the set
    p = cli("-m", "hpcvae.shard", "--catalog", str(cat), "--out", str(tmp_path / "n"), "--size", str(SIZE),
             "--no-psfs")  # fmt: skip
    assert p.returncode == 0, p.stderr
    man = json.loads((tmp_path / "n" / "manifest.json").read_text())
    assert man["n_skipped"] == 0 and man["physics"]["psf"]["per_galaxy"] is False


def test_model_json_records_pixels_band_unit_noise_and_psf(run):
    meta = json.loads((run / "model.json").read_text())
    phys = meta["physics"]
    assert phys["pixel_scale_arcsec"] == pytest.approx(0.03) and phys["band"] == "F814W"
    assert phys["psf"]["in_images"] is True and phys["psf_free"] is False
    assert len(meta["config_sha256"]) == 64
    assert meta["data"]["counts"]["train"] > 0 and meta["data"]["synthetic"] is True


def test_generate_writes_fits_with_a_celestial_wcs(run, tmp_path):
    from astropy.io import fits
    from astropy.wcs import WCS

    p = cli("-m", "hpcvae.generate", str(run), "--n", "5", "--redshift", "0.7", "--seed", "3",
             "--out", str(tmp_path / "gen.fits"))  # fmt: skip
    assert p.returncode == 0, p.stderr
    with fits.open(tmp_path / "gen.fits", checksum=True) as hdul:  # the default: cube + table + PSF
        assert [h.name for h in hdul] == ["GALAXIES_IMG", "GALAXIES", "PSF"]
        h = hdul[0].header
        assert h["ARCH"] == "cvae2" and h["NGAL"] == 5 and len(h["CFGHASH"]) == 16
        assert h["SEED"] == 3 and h["PRIOR"] == "normal" and h["BUNIT"]
        assert hdul[0].data.shape == (5, SIZE, SIZE)
        w = WCS(h).celestial
        assert w.has_celestial and w.wcs.ctype[0] == "RA---TAN"
        assert np.allclose(w.proj_plane_pixel_scales()[0].to_value("arcsec"), 0.03)
        table = hdul["GALAXIES"].data
        assert len(table) == 5 and np.allclose(table["zphot"], 0.7)
        first = hdul[0].data[0].copy()
    import fitsio

    assert np.array_equal(fitsio.read(str(tmp_path / "gen.fits"), ext=0)[0], first)
    # one HDU per galaxy, each with its own 2-D WCS: the same pixels
    assert cli("-m", "hpcvae.generate", str(run), "--n", "5", "--redshift", "0.7", "--seed", "3", "--layout",
                "hdus", "--out", str(tmp_path / "hdus.fits")).returncode == 0  # fmt: skip
    with fits.open(tmp_path / "hdus.fits") as hdul:
        assert len(hdul) == 7 and hdul[-1].name == "GALAXIES"
        assert WCS(hdul[1].header).has_celestial and np.array_equal(hdul[1].data, first)
    # the same seed gives the same galaxies; another seed others
    assert cli("-m", "hpcvae.generate", str(run), "--n", "5", "--redshift", "0.7", "--seed", "3",
                "--out", str(tmp_path / "again.npy")).returncode == 0  # fmt: skip
    assert np.allclose(np.load(tmp_path / "again.npy")[0], first)
    assert cli("-m", "hpcvae.generate", str(run), "--n", "2", "--redshift", "0.7", "--out",
                str(tmp_path / "grid.png")).returncode == 0  # fmt: skip
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--n", "2", "--redshift", "40"], "outside the training range"),
        (["--n", "2", "--redshift", "0.5", "--format", "tiff"], "'tiff' is not one of"),
        (["--n", "0", "--redshift", "0.5"], "n must be in [1, 1000000000], got 0"),
    ],
)
def test_generate_bad_input_is_one_line(run, tmp_path, args, words):
    p = cli("-m", "hpcvae.generate", str(run), *args, "--out", str(tmp_path / "g.fits"))
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1 and words in err, err


def test_generate_refuses_to_overwrite(run, tmp_path):
    (tmp_path / "g.fits").write_text("keep me")
    p = cli(
        "-m", "hpcvae.generate", str(run), "--n", "1", "--redshift", "0.5", "--out", str(tmp_path / "g.fits")
    )
    assert p.returncode == 2 and "--overwrite" in p.stderr
    assert (tmp_path / "g.fits").read_text() == "keep me"


def test_to_galsim_keeps_flux_scale_and_the_galsim_seed(run):
    import galsim

    from hpcvae import load_model
    from hpcvae.galsim import generator_from

    model = load_model(run)
    objs = model.to_galsim(6, redshift=0.7, rng=galsim.BaseDeviate(11))
    pixels = model.sample(6, redshift=0.7, generator=generator_from(galsim.BaseDeviate(11)))[:, 0].numpy()
    for obj, pix in zip(objs, pixels):
        assert isinstance(obj, galsim.InterpolatedImage)
        drawn = obj.drawImage(nx=SIZE, ny=SIZE, scale=0.03, method="no_pixel").array
        assert drawn.sum() == pytest.approx(float(pix.sum()), rel=0.01)
        assert obj.flux == pytest.approx(float(pix.sum()), rel=0.01)
    again = model.to_galsim(6, redshift=0.7, rng=galsim.BaseDeviate(11))
    assert [o.flux for o in again] == [o.flux for o in objs]
    assert [o.flux for o in model.to_galsim(6, redshift=0.7, rng=galsim.BaseDeviate(12))] != [
        o.flux for o in objs
    ]


def test_to_galsim_deconvolves_the_training_psf_only_towards_a_larger_one(run):
    import galsim

    from hpcvae import load_model
    from hpcvae.errors import ModelError

    model = load_model(run)
    with pytest.raises(ModelError, match=r"must be larger than the training PSF"):
        model.to_galsim(1, redshift=0.7, rng=1, psf=galsim.Gaussian(fwhm=0.03))
    moffat = galsim.Moffat(beta=3.0, fwhm=0.7)
    (obj,) = model.to_galsim(1, redshift=0.7, rng=1, psf=moffat)
    (plain,) = model.to_galsim(1, redshift=0.7, rng=1)
    img = obj.drawImage(nx=48, ny=48, scale=0.2)
    assert img.array.sum() == pytest.approx(plain.flux, rel=0.01)
    # sizes are in arcsec: the same object drawn on two pixel grids has the same HSM size in arcsec
    fine = obj.drawImage(nx=200, ny=200, scale=0.05)
    s_coarse = img.FindAdaptiveMom().moments_sigma * 0.2
    s_fine = fine.FindAdaptiveMom().moments_sigma * 0.05
    assert s_coarse == pytest.approx(s_fine, rel=0.05)


def test_galsim_command_draws_hpcvae_galaxies_from_yaml(run, tmp_path):
    yaml = f"""
modules: [hpcvae.galsim]
psf: {{type: Moffat, beta: 3.0, fwhm: 0.7}}
gal: {{type: HpcvaeGalaxy, model: {run}, redshift: {{type: Random, min: 0.3, max: 1.2}}}}
image:
  type: Scattered
  size: 160
  pixel_scale: 0.2
  nobjects: 12
  random_seed: 1234
  noise: {{type: Gaussian, sigma: 1.0e-4}}
output: {{dir: {tmp_path}, file_name: field.fits}}
"""
    (tmp_path / "field.yaml").write_text(yaml)
    p = subprocess.run(["galsim", "-v", "1", str(tmp_path / "field.yaml")], capture_output=True, text=True,
                       cwd=REPO, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    import fitsio

    field, hdr = fitsio.read(str(tmp_path / "field.fits"), header=True)
    assert field.shape == (160, 160) and field.sum() > 0


def test_simulate_field_example_conserves_flux(run, tmp_path):
    p = cli("examples/simulate_field.py", str(run), "--n", "20", "--out", str(tmp_path / "field.fits"),
             "--noise", "0")  # fmt: skip
    assert p.returncode == 0, p.stderr
    import fitsio

    field = fitsio.read(str(tmp_path / "field.fits"))
    hdr = fitsio.read_header(str(tmp_path / "field.fits"))
    assert abs(field.sum() / hdr["FLUXSUM"] - 1) < 0.01
    assert hdr["PIXSCALE"] == 0.2 and hdr["NGAL"] == 20
    bad = cli("examples/simulate_field.py", str(tmp_path / "nope"), "--out", str(tmp_path / "f2.fits"))
    err = bad.stderr.strip()
    assert bad.returncode == 2 and len(err.splitlines()) == 1 and "nope" in err and "Traceback" not in err


def test_model_card_from_model_json_and_the_report(run, shards, tmp_path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "MODEL_CARD.md")
    assert card.data.license == "mit" and card.data.library_name == "hpcvae"
    assert "cvae2" in card.data.tags and card.data.datasets and not card.data.eval_results
    assert "`cvae2`" in card.text and "Not evaluated yet" in card.text and "PSF-convolved" in card.text
    from hpcvae.evaluate import EvalConfig, evaluate

    evaluate(run, shards, tmp_path / "report", config=EvalConfig(n=16, device="cpu", n_boot=20))
    card = ModelCard.load(run / "MODEL_CARD.md")
    assert "## Evaluation" in card.text and "| mean \\|g\\| |" in card.text and "0.248" in card.text
    assert "Not evaluated yet" not in card.text and "synthetic" in card.text
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["delta_mean_g"] == pytest.approx(report["population"]["stats"]["g"]["mean_diff"])
    assert str(run.parent) not in card.content  # no path of the training machine


def test_export_writes_a_shareable_model_folder(run, shards, tmp_path):
    import stat

    from huggingface_hub import ModelCard

    import hpcvae
    from hpcvae.evaluate import EvalConfig, evaluate

    report = tmp_path / "report"
    evaluate(run, shards, report, config=EvalConfig(n=16, device="cpu", n_boot=20))
    out = tmp_path / "share" / "hpcvae-cvae2"
    done = cli("-m", "hpcvae.export", str(run), str(out), "--report", str(report))
    assert done.returncode == 0, done.stderr
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"README.md", "model.safetensors", "model.json", "report.json"} <= names
    assert any(n.startswith("figures/") and n.endswith(".png") for n in names)
    for p in out.rglob("*"):
        mode = p.stat().st_mode
        assert mode & stat.S_IRGRP and mode & stat.S_IROTH, p  # a group can read what it is given
        assert not mode & stat.S_IWOTH, p
    for name in ("README.md", "model.json", "report.json"):
        assert str(tmp_path) not in (out / name).read_text() and "/tmp/" not in (out / name).read_text(), name
    assert ModelCard.load(out / "README.md").data.eval_results
    a = hpcvae.load_model(run).sample(3, seed=5)
    b = hpcvae.load_model(out).sample(3, seed=5)
    assert torch_equal(a, b)
    again = cli("-m", "hpcvae.export", str(run), str(out))
    assert again.returncode == 2 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_a_hub_repo_id_loads_from_the_local_cache_offline(run, tmp_path):
    """``load_model("org/name")`` resolves through huggingface_hub's cache (the layout it downloads into)."""
    import shutil

    cache = tmp_path / "hub"
    snap = cache / "models--astro--hpcvae-cvae2" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for name in ("model.safetensors", "model.json", "MODEL_CARD.md"):
        shutil.copyfile(run / name, snap / (name if name != "MODEL_CARD.md" else "README.md"))
    (cache / "models--astro--hpcvae-cvae2" / "refs").mkdir()
    (cache / "models--astro--hpcvae-cvae2" / "refs" / "main").write_text("0123abcd")
    code = "import hpcvae, sys; m = hpcvae.load_model(sys.argv[1]); print(tuple(m.sample(2, seed=1).shape))"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("HPCVAE_TRACEBACK", None)
    ok = subprocess.run([sys.executable, "-c", code, "astro/hpcvae-cvae2"], capture_output=True, text=True,
                        env=env, timeout=120, cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "(2, 1, 32, 32)" in ok.stdout
    missing = subprocess.run([sys.executable, "-m", "hpcvae.generate", "astro/not-there", "--n", "2", "--out",
                              str(tmp_path / "x.npy")], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert (
        missing.returncode == 2 and "astro/not-there" in missing.stderr and "Traceback" not in missing.stderr
    )
    assert len(missing.stderr.strip().splitlines()) == 1


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_wids_and_webdataset_open_a_split(shards):
    import webdataset as wds
    import wids

    from hpcvae.shards import Manifest

    m = Manifest.load(shards)
    index = json.loads((shards / "train.wids.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    ds = wids.ShardListDataset(str(shards / "train.wids.json"))
    assert len(ds) == m.count("train")
    sample = ds[0]
    assert ".image.npy" in sample and ".meta.json" in sample
    n = sum(1 for _ in wds.WebDataset([str(p) for p in m.shard_paths("val")], shardshuffle=False))
    assert n == m.count("val")
