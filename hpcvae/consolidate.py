"""``python -m hpcvae.consolidate CHECKPOINT OUT``: a checkpoint -> the consolidated model files.

Works on any of our checkpoints: DDP (the weights are saved whole) or DeepSpeed ZeRO 0-3
(gathered with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``, its pickles read
with ``weights_only=True``; see ``hpcvae.deepspeed_compat``).  The checkpoint is verified
first (``files.json``): a damaged one is refused with the file named.  The files themselves
are ``hpcvae.model_files``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hpcvae.cli import run_cli
from hpcvae.errors import CheckpointError
from hpcvae.model_files import CARRIED, MODEL_FILE, MODEL_JSON, write_model


def checkpoint_state_dict(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from one of our checkpoints, whatever engine wrote it."""
    from hpcvae.engines import zero0_state_dict, zero_state_dict

    if meta.get("engine") == "deepspeed":
        return zero0_state_dict(folder) if int(meta.get("zero_stage", 0)) == 0 else zero_state_dict(folder)
    from safetensors.torch import load_file

    path = folder / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    return load_file(str(path))


def consolidate_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """``model.safetensors`` + ``model.json`` in ``out`` from a checkpoint folder (or a run's latest)."""
    from hpcvae.checkpoint import latest_intact, read_meta, verify

    ck = Path(checkpoint)
    if not ck.exists():
        raise CheckpointError(f"{ck}: no such checkpoint")
    if not (ck / "meta.json").exists():
        latest = latest_intact(ck)
        if latest is None:
            raise CheckpointError(f"{ck}: not a checkpoint and holds no complete checkpoint")
        ck = latest
    else:
        verify(ck)
    meta = read_meta(ck)
    sd = checkpoint_state_dict(ck, meta)
    return write_model(
        out,
        sd,
        model_config=meta["model_config"],
        transform=meta.get("transform"),
        training=meta.get("summary", {}),
        manifest_digest=meta.get("manifest_digest"),
        beta_schedule=meta.get("beta"),
        lr_schedule=meta.get("lr_schedule"),
        **{k: meta.get(k) for k in CARRIED},
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hpcvae.consolidate", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="checkpoint folder (checkpoints/step-N) or a run folder (its latest)")
    ap.add_argument("out", help="folder to write model.safetensors + model.json into")
    a = ap.parse_args(argv)
    path = consolidate_checkpoint(a.checkpoint, a.out)
    print(f"wrote {path} and {path.with_name(MODEL_JSON)}")
    return 0


if __name__ == "__main__":
    run_cli(main, "hpcvae.consolidate")
