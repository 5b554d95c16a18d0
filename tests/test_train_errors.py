"""Bad input to ``hpcvae.train``: one clear line, exit code 2, no traceback, no hang."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from train_helpers import cli, make_h5, make_shards, train_args

from hpcvae.config import load_config
from hpcvae.errors import CheckpointError, ConfigError, ShardError
from hpcvae.train import _per_rank_batch, main


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("errors"))


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    line = [s for s in r.stderr.splitlines() if s.startswith("hpcvae.train: error:")]
    assert len(line) == 1, r.stderr
    for n in needles:
        assert n in line[0], line[0]


def test_cli_unknown_arch(shards: Path, tmp_path: Path) -> None:
    _one_line_error(
        cli("-m", "hpcvae.train", *train_args(shards, tmp_path / "r", "--arch", "resnet")),
        "model.arch",
        "'resnet'",
        "cvae2",
    )


def test_cli_missing_shard(shards: Path, tmp_path: Path) -> None:
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    victim = sorted(broken.glob("train-*.tar"))[0]
    victim.unlink()
    _one_line_error(cli("-m", "hpcvae.train", *train_args(broken, tmp_path / "r")), victim.name, "missing")


def test_cli_resume_path_without_checkpoint(shards: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(
        cli("-m", "hpcvae.train", *train_args(shards, tmp_path / "r", "--resume", str(empty))),
        "no complete checkpoint",
    )


def test_corrupt_shard(shards: Path, tmp_path: Path) -> None:
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    victim = sorted(broken.glob("train-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:700] + b"\x00garbage" * 50)
    with pytest.raises(ShardError):
        main(train_args(broken, tmp_path / "r", epochs=1))


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (["--set", "beta.value=-0.5"], ConfigError, "beta.value must be >= 0"),
        (["--flavour", "huge"], ConfigError, "model.flavour"),
        (["--set", "model.image_size=64"], ConfigError, "images are 32x32 but model.image_size = 64"),
        (["--batch-size", "512"], ConfigError, "lower data.batch_size"),
        (["--precision", "fp8"], ConfigError, "train.precision"),
    ],
)
def test_bad_config_values(shards: Path, tmp_path: Path, extra: list[str], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        main(train_args(shards, tmp_path / "r", *extra))


def test_global_batch_must_divide_over_ranks() -> None:
    cfg = load_config(None, {"data.global_batch_size": 10})
    with pytest.raises(ConfigError, match="does not divide over 4 ranks"):
        _per_rank_batch(cfg, 4)
    assert _per_rank_batch(cfg, 2).data.batch_size == 5


def test_conditional_model_needs_redshifts(tmp_path: Path) -> None:
    from hpcvae.shards import build_shards_from_h5

    h5 = make_h5(tmp_path / "g.h5", n=40)
    plain = tmp_path / "plain"
    build_shards_from_h5(h5, plain, size=32, use_redshift=False)
    with pytest.raises(ConfigError, match="conditioned on redshift"):
        main(train_args(plain, tmp_path / "r"))


def test_checkpoint_from_another_arch(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert main(train_args(shards, out, epochs=1)) == 0
    with pytest.raises(CheckpointError, match="arch = 'cvae2' but this run has arch = 'vae158'"):
        main(train_args(shards, tmp_path / "other", "--arch", "vae158", "--resume", str(out)))


def test_a_changed_model_default_on_resume_names_the_field(shards: Path, tmp_path: Path) -> None:
    """A run started with another likelihood (e.g. before a default changed) is refused naming that field;
    the message used to print both whole model_config dicts."""
    out = tmp_path / "r"
    assert main(train_args(shards, out, "--set", 'model.likelihood="calibrated"', epochs=1)) == 0
    with pytest.raises(
        CheckpointError,
        match=r"has model_config\.likelihood = 'calibrated' but this run has model_config\.likelihood = 'mse';",
    ):
        main(train_args(shards, out, epochs=2))


def test_an_error_every_rank_sees_is_printed_once(shards: Path, tmp_path: Path) -> None:
    """A training set too small for world_size x batch_size: one line from rank 0, not one per rank."""
    from train_helpers import run_ranks

    rcs = run_ranks(train_args(shards, tmp_path / "r", "--batch-size", "100"), tmp_path / "logs", world=2)
    assert rcs == [2, 2]
    texts = [(tmp_path / "logs" / f"rank{r}.log").read_text() for r in (0, 1)]
    assert texts[0].count("hpcvae.train: error:") == 1 and "lower data.batch_size" in texts[0]
    assert "error" not in texts[1], texts[1]


def test_progress_is_status_lines_when_stderr_is_not_a_terminal(shards: Path, tmp_path: Path) -> None:
    r = cli(
        "-m", "hpcvae.train", *train_args(shards, tmp_path / "r", "--set", "train.status_every=5", epochs=1)
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stderr  # no progress bar redrawn into a log file
    lines = [s for s in r.stderr.splitlines() if s.startswith("hpcvae.train: epoch 1/1, step ")]
    assert len(lines) >= 2 and "loss" in lines[-1], r.stderr[-2000:]


def test_metrics_jsonl_is_strict_json(tmp_path: Path) -> None:
    import json

    from hpcvae.metrics import Metrics

    m = Metrics(tmp_path, enabled=True, sinks=["jsonl"]).open(total=1)
    m.write({"kind": "train", "step": 1, "loss": float("nan"), "kl": float("inf"), "lr": 1e-3})
    m.close()

    def strict(name: str) -> None:
        raise AssertionError(f"bare {name} in metrics.jsonl")

    rec = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=strict)
    assert rec["loss"] is None and rec["kl"] is None and rec["lr"] == 1e-3


def test_load_model_names_the_path_it_was_given(tmp_path: Path) -> None:
    from hpcvae import load_model

    missing = tmp_path / "runs" / "nope" / "model.safetensors"
    with pytest.raises(CheckpointError, match=f"^{missing}: no such file or folder"):
        load_model(missing)


def test_metric_sinks_are_a_table_the_config_names(shards: Path, tmp_path: Path) -> None:
    """A sink is a class plus its line in SINKS; ``[metrics] sinks`` picks them, and only those write."""
    import typing

    from hpcvae.config import SinkName
    from hpcvae.metrics import SINKS

    assert set(typing.get_args(SinkName)) == set(SINKS)
    out = tmp_path / "jsonl-only"
    r = cli("-m", "hpcvae.train", *train_args(shards, out, "--set", 'metrics.sinks=["jsonl"]', epochs=1))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "metrics.jsonl").stat().st_size > 0 and not (out / "tb").exists()
    _one_line_error(
        cli("-m", "hpcvae.train", *train_args(shards, tmp_path / "bad", "--set", 'metrics.sinks=["wandb"]')),
        "metrics.sinks",
        "'wandb'",
    )


def test_check_model_fits_names_what_the_data_lacks(tiny_shards: Path, aegis_shards: Path) -> None:
    """One check for train, train_prior and evaluate: each requirement a model has of its shard set."""
    from hpcvae.errors import ModelError
    from hpcvae.models import build_model
    from hpcvae.models.data_fit import check_model_fits
    from hpcvae.shards.manifest import Manifest

    tiny = Manifest.load(tiny_shards)  # 32x32, redshift only
    check_model_fits(build_model("cvae2", "debug", image_size=32), tiny, where="m")  # fits
    with pytest.raises(ModelError, match=r"^m: cvae2 expects 48x48 images but shard set .* holds 32x32"):
        check_model_fits(build_model("cvae2", "debug", image_size=48), tiny, where="m")
    film = build_model("galaxy_film", "debug", image_size=32, conditions=("redshifts", "mag_auto"))
    with pytest.raises(ModelError, match=r"conditioned on 'mag_auto' but shard set .* carries redshifts;"):
        check_model_fits(film, tiny, where="m")
    with pytest.raises(ConfigError, match="conditioned on redshift but shard set") as info:
        check_model_fits(build_model("cvae2", "debug", image_size=64), Manifest.load(aegis_shards), where="m",
                         error=ConfigError, collective=True)  # fmt: skip
    assert info.value.collective
    for likelihood in ("gaussian", "calibrated_noise"):
        noisy = build_model("galaxy_vae", "debug", image_size=32, likelihood=likelihood)
        with pytest.raises(ModelError, match=f"{likelihood}' needs each galaxy's noise variance"):
            check_model_fits(noisy, tiny, where="m")
    psf = build_model("galaxy_vae", "debug", image_size=32, psf_forward=True)
    with pytest.raises(ModelError, match="psf_forward needs each galaxy's PSF"):
        check_model_fits(psf, tiny, where="m")
