"""PSF-free models (galaxy2galaxy's forward model): the convolution, the loader's PSFs, and the science."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcvae.psf import psf_convolve

REPO = Path(__file__).resolve().parents[1]


def test_psf_convolve_matches_scipy_and_conserves_flux():
    from scipy.signal import fftconvolve

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 32, 32, generator=g)
    for p in (5, 37):  # a PSF stamp smaller and larger than the image
        k = torch.rand(3, 1, p, p, generator=g)
        k /= k.sum(dim=(2, 3), keepdim=True)
        y = psf_convolve(x, k)
        ref = np.stack([fftconvolve(x[i, 0].numpy(), k[i, 0].numpy(), mode="same") for i in range(3)])
        assert np.abs(y[:, 0].numpy() - ref).max() < 1e-5
    centred = torch.zeros(1, 1, 64, 64)
    centred[..., 32, 32] = 1.0
    wide = torch.rand(1, 1, 9, 9, generator=g)
    wide /= wide.sum()
    assert float(psf_convolve(centred, wide).sum()) == pytest.approx(1.0, abs=1e-5)


def test_a_delta_psf_leaves_the_loss_unchanged():
    from hpcvae.models import build_model
    from hpcvae.transforms import get_transform

    t = get_transform("asinh", {"min": -0.01, "max": 2.0, "p0.1": -0.01, "p99.9": 2.0, "noise_std": 0.01})
    plain = build_model("galaxy_vae", "debug", image_size=32).set_normalisation(t)
    fwd = build_model("galaxy_vae", "debug", image_size=32, psf_forward=True).set_normalisation(t)
    fwd.load_state_dict(plain.state_dict())
    x = torch.rand(4, 1, 32, 32)
    z = torch.full((4,), 0.5)
    delta = torch.zeros(4, 1, 5, 5)
    delta[..., 2, 2] = 1.0
    torch.manual_seed(0)
    a = {k: v.detach() for k, v in plain.compute_loss(plain(x, z, sample_latent=False), x, z, 0.1).items()}
    b = {
        k: v.detach()
        for k, v in fwd.compute_loss(fwd(x, z, sample_latent=False), x, z, 0.1, psf=delta).items()
    }
    assert float(b["recon"]) == pytest.approx(float(a["recon"]), rel=1e-4)
    blur = torch.full((4, 1, 5, 5), 1 / 25)
    c = {
        k: v.detach()
        for k, v in fwd.compute_loss(fwd(x, z, sample_latent=False), x, z, 0.1, psf=blur).items()
    }
    assert float(c["recon"]) != pytest.approx(float(a["recon"]), rel=1e-3)
    from hpcvae.errors import ModelError

    with pytest.raises(ModelError, match="psf_forward needs"):
        fwd.compute_loss(fwd(x, z), x, z, 0.1)


@pytest.fixture(scope="module")
def blurred(tmp_path_factory) -> Path:
    """800 synthetic galaxies at 32 px whose PSF matters (0.1" of extra blur), sharded with their PSFs."""
    from hpcvae.shards.__main__ import main as shard_main
    from hpcvae.synth import make_synthetic

    root = tmp_path_factory.mktemp("psf")
    cat = make_synthetic(800, 32, root / "synth", seed=5, workers=1, progress=False, psf_blur=0.1)
    assert shard_main(["--catalog", str(cat), "--out", str(root / "shards"), "--size", "32",
                       "--val-fraction", "0.2"]) in (0, None)  # fmt: skip
    return root / "shards"


@pytest.mark.parametrize("resident", [False, True])
def test_loaders_carry_each_galaxys_psf(blurred, resident):
    from hpcvae.config import DataConfig
    from hpcvae.data import make_data
    from hpcvae.shards import Manifest, iter_samples
    from hpcvae.shards.format import PSF, decode_npy, read_shard

    m = Manifest.load(blurred)
    cfg = DataConfig(path=str(blurred), batch_size=8, num_workers=0, gpu_resident=resident)
    data = make_data(cfg, m, rank=0, world_size=1, seed=0, device="cpu", psf=True)
    batch = next(iter(data.val_loader()))
    assert batch["psf"].shape == (8, 1, 37, 37) and batch["psf"].dtype == torch.float32
    sums = batch["psf"].sum(dim=(1, 2, 3))
    assert torch.allclose(sums, torch.ones(8), atol=1e-5)
    # the same PSF the shard holds for that key
    first = {k: f for k, f in read_shard(m.shard_paths("val")[0])}[batch["key"][0]]
    assert np.allclose(decode_npy(first[PSF]), batch["psf"][0, 0].numpy(), atol=1e-3 if resident else 0)
    data.close()
    assert next(iter_samples(m, "val"))[2]["psf_hdu"] is not None


def test_psfs_of_several_shapes_reach_the_model_as_one_centred_square(tmp_path):
    """GalSim's COSMOS PSF images come as 37x37, 37x39, 39x37 and 39x39.  The shards stored them as given
    and the manifest said the first one's shape, so a psf_forward run stopped at the first other one, and
    the set's mean PSF left out every PSF of another shape."""
    from hpcvae.config import DataConfig
    from hpcvae.data import make_data
    from hpcvae.shards import Manifest
    from hpcvae.shards.__main__ import main as shard_main
    from hpcvae.shards.format import PSF, decode_npy, read_shard
    from hpcvae.synth import make_synthetic

    cat = make_synthetic(40, 32, tmp_path / "synth", seed=2, workers=1, progress=False, family="cosmos")
    out = tmp_path / "shards"
    assert shard_main(
        ["--catalog", str(cat), "--out", str(out), "--size", "32", "--val-fraction", "0.25"]
    ) in (0, None)
    m = Manifest.load(out)
    info = m.physics()["psf"]
    n_all = m.count("train") + m.count("val")
    assert info["shape"] == [39, 39] and info["n"] == n_all  # every PSF in the mean
    stored = {k: decode_npy(f[PSF]) for p in m.shard_paths("train") for k, f in read_shard(p)}
    sides = {a.shape for a in stored.values()}
    assert sides == {(37, 37), (39, 39)}  # squared where they were not, centre kept
    data = make_data(DataConfig(path=str(out), batch_size=5, num_workers=0), m, rank=0, world_size=1, seed=0,
                     device="cpu", psf=True)  # fmt: skip
    seen = 0
    for batch in data.train_loader(0):
        assert batch["psf"].shape[1:] == (1, 39, 39)
        assert torch.allclose(batch["psf"].sum(dim=(1, 2, 3)), torch.ones(len(batch["key"])), atol=1e-5)
        for key, p in zip(batch["key"], batch["psf"][:, 0].numpy()):
            a = stored[key]
            o = (39 - a.shape[0]) // 2
            assert np.array_equal(p[o : o + a.shape[0], o : o + a.shape[1]], a)
            assert p.sum() == pytest.approx(a.sum())
            seen += a.shape[0] == 37
    data.close()
    assert seen > 0


def test_psf_forward_without_psfs_in_the_shards_is_a_one_line_error(tiny_shards, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "hpcvae.train", "--config", "configs/debug.toml", "--data", str(tiny_shards),
         "--out", str(tmp_path / "r"), "--epochs", "1", "--set", "model.psf_forward=true", "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1, err
    assert "model.psf_forward needs each galaxy's PSF" in err and "manifest.json" in err


@pytest.mark.slow
def test_psf_free_model_generates_the_psf_free_sizes(blurred, tmp_path):
    """Trained through the PSF, a model generates galaxies of the truth's size, not the observed one."""
    from hpcvae import load_model
    from hpcvae.evaluate.moments import moments
    from hpcvae.shards import Manifest, iter_samples
    from hpcvae.synth.simple import PIXEL_SCALE, _profile, draw_params
    from hpcvae.train import main as train_main
    from hpcvae.train_prior import main as prior_main

    run = tmp_path / "fwd"
    assert train_main([
        "--arch", "galaxy_vae", "--flavour", "debug", "--data", str(blurred), "--out", str(run), "--epochs", "15",
        "--batch-size", "32", "--seed", "0", "--set", "model.psf_forward=true", "--set", "data.num_workers=0",
        "--set", "data.persistent_workers=false", "--set", "train.sample_grid=false",
    ]) == 0  # fmt: skip
    assert json.loads((run / "model.json").read_text())["physics"]["psf_free"] is True
    assert prior_main([str(run), "--data", str(blurred), "--epochs", "40", "--workers", "0"]) in (0, None)

    m = Manifest.load(blurred)
    val = [(img, meta["zphot"]) for _, img, meta in iter_samples(m, "val")]
    truth = np.stack([_profile(p).drawImage(nx=32, ny=32, scale=PIXEL_SCALE, method="no_pixel").array
                      for p in draw_params(5, 0, 800, 32)])  # fmt: skip

    def mean_sigma(images: np.ndarray) -> float:
        s = moments(images, PIXEL_SCALE)
        return float(np.nanmean(s["sigma_arcsec"][s["ok"]]))

    observed, psf_free = mean_sigma(np.stack([v[0] for v in val])), mean_sigma(truth)
    assert observed > 1.3 * psf_free  # the PSF matters in this set
    model = load_model(run)
    z = torch.as_tensor([v[1] for v in val], dtype=torch.float32)
    with torch.no_grad():
        gen = model.sample(len(val), redshift=z, generator=torch.Generator().manual_seed(0))[:, 0].numpy()
    generated = mean_sigma(gen)
    assert abs(generated / psf_free - 1) < 0.15, (generated, psf_free, observed)
    assert abs(generated - psf_free) < 0.5 * abs(generated - observed), (generated, psf_free, observed)
