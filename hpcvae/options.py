"""docs/options.md, generated from the option dataclasses so the reference cannot drift.

``python -m hpcvae.options > docs/options.md``; ``tests/test_config.py`` keeps the file current.
"""

from __future__ import annotations

import dataclasses
import typing

from hpcvae.config import JobConfig, field_docs


def _commands() -> list[tuple[str, str, type]]:
    from hpcvae.evaluate.report import EvalConfig
    from hpcvae.generate import GenerateConfig
    from hpcvae.launch.profile import LaunchOptions, SiteProfile
    from hpcvae.shards.ingest import ShardConfig
    from hpcvae.synth import SynthConfig
    from hpcvae.train_prior import PriorConfig

    return [
        ("python -m hpcvae.train", "a TOML file from configs/ (`--config`), `--set section.key=value`, "
         "and the named flags `--arch --flavour --data --out --epochs --engine --zero-stage --precision "
         "--resume --batch-size --lr --seed --device --compile --channels-last --deterministic`", JobConfig),
        ("python -m hpcvae.train_prior MODEL", "`--config`, `--set`, and one flag per option (`--workers`, "
         "`--hidden 64,64`, `--resume`, `--every-steps`, `--keep-last` for the nested ones)", PriorConfig),
        ("python -m hpcvae.evaluate MODEL --data SHARDS --out REPORT", "`--config`, `--set`, one flag per option",
         EvalConfig),
        ("python -m hpcvae.shard (--catalog FITS | --from-h5 H5) --out SHARDS", "`--config`, `--set`, one flag "
         "per option, plus the source's own (`--fits-catalog`, `--redshift-column`, `--no-redshift`, "
         "`--h5-images`, `--h5-redshifts`)", ShardConfig),
        ("python -m hpcvae.synth", "`--config`, `--set`, one flag per option", SynthConfig),
        ("python -m hpcvae.generate MODEL --out FILE", "`--config`, `--set`, one flag per option", GenerateConfig),
        ("python -m hpcvae.launch", "one flag per option; every other argument goes to hpcvae.train", LaunchOptions),
        ("site profile (`--profile slurm/SITE.toml`)", "the TOML file's top-level keys", SiteProfile),
    ]  # fmt: skip


def _table(cls: type, prefix: str = "") -> list[str]:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    rows: list[str] = []
    nested: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested += [f"\n**[{prefix}{f.name}]**\n", *_table(tp, f"{prefix}{f.name}.")]
            continue
        if f.default is not dataclasses.MISSING:
            default = f"`{f.default!r}`"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"`{f.default_factory()!r}`"
        else:
            default = "required"
        kind = tp.__name__ if isinstance(tp, type) else " ".join(str(tp).replace("typing.", "").split())
        rows.append(f"| `{prefix}{f.name}` | `{kind}` | {default} | {docs.get(f.name, '')} |")
    head = ["| option | type | default | what it does |", "|---|---|---|---|"] if rows else []
    return head + rows + nested


def options_markdown() -> str:
    """docs/options.md: every command's options, from the dataclasses themselves."""
    md = [
        "# Options of every command",
        "",
        "Generated from the option dataclasses by `python -m hpcvae.options > docs/options.md` (a test keeps",
        "it current). Every command loads its options the same way: the dataclass defaults, then a TOML",
        "file (`--config`), then `--set key=value` (dotted keys for nested tables), then the named flags;",
        "each value is type-checked and validated once, and a bad one is a one-line error naming its key.",
    ]
    for command, how, cls in _commands():
        md += ["", f"## `{command}`", "", f"Given by {how}.", "", *_table(cls)]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    print(options_markdown(), end="")
