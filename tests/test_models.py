"""The architectures: the seed's five layer tables, galaxy_vae, shapes, losses, conditioning, generation API."""

from __future__ import annotations

import fitsio
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from torch import nn

from hpcvae.config import ModelConfig
from hpcvae.errors import ModelError
from hpcvae.models import MODEL_REGISTRY, VAEOutput, build_model, list_models, model_from_config

SEED = ["vae128", "vae158", "cvae", "cvae2", "fancy_cvae"]
ALL = [*SEED, "galaxy_vae", "galaxy_film"]
CONDITIONAL = ["cvae", "cvae2", "fancy_cvae", "galaxy_vae"]
AEGIS = SHARED_DATA / "aegis-real"


def _inputs(m, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, m.image_size, m.image_size, generator=g)
    r = torch.rand(b, generator=g) * 2 if m.conditional else None
    return x, r


def _noise(m, b):
    """Per-galaxy noise variances for a likelihood that reads them (identity normalisation), else None."""
    if "noise_var" not in m.likelihood.needs:
        return None
    from hpcvae.transforms import get_transform

    m.set_normalisation(get_transform("identity"))
    return torch.full((b,), 1e-4)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_the_five_and_galaxy_vae():
    assert list_models() == ALL
    assert set(MODEL_REGISTRY) == set(ALL)
    for name in ALL:
        assert set(MODEL_REGISTRY[name].flavours) == {"default", "debug"}


# ----------------------------------------------------------------------------------------
# Layer tables from ../shared/reference/seed-models.md, at nf=64, z_dim=32.


def _convs(seq: nn.Sequential) -> list[tuple]:
    rows = []
    for layer in seq:
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            kind = "TConv" if isinstance(layer, nn.ConvTranspose2d) else "Conv"
            rows.append(
                (
                    kind,
                    layer.in_channels,
                    layer.out_channels,
                    layer.kernel_size[0],
                    layer.stride[0],
                    layer.padding[0],
                    layer.bias is not None,
                )
            )
        elif isinstance(layer, nn.BatchNorm2d):
            rows.append(("BN", layer.num_features))
        elif isinstance(layer, nn.LeakyReLU):
            rows.append(("LReLU", layer.negative_slope))
        elif isinstance(layer, nn.ReLU):
            rows.append(("ReLU",))
        else:
            rows.append((type(layer).__name__,))
    return rows


def _enc_table(nc, k2, head):
    return [
        ("Conv", nc, 64, 4, 2, 1, False), ("LReLU", 0.2),
        ("Conv", 64, 128, k2, 2, 1, False), ("BN", 128), ("LReLU", 0.2),
        ("Conv", 128, 256, 4, 2, 1, False), ("BN", 256), ("LReLU", 0.2),
        ("Conv", 256, 512, 4, 2, 1, False), ("BN", 512), ("LReLU", 0.2),
        ("Conv", 512, 1, *head, False),
    ]  # fmt: skip


def _dec_table(nc, head, k4, out, head_bias=True):
    return [
        ("TConv", nc, 512, *head, head_bias), ("BN", 512), ("ReLU",),
        ("TConv", 512, 256, 4, 2, 1, False), ("BN", 256), ("ReLU",),
        ("TConv", 256, 128, 4, 2, 1, False), ("BN", 128), ("ReLU",),
        ("TConv", 128, 64, k4, 2, 1, False), ("BN", 64), ("ReLU",),
        ("TConv", 64, out, 4, 2, 1, False),
    ]  # fmt: skip


SEED_TABLES = {
    # name: (encoder, decoder, (mu/logvar Linear in, out), decoder Linear (in, out))
    "vae158": (_enc_table(1, 3, (4, 2, 1)), _dec_table(1, (4, 2, 1), 3, 1), (25, 32), (32, 25)),
    "vae128": (
        _enc_table(1, 4, (5, 1, 0)),
        _dec_table(1, (5, 1, 0), 4, 1, head_bias=False),
        (16, 32),
        (32, 16),
    ),
    "cvae": (_enc_table(2, 3, (4, 2, 1)), _dec_table(2, (4, 2, 1), 3, 1), (25, 32), (32, 25)),
    "cvae2": (_enc_table(1, 3, (4, 2, 1)), _dec_table(1, (4, 2, 1), 3, 1), (26, 32), (33, 25)),
    "fancy_cvae": (_enc_table(2, 3, (4, 2, 1)), _dec_table(2, (4, 2, 1), 3, 2), (25, 32), (32, 25)),
}

# Hand arithmetic from the tables (weights + biases + BN affine; BN running stats are buffers).
_ENC158 = 1 * 64 * 16 + 64 * 128 * 9 + 128 * 256 * 16 + 256 * 512 * 16 + 512 * 16  # 2_704_384
_DEC158 = (1 * 512 * 16 + 512) + 512 * 256 * 16 + 256 * 128 * 16 + 128 * 64 * 9 + 64 * 16  # 2_704_896
_BN = 2 * (128 + 256 + 512) + 2 * (512 + 256 + 128 + 64)  # 3_712
SEED_PARAMS = {
    # vae158: convs + BN + 2 x Linear(25, 32) + Linear(32, 25)
    "vae158": 5_415_481,  # 2_704_384 + 2_704_896 + 3_712 + 1_664 + 825
    # vae128: Conv(5,1,0) 512*25 head, 2 x Linear(16, 32) = 1_088, Linear(32, 16) = 528,
    # TConv(5,1,0) 1->512 without bias (the seed's code) = 12_800, kernel-4 TConv 128->64 = 131_072
    "vae128": 5_538_000,  # 2_766_336 + 2_766_336 + 3_712 + 1_088 + 528
    # cvae: first conv 2->64 (+1_024), first TConv 2->512 (+8_192)
    "cvae": 5_424_697,
    # cvae2: 2 x Linear(26, 32) (+64), Linear(33, 25) (+25)
    "cvae2": 5_415_570,
    # fancy_cvae: cvae with a 2-channel last TConv (+1_024)
    "fancy_cvae": 5_425_721,
}


def test_hand_arithmetic_is_consistent():
    assert _ENC158 == 2_704_384 and _DEC158 == 2_704_896 and _BN == 3_712
    assert _ENC158 + _DEC158 + _BN + 2 * (25 * 32 + 32) + (32 * 25 + 25) == SEED_PARAMS["vae158"]


@pytest.mark.parametrize("name", SEED)
def test_default_matches_seed_layer_tables(name):
    m = build_model(name)
    enc, dec, lin_enc, lin_dec = SEED_TABLES[name]
    assert _convs(m.encoder) == enc
    assert _convs(m.decoder) == dec
    for head in (m.fc_mu, m.fc_logvar):
        assert (head.in_features, head.out_features) == lin_enc
    assert (m.fc_dec.in_features, m.fc_dec.out_features) == lin_dec
    assert _n_params(m) == SEED_PARAMS[name]


@pytest.mark.parametrize("name", ALL)
def test_default_shapes(name):
    m = build_model(name)
    assert m.image_size == (128 if name == "vae128" else 158)
    x, r = _inputs(m)
    out = m(x, r)
    assert m.z_dim == 32
    assert isinstance(out, VAEOutput)
    assert out.recon.shape == x.shape and out.mu.shape == (2, m.z_dim) and out.logvar.shape == (2, m.z_dim)
    assert (out.z_pred is not None) == (name == "fancy_cvae")
    if out.z_pred is not None:
        assert out.z_pred.shape == (2,)
    assert float(out.recon.detach().min()) >= 0 and float(out.recon.detach().max()) <= 1


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("size", [64, 32, 96, 158, 128])
def test_debug_and_other_sizes(name, size):
    m = build_model(name, "debug", image_size=size)
    assert m.config["nf"] == 8 and m.config["z_dim"] == (16 if name in ("galaxy_vae", "galaxy_film") else 8)
    x, r = _inputs(m, b=3)
    m.eval()
    out = m(x, r)
    assert out.recon.shape == (3, 1, size, size) and out.mu.shape == (3, m.z_dim)
    assert m.bottleneck >= 16  # the last map is never below 4 x 4
    assert m.decode(out.mu, r).shape == (3, 1, size, size)


def test_debug_default_size_and_geometry_rule():
    for name in ALL:
        assert build_model(name, "debug").image_size == 64
    # The last map never goes below 4 x 4: where halving would, the layer keeps the side.
    g = build_model("vae128", "debug").geometry  # 64 -> 32 16 8 4, head Conv(1,1,0) keeps 4
    assert (g.sizes[-1], g.head_kernel, g.latent_side) == (4, 1, 4)
    g = build_model("vae158", "debug").geometry  # 64 -> 32 16 8 4, head Conv(3,1,1) keeps 4
    assert (g.head_kernel, g.head_stride, g.latent_side) == (3, 1, 4)
    g = build_model("vae158", "debug", image_size=96).geometry  # 96 48 24 12 6, head keeps 6 (not 3)
    assert g.latent_side == 6 and g.head_stride == 1
    g = build_model("cvae2", "debug", image_size=32).geometry  # 32 16 8 4 4: a stride-1 trunk conv
    assert g.strides == (2, 2, 2, 1) and g.latent_side == 4


def test_a_starved_bottleneck_is_an_error_except_for_a_seed_model_at_its_size():
    with pytest.raises(
        ModelError, match=r"cvae2 at 64px: its encoder hands 16 numbers .* z_dim = 32.*galaxy_vae"
    ):
        build_model("cvae2", image_size=64)  # the seed's z_dim at 64 px: 4 x 4 = 16 numbers
    assert build_model("cvae2").bottleneck == 25 < 32  # the seed's own model at 158 px is kept
    assert build_model("vae128").bottleneck == 16
    assert build_model("galaxy_vae", image_size=64).bottleneck == 8 * 32 * 4 * 4


def test_galaxy_vae_design():
    """Wide bottleneck, no transposed convolutions, replicated borders, equalised Linear -> z starting at sigma 1."""
    from hpcvae.models.galaxy import EqualizedLinear

    m = build_model("galaxy_vae", "debug")  # nf 8 at 64 px: 8nf channels at 4 x 4
    assert m.sides == [64, 32, 16, 8, 4] and m.channels[-1] == 64 and m.n_features == 64 * 16
    assert not [x for x in m.modules() if isinstance(x, nn.ConvTranspose2d)]
    assert all(c.padding_mode == "replicate" for c in m.decoder.modules() if isinstance(c, nn.Conv2d))
    assert isinstance(m.fc_mu, EqualizedLinear) and m.fc_mu.in_features == 64 * 16 + 1
    x, r = _inputs(m, b=4)
    m.eval()
    out = m(x, r)
    assert torch.equal(out.logvar, torch.zeros_like(out.logvar))  # posterior sigma starts at 1
    # An Adam step moves the equalised layer's output like a narrow layer's, whatever its fan-in.
    m.train()
    opt = torch.optim.Adam([m.fc_mu.weight], lr=1e-3)
    before = m(x, r).mu.detach()
    opt.zero_grad()
    m(x, r).mu.sum().backward()
    opt.step()
    torch.manual_seed(0)
    assert (m(x, r).mu.detach() - before).abs().max() < 0.5


# ----------------------------------------------------------------------------------------
# Losses


def test_kl_matches_closed_form_and_reduction():
    m = build_model("vae158", "debug")
    x, _ = _inputs(m, b=4)
    out = m(x)
    losses = m.compute_loss(out, x, None, beta=0.5)
    q = torch.distributions.Normal(out.mu, torch.exp(0.5 * out.logvar))
    p = torch.distributions.Normal(torch.zeros_like(out.mu), torch.ones_like(out.mu))
    kl_ref = torch.distributions.kl_divergence(q, p).sum()
    torch.testing.assert_close(losses["kl"], kl_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["recon"], ((out.recon - x) ** 2).sum())
    torch.testing.assert_close(losses["total"], losses["recon"] + 0.5 * losses["kl"])

    mean = build_model("vae158", "debug", recon_reduction="mean")
    mean.load_state_dict(m.state_dict())
    lm = mean.compute_loss(out, x, None, beta=0.5)
    for k in ("recon", "kl", "total"):
        torch.testing.assert_close(lm[k], losses[k] / x.numel())


def test_fancy_loss_adds_weighted_redshift_term():
    m = build_model("fancy_cvae", "debug", redshift_weight=10.0)
    x, r = _inputs(m, b=3)
    out = m(x, r)
    losses = m.compute_loss(out, x, r, beta=0.1)
    torch.testing.assert_close(losses["redshift"], ((out.z_pred - r) ** 2).sum())
    torch.testing.assert_close(
        losses["total"], losses["recon"] + 0.1 * losses["kl"] + 10.0 * losses["redshift"]
    )
    assert set(build_model("cvae2", "debug").loss({"image": x, "redshift": r}, 0.1)) == {
        "total",
        "recon",
        "kl",
    }


def test_loss_from_batch_and_unconditional_ignores_batch_redshift():
    m = build_model("vae158", "debug")
    x, _ = _inputs(m, b=2)
    torch.manual_seed(3)
    a = m.loss({"image": x, "redshift": torch.ones(2)}, 0.1)["total"]
    torch.manual_seed(3)
    b = m.compute_loss(m(x), x, None, 0.1)["total"]
    torch.testing.assert_close(a, b)
    assert a.dtype == torch.float32


def test_reparameterisation_is_reproducible_and_eval_uses_mean():
    m = build_model("cvae2", "debug")
    x, r = _inputs(m)
    torch.manual_seed(7)
    a = m(x, r).recon
    torch.manual_seed(7)
    b = m(x, r).recon
    torch.manual_seed(8)
    c = m(x, r).recon
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    m.eval()
    torch.testing.assert_close(m(x, r).recon, m(x, r).recon)
    assert not torch.equal(m(x, r, sample_latent=True).recon, m(x, r, sample_latent=True).recon)


# ----------------------------------------------------------------------------------------
# Conditioning and errors


@pytest.mark.parametrize("name", CONDITIONAL)
def test_conditional_models_use_the_redshift(name):
    torch.manual_seed(0)
    m = build_model(name, "debug").eval()
    x, _ = _inputs(m, b=2)
    with torch.no_grad():
        lo = m(x, torch.tensor([0.2, 0.2]))
        hi = m(x, torch.tensor([[1.5], [1.5]]))  # (B, 1) accepted
    assert (lo.mu - hi.mu).abs().max() > 1e-5
    assert (lo.recon - hi.recon).abs().max() > 1e-5
    z = torch.zeros(1, m.z_dim)
    assert (m.decode(z, 0.2) - m.decode(z, 1.5)).abs().max() > 1e-5


@pytest.mark.parametrize("name", ALL)
def test_redshift_errors(name):
    m = build_model(name, "debug")
    x, _ = _inputs(m)
    if m.conditional:
        with pytest.raises(ModelError, match="conditional.*needs (a redshift|its conditions)"):
            m(x)
        with pytest.raises(ModelError, match=r"shape \(2,\)|needs 2 values of 'zphot'"):
            m(x, torch.ones(3))
        with pytest.raises(ModelError, match="needs (a redshift|its conditions)"):
            m.sample(2)
    else:
        with pytest.raises(ModelError, match="unconditional"):
            m(x, torch.ones(2))
        with pytest.raises(ModelError, match="unconditional"):
            m.interpolate([0.1, 0.5])


def test_build_errors_name_the_choices():
    with pytest.raises(ModelError, match="unknown model 'vae256'.*vae128, vae158, cvae, cvae2, fancy_cvae"):
        build_model("vae256")
    with pytest.raises(ModelError, match="unknown flavour 'huge'.*default, debug"):
        build_model("cvae2", "huge")
    with pytest.raises(ModelError, match="unknown option 'width'"):
        build_model("cvae2", width=3)
    with pytest.raises(ModelError, match="image_size must be"):
        build_model("cvae2", image_size=8)
    m = build_model("vae158", "debug")
    with pytest.raises(ModelError, match=r"\(B, 1, 64, 64\)"):
        m(torch.rand(2, 1, 32, 32))


def test_config_rebuilds_and_model_from_config():
    m = build_model("fancy_cvae", "debug", image_size=32, z_dim=4, recon_reduction="mean")
    assert m.config == {
        "arch": "fancy_cvae", "flavour": "debug", "image_size": 32, "nf": 8, "z_dim": 4,
        "recon_reduction": "mean", "redshift_weight": 1000.0, "likelihood": "mse", "psf_forward": False,
        "conditions": [],
    }  # fmt: skip
    again = build_model(**m.config)
    assert again.config == m.config and _n_params(again) == _n_params(m)
    assert m.conditional and m.predicts_redshift
    assert not build_model("vae128", "debug").conditional

    cfg = ModelConfig(arch="cvae2", flavour="debug", nf=4)
    assert model_from_config(cfg, None).config["image_size"] == 64
    from_data = model_from_config(cfg, 48)
    assert (from_data.image_size, from_data.spec.nf, from_data.z_dim) == (48, 4, 8)
    assert model_from_config(ModelConfig(arch="vae158"), None).config["nf"] == 64
    with pytest.raises(ModelError, match="model.image_size = 32 but the data holds 64x64"):
        model_from_config(ModelConfig(arch="cvae2", flavour="debug", image_size=32), 64)


# ----------------------------------------------------------------------------------------
# Precision, memory format, devices


@pytest.mark.parametrize("name", ALL)
def test_channels_last_and_bf16_autocast_are_finite(name):
    m = build_model(name, "debug").to(memory_format=torch.channels_last)
    x, r = _inputs(m, b=4)
    x = x.contiguous(memory_format=torch.channels_last)
    nv = _noise(m, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, r)
        losses = m.compute_loss(out, x, r, 0.1, noise_var=nv)
    assert all(torch.isfinite(t).all() for t in out if t is not None)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_torch_compile_fullgraph():
    """No graph breaks in forward or the loss: the output type and the checks are traceable."""
    m = build_model("fancy_cvae", "debug")
    x, r = _inputs(m, b=4)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    out = compiled(x, r)
    assert isinstance(out, VAEOutput) and out.z_pred.shape == (4,)
    losses = torch.compile(m.compute_loss, backend="aot_eager", fullgraph=True)(out, x, r, 0.1)
    losses["total"].backward()
    torch.manual_seed(1)
    torch.testing.assert_close(out.recon, m(x, r).recon)


def test_ddp_wrapped_forward(one_rank_group):
    """Training calls the DDP wrapper, then module.compute_loss; the NamedTuple output must pass through."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    one_rank_group("gloo")
    m = build_model("cvae2", "debug")
    ddp = DDP(m)
    x, r = _inputs(m, b=4)
    out = ddp(x, r)
    assert isinstance(out, VAEOutput)
    ddp.module.compute_loss(out, x, r, 0.1)["total"].backward()
    assert all(p.grad is not None for p in m.parameters())


def test_no_device_baked_in():
    m = build_model("cvae", "debug").to(torch.float64)
    assert all(p.device.type == "cpu" for p in m.parameters())
    out = m.sample(2, redshift=0.5)
    assert out.dtype == torch.float64


# ----------------------------------------------------------------------------------------
# Generation API


@pytest.mark.parametrize("name", ALL)
def test_sample_reconstruct_interpolate(name):
    m = build_model(name, "debug").train()
    x, r = _inputs(m, b=3)
    zr = 0.7 if m.conditional else None
    s1 = m.sample(5, redshift=zr, generator=torch.Generator().manual_seed(1))
    s2 = m.sample(5, redshift=zr, generator=torch.Generator().manual_seed(1))
    assert s1.shape == (5, 1, 64, 64) and torch.equal(s1, s2) and not s1.requires_grad
    assert m.training  # mode restored
    rec = m.reconstruct(x, r)
    assert rec.shape == x.shape and torch.equal(rec, m.reconstruct(x, r))
    assert m.training
    if m.conditional:
        sweep = m.interpolate([0.1, 0.5, 1.0, 2.0], generator=torch.Generator().manual_seed(0))
        assert sweep.shape == (4, 1, 64, 64)
        assert (sweep[0] - sweep[-1]).abs().max() > 0
        z = torch.randn(m.z_dim)
        m.eval()
        torch.testing.assert_close(m.interpolate([0.5], z=z), m.decode(z[None], 0.5).detach())
    with pytest.raises(ModelError, match="model has no flow prior"):
        m.sample(2, redshift=zr, prior="flow")
    with pytest.raises(ModelError, match="normalized=False needs a transform"):
        m.sample(2, redshift=zr, normalized=False)


def test_normalisation_transform_round_trip():
    transforms = pytest.importorskip("hpcvae.transforms")
    stats = {"min": -0.01, "max": 2.0, "mean": 0.02, "std": 0.1, "p0.1": -0.01, "p1": -0.005,
             "p50": 0.0, "p99": 0.5, "p99.9": 1.5, "n_pixels_sampled": 1000}  # fmt: skip
    t = transforms.get_transform("minmax", stats)
    m = build_model("cvae2", "debug")
    x, r = _inputs(m)
    norm = m.sample(2, redshift=0.5, generator=torch.Generator().manual_seed(0))
    m.set_normalisation(t)
    phys = m.sample(2, redshift=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(phys, t.inverse(norm))
    torch.testing.assert_close(
        m.sample(2, redshift=0.5, generator=torch.Generator().manual_seed(0), normalized=True), norm
    )
    x_phys = t.inverse(x)
    torch.testing.assert_close(m.reconstruct(x_phys, r), t.inverse(m.reconstruct(x, r, normalized=True)))


# ----------------------------------------------------------------------------------------
# Learning on real HST stamps


def _center(a: np.ndarray, n: int) -> np.ndarray:
    """Centre-crop or zero-pad to n x n."""
    h, w = a.shape
    a = a[max(0, (h - n) // 2) : max(0, (h - n) // 2) + n, max(0, (w - n) // 2) : max(0, (w - n) // 2) + n]
    out = np.zeros((n, n), np.float32)
    h, w = a.shape
    out[(n - h) // 2 : (n - h) // 2 + h, (n - w) // 2 : (n - w) // 2 + w] = a
    return out


@pytest.fixture(scope="module")
def aegis_stamps() -> torch.Tensor:
    """16 real AEGIS stamps, 64x64, min-max normalised: 5 galaxies x 2 bands + 6 flips."""
    images = []
    for band in ("F814w", "F606w"):
        catalog = fitsio.read(AEGIS / f"AEGIS_{band}_catalog.fits")
        for row in catalog:
            name = row["GAL_FILENAME"]
            name = (name.decode() if isinstance(name, bytes) else name).strip()
            a = _center(fitsio.read(AEGIS / name, ext=int(row["GAL_HDU"])).astype(np.float32), 64)
            images.append((a - a.min()) / (a.max() - a.min()))
    assert len(images) == 10
    images += [a[:, ::-1].copy() for a in images[:6]]
    return torch.from_numpy(np.stack(images))[:, None]


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core box OpenMP spin-waits make more threads far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_gaussian_likelihood_is_half_chi2_in_physical_units():
    from hpcvae.transforms import get_transform

    t = get_transform("asinh", {"noise_std": 0.01, "p0.1": -0.03, "max": 2.0})
    m = build_model("galaxy_vae", "debug", likelihood="gaussian").set_normalisation(t)
    x, r = _inputs(m, b=3)
    nv = torch.tensor([1e-4, 4e-4, 9e-4])
    out = m(x, r)
    losses = m.compute_loss(out, x, r, beta=0.5, noise_var=nv)
    chi2 = ((t.inverse(out.recon) - t.inverse(x)) ** 2 / nv[:, None, None, None]).sum()
    torch.testing.assert_close(losses["recon"], 0.5 * chi2)
    torch.testing.assert_close(losses["total"], losses["recon"] + 0.5 * losses["kl"])
    assert m.config["likelihood"] == "gaussian"
    with pytest.raises(ModelError, match="noise variance"):
        m.compute_loss(out, x, r, beta=0.5)
    with pytest.raises(ModelError, match="likelihood must be"):
        build_model("cvae2", "debug", likelihood="poisson")


def _blob(size=32, peak=2.0, sigma_px=2.0):
    """A small bright galaxy (peak 200 noise sigma at noise_std 0.01) on empty sky, (1, 1, S, S)."""
    yy, xx = torch.meshgrid(torch.arange(size) - size / 2, torch.arange(size) - size / 2, indexing="ij")
    return (peak * torch.exp(-(xx**2 + yy**2) / (2 * sigma_px**2)))[None, None]


def test_calibrated_noise_weighs_a_bright_core_by_its_noise():
    """Under asinh, ``calibrated`` weighs a core pixel like a sky pixel; ``calibrated_noise`` by its noise."""
    from hpcvae.models.likelihoods import LIKELIHOODS, CalibratedNoise
    from hpcvae.transforms import get_transform

    t = get_transform("asinh", {"noise_std": 0.01, "p0.1": -0.03, "max": 2.0})
    m = build_model("galaxy_vae", "debug", likelihood="calibrated_noise").set_normalisation(t)
    phys, nv = _blob(), torch.tensor([1e-4])
    x = t.forward(phys)
    g = torch.Generator().manual_seed(0)
    recon = x + 0.02 * torch.randn(x.shape, generator=g)
    core, wing = (0, 0, 16, 16), (0, 0, 2, 2)
    ratios = {}
    for name in ("calibrated", "calibrated_noise"):
        r = recon.detach().clone()
        r[core] = x[core] + 0.02
        r[wing] = x[wing] + 0.02  # the same residual in both pixels
        r.requires_grad_()
        LIKELIHOODS[name].nll(m, r, x, {"noise_var": nv}).backward()
        ratios[name] = float(r.grad[core] / r.grad[wing])
    assert ratios["calibrated"] == pytest.approx(1.0, rel=1e-4)
    assert ratios["calibrated_noise"] > 20, ratios

    # the misfit variance is the likelihood's maximum: nudging it either way raises the NLL
    sd = nv.sqrt()
    r0 = recon.detach()
    mid = t.inverse(r0)
    s2 = (0.5 * (t.forward(mid + sd) - t.forward(mid - sd))).square().flatten(1)
    r2 = (r0 - x).square().flatten(1)
    m2 = CalibratedNoise.misfit(s2, r2)

    def nll(v2):
        v = s2 + v2
        return float(0.5 * (r2 / v + torch.log(2 * torch.pi * v)).sum())

    assert nll(m2) < nll(m2 * 1.05) and nll(m2) < nll(m2 / 1.05)
    torch.testing.assert_close(LIKELIHOODS["calibrated_noise"].nll(m, r0, x, {"noise_var": nv}),
                               torch.tensor(nll(m2)), rtol=1e-5, atol=1e-3)  # fmt: skip


def test_calibrated_noise_misfit_is_zero_for_a_model_that_fits_to_the_noise():
    """Residuals at the noise level leave no misfit (the weights are the noise's: galaxy2galaxy's chi^2);
    a core 30% too faint sets a misfit that caps the core's weight and leaves the sky's alone."""
    from hpcvae.models.likelihoods import LIKELIHOODS, CalibratedNoise
    from hpcvae.transforms import get_transform

    t = get_transform("asinh", {"noise_std": 0.01, "p0.1": -0.03, "max": 2.0})
    phys, sd = _blob(size=64), torch.tensor(0.01)
    g = torch.Generator().manual_seed(1)
    x = t.forward(phys + sd * torch.randn(phys.shape, generator=g))
    misfit = {}
    for name, model in (("fits", phys), ("core 30% low", phys * torch.where(phys > 0.2, 0.7, 1.0))):
        s2 = (0.5 * (t.forward(model + sd) - t.forward(model - sd))).square().flatten(1)
        misfit[name] = float(CalibratedNoise.misfit(s2, (t.forward(model) - x).square().flatten(1)))
    sky, core = float(s2.median()), float(s2.min())
    assert misfit["fits"] <= 1e-3 * sky and misfit["fits"] <= 2e-6
    assert 100 * core < misfit["core 30% low"] < 0.1 * sky, (misfit, core, sky)
    m = build_model("galaxy_vae", "debug", likelihood="calibrated_noise").set_normalisation(t)
    with pytest.raises(ModelError, match="noise variance"):
        LIKELIHOODS["calibrated_noise"].nll(m, x, x, {})


@pytest.mark.parametrize("name", ALL)
def test_debug_model_overfits_real_stamps(name, aegis_stamps, one_thread):
    torch.manual_seed(0)
    m = build_model(name, "debug")
    batch = {"image": aegis_stamps, "redshift": torch.linspace(0.1, 2.0, 16)}  # fake zphot per stamp
    if (nv := _noise(m, 16)) is not None:
        batch["noise_var"] = nv
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = float(m.loss(batch, beta=0.1)["total"].detach())
    last = first
    for _ in range(80):  # typically reaches 5x in ~25 steps, 30x by 80
        losses = m.loss(batch, beta=0.1)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        last = float(m.loss(batch, beta=0.1)["total"].detach())
        if last * 5 <= first:
            break
    assert last * 5 <= first, f"{name}: loss {first:.1f} -> {last:.1f} in 80 steps"


def test_galaxy_film_default_likelihood_follows_what_the_data_carry():
    """calibrated_noise where the shards carry noise variances, calibrated where not; an explicit choice stays."""
    cfg = ModelConfig(arch="galaxy_film", flavour="debug")
    assert model_from_config(cfg, 64, ("zphot",)).spec.likelihood == "calibrated_noise"
    assert model_from_config(cfg, 64, ("zphot",), noise_known=False).spec.likelihood == "calibrated"
    chosen = ModelConfig(arch="galaxy_film", flavour="debug", likelihood="calibrated_noise")
    assert model_from_config(chosen, 64, ("zphot",), noise_known=False).spec.likelihood == "calibrated_noise"
    seed = ModelConfig(arch="cvae2", flavour="debug")
    assert model_from_config(seed, 64, noise_known=False).spec.likelihood == "mse"


def test_config_choices_match_the_registry():
    """Adding an architecture or a likelihood means naming it in config.py too; this says so."""
    import typing

    from hpcvae.config import ArchName, ModelConfig
    from hpcvae.models import MODEL_REGISTRY
    from hpcvae.models.likelihoods import LIKELIHOODS, LikelihoodName

    assert typing.get_args(ArchName) == tuple(MODEL_REGISTRY)
    (choices,) = [
        a for a in typing.get_args(typing.get_type_hints(ModelConfig)["likelihood"]) if a is not type(None)
    ]
    assert typing.get_args(choices) == typing.get_args(LikelihoodName) == tuple(LIKELIHOODS)


def test_model_hyperparameters_are_declared_once():
    """ModelSpec's fields are the hyperparameters: the registry's overrides and ModelConfig follow them."""
    import dataclasses

    from hpcvae.config import ModelConfig
    from hpcvae.models import OVERRIDABLE
    from hpcvae.models.spec import ModelSpec

    spec = {f.name for f in dataclasses.fields(ModelSpec)}
    assert set(OVERRIDABLE) == spec - {"arch", "flavour"}
    missing = spec - {f.name for f in dataclasses.fields(ModelConfig)}
    assert not missing, (
        f"ModelConfig lacks {sorted(missing)}: a new hyperparameter needs its option there too"
    )


def test_galaxy_film_margin_draws_beyond_the_stamp_and_crops():
    """model.margin: the last decoder block works on a wider canvas; outputs keep the stamp's size."""
    from hpcvae.errors import ModelError

    m = build_model("galaxy_film", "debug", image_size=32, margin=4, conditions=("zphot",))
    depth = len(m.sides) - 1
    # a canvas 4 px wider on each side that halves exactly: no level stretches the stamp
    assert m.dec_sides == [40 // 2**i for i in range(depth + 1)] and m.up[-1].side == 40
    assert m.config["margin"] == 4
    out = m(torch.rand(3, 1, 32, 32), torch.rand(3))
    assert out.recon.shape == (3, 1, 32, 32)
    plain = build_model("galaxy_film", "debug", image_size=32, conditions=("zphot",))
    assert "margin" not in plain.config  # models from before margin keep their exact model_config
    with pytest.raises(ModelError, match=r"margin 2 makes a 36-pixel canvas, which must be divisible by 8"):
        build_model("galaxy_film", "debug", image_size=32, margin=2, conditions=("zphot",))
    with pytest.raises(ModelError, match="margin = 2 is galaxy_film's"):
        build_model("cvae2", "debug", image_size=32, margin=2)
    with pytest.raises(ModelError, match=r"margin must be an integer in \[0, image_size / 4 = 8\]"):
        build_model("galaxy_film", "debug", image_size=32, margin=9, conditions=("zphot",))


def test_galaxy_film_circular_padding_treats_the_edge_like_the_interior(tmp_path):
    """model.padding = circular: the decoder is one operation at every pixel of a torus.

    A zero-padded decoder computes its edge pixels from zeros beyond the stamp (the row/column streaks);
    on the torus, shifting the coarse map by one cell shifts the output by exactly one cell's pixels,
    across the edge too, which no zero-padded stack does.
    """
    import torch.nn.functional as F

    from hpcvae.model_files import ModelInfo, load_model, write_model
    from hpcvae.models.film import UpBlock, periodic_resize

    for n, side in ((4, 8), (5, 10), (40, 79)):  # 79: the seed's 158 path does not halve exactly
        h = torch.randn(2, 3, n, n, dtype=torch.float64)
        r = periodic_resize(n, side, torch.float64)
        wrapped = torch.einsum("ij,bcjk,lk->bcil", r, h, r)
        plain = F.interpolate(h, size=(side, side), mode="bilinear", align_corners=False)
        inner = slice(2, side - 2)  # away from the edge it is the ordinary bilinear resize
        assert torch.allclose(wrapped[..., inner, inner], plain[..., inner, inner], atol=1e-12)
        assert not torch.allclose(wrapped[..., 0, :], plain[..., 0, :])
    torch.manual_seed(0)
    h, e = torch.randn(2, 6, 8, 8), torch.randn(2, 64)
    for padding, equivariant in (("circular", True), ("zeros", False)):
        block = UpBlock(6, 4, 16, residual=True, from_side=8, padding=padding).eval()
        with torch.no_grad():
            shifted = block(torch.roll(h, 1, dims=2), e)
            expect = torch.roll(block(h, e), 2, dims=2)
        assert torch.allclose(shifted, expect, atol=1e-5) is equivariant, padding

    m = build_model("galaxy_film", "debug", image_size=32, padding="circular", conditions=("zphot",))
    assert m.config["padding"] == "circular" and m.head.padding_mode == "circular"
    assert m(torch.rand(3, 1, 32, 32), torch.rand(3)).recon.shape == (3, 1, 32, 32)
    write_model(tmp_path / "m", m.state_dict(), ModelInfo(model_config=m.config))
    back = load_model(tmp_path / "m")  # model.json records the padding; the model comes back circular
    assert back.spec.padding == "circular" and all(b.circular for b in back.up)
    assert "padding" not in build_model("galaxy_film", "debug", image_size=32, conditions=("zphot",)).config
    with pytest.raises(ModelError, match="padding = 'circular' is galaxy_film's"):
        build_model("cvae2", "debug", image_size=32, padding="circular")
    with pytest.raises(ModelError, match="padding must be one of zeros, circular, reflect, got 'replicate'"):
        build_model("galaxy_film", "debug", image_size=32, padding="replicate", conditions=("zphot",))


def test_galaxy_film_reflect_padding_keeps_a_smooth_sky_smooth_to_the_edge(tmp_path):
    """model.padding = reflect: a spatially constant feature map (a flat sky) comes out flat at the edge too.

    Zero padding computes the outermost pixels from zeros beyond the stamp, so a flat input gives an
    edge row unlike the interior (the row/column streak measure's largest part on COSMOS-like stamps);
    a mirrored edge sees the interior, and a flat map stays flat through every block and the head.
    """
    from hpcvae.model_files import ModelInfo, load_model, write_model
    from hpcvae.models.film import UpBlock

    torch.manual_seed(0)
    flat, e = torch.ones(2, 6, 8, 8), torch.randn(2, 64)
    for padding, stays_flat in (("reflect", True), ("zeros", False)):
        block = UpBlock(6, 4, 16, residual=True, from_side=8, padding=padding).eval()
        with torch.no_grad():
            out = block(flat, e)
        spread = (out - out[..., 8:9, 8:9]).abs().amax().item()  # against the central pixel, per channel
        assert (spread < 1e-5) is stays_flat, (padding, spread)

    m = build_model("galaxy_film", "debug", image_size=32, padding="reflect", conditions=("zphot",))
    convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d) and c.stride == (1, 1)]
    assert convs and all(
        c.padding_mode == "reflect" for c in convs
    )  # every decoder convolution, the head too
    assert m(torch.rand(3, 1, 32, 32), torch.rand(3)).recon.shape == (3, 1, 32, 32)
    write_model(tmp_path / "m", m.state_dict(), ModelInfo(model_config=m.config))
    assert load_model(tmp_path / "m").head.padding_mode == "reflect"  # model.json records the padding
