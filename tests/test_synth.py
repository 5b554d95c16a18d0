"""The synthetic set must be a real RealGalaxyCatalog and follow its documented relations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fitsio
import galsim
import numpy as np
import pytest
from conftest import SHARED_DATA
from scipy import integrate, stats

from hpcvae import cosmology as cosmo
from hpcvae.errors import ConfigError
from hpcvae.synth import CATALOG_NAME, FITS_CATALOG_NAME, SynthConfig, main, make_synthetic
from hpcvae.synth.simple import TRUNC, _sersic_scale, composite_hlr, draw_noiseless, draw_params

REAL = SHARED_DATA / "cosmos-23.5-example"
SIZE = 48
N = 60


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    return make_synthetic(N, SIZE, out, seed=7, workers=1, progress=False, per_file=25)


def test_files_and_columns_mirror_cosmos(synth: Path) -> None:
    out = synth.parent
    assert synth.name == CATALOG_NAME
    cat = fitsio.read(str(synth), ext=1)
    truth = fitsio.read(str(out / FITS_CATALOG_NAME), ext=1)
    real = fitsio.read(str(REAL / "real_galaxy_catalog_23.5_example.fits"), ext=1)
    required = [
        "IDENT",
        "MAG",
        "BAND",
        "GAL_FILENAME",
        "GAL_HDU",
        "PSF_FILENAME",
        "PSF_HDU",
        "PIXEL_SCALE",
        "NOISE_VARIANCE",
    ]
    for name in required:
        assert name in cat.dtype.names
        assert cat.dtype[name].kind == real.dtype[name].kind, name
        if cat.dtype[name].kind != "U":
            assert cat.dtype[name].itemsize == real.dtype[name].itemsize, name
    for name in ["IDENT", "zphot", "hlr", "flux", "q", "n", "bulge_frac"]:
        assert name in truth.dtype.names
    assert len(cat) == len(truth) == N
    np.testing.assert_array_equal(cat["IDENT"], truth["IDENT"])
    assert set(cat["BAND"]) == {"F814W"}
    np.testing.assert_allclose(cat["PIXEL_SCALE"], 0.03)
    # 60 galaxies at 25 per file -> three image files and three PSF files, HDUs from 0.
    assert sorted(set(cat["GAL_FILENAME"])) == [f"real_galaxy_images_synth_n{k}.fits" for k in (1, 2, 3)]
    for k, count in ((1, 25), (2, 25), (3, 10)):
        rows = cat[cat["GAL_FILENAME"] == f"real_galaxy_images_synth_n{k}.fits"]
        np.testing.assert_array_equal(np.sort(rows["GAL_HDU"]), np.arange(count))
        with fitsio.FITS(str(out / f"real_galaxy_images_synth_n{k}.fits")) as f:
            assert len(f) == count
            assert f[0].read().dtype == np.float32
        with fitsio.FITS(str(out / f"real_galaxy_PSF_images_synth_n{k}.fits")) as f:
            assert len(f) == count
    # NOISE_VARIANCE looks like COSMOS's.
    lo, hi = np.percentile(real["NOISE_VARIANCE"], [0, 100])
    assert lo / 2 < np.median(cat["NOISE_VARIANCE"]) < hi
    assert np.all(cat["MAG"] <= cosmo.MAG_LIMIT + 1e-9)
    np.testing.assert_allclose(cat["MAG"], truth["mag"])


def test_galsim_real_galaxy_catalog_reads_it(synth: Path) -> None:
    rgc = galsim.RealGalaxyCatalog(str(synth))
    assert rgc.getNObjects() == N
    cat = fitsio.read(str(synth), ext=1)
    for i in (0, 24, 25, 59):
        expected = fitsio.read(str(synth.parent / cat["GAL_FILENAME"][i]), ext=int(cat["GAL_HDU"][i]))
        np.testing.assert_array_equal(rgc.getGalImage(i).array, expected.astype(np.float64))
        assert rgc.getGalImage(i).scale == pytest.approx(0.03)
        psf = rgc.getPSFImage(i).array
        assert psf.shape == (37, 37)
        assert psf.sum() == pytest.approx(1.0, abs=1e-5)
        assert np.unravel_index(psf.argmax(), psf.shape) == (18, 18)
        assert rgc.getNoiseProperties(i)[2] == pytest.approx(cat["NOISE_VARIANCE"][i])
    # The full RealGalaxy path (PSF deconvolution, noise model) works on it.
    gal = galsim.RealGalaxy(rgc, index=3)
    assert gal.flux == pytest.approx(cat["stamp_flux"][3], rel=1e-6)


def test_stamp_sizes_vary_around_size(synth: Path) -> None:
    rgc = galsim.RealGalaxyCatalog(str(synth))
    shapes = np.array([rgc.getGalImage(i).array.shape for i in range(N)])
    assert (shapes < SIZE).any() and (shapes > SIZE).any()
    assert (shapes[:, 0] != shapes[:, 1]).mean() > 0.5
    assert len({tuple(s) for s in shapes}) > N // 3
    assert shapes.min() >= 16


def test_rendered_sizes_and_fluxes_track_truth(synth: Path) -> None:
    """HSM size of the noisy stamps follows the truth hlr; stamp sums follow the truth flux."""
    rgc = galsim.RealGalaxyCatalog(str(synth))
    truth = fitsio.read(str(synth.parent / FITS_CATALOG_NAME), ext=1)
    cat = fitsio.read(str(synth), ext=1)
    sigmas, hlrs, failed = [], [], 0
    for i in range(N):
        try:
            mom = galsim.hsm.FindAdaptiveMom(rgc.getGalImage(i))
        except galsim.GalSimHSMError:
            failed += 1
            continue
        sigmas.append(mom.moments_sigma)
        hlrs.append(truth["hlr"][i])
    assert failed <= N // 10
    assert stats.spearmanr(sigmas, hlrs).statistic > 0.7
    assert stats.spearmanr(cat["stamp_flux"], truth["flux"]).statistic > 0.8


def test_pixel_noise_matches_noise_variance(synth: Path) -> None:
    """Stamp minus the same galaxy drawn without noise is white noise of NOISE_VARIANCE."""
    rgc = galsim.RealGalaxyCatalog(str(synth))
    cat = fitsio.read(str(synth), ext=1)
    params = draw_params(7, 0, 8, SIZE)
    for i, p in enumerate(params):
        resid = rgc.getGalImage(i).array - draw_noiseless(p)
        assert resid.var() / cat["NOISE_VARIANCE"][i] == pytest.approx(1.0, abs=0.15)
        assert abs(resid.mean()) < 4 * np.sqrt(cat["NOISE_VARIANCE"][i] / resid.size)
        lag1 = np.corrcoef(resid[:, 1:].ravel(), resid[:, :-1].ravel())[0, 1]
        assert abs(lag1) < 0.1


def test_truth_follows_documented_redshift_relations() -> None:
    p = draw_params(11, 0, 3000, 64)
    z = p["zphot"]
    assert z.min() >= cosmo.Z_MIN and z.max() <= cosmo.Z_MAX
    # n(z) is the documented Smail law.
    grid = np.linspace(cosmo.Z_MIN, cosmo.Z_MAX, 600)
    cdf = integrate.cumulative_trapezoid(cosmo.smail_pdf(grid), grid, initial=0.0)
    assert stats.kstest(z, lambda x: np.interp(x, grid, cdf)).pvalue > 1e-3
    assert 0.6 < grid[np.argmax(cosmo.smail_pdf(grid))] < 0.8
    # Size: log-normal around the median relation with the documented scatter.
    resid = np.log(p["hlr"] / cosmo.expected_hlr_arcsec(z))
    assert abs(np.median(resid)) < 0.04
    assert np.std(resid) == pytest.approx(cosmo.SIGMA_LN_RE, rel=0.08)
    assert stats.spearmanr(p["hlr"], cosmo.expected_hlr_arcsec(z)).statistic > 0.4
    slope = np.polyfit(np.log(cosmo.expected_hlr_arcsec(z)), np.log(p["hlr"]), 1)[0]
    assert slope == pytest.approx(1.0, abs=0.15)
    # Flux: the median at each z is expected_flux(z), and everything passes the flux limit.
    above = p["flux"] > cosmo.expected_flux(z)
    assert above.mean() == pytest.approx(0.5, abs=0.03)
    for lo, hi in ((0.05, 0.5), (0.5, 1.0), (1.0, 3.0)):
        sel = (z >= lo) & (z < hi)
        assert above[sel].mean() == pytest.approx(0.5, abs=0.07), (lo, hi)
    assert p["mag"].max() <= cosmo.MAG_LIMIT + 1e-9
    assert stats.spearmanr(p["flux"], z).statistic < -0.3
    # Sizes stay in the range a 0.03"/px stamp can hold.
    hlr_px = p["hlr"] / 0.03
    assert 6 < np.median(hlr_px) < 16
    assert np.mean((hlr_px > 2) & (hlr_px < 40)) > 0.9
    # Profiles: both kinds present, shapes COSMOS-like.
    assert 0.25 < p["use_bulgefit"].mean() < 0.45
    assert 0.45 < np.median(p["q"]) < 0.7
    assert np.all((p["n"] >= 0.5) & (p["n"] <= 6.0))


def test_expected_relations_are_monotonic_and_physical() -> None:
    z = np.linspace(cosmo.Z_MIN, cosmo.Z_MAX, 50)
    assert np.all(np.diff(cosmo.expected_hlr_arcsec(z)) < 0)
    assert np.all(np.diff(cosmo.expected_flux(z)) < 0)
    # 1 arcsec is ~7.2 kpc at z = 0.7 in this cosmology.
    assert cosmo.re_kpc_to_arcsec(7.15, 0.7) == pytest.approx(1.0, rel=0.01)
    assert integrate.quad(cosmo.smail_pdf, 0.0, 3.5, points=[0.7])[0] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("n", [1.0, 2.5, 4.0])
def test_truncated_sersic_scale_matches_galsim(n: float) -> None:
    r0, _ = _sersic_scale(n)
    assert r0 == pytest.approx(galsim.Sersic(n=n, half_light_radius=1.0, trunc=TRUNC).scale_radius, rel=1e-4)


def test_bulge_disk_truth_hlr_is_the_half_light_radius() -> None:
    """The composite hlr written as truth encloses half the light of the GalSim profile."""
    btt, ratio, hd = 0.45, 0.4, 0.3
    r = composite_hlr(btt, ratio) * hd
    gal = galsim.Add(
        galsim.Sersic(n=4.0, half_light_radius=ratio * hd, trunc=TRUNC * ratio * hd, flux=btt),
        galsim.Sersic(n=1.0, half_light_radius=hd, trunc=TRUNC * hd, flux=1 - btt),
    )
    # Radial integral of GalSim's own surface brightness (circular, so 2πr I(r) dr).
    inner = integrate.quad(
        lambda s: 2 * np.pi * s * gal.xValue(s, 0.0), 0.0, r, points=[1e-3, 1e-2, ratio * hd], limit=200
    )[0]
    assert inner / gal.flux == pytest.approx(0.5, abs=1e-5)


def test_same_seed_same_pixels_for_any_worker_count(tmp_path: Path) -> None:
    a = make_synthetic(12, 32, tmp_path / "a", seed=5, workers=1, progress=False, per_file=5)
    b = make_synthetic(12, 32, tmp_path / "b", seed=5, workers=2, progress=False, per_file=5)
    c = make_synthetic(4, 32, tmp_path / "c", seed=6, workers=1, progress=False, per_file=5)
    np.testing.assert_array_equal(fitsio.read(str(a), ext=1), fitsio.read(str(b), ext=1))
    np.testing.assert_array_equal(
        fitsio.read(str(a.parent / FITS_CATALOG_NAME), ext=1),
        fitsio.read(str(b.parent / FITS_CATALOG_NAME), ext=1),
    )
    for k in (1, 2, 3):
        for stem in ("images", "PSF_images"):
            name = f"real_galaxy_{stem}_synth_n{k}.fits"
            with fitsio.FITS(str(a.parent / name)) as fa, fitsio.FITS(str(b.parent / name)) as fb:
                assert len(fa) == len(fb)
                for h in range(len(fa)):
                    np.testing.assert_array_equal(fa[h].read(), fb[h].read())
    ga = galsim.RealGalaxyCatalog(str(a)).getGalImage(0).array
    gc = galsim.RealGalaxyCatalog(str(c)).getGalImage(0).array
    assert ga.shape != gc.shape or not np.array_equal(ga, gc)


def test_main_reports_rate(tmp_path: Path, capsys) -> None:
    assert (
        main(["--n", "3", "--size", "24", "--out", str(tmp_path / "o"), "--workers", "1", "--no-progress"])
        == 0
    )
    out = capsys.readouterr().out
    assert "wrote 3 simple galaxies" in out and "galaxies/s" in out
    assert len(fitsio.read(str(tmp_path / "o" / CATALOG_NAME), ext=1)) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0, "size": 64}, "--n must be >= 1"),
        ({"n": 5, "size": 15}, "--size must be >= 16"),
        ({"n": 5, "size": 64, "workers": 0}, "--workers must be >= 1"),
        ({"n": 5, "size": 64, "seed": -1}, r"--seed must be in \[0, 2\*\*63\)"),
        ({"n": 5, "size": 64, "seed": 2**64}, r"--seed must be in \[0, 2\*\*63\)"),
        ({"n": 5, "size": 200_000}, "--size must be <= 4096"),
        ({"n": 5, "size": 64, "family": "hsc"}, "family"),
    ],
)
def test_bad_config_is_a_config_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SynthConfig(out=tmp_path, **kwargs)


def test_unwritable_out_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"--out .*a-file/sub: cannot write there"):
        make_synthetic(2, 32, blocker / "sub", workers=1, progress=False)


def test_cli_prints_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hpcvae.synth", "--n", "0", "--size", "64", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "hpcvae.synth: error: --n must be >= 1, got 0"
    assert "Traceback" not in proc.stderr


def test_an_existing_set_is_kept_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    make_synthetic(3, 32, out, seed=1, workers=1, progress=False)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.run([sys.executable, "-m", "hpcvae.synth", "--n", "2", "--size", "32", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already holds a synthetic set" in proc.stderr and "--overwrite" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced
    make_synthetic(2, 32, out, seed=2, workers=1, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # only the set's own files are replaced
    import fitsio

    assert len(fitsio.read(str(out / "real_galaxy_catalog_synth.fits"))) == 2


# -- the COSMOS-like family ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cosmos_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cosmos")
    return make_synthetic(120, SIZE, out, seed=3, workers=1, progress=False, family="cosmos")


def test_cosmos_family_is_drawn_from_the_real_fits(cosmos_set: Path) -> None:
    """Every galaxy comes from a real COSMOS fit, moved by kernel noise: the population keeps its shape."""
    from hpcvae.synth import cosmos

    truth = fitsio.read(str(cosmos_set.parent / FITS_CATALOG_NAME), ext=1)
    header = fitsio.read_header(str(cosmos_set.parent / FITS_CATALOG_NAME), ext=1)
    real = fitsio.read(str(REAL / "real_galaxy_catalog_23.5_example_fits.fits"), ext=1)
    assert header["FAMILY"].strip() == "cosmos" and header["ZEROPT"] == pytest.approx(26.02, abs=0.01)
    assert set(truth["source_ident"]) <= set(real["IDENT"])
    assert len(set(truth["source_ident"])) > 40  # many real galaxies, not a few repeated
    for col, real_col in (("mag", real["mag_auto"]), ("zphot", real["zphot"])):
        assert stats.ks_2samp(truth[col], real_col).pvalue > 0.01, col
    assert stats.ks_2samp(np.log(truth["hlr"]), np.log(real["hlr"][:, 0])).pvalue > 0.01
    assert abs(truth["use_bulgefit"].mean() - real["use_bulgefit"].mean()) < 0.15
    # the smoothed bootstrap keeps the real size-magnitude correlation (brighter is bigger)
    r_real = stats.spearmanr(real["mag_auto"], np.log(real["hlr"][:, 0]))[0]
    r_synth = stats.spearmanr(truth["mag"], np.log(truth["hlr"]))[0]
    assert r_real < -0.2 and abs(r_synth - r_real) < 0.25
    assert np.all((truth["n"] >= 0.3) & (truth["n"] <= 6)) and np.all((truth["q"] > 0) & (truth["q"] <= 1))
    np.testing.assert_allclose(truth["flux"], 10 ** (-0.4 * (truth["mag"] - cosmos.zeropoint())), rtol=1e-9)
    ok = np.isfinite(truth["hsm_sigma_observed"])
    assert ok.mean() > 0.8 and np.all(truth["hsm_sigma_observed"][ok] > 0.03)  # the PSF widens every galaxy


def test_cosmos_stamps_carry_real_psfs_and_cosmos_noise(cosmos_set: Path) -> None:
    from hpcvae.synth import cosmos

    cat = fitsio.read(str(cosmos_set), ext=1)
    truth = fitsio.read(str(cosmos_set.parent / FITS_CATALOG_NAME), ext=1)
    rgc = galsim.RealGalaxyCatalog(str(cosmos_set))
    real_psfs = cosmos.ingredients()["psfs"]
    resid = []
    for i in range(10):
        psf = rgc.getPSFImage(i).array
        np.testing.assert_allclose(psf, real_psfs[int(truth["psf_index"][i])], rtol=1e-5, atol=1e-7)
        stamp = rgc.getGalImage(i).array
        assert stamp.shape[0] >= SIZE and stamp.shape[1] >= SIZE  # sharding crops, never pads the noise
        resid.append(stamp - cosmos.noiseless({"SEED": 3, "NOMSIZE": SIZE}, i))
    assert cat["NOISE_VARIANCE"][:10] == pytest.approx(truth["noise_variance"][:10])
    ratio = np.mean([r.var() / v for r, v in zip(resid, cat["NOISE_VARIANCE"][:10])])
    assert ratio == pytest.approx(1.0, rel=0.15)  # the residual is the noise, at each galaxy's catalog level
    lag1 = np.mean([np.mean(r[:, 1:] * r[:, :-1]) / r.var() for r in resid])
    assert lag1 > 0.1  # correlated between neighbours, as COSMOS noise is (white noise: ~0)


def test_cosmos_family_is_the_same_for_any_worker_count(tmp_path: Path) -> None:
    a = make_synthetic(6, 32, tmp_path / "a", seed=9, workers=1, progress=False, family="cosmos")
    b = make_synthetic(6, 32, tmp_path / "b", seed=9, workers=2, progress=False, family="cosmos")
    ta, tb = (fitsio.read(str(x.parent / FITS_CATALOG_NAME), ext=1) for x in (a, b))
    for name in ta.dtype.names:  # HSM truth is NaN where HSM failed: NaN == NaN here
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)
    with fitsio.FITS(str(a.parent / "real_galaxy_images_synth_n1.fits")) as fa:
        with fitsio.FITS(str(b.parent / "real_galaxy_images_synth_n1.fits")) as fb:
            for h in range(6):
                np.testing.assert_array_equal(fa[h].read(), fb[h].read())
