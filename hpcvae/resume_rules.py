"""The resume rule: what a resumed run may change, checked before anything is built.

A resume continues the same training.  Options that define *what* is trained (architecture, data
normalisation, engine, ...) cannot change; the others (epochs, logging, workers) apply and are printed.
The checkpoint's ``config.toml`` is the run's record.  Both trainers call these before building a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcvae.config import to_dict
from hpcvae.dist import print0
from hpcvae.errors import CheckpointError, ConfigError


def check_changed_options(folder: Path | str | None, cfg: Any, meta: dict[str, Any] | None) -> None:
    """Refuse a change of what is trained (one line naming the key); print the changes that apply.

    A refused change leaves everything as it was; an applied one is recorded in config.toml and
    model.json, which say what ran.
    """
    import tomllib

    from hpcvae.config import resume_changes

    if folder is None or not (Path(folder) / "config.toml").is_file():
        return
    try:
        old = tomllib.loads((Path(folder) / "config.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CheckpointError(f"{folder}/config.toml: unreadable ({exc})", collective=True) from None
    refused, applied = resume_changes(old, to_dict(cfg))
    refused = [r for r in refused if r[0] != "data.path"]
    if refused:
        key, a, b = refused[0]
        more = (
            f" (and {len(refused) - 1} more: {', '.join(r[0] for r in refused[1:4])})"
            if len(refused) > 1
            else ""
        )
        raise ConfigError(
            f"{folder}: {key} was {a!r} when this run started and is {b!r} now{more}; a resume cannot change "
            "what is being trained. Use the run's value, or start a new run (--resume none or another --out)",
            key=key, collective=True,
        )  # fmt: skip
    done = int((meta or {}).get("epoch", 0))
    if cfg.train.epochs < done:
        raise ConfigError(
            f"{folder}: train.epochs = {cfg.train.epochs} but the checkpoint has already trained {done} "
            "epochs; ask for at least that many", key="train.epochs", collective=True,
        )  # fmt: skip
    shown = [r for r in applied if not r[0].startswith(("data.path", "out", "checkpoint.resume"))]
    if shown:
        print0("resume: applying changed options: " + "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in shown))


def choose_transform(
    cfg: Any, manifest: Any, meta: dict[str, Any] | None, folder: Path | str | None, expect: dict[str, Any]
) -> tuple[Any, str | None]:
    """The normalisation, from the manifest or the checkpoint's when resuming, and a note if the data changed.

    A resume on another shard set, or with another ``data.transform``, would feed the model differently
    normalised pixels mid-training; it is refused unless ``checkpoint.allow_new_data``, and then the
    checkpoint's normalisation is kept.  ``expect``: the checkpoint keys that must match (arch, engine...).
    """
    from hpcvae.transforms import get_transform, transform_from_dict

    fresh = get_transform(cfg.data.transform, manifest.stats("train"))
    if meta is None:
        return fresh, None
    for key, want in expect.items():  # cheap checks first: nothing built yet
        have = meta.get(key)
        if have != want:
            if isinstance(have, dict) and isinstance(want, dict):  # name the field, not two whole dicts
                key, have, want = next((f"{key}.{k}", have.get(k), want.get(k)) for k in sorted(set(have) | set(want))
                                       if have.get(k) != want.get(k))  # fmt: skip
            raise CheckpointError(
                f"{folder}: checkpoint has {key} = {have!r} but this run has {key} = {want!r}; "
                "resume with the same setting or start fresh with --resume none",
                collective=True,
            )
    changed = []
    if meta.get("manifest_digest") not in (None, manifest.digest):
        changed.append(f"--data {manifest.root} is another shard set (manifest digest differs)")
    saved = meta.get("transform")
    if saved is not None and saved != fresh.to_dict():
        changed.append(f"the normalisation differs ({saved['name']} {saved.get('params')} in the checkpoint, "
                       f"{fresh.name} {fresh.to_dict()['params']} now)")  # fmt: skip
    if not changed:
        return fresh, None
    if not cfg.checkpoint.allow_new_data:
        raise CheckpointError(
            f"{folder}: {'; '.join(changed)}; resuming would continue on other data. "
            "Pass --set checkpoint.allow_new_data=true to do it anyway, or --resume none to start fresh",
            collective=True,
        )
    return (transform_from_dict(saved) if saved is not None else fresh), "; ".join(changed)
