"""The flow prior: densities and samples, consolidation round trip, sampling errors, the CLI with resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hpcvae.errors import CheckpointError, ModelError
from hpcvae.model_files import ModelInfo, load_model, write_model
from hpcvae.models import build_model
from hpcvae.prior import PREFIX, FlowPrior, FlowSpec, build_flow, flow_meta, vae_digest
from tests.helpers_shards import write_shard_set

SIZE = 32


def _flow(conditional: bool, z_dim: int = 4, seed: int = 0) -> FlowPrior:
    torch.manual_seed(seed)
    return build_flow(FlowSpec(z_dim=z_dim, conditional=conditional, transforms=2, hidden_features=(16, 16)))


def _fit(flow: FlowPrior, z: torch.Tensor, r: torch.Tensor | None, steps: int) -> None:
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = flow(z, r)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("conditional", [False, True])
def test_log_prob_is_finite_and_samples_have_the_latent_size(conditional):
    flow = _flow(conditional, z_dim=5)
    flow.set_standardisation(torch.full((5,), 0.3), torch.full((5,), 0.2), 1.0, 0.5)
    r = torch.linspace(0.2, 2.5, 7) if conditional else None
    z = flow.sample(7, redshift=r, generator=torch.Generator().manual_seed(0))
    assert z.shape == (7, 5)
    lp = flow.log_prob(z, r)
    assert lp.shape == (7,) and torch.isfinite(lp).all()
    # The standardisation is part of the density: p(z) of raw latents, Jacobian included.
    flow0 = _flow(conditional, z_dim=5)
    u = (z - 0.3) / 0.2
    c = ((r - 1.0) / 0.5)[:, None] if conditional else None
    expect = flow0.flow(c).log_prob(u) - 5 * torch.log(torch.tensor(0.2))
    torch.testing.assert_close(lp, expect)


def test_conditional_flow_learns_a_redshift_dependent_density():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(512, generator=g) * 2 - 1
    z = torch.stack([2 * r, torch.zeros_like(r)], 1) + 0.1 * torch.randn(512, 2, generator=g)
    flow = _flow(True, z_dim=2)
    flow.set_standardisation(z.mean(0), z.std(0), float(r.mean()), float(r.std()))
    _fit(flow, z, r, steps=300)
    lo = flow.sample(400, redshift=-0.8, generator=torch.Generator().manual_seed(1))
    hi = flow.sample(400, redshift=0.8, generator=torch.Generator().manual_seed(1))
    assert lo[:, 0].mean() == pytest.approx(-1.6, abs=0.3)
    assert hi[:, 0].mean() == pytest.approx(1.6, abs=0.3)
    point = torch.tensor([[1.6, 0.0]])
    assert flow.log_prob(point, 0.8) > flow.log_prob(point, -0.8) + 5  # the context moves the density


def test_redshift_arguments_are_checked():
    with pytest.raises(ModelError, match="unconditional but was given a redshift"):
        _flow(False).sample(3, redshift=0.5)
    with pytest.raises(ModelError, match="flow prior is conditional: pass its conditions"):
        _flow(True).log_prob(torch.zeros(3, 4))
    with pytest.raises(ModelError, match=r"shape \(B, 4\)"):
        _flow(False).log_prob(torch.zeros(3, 5))


def _model_with_flow(folder: Path) -> tuple[torch.nn.Module, FlowPrior]:
    torch.manual_seed(0)
    m = build_model("cvae2", "debug", image_size=SIZE)
    flow = _flow(True, z_dim=m.z_dim, seed=3)
    flow.set_standardisation(torch.linspace(-1, 1, m.z_dim), torch.full((m.z_dim,), 0.5), 0.9, 0.4)
    _fit(flow, torch.randn(64, m.z_dim), torch.rand(64) * 2, steps=3)  # weights away from init
    sd = {**m.state_dict(), **{PREFIX + k: v for k, v in flow.state_dict().items()}}
    block = flow_meta(flow.spec, flow, training={"epochs": 0}, evaluation={"val_nll": None})
    write_model(folder, sd, ModelInfo(model_config=m.config, flow_prior=block))
    return m, flow


def test_flow_round_trips_through_the_model_files(tmp_path):
    m, flow = _model_with_flow(tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["flow_prior"]["library"] == "zuko" and meta["flow_prior"]["spec"]["transforms"] == 2
    assert meta["flow_prior"]["context_standardisation"]["mean"] == pytest.approx([0.9])
    loaded = load_model(tmp_path)
    assert isinstance(loaded.flow_prior, FlowPrior) and loaded.default_prior == "flow"
    z, r = torch.randn(10, m.z_dim), torch.linspace(0.1, 2.0, 10)
    torch.testing.assert_close(loaded.flow_prior.log_prob(z, r), flow.log_prob(z, r), rtol=0, atol=0)
    a = flow.sample(6, redshift=r[:6], generator=torch.Generator().manual_seed(5))
    b = loaded.flow_prior.sample(6, redshift=r[:6], generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # model.sample defaults to the flow: the same latents through the same decoder.
    imgs = loaded.sample(6, redshift=r[:6], generator=torch.Generator().manual_seed(5))
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(imgs, m.decode(a, r[:6]))
    normal = loaded.sample(6, redshift=r[:6], generator=torch.Generator().manual_seed(5), prior="normal")
    assert not torch.allclose(normal, imgs)
    assert vae_digest(loaded.state_dict()) == vae_digest(m.state_dict())
    # interpolate holds the flow's base noise, not the latent: each redshift gets the latent the
    # conditional flow gives that noise there (a held latent barely follows the redshift).
    eps = torch.randn(1, m.z_dim, generator=torch.Generator().manual_seed(7))
    lats = flow.sample(2, redshift=torch.tensor([0.5, 2.0]), eps=eps.expand(2, -1))
    assert not torch.allclose(lats[0], lats[1])
    sweep = loaded.interpolate([0.5, 2.0], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(sweep, m.decode(lats, torch.tensor([0.5, 2.0])))
    given = loaded.interpolate([0.5, 2.0], z=lats[0])  # a latent given is held
    with torch.no_grad():
        torch.testing.assert_close(given, m.decode(lats[:1].expand(2, -1), torch.tensor([0.5, 2.0])))
    # sample_latent: the latents sample() would decode, drawn at one redshift for reuse in sweeps.
    lats = loaded.sample_latent(4, redshift=0.9, generator=torch.Generator().manual_seed(3))
    want = flow.sample(4, redshift=torch.full((4,), 0.9), generator=torch.Generator().manual_seed(3))
    assert lats.shape == (4, m.z_dim) and torch.equal(lats, want)


def test_flow_weights_without_their_description_are_refused(tmp_path):
    _model_with_flow(tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["flow_prior"] = None
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unexpected .* tensors"):
        load_model(tmp_path)


def test_flow_prior_on_a_model_without_one_is_a_clear_error():
    m = build_model("cvae2", "debug", image_size=SIZE)
    assert m.default_prior == "normal"
    with pytest.raises(ModelError, match="prior='flow' but this model has no flow prior.*train_prior"):
        m.sample(2, redshift=0.5, prior="flow")
    with pytest.raises(ModelError, match="unknown prior 'gamma'"):
        m.sample(2, redshift=0.5, prior="gamma")
    assert m.sample(2, redshift=0.5).shape == (2, 1, SIZE, SIZE)


# -- the CLI on a tiny trained run ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A debug cvae2 trained for a few steps (cosine LR, β warm-up) on a 32 px shard set."""
    from hpcvae.train import main as train_main

    root = tmp_path_factory.mktemp("prior")
    shards = root / "shards"
    write_shard_set(shards, train_counts=[50, 30], val_counts=[24], size=SIZE, seed=2)
    run = root / "run"
    rc = train_main([
        "--arch", "cvae2", "--flavour", "debug", "--data", str(shards), "--out", str(run), "--epochs", "2",
        "--batch-size", "16", "--set", "data.num_workers=0", "--set", "data.persistent_workers=false",
        "--set", "train.max_steps_per_epoch=2", "--set", "train.sample_grid=false",
        "--set", "scheduler.kind=cosine", "--set", "beta.kind=linear_warmup", "--set", "beta.warmup_epochs=2",
    ])  # fmt: skip
    assert rc == 0
    return run, shards


def test_training_records_beta_and_lr_schedules(tiny_run):
    meta = json.loads((tiny_run[0] / "model.json").read_text())
    assert meta["beta_schedule"]["kind"] == "linear_warmup" and meta["beta_schedule"]["warmup_epochs"] == 2
    lr = meta["lr_schedule"]
    assert lr["scheduler"]["kind"] == "cosine" and lr["optim"]["lr"] == pytest.approx(1e-3)
    assert lr["total_steps"] == 4 and lr["steps_per_epoch"] == 2


def _prior_args(run: Path, shards: Path, out: Path, epochs: int) -> list[str]:
    return [str(run), "--data", str(shards), "--out", str(out), "--epochs", str(epochs), "--batch-size", "16",
            "--encode-batch-size", "8", "--transforms", "2", "--hidden", "16,16", "--every-steps", "3",
            "--keep-last", "2", "--log-every", "2"]  # fmt: skip


def test_train_prior_cli_writes_the_flow_into_the_model_files(tiny_run, tmp_path):
    from hpcvae.train_prior import main

    run, shards = tiny_run
    out = tmp_path / "withflow"
    assert main(_prior_args(run, shards, out, epochs=2)) == 0
    meta = json.loads((out / "model.json").read_text())
    fp = meta["flow_prior"]
    assert fp["spec"] == {"z_dim": 8, "conditional": True, "kind": "nsf", "transforms": 2,
                          "hidden_features": [16, 16], "context_features": 1, "passes": 2}  # fmt: skip
    assert fp["training"]["n_train_latents"] == 80 and fp["training"]["steps"] == 10  # 5 steps x 2 epochs
    assert fp["evaluation"]["val_count"] == 24 and fp["evaluation"]["val_nll"] is not None
    assert meta["lr_schedule"]["scheduler"]["kind"] == "cosine"  # carried over from the VAE's model.json
    recs = [json.loads(x) for x in (out / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in recs} == {"start", "train", "val"}
    assert len([p for p in (out / "prior" / "checkpoints").iterdir() if p.name.startswith("step-")]) == 2
    model = load_model(out)
    assert model.default_prior == "flow"
    assert model.sample(3, redshift=0.7, normalized=True).shape == (3, 1, SIZE, SIZE)
    vae = load_model(run)  # the source model is untouched when --out points elsewhere
    assert vae.flow_prior is None and vae_digest(vae.state_dict()) == fp["training"]["vae_digest"]


@pytest.mark.parametrize("latents", ["mean", "posterior"])
def test_train_prior_resume_matches_an_uninterrupted_fit(tiny_run, tmp_path, latents):
    from hpcvae.dist import DistInfo
    from hpcvae.train_prior import PriorTrainer, config_from_args, parser

    run, shards = tiny_run
    extra = ["--latents", latents]
    args_a = [*_prior_args(run, shards, tmp_path / "a", 3), *extra]
    full = PriorTrainer(config_from_args(parser().parse_args(args_a)), DistInfo()).train()
    assert full.status == "completed"

    args = [*_prior_args(run, shards, tmp_path / "b", 3), *extra]
    first = PriorTrainer(config_from_args(parser().parse_args(args)), DistInfo())
    first.request_stop()  # as SIGUSR2 would: save at the next step boundary and stop
    res = first.train()
    assert (
        res.status == "preempted" and res.checkpoint is not None and res.checkpoint.name == "step-000000001"
    )
    assert not (tmp_path / "b" / "model.json").exists()
    second = PriorTrainer(config_from_args(parser().parse_args(args)), DistInfo())
    assert (second.epoch, second.step_in_epoch, second.global_step) == (0, 1, 1)
    assert second.train().status == "completed"

    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    for k, v in a.flow_prior.state_dict().items():
        assert torch.equal(v, b.flow_prior.state_dict()[k]), k
    ja = json.loads((tmp_path / "a" / "model.json").read_text())["flow_prior"]
    jb = json.loads((tmp_path / "b" / "model.json").read_text())["flow_prior"]
    assert ja["evaluation"]["val_nll"] == jb["evaluation"]["val_nll"]
    # The standardisation follows the target: the means' spread, or the aggregate posterior's (+ E[σ²]).
    mom = ja["evaluation"]["latent_moments"]
    var = torch.tensor(mom["mu_var"]) + (
        torch.tensor(mom["posterior_var_mean"]) if latents == "posterior" else 0
    )
    torch.testing.assert_close(a.flow_prior.z_scale, var.sqrt())
    assert ja["training"]["latents"] == latents and ("q(z|x)" in ja["fitted_on"]) == (latents == "posterior")


def test_train_prior_refuses_a_checkpoint_of_another_vae(tiny_run, tmp_path):
    from hpcvae.train_prior import main

    run, shards = tiny_run
    out = tmp_path / "c"
    assert main(_prior_args(run, shards, out, epochs=1)) == 0
    other = tmp_path / "other"
    torch.manual_seed(9)
    m = build_model("cvae2", "debug", image_size=SIZE)
    src = json.loads((run / "model.json").read_text())
    write_model(other, m.state_dict(), ModelInfo(model_config=m.config, transform=src["transform"]))
    args = _prior_args(other, shards, out, epochs=1)
    with pytest.raises(CheckpointError, match="vae_digest"):
        main(args)
    assert main([*args, "--resume", "none"]) == 0


def test_train_prior_missing_model_is_a_checkpoint_error(tmp_path):
    from hpcvae.train_prior import main

    with pytest.raises(CheckpointError, match="no such model"):
        main([str(tmp_path / "nope"), "--data", str(tmp_path)])


def test_evaluate_samples_through_the_flow_by_default(tiny_run, tmp_path):
    from hpcvae.evaluate import EvalConfig, evaluate
    from hpcvae.train_prior import main

    run, shards = tiny_run
    out = tmp_path / "m"
    assert main(_prior_args(run, shards, out, epochs=1)) == 0
    cfg = dict(
        n=24, grid_size=2, sweep_rows=1, n_recon=2, latent_dims=2, morph_n=4, n_boot=50, response_latents=4
    )
    flow = evaluate(out, shards, tmp_path / "rf", config=EvalConfig(**cfg))
    normal = evaluate(out, shards, tmp_path / "rn", config=EvalConfig(prior="normal", **cfg))
    assert flow["population"]["prior"] == "flow" and flow["generation"]["prior"] == "flow"
    assert flow["redshift_sweep"]["prior"] == "flow" and normal["redshift_sweep"]["prior"] == "normal"
    assert normal["population"]["prior"] == "normal"
    assert "latents from the flow prior" in (tmp_path / "rf" / "report.md").read_text()
    grid = next(
        iter(flow["generation"]["grids"].values())
    )  # the untrained model's samples all fail HSM: compare pixels
    assert (tmp_path / "rf" / grid).read_bytes() != (tmp_path / "rn" / grid).read_bytes()


@pytest.mark.slow
def test_train_prior_on_two_ddp_ranks(tiny_run, tmp_path):
    """Two gloo ranks (env as torchrun/srun set it): each encodes its own share; steps match; one model written."""
    import os
    import subprocess
    import sys

    from hpcvae.dist import free_port

    run, shards = tiny_run
    out = tmp_path / "ddp"
    port, procs = str(free_port()), []
    for r in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        cmd = [
            sys.executable,
            "-m",
            "hpcvae.train_prior",
            *_prior_args(run, shards, out, epochs=2),
            "--device",
            "cpu",
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    fp = json.loads((out / "model.json").read_text())["flow_prior"]
    t = fp["training"]
    assert t["world_size"] == 2 and t["n_train_latents"] == 80  # 40 per rank, no galaxy seen twice
    assert t["steps_per_epoch"] == 2 and t["steps"] == 4  # 40 latents // 16 per rank
    assert fp["evaluation"]["val_count"] == 24 and math.isfinite(fp["evaluation"]["val_nll"])
    recs = [json.loads(x) for x in (out / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["kind"] == "start" and recs[0]["world_size"] == 2
    assert load_model(out).sample(2, redshift=1.0).shape == (2, 1, SIZE, SIZE)
