"""The benchmark suite: smoke runs end to end, plus the pieces its numbers rest on.

The smoke runs check that the suite works and that every reported figure is present and
finite, not how fast anything is (the CPU here is shared).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import common
from benchmarks.epoch_time import Variant, seed_flops_per_batch
from benchmarks.epoch_time import main as epoch_main
from benchmarks.seed_baseline import SeedCVAE2, SeedVAE158, run_seed_loop, seed_loader, write_seed_h5
from hpcvae.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pool(n: int = 6, size: int = 24) -> common.Pool:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    imgs = np.stack(
        [np.exp(-((yy - size / 2 + i) ** 2 + (xx - size / 3) ** 2) / 8.0) for i in range(n)]
    ).astype(np.float32)
    imgs += rng.normal(0, 0.01, imgs.shape).astype(np.float32)
    return common.Pool(images=imgs, redshifts=np.linspace(0.1, 2.0, n).astype(np.float32), noise_sigma=0.01)


# ----------------------------------------------------------------------------------------
# Fast pieces


def test_seed_models_match_the_layer_tables():
    x = torch.rand(2, 1, 158, 158)
    z = torch.rand(2)
    for model in (SeedCVAE2(nf=4, z_dim=8), SeedVAE158(nf=4, z_dim=8)):
        with torch.no_grad():
            recon, mu, logvar = model(x, z)
        assert recon.shape == x.shape and mu.shape == (2, 8) and logvar.shape == (2, 8)
        assert 0.0 <= float(recon.min()) and float(recon.max()) <= 1.0
    # The issue states 6.5 GFLOP per image for cvae2 at 158², forward + backward.
    gflop = seed_flops_per_batch("cvae2", 4, 64, 32) / 4 / 1e9
    assert gflop == pytest.approx(common.SEED_CVAE2_GFLOP_PER_IMAGE, rel=0.01)


def test_seed_loop_trains_on_h5_in_the_seed_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 2, (10, 158, 158)).astype(np.float32)
    h5 = write_seed_h5(tmp_path / "seed.h5", images, rng.uniform(0, 3, 10))
    loader = seed_loader(h5, 0.0, 2.0, batch_size=4)
    x, z = next(iter(loader))
    assert x.shape == (4, 1, 158, 158) and x.dtype == torch.float32 and z.shape == (4,)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    run = run_seed_loop(SeedCVAE2(nf=2, z_dim=4), loader, torch.device("cpu"), steps=3, warmup=1)
    assert len(run.step_times) == 3 and len(run.losses) == 4  # the 3-batch epoch wraps around
    assert all(math.isfinite(v) for v in run.losses)


def test_make_big_set_is_read_by_the_product_loader(tmp_path):
    from hpcvae.config import DataConfig
    from hpcvae.data import ShardData
    from hpcvae.shards.manifest import Manifest
    from hpcvae.transforms import get_transform

    out = common.make_big_set(300, 16, tmp_path / "big", _pool(), per_shard=64, progress=False)
    m = Manifest.load(out)
    assert m.count("train") + m.count("val") == 300
    assert all(s.count <= 64 for s in m.shards("train"))
    m.check_files()
    images, z = common.read_shard_images(out)
    assert images.shape == (300, 16, 16) and z.shape == (300,)
    assert len({img.tobytes() for img in images}) == 300  # noise re-drawn: no two identical
    data = ShardData(
        DataConfig(path=str(out), batch_size=32, num_workers=0),
        m,
        rank=0,
        world_size=1,
        seed=0,
        transform=get_transform("minmax", m.stats("train")),
    )
    n = sum(b["image"].shape[0] for b in data.train_loader(0))
    assert n == data.steps_per_epoch * 32 == (m.count("train") // 32) * 32


def test_variant_parsing_rejects_bad_names():
    v = Variant.parse("cvae2:deepspeed:bf16:channels_last+compile")
    assert v.channels_last and v.compile and v.engine == "deepspeed"
    with pytest.raises(ConfigError, match="unknown architecture"):
        Variant.parse("cvae3:ddp:fp32:none")
    with pytest.raises(ConfigError, match="arch:engine:precision:option"):
        Variant.parse("cvae2:ddp")
    with pytest.raises(ConfigError, match="unknown option"):
        Variant(arch="cvae2", option="fast")  # type: ignore[arg-type]


def test_epoch_time_cli_errors_are_one_line(capsys):
    with pytest.raises(ConfigError, match="--out"):
        epoch_main(["--smoke"])


def test_results_index_is_newest_first_by_the_date_in_the_name(tmp_path):
    """A fresh clone gives every result the same mtime: the index used to list them in arbitrary order."""
    import os

    from benchmarks.common import update_index

    names = ["generalize-cpu-2core-2026-12-03.md", "epoch_time-cpu-2core-2026-11-24.md",
             "generalize-cpu-2core-2026-12-07.md", "generalize-cpu-2core-2026-12-03-plain-inverse.md"]  # fmt: skip
    for n in names:
        (tmp_path / n).write_text("x")
        os.utime(tmp_path / n, (1_000_000, 1_000_000))
    lines = [ln for ln in update_index(tmp_path).read_text().splitlines() if ln.startswith("- [")]
    order = [ln.split("](")[0][3:] for ln in lines]
    assert (
        order[0] == "generalize-cpu-2core-2026-12-07.md" and order[-1] == "epoch_time-cpu-2core-2026-11-24.md"
    )
    latest = {ln.split("](")[0][3:] for ln in lines if ln.endswith("(latest)")}
    assert latest == {"generalize-cpu-2core-2026-12-07.md", "generalize-cpu-2core-2026-12-03-plain-inverse.md",
                      "epoch_time-cpu-2core-2026-11-24.md"}  # fmt: skip


def test_rss_sampler_sees_an_allocation():
    with common.RssSampler(0.01) as s:
        before = common.current_rss_mb()
        block = np.ones(64 * 2**20 // 8)  # 64 MB
        import time

        time.sleep(0.1)
    assert s.peak >= before + 50
    del block


# ----------------------------------------------------------------------------------------
# Smoke runs of both CLIs


def _check_rows(rows, keys):
    assert rows
    for r in rows:
        assert "error" not in r, r.get("error")
        for k in keys:
            assert _finite(r.get(k)), (r.get("name") or r.get("loader"), k, r.get(k))


def _check_epoch_time(jp: Path, mp: Path) -> None:
    """epoch_time's smoke results (run by the GPU check's CPU rehearsal, with --profile): every column there."""
    p = json.loads(jp.read_text())
    env = p["environment"]
    assert env["versions"]["torch"] and env["versions"]["hpcvae"] and "deepspeed" in env["versions"]
    assert len(env["loadavg_start"]) == 3 and _finite(env["matmul_tflops"]["bf16"])
    keys = ["step_s", "images_per_s", "epoch_s_81k", "epoch_s_314k", "gflop_per_image", "mfu_vs_matmul",
            "data_wait_share", "peak_memory_mb"]  # fmt: skip
    ours = [r for r in p["results"] if r["kind"] == "ours"]
    _check_rows(ours, [*keys, "speedup_vs_seed", "warmup_overhead_s", "x_seed", "x_bare", "x_lightning"])
    _check_rows([r for r in p["results"] if r["kind"] != "ours"], keys)
    assert env["capabilities"]["kind"] == "cpu" and isinstance(env["capabilities"]["native_bf16"], bool)
    (auto,) = [r for r in ours if r["requested_precision"] == "auto"]  # resolved by the product's own rule
    assert (
        auto["precision"] == env["auto"]["precision"]
        and auto["channels_last"] == env["auto"]["channels_last"]
    )
    kinds = {(r["kind"], r["precision"]) for r in p["results"]}
    assert {
        ("bare", "fp32"),
        ("bare", "bf16"),
        ("lightning", "fp32"),
        ("lightning", "bf16"),
        ("seed", "fp32"),
    } <= kinds
    light = [r for r in p["results"] if r["kind"] == "lightning"]  # the peer, in the same run
    assert all(r["arch"] == "cvae2" and r["engine_info"]["engine"].startswith("lightning") for r in light)
    assert all(r["profile"] and r["profile"][0]["self_ms"] > 0 for r in ours)
    for r in p["results"]:
        assert r["epoch_s_314k"] == pytest.approx(r["step_s"] * (314_000 // 8))
    assert _finite(p["flop_check"]["flopcounter_seed_cvae2_gflop_per_image"])
    assert p["fastest"]["bare"]["precision"] in ("fp32", "bf16")
    md = mp.read_text()
    for text in (
        "s/epoch 81,499",
        "s/epoch 314,000",
        "MFU vs matmul",
        "× seed",
        "× bare loop",
        "× Lightning",
        "Which precision is fastest here",
        "load average",
        "no GPU",
        "profiler",
    ):
        assert text in md


@pytest.mark.slow
def test_data_throughput_smoke(tmp_path):
    from benchmarks.data_throughput import main as data_main

    out = tmp_path / "res"
    assert data_main(["--smoke", "--out", str(out), "--workdir", str(tmp_path)]) == 0
    (jp,) = out.glob("data_throughput-*.json")
    (mp,) = out.glob("data_throughput-*.md")
    p = json.loads(jp.read_text())
    _check_rows(p["loaders"], ["images_per_s", "first_epoch_images_per_s", "speedup_vs_seed", "setup_s"])
    names = " ".join(r["loader"] for r in p["loaders"])
    assert "seed h5py" in names and "ShardData num_workers=0" in names and "ShardData num_workers=2" in names
    _check_rows(p["sharding"], ["galaxies_per_s", "seconds"])
    _check_rows(p["rss"], ["rss_peak_tree_mb", "rss_peak_over_base_mb", "images_per_s"])
    assert all(r["images_read"] == (r["n_train"] // 32) * 32 for r in p["rss"])
    (verdict,) = p["rss_verdict"].values()
    assert _finite(verdict["growth_mb"]) and verdict["n_ratio"] > 3
    v = p["verify"]  # data.verify's first check is timed, and a resume's cached one is far cheaper
    assert v["bytes"] > 0 and v["first_check_s"] > 0 and 0 <= v["cached_check_s"] < v["first_check_s"]
    assert "`data.verify`" in mp.read_text()
    md = mp.read_text()
    for text in ("× seed", "galaxies/s", "peak RSS", "32²"):
        assert text in md


def test_scaling_model_and_gloo_measurement(tmp_path):
    from benchmarks.scaling import efficiency
    from benchmarks.scaling import main as scaling_main

    assert efficiency(1, 64, 100, 0.3, 21.6e6)["efficiency"] == 1.0
    effs = [efficiency(16, 64, bw, 0.3, 21.6e6)["efficiency"] for bw in (100, 200, 400)]
    assert effs == sorted(effs) and effs[0] < 0.9  # more bandwidth helps; batch 64 on 100 Gb/s cannot
    assert efficiency(16, 256, 100, 0.3, 21.6e6)["efficiency"] > effs[0]  # so does a bigger batch
    assert (
        scaling_main(
            ["--out", str(tmp_path), "--model", str(tmp_path / "s.md"), "--batch", "1", "--steps", "1"]
        )
        == 0
    )
    (jp,) = tmp_path.glob("allreduce-*.json")
    m = json.loads(jp.read_text())
    assert m["world_size"] == 2 and m["grad_mb_fp32"] > 20 and m["allreduce_fp32_s"]["median"] > 0
    text = (tmp_path / "s.md").read_text()
    assert "per-GPU batch that keeps 16 GPUs" in text and "Measured here" in text


@pytest.mark.slow
def test_gpu_check_rehearsal_runs_end_to_end(tmp_path):
    """benchmarks/gpu_check.sh --cpu-rehearsal: the same steps as on the GPU, at tiny sizes, known to work."""
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-rehearsal", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=900)  # fmt: skip
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    (tests_log,) = tmp_path.glob("gpu_tests-cpu-*.txt")
    assert " passed" in tests_log.read_text() and "failed" not in tests_log.read_text()
    (jp,) = tmp_path.glob("epoch_time-*-rehearsal.json")
    _check_epoch_time(jp, jp.with_suffix(".md"))
    names = {r["name"] for r in json.loads(jp.read_text())["results"]}
    assert {"cvae2/ddp/bf16/channels_last+resident", "lightning cvae2 bf16-mixed"} <= names
    (gp,) = tmp_path.glob("generalize-*-rehearsal.json")  # the science step: one recipe judged on COSMOS-like
    (row,) = json.loads(gp.read_text())["rows"]
    assert (
        row["set"] == "cosmos" and row["recipe"] == "galaxy_film" and "orientation >= 0.97" in row["checks"]
    )
    (fp,) = tmp_path.glob("generate-*-cpu.json")  # generation speed and catalog fidelity with that model
    fid = json.loads(fp.read_text())["fidelity"]
    assert fid["n"] == 16 and -1 <= fid["spearman_flux"] <= 1 and len(fid["flux_bins_by_mag_auto"]) == 5
    bad = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--nope"], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown argument --nope" in bad.stderr


@pytest.mark.slow
def test_full_scale_path_at_a_tiny_scale(tmp_path):
    """The --full-scale run (314k x 158^2, once, not in CI) is the same code at any size: check it at 300 x 32^2."""
    from benchmarks.data_throughput import full_scale

    p = full_scale(tmp_path / "res", str(tmp_path), n=300, size=32)
    assert p["dtype"] == "float16" and p["disk_gb"] > 0 and p["build_galaxies_per_s"] > 0
    e = p["epoch"]
    assert e["images_read"] == (e["n_train"] // 64) * 64 and e["rss_peak_tree_mb"] > 0
    assert list((tmp_path / "res").glob("data_throughput-full-scale-*.md"))


def test_science_picks_the_best_variant_and_rejects_unknown_ones(capsys):
    from benchmarks.science import best, meets
    from benchmarks.science import main as science_main

    def r(name, g, s, k):
        return {"size": 64, "variant": name, "g_delta": g, "sigma_rel": s, "slope_rel": k}

    rows = [r("round", -0.1, 0.01, 0.0), r("big", 0.0, 0.13, 0.2), r("close", -0.015, 0.03, 0.15)]
    assert best(rows, 64)["variant"] == "close" and meets(best(rows, 64))
    assert not meets(rows[1]) and best(rows, 158) is None
    assert science_main(["--variants", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("benchmarks.science: error: unknown --variants nope") and "\n" not in err
    assert science_main(["--sweep", "--sizes", "158"]) == 2  # the sweep is 64x64 only: refused, not run at 64
    assert "--sizes must be among [64]" in capsys.readouterr().err


@pytest.mark.slow
def test_science_smoke_one_variant(tmp_path, capsys):
    """The product's own commands end to end (synth, shard, train, prior, evaluate) for one variant."""
    from benchmarks.science import main as science_main

    argv = [
        "--smoke",
        "--sizes",
        "64",
        "--variants",
        "galaxy_vae-beta0.03",
        "--work",
        str(tmp_path),
        "--jobs",
        "1",
    ]
    assert science_main(argv) == 0
    md = capsys.readouterr().out
    (line,) = [x for x in md.splitlines() if x.startswith("| galaxy_vae-beta0.03 |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:4] == ["asinh", "mse", "121656"] and cells[4:6] == ["0.03", "16"]
    assert all(math.isfinite(float(c)) for c in cells[6:-1]), line  # every figure present and finite
    assert "variance β / 2" in md and "Best: **galaxy_vae-beta0.03**" in md


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["benchmarks.generate", "--out", "TMP", "--truth", "no-such-truth.fits"],
            "--truth no-such-truth.fits",
        ),
        (["benchmarks.generate", "--out", "TMP", "--n-fidelity", "0"], "--n-fidelity must be in"),
        (["benchmarks.generalize", "--work", "TMP", "--sets", "hsc"], "unknown recipe or set 'hsc'"),
        (["benchmarks.generalize", "--work", "TMP", "--size", "4"], "--size >= 16"),
        (
            ["benchmarks.generalize", "--work", "TMP", "--seeds", "one"],
            "--seeds must be comma-separated integers",
        ),
    ],
)
def test_the_science_benchmarks_refuse_bad_options_in_one_line(tmp_path, argv, needle):
    from train_helpers import cli

    p = cli("-m", *[str(tmp_path) if a == "TMP" else a for a in argv], timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in p.stderr, p.stderr
