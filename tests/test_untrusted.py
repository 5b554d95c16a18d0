"""Untrusted files run no code: a crafted checkpoint whose pickle would create a file is refused.

DeepSpeed loads its own files with ``weights_only=False``; hpcvae runs every such load with
``weights_only=True`` and an allow-list of the few DeepSpeed types the files hold
(``hpcvae/deepspeed_compat.py``).  The crafted checkpoint is a real DeepSpeed one whose
model-states file was replaced by a pickle with a ``__reduce__`` that touches a marker file.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import cli, make_shards, train_args

from hpcvae.checkpoint import FILES, file_list, list_checkpoints

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def ds_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("evil")
    shards = make_shards(root)
    out = root / "run"
    r = cli(
        "-m", "hpcvae.train", *train_args(shards, out, "--engine", "deepspeed", "--zero-stage", "0", epochs=1)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return list_checkpoints(out)[-1]


def _crafted(ds_checkpoint: Path, tmp: Path, *, rehash: bool) -> tuple[Path, Path]:
    """A copy of the checkpoint with a malicious model-states pickle; ``rehash`` keeps files.json consistent."""
    run = tmp / "crafted-run"
    ck = run / "checkpoints" / ds_checkpoint.name
    shutil.copytree(ds_checkpoint, ck)
    marker = tmp / "PWNED"
    torch.save({"module": _Evil(marker)}, ck / "deepspeed" / "mp_rank_00_model_states.pt")
    if rehash:  # an attacker can write a matching files.json as easily as the pickle
        (ck / FILES).write_text(json.dumps({"files": file_list(ck)}))
    else:
        (ck / FILES).unlink()  # or pose as a checkpoint from before files.json existed
    return ck, marker


@pytest.mark.parametrize("rehash", [True, False], ids=["consistent-files-json", "legacy"])
def test_consolidate_refuses_a_malicious_pickle(ds_checkpoint: Path, tmp_path: Path, rehash: bool) -> None:
    ck, marker = _crafted(ds_checkpoint, tmp_path, rehash=rehash)
    r = cli("-m", "hpcvae.consolidate", str(ck), str(tmp_path / "model"))
    assert not marker.exists(), "the pickle's code ran"
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.startswith("hpcvae.consolidate: error:") and "mp_rank_00_model_states.pt" in r.stderr
    assert "not allowed" in r.stderr


def test_resume_refuses_a_malicious_pickle(ds_checkpoint: Path, tmp_path: Path) -> None:
    ck, marker = _crafted(ds_checkpoint, tmp_path, rehash=True)
    shards = ds_checkpoint.parents[2] / "shards"
    args = train_args(shards, tmp_path / "victim", "--engine", "deepspeed", "--zero-stage", "0",
                      "--resume", str(ck), epochs=2)  # fmt: skip
    r = cli("-m", "hpcvae.train", *args)
    assert not marker.exists(), "the pickle's code ran"
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = [s for s in r.stderr.splitlines() if s.startswith("hpcvae.train: error:")]
    assert len(line) == 1 and "mp_rank_00_model_states.pt" in line[0] and "is not allowed" in line[0], (
        r.stderr
    )


def test_real_deepspeed_checkpoints_still_load(ds_checkpoint: Path, tmp_path: Path) -> None:
    r = cli("-m", "hpcvae.consolidate", str(ds_checkpoint), str(tmp_path / "model"))
    assert r.returncode == 0, r.stderr[-3000:]
