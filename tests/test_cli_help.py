"""Every command's ``--help`` prints its options (a field doc with a bare % used to crash argparse)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from train_helpers import REPO, child_env

COMMANDS = ["hpcvae.train", "hpcvae.shard", "hpcvae.synth", "hpcvae.evaluate", "hpcvae.generate",
            "hpcvae.train_prior", "hpcvae.consolidate", "hpcvae.export", "hpcvae.launch", "hpcvae.demo"]  # fmt: skip


@pytest.mark.parametrize("module", COMMANDS)
def test_help_prints_every_option(module: str) -> None:
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:") and "Traceback" not in done.stderr
    assert "--" in done.stdout.split("options:", 1)[-1]
