"""The science measures of hpcvae.evaluate on real GalSim profiles with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpcvae.evaluate import bootstrap, morphology, spectra

SIZE = 64
SCALE = 0.03


def _galaxy(n: float, hlr: float, q: float = 1.0, beta: float = 0.0, flux: float = 40.0) -> np.ndarray:
    import galsim

    gal = galsim.Sersic(n=n, half_light_radius=hlr).shear(q=q, beta=beta * galsim.degrees).withFlux(flux)
    psf = galsim.Gaussian(fwhm=0.1)
    return galsim.Convolve(gal, psf).drawImage(nx=SIZE, ny=SIZE, scale=SCALE).array.astype(np.float64)


def _cosmos_noise():
    """GalSim's COSMOS correlated noise and its true autocorrelation (1 at [0, 0]), from one 512² field."""
    import galsim

    cn = galsim.getCOSMOSNoise(variance=1.0)
    big = galsim.ImageF(512, 512, scale=SCALE)
    big.addNoise(cn.copy(rng=galsim.BaseDeviate(3)))
    a = big.array - big.array.mean()
    truth = np.fft.ifft2(np.abs(np.fft.fft2(a)) ** 2).real / a.size
    return cn, truth / truth[0, 0]


def test_white_noise_has_a_flat_spectrum_at_its_variance_and_the_corners_find_it():
    from hpcvae.evaluate.noise import NoiseModel

    rng = np.random.default_rng(0)
    sigma = 0.02
    noise = rng.normal(0, sigma, (200, SIZE, SIZE))
    ps = spectra.power_spectrum(noise)
    assert ps["p"].mean() == pytest.approx(sigma**2, rel=0.02)
    assert np.ptp(ps["p"][2:]) / sigma**2 < 0.15  # flat
    stamps = np.stack([_galaxy(1.0, 0.2) for _ in range(50)]) + rng.normal(0, sigma, (50, SIZE, SIZE))
    est = spectra.noise_spectrum(NoiseModel.from_stamps(stamps, sigma), np.full(50, sigma), SIZE)
    assert est is not None and est["n"] >= 100 and np.allclose(est["k"], ps["k"])
    assert est["p"].mean() == pytest.approx(sigma**2, rel=0.1)
    # residuals that are exactly the noise sit at 1 in every band
    ratios = spectra.band_ratios(ps["k"], spectra.power_spectrum(stamps - np.stack([_galaxy(1.0, 0.2)] * 50))["p"],
                                 est["p"])  # fmt: skip
    assert all(v == pytest.approx(1.0, abs=0.15) for v in ratios.values())


def test_the_noise_model_learns_cosmos_correlated_noise_around_galaxies_and_redraws_it():
    """Corner patches of real stamps give the noise's correlation; draws have its variance and correlation."""
    import galsim

    from hpcvae.evaluate.noise import NoiseModel, correlation

    cn, truth = _cosmos_noise()
    sigma = np.full(120, 0.01)
    stamps = []
    for i in range(120):
        im = galsim.ImageF(SIZE, SIZE, scale=SCALE)
        im.addNoise(cn.withVariance(1e-4).copy(rng=galsim.BaseDeviate(10 + i)))
        stamps.append(im.array + _galaxy(1.0, 0.1 + 0.002 * i, flux=5.0))
    acf = correlation(np.stack(stamps), sigma)
    assert acf is not None
    c = acf.shape[0] // 2
    assert acf[c, c + 1] == pytest.approx(truth[0, 1], abs=0.05) and truth[0, 1] > 0.3  # really correlated
    assert acf[c + 1, c + 1] == pytest.approx(truth[1, 1], abs=0.05)
    model = NoiseModel(acf)
    draws = model.draw(200, SIZE, np.full(200, 0.5), np.random.default_rng(0))
    assert draws.std() == pytest.approx(0.5, rel=0.03)
    again = correlation(draws, np.full(200, 0.5))
    assert again[c, c + 1] == pytest.approx(acf[c, c + 1], abs=0.03)
    white = NoiseModel.from_stamps(np.random.default_rng(1).normal(0, 1, (50, SIZE, SIZE)), 1.0)
    assert abs(white.describe()["rho_1px_x"]) < 0.03
    assert NoiseModel(None).describe()["kind"] == "white"


def test_the_noise_of_stamps_that_galaxies_fill_is_the_noise_not_their_wings():
    """Half the stamps hold a de Vaucouleurs galaxy whose wings put 0.5-2.6 sigma of light in every corner.

    The source mask is relative to each stamp, so those corners passed as blank: the noise came out
    correlated at 0.70 between neighbours (COSMOS's: 0.48) and its low-frequency power 1.24x too high (on the
    COSMOS-like set 0.99 and 5-50x, which added a smooth offset field to every generated stamp before its
    morphology was measured).  A blank patch's mean must now be within 0.3 sigma of the sky; on synthetic
    sets the noise is measured exactly, as the real stamps minus their noise-free truth.
    """
    import galsim

    from hpcvae.evaluate.noise import NoiseModel

    cn, truth = _cosmos_noise()
    n, sigma = 120, np.full(120, 0.01)
    noise, clean = [], []
    for i in range(n):
        im = galsim.ImageF(SIZE, SIZE, scale=SCALE)
        im.addNoise(cn.withVariance(1e-4).copy(rng=galsim.BaseDeviate(10 + i)))
        noise.append(im.array.astype(np.float64))
        clean.append(
            _galaxy(4.0, 0.6 + 0.01 * i, q=0.6, beta=3 * i, flux=400.0)
            if i % 2
            else _galaxy(1.0, 0.15, flux=5.0)
        )
    noise, clean = np.stack(noise), np.stack(clean)
    assert (clean[1::2, :16, :16].mean(axis=(1, 2)) > 0.4 * sigma[0]).all()  # the wings reach every corner
    true_ps = spectra.power_spectrum(noise)
    for model in (NoiseModel.from_stamps(clean + noise, sigma), NoiseModel.from_noise(noise, sigma)):
        c = model.acf.shape[0] // 2
        assert model.acf[c, c + 1] == pytest.approx(truth[0, 1], abs=0.02), model.describe()
        assert model.acf[c + 1, c + 1] == pytest.approx(truth[1, 1], abs=0.02), model.describe()
        est = spectra.noise_spectrum(model, sigma, SIZE)
        ratios = spectra.band_ratios(true_ps["k"], est["p"], true_ps["p"])
        assert all(v == pytest.approx(1.0, abs=0.05) for v in ratios.values()), (model.describe(), ratios)
    assert NoiseModel.from_stamps(
        clean[1::2] + noise[1::2], sigma[1::2]
    ).white  # no blank patch: not the wings
    assert spectra.noise_spectrum(NoiseModel(None), sigma, SIZE) is None  # residuals are then not judged


def test_reduced_chi2_is_one_for_noise_and_grows_with_a_model_error():
    rng = np.random.default_rng(1)
    clean = np.stack([_galaxy(1.0, 0.2) for _ in range(20)])
    real = clean + rng.normal(0, 0.01, clean.shape)
    assert spectra.reduced_chi2(real, clean, np.full(20, 1e-4)).mean() == pytest.approx(1.0, rel=0.05)
    assert spectra.reduced_chi2(real, 0.8 * clean, np.full(20, 1e-4)).mean() > 1.2


def test_artefact_measure_separates_row_stripes_from_a_clean_stamp():
    """A smooth galaxy has no streaks; the same galaxy with faint stripes on every other row has many."""
    clean = np.stack([_galaxy(1.5, 0.25, q=0.6, beta=b) for b in (0, 30, 60, 90)])
    sigma = 0.01
    striped = clean.copy()
    striped[:, ::2, :] += 0.1 * sigma  # a tenth of the noise: invisible by eye, plain to the measure
    a_clean, a_striped = spectra.artefacts(clean, sigma), spectra.artefacts(striped, sigma)
    assert a_clean["streak_rows_median"] < 0.01
    assert a_striped["streak_rows_median"] > 10 * max(a_clean["streak_rows_median"], 1e-4)
    assert a_striped["streak_cols_median"] == pytest.approx(a_clean["streak_cols_median"], abs=1e-6)
    cols = np.swapaxes(striped, 1, 2)
    assert spectra.artefacts(cols, sigma)["streak_cols_median"] > 10 * max(
        a_clean["streak_cols_median"], 1e-4
    )
    grid = clean.copy()
    grid[:, ::4, :] += 0.3 * sigma  # a period-4 pattern along rows and columns: a cross-hatch
    grid[:, :, ::4] += 0.3 * sigma
    assert (
        spectra.artefacts(grid, sigma)["axis_power_ratio"]
        > 3 * spectra.artefacts(clean, sigma)["axis_power_ratio"]
    )
    # noise alone sits at sqrt(6 / S) in both directions, and is isotropic
    noise = np.random.default_rng(2).normal(0, sigma, (64, SIZE, SIZE))
    a_noise = spectra.artefacts(noise, sigma)
    assert a_noise["streak_rows_median"] == pytest.approx(math.sqrt(6 / SIZE), rel=0.2)
    assert a_noise["axis_power_ratio"] == pytest.approx(1.0, abs=0.15)


def test_statmorph_ranks_concentrated_above_extended_profiles():
    """de Vaucouleurs profiles have higher Gini and concentration, lower M20, than exponential disks."""
    rng = np.random.default_rng(3)
    sigma = 0.004
    disks = np.stack([_galaxy(1.0, 0.25) for _ in range(4)]) + rng.normal(0, sigma, (4, SIZE, SIZE))
    devs = np.stack([_galaxy(4.0, 0.25) for _ in range(4)]) + rng.normal(0, sigma, (4, SIZE, SIZE))
    md, mv = morphology.measure(disks, sigma), morphology.measure(devs, sigma)
    assert md["ok"].all() and mv["ok"].all()
    assert np.mean(mv["gini"]) > np.mean(md["gini"]) + 0.05
    assert np.mean(mv["concentration"]) > np.mean(md["concentration"]) + 0.5
    assert np.mean(mv["m20"]) < np.mean(md["m20"])
    empty = morphology.measure(rng.normal(0, sigma, (2, SIZE, SIZE)) * 0.01, sigma)  # nothing above 1.5 sigma
    assert not empty["ok"].any() and np.isnan(empty["gini"]).all() and len(empty["errors"]) == 2


def test_noise_free_asymmetry_is_zero_for_symmetric_galaxies_and_measures_a_lopsided_one():
    """A sheared Sérsic at a sub-pixel offset is symmetric (A ~ 0); a clump of 5% of the light, far from its
    mirror image, adds |clump| twice to sum |I - I_180|: A = 2 * 0.05 / 1.05, less what re-centring gains."""
    import galsim

    def draw(offset: tuple[float, float], clump: bool) -> np.ndarray:
        gal = galsim.Sersic(n=1.5, half_light_radius=0.2, flux=40.0).shear(q=0.6, beta=30 * galsim.degrees)
        if clump:
            gal = gal + galsim.Gaussian(sigma=0.03, flux=2.0).shift(0.12, 0.05)
        img = galsim.Convolve(gal, galsim.Gaussian(fwhm=0.1))
        return img.drawImage(nx=SIZE, ny=SIZE, scale=SCALE, offset=offset).array.astype(np.float64)

    sym = np.stack([draw((0.0, 0.0), False), draw((0.3, -0.4), False)])
    lop = np.stack([draw((0.0, 0.0), True), draw((0.3, -0.4), True)])
    a_sym, a_lop = morphology.noise_free_asymmetry(sym), morphology.noise_free_asymmetry(lop)
    assert np.all(a_sym < 0.01), a_sym
    assert np.all((a_lop > 0.06) & (a_lop < 2 * 0.05 / 1.05 + 0.005)), a_lop
    assert np.isnan(morphology.noise_free_asymmetry(np.zeros((1, SIZE, SIZE)))).all()  # no light: no value


def test_bootstrap_intervals_cover_and_keep_copies_of_a_galaxy_together():
    rng = np.random.default_rng(4)
    real, gen = rng.normal(1.0, 0.3, 400), rng.normal(1.1, 0.3, 400)
    rs = bootstrap.Resampler([str(i) for i in range(400)], 400, n_boot=300, seed=0)
    c = bootstrap.compare(real, gen, rs)
    lo, hi = c["mean_diff_ci"]
    assert lo < 0.1 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.3 * math.sqrt(2 / 400), rel=0.25)
    # 100 galaxies in 4 copies each: the interval is as wide as 100 independent galaxies', not 400
    grouped = bootstrap.Resampler([str(i // 4) for i in range(400)], 400, n_boot=300, seed=0)
    copies = np.repeat(rng.normal(1.0, 0.3, 100), 4)
    w_group = np.ptp(bootstrap.compare(copies, gen, grouped)["mean_real_ci"])
    w_naive = np.ptp(bootstrap.compare(copies, gen, rs)["mean_real_ci"])
    assert w_group > 1.6 * w_naive
    b, se = bootstrap.slope(np.linspace(0, 1, 50), 2.0 * np.linspace(0, 1, 50) + rng.normal(0, 0.01, 50))
    assert b == pytest.approx(2.0, abs=5 * se)


def test_the_response_to_one_of_several_conditions_walks_along_the_real_population():
    """A decoder whose size follows flux_radius only, on galaxies whose flux_radius grows with zphot: at fixed
    other conditions zphot changes nothing, along the real galaxies it gives their trend."""
    from hpcvae.evaluate import response

    rng = np.random.default_rng(0)
    z = rng.uniform(0.2, 2.0, 400)
    radius = 4.0 + 3.0 * z + rng.normal(0, 0.2, 400)  # pixels: bigger at higher zphot in this population
    conds = {"zphot": z, "flux_radius": radius}
    yy, xx = np.mgrid[:32, :32] - 15.5

    def decode(lat: np.ndarray, c: dict[str, np.ndarray]) -> np.ndarray:
        s = c["flux_radius"][:, None, None]
        return np.exp(-(xx**2 + yy**2) / (2 * s**2)).astype(np.float32)

    grid = np.percentile(z, [10, 50, 90])
    lat = np.zeros((4, 2))
    fixed = response.sweep(
        decode, lat, "zphot", grid, {"zphot": 1.0, "flux_radius": float(np.median(radius))}, 0.03
    )
    walk = response.sweep(decode, lat, "zphot", grid, response.along_population(conds, "zphot", grid), 0.03)
    from hpcvae.evaluate.moments import moments

    real_imgs = decode(
        np.zeros((len(z), 2)), conds
    )  # the real galaxies: the same profiles at their own radii
    st = moments(real_imgs, 0.03)
    real = response.real_change(z, st["sigma_arcsec"], real_imgs.reshape(len(z), -1).sum(1), grid)
    assert abs(fixed["dlog10_sigma"]) < 1e-3 and real["dlog10_sigma"] > 0.15
    assert walk["dlog10_sigma"] == pytest.approx(real["dlog10_sigma"], rel=0.1)


def test_the_baseline_difference_is_paired_and_tells_closer_farther_and_noise_apart():
    """Each real galaxy carries its baseline stamp: a baseline that mirrors the real galaxies up to a shift
    is judged on the shift, not on the real set's scatter."""
    from hpcvae.evaluate.bootstrap import Resampler
    from hpcvae.evaluate.science import baseline_difference

    rng = np.random.default_rng(3)
    n = 300
    real = rng.lognormal(0.0, 0.5, n)
    rs = Resampler(list(range(n)), n, n_boot=200, seed=1)
    like = rng.lognormal(0.0, 0.5, n)  # a fresh draw of the real population
    closer = baseline_difference(real, like, real * 1.3, rs)  # the baseline is 30% too big everywhere
    assert closer["value"] < 0 and closer["value_ci"][1] < 0 and closer["says"] == "closer than the baseline"
    farther = baseline_difference(real, like * 1.5, real * 1.05, rs)
    assert farther["value_ci"][0] > 0 and farther["says"] == "farther than the baseline"
    same = baseline_difference(real, like, rng.lognormal(0.0, 0.5, n)[np.argsort(np.argsort(real))], rs)
    assert same["value_ci"][0] < 0 < same["value_ci"][1] and same["says"] == "within noise of the baseline"
    for d in (closer, farther, same):
        assert d["value_ci"][0] <= d["value"] <= d["value_ci"][1]
