"""``python -m hpcvae.export RUN OUT [--report REPORT]``: a model folder to share, in the Hugging Face layout.

OUT holds ``README.md`` (the model card, built with ``huggingface_hub``: metadata, ``model-index`` with
the evaluation's numbers, intended and out-of-scope use, limitations, usage, citation),
``model.safetensors`` and ``model.json`` (no absolute path of the training machine left in it), and,
with ``--report``, the evaluation's ``report.json`` and figures under ``figures/``.  Files are mode
0644 less the umask, so a group can read them.  ``hpcvae.load_model(OUT)`` opens it, and so does
``hpcvae.load_model("org/name")`` once it is pushed to the Hub (``huggingface-cli upload org/name OUT``).
The folder appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpcvae.cli import run_cli
from hpcvae.errors import ConfigError
from hpcvae.model_files import MODEL_FILE, MODEL_JSON, shareable


def portable_json(x: Any) -> Any:
    """A JSON value with every absolute path replaced by its file name."""
    if isinstance(x, dict):
        return {k: portable_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [portable_json(v) for v in x]
    if isinstance(x, str) and x.startswith("/") and len(x) > 1 and "\n" not in x:
        return Path(x).name
    return x


def export(
    run: str | Path, out: str | Path, report: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Write the shareable folder ``out`` from a run folder (or a model folder) ``run``."""
    from hpcvae.model_card import write_model_card
    from hpcvae.model_files import load_model, read_model_json
    from hpcvae.safe_io import replace_folder, signals_as_interrupt, temp_name

    run, out = Path(run), Path(out)
    if not (run / MODEL_JSON).is_file():
        raise ConfigError(
            f"{run}: no {MODEL_JSON} (export a run folder whose training completed, or consolidate one)"
        )
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: exists; pass --overwrite to replace it")
    load_model(run)  # refuses anything broken before a byte is written
    meta = read_model_json(run / MODEL_JSON)
    rep = None
    if report is not None:
        report = Path(report)
        if not (report / "report.json").is_file():
            raise ConfigError(
                f"{report}: no report.json (python -m hpcvae.evaluate RUN --data SHARDS --out REPORT)"
            )
        rep = json.loads((report / "report.json").read_text())
    tmp = temp_name(out)
    with signals_as_interrupt(f"hpcvae.export {out}"):
        try:
            tmp.mkdir(parents=True)
            shutil.copyfile(run / MODEL_FILE, tmp / MODEL_FILE)
            (tmp / MODEL_JSON).write_text(json.dumps(portable_json(meta), indent=1))
            write_model_card(tmp, portable_json(rep) if rep else None, name="README.md")
            if report is not None:
                (tmp / "figures").mkdir()
                for png in sorted(Path(report).glob("*.png")):
                    shutil.copyfile(png, tmp / "figures" / png.name)
                (tmp / "report.json").write_text(json.dumps(portable_json(rep), indent=1))
            for p in tmp.rglob("*"):
                if p.is_file():
                    shareable(p)
            mask = os.umask(0)
            os.umask(mask)
            for d in [tmp, *[p for p in tmp.rglob("*") if p.is_dir()]]:
                os.chmod(d, 0o777 & ~mask)
            replace_folder(tmp, out)  # the old folder goes only once the new one is complete
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcvae.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run folder (model.safetensors + model.json)")
    p.add_argument("out", help="folder to write (the Hugging Face model layout)")
    p.add_argument(
        "--report", help="an hpcvae.evaluate report folder: its numbers go into the card, its PNGs along"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    a = p.parse_args(argv)
    out = export(a.run, a.out, a.report, a.overwrite)
    print(
        f"hpcvae.export: wrote {out} (README.md, {MODEL_FILE}, {MODEL_JSON}{', report and figures' if a.report else ''})"
    )
    return 0


if __name__ == "__main__":
    run_cli(main, "hpcvae.export")
