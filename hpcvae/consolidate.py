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

from hpcvae.cli import run_cli
from hpcvae.engines import weights_from_checkpoint
from hpcvae.errors import CheckpointError
from hpcvae.model_files import MODEL_JSON, ModelInfo, write_model


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
    return write_model(out, weights_from_checkpoint(ck, meta), ModelInfo.from_checkpoint(meta))


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
