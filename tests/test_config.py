"""The one config system: precedence, typing, error messages, and the generated options reference."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hpcvae.config import JobConfig, add_options, load_options, options_from_args
from hpcvae.errors import ConfigError
from hpcvae.options import options_markdown
from hpcvae.synth import SynthConfig

REPO = Path(__file__).resolve().parents[1]


def test_options_reference_is_current():
    text = (REPO / "docs" / "options.md").read_text()
    assert text == options_markdown(), "docs/options.md is stale: python -m hpcvae.options > docs/options.md"


def test_precedence_defaults_file_set_flags(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[train]\nepochs = 7\n[data]\nbatch_size = 8\nnum_workers = 0\n[model]\narch = "cvae"\n')
    cfg = load_options(JobConfig, f, ["data.batch_size=16"], flags={"model.arch": "cvae2"})
    assert cfg.train.epochs == 7  # file over default
    assert cfg.data.batch_size == 16  # --set over file
    assert cfg.model.arch == "cvae2"  # flag over --set and file
    assert cfg.data.num_workers == 0
    # a partial [data] table keeps the defaults of the keys it does not name
    assert cfg.data.shuffle_buffer == JobConfig().data.shuffle_buffer


def test_bad_value_in_file_names_the_file_and_key(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[model]\narch = "resnet"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: model\.arch: 'resnet' is not one of") as ei:
        load_options(JobConfig, f)
    assert ei.value.key == "model.arch"
    # the same bad value given by --set is the user's flag, not the file's
    with pytest.raises(ConfigError, match=r"^model\.arch: 'resnet'"):
        load_options(JobConfig, None, ["model.arch=resnet"])


def test_unknown_key_and_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key train\.epoch \(known:"):
        load_options(JobConfig, None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got 'three'"):
        load_options(JobConfig, None, {"train.epochs": "three"})
    with pytest.raises(ConfigError, match=r"optim\.lr: inf is not a finite number"):
        load_options(JobConfig, None, ["optim.lr=inf"])


def test_flags_from_the_dataclass_and_required_names_the_flag(tmp_path):
    parser = argparse.ArgumentParser()
    table = add_options(parser, SynthConfig)
    args = parser.parse_args(["--n", "12", "--size", "32", "--out", str(tmp_path / "s")])
    cfg = options_from_args(SynthConfig, args, table)
    assert cfg.n == 12 and cfg.out == tmp_path / "s" and isinstance(cfg.out, Path)
    with pytest.raises(ConfigError, match=r"^--out is required$"):
        options_from_args(SynthConfig, parser.parse_args(["--n", "3", "--size", "32"]), table)
