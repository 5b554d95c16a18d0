"""One validating reader for every JSON file hpcvae reads: shape, types and ranges, checked before use.

A JSON file of valid syntax can still be the wrong shape (a list where an object belongs, a string
where a count does, a size that would allocate terabytes).  Each file kind declares its
:class:`Schema`; :func:`read_json` parses the file and checks it, so an error is one line naming
the file and the key (``manifest.json: splits.train.shards[0].count: expected an integer >= 0,
got 'x'``) instead of a traceback far away.  A new file kind is one schema here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcvae.errors import HpcvaeError

MAX_SIDE = 4096
MAX_WIDTH = 4096
"""Largest nf, z_dim a model.json may ask for: larger would allocate gigabytes before the weights are read."""
MAX_COUNT = 10**10


@dataclass(frozen=True)
class Schema:
    """What one JSON value must be; ``None`` accepted where ``optional``."""

    kind: str
    """``object``, ``list``, ``int``, ``number``, ``str``, ``bool`` or ``any``."""
    keys: dict[str, Schema] = field(default_factory=dict)
    """For objects: the keys that are checked (others pass unchecked)."""
    required: tuple[str, ...] = ()
    items: Schema | None = None
    """For lists: each item; for objects with ``values``: each value."""
    values: Schema | None = None
    lo: float | None = None
    hi: float | None = None
    pattern: str | None = None
    optional: bool = False
    check: Callable[[Any], str | None] | None = None


def obj(keys: dict[str, Schema] | None = None, required: tuple[str, ...] = (), *, values: Schema | None = None,
        optional: bool = False) -> Schema:  # fmt: skip
    return Schema("object", keys=keys or {}, required=required, values=values, optional=optional)


def lst(items: Schema, optional: bool = False) -> Schema:
    return Schema("list", items=items, optional=optional)


def num(lo: float | None = None, hi: float | None = None, optional: bool = False) -> Schema:
    return Schema("number", lo=lo, hi=hi, optional=optional)


def integer(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Schema:
    return Schema("int", lo=lo, hi=hi, optional=optional)


def text(pattern: str | None = None, optional: bool = False) -> Schema:
    return Schema("str", pattern=pattern, optional=optional)


ANY = Schema("any", optional=True)


def validate(value: Any, schema: Schema, where: str = "") -> None:
    """Raise ValueError naming the first key that does not fit ``schema``."""
    here = where or "the file"
    if value is None:
        if schema.optional or schema.kind == "any":
            return
        raise ValueError(f"{here}: expected {_describe(schema)}, got null")
    k = schema.kind
    if k == "object":
        if not isinstance(value, dict):
            raise ValueError(f"{here}: expected an object, got {_short(value)}")
        for key in schema.required:
            if key not in value:
                raise ValueError(f"{_join(where, key)}: missing")
        for key, sub in schema.keys.items():
            if key in value:
                validate(value[key], sub, _join(where, key))
        if schema.values is not None:
            for key, v in value.items():
                validate(v, schema.values, _join(where, str(key)))
    elif k == "list":
        if not isinstance(value, list):
            raise ValueError(f"{here}: expected a list, got {_short(value)}")
        if schema.items is not None:
            for i, v in enumerate(value):
                validate(v, schema.items, f"{where}[{i}]")
    elif k in ("int", "number"):
        ok = isinstance(value, int) if k == "int" else isinstance(value, (int, float))
        if not ok or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"{here}: expected {_describe(schema)}, got {_short(value)}")
        if (schema.lo is not None and value < schema.lo) or (schema.hi is not None and value > schema.hi):
            raise ValueError(f"{here}: expected {_describe(schema)}, got {value}")
    elif k == "str":
        if not isinstance(value, str):
            raise ValueError(f"{here}: expected a string, got {_short(value)}")
        if schema.pattern and not re.fullmatch(schema.pattern, value):
            raise ValueError(f"{here}: {value!r} is not a valid value here")
    elif k == "bool" and not isinstance(value, bool):
        raise ValueError(f"{here}: expected true/false, got {_short(value)}")
    if schema.check is not None:
        problem = schema.check(value)
        if problem:
            raise ValueError(f"{here}: {problem}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _describe(s: Schema) -> str:
    what = {"int": "an integer", "number": "a number", "str": "a string", "object": "an object", "list": "a list",
            "bool": "true/false"}.get(s.kind, s.kind)  # fmt: skip
    if s.lo is not None and s.hi is not None:
        return f"{what} in [{s.lo:g}, {s.hi:g}]"
    if s.lo is not None:
        return f"{what} >= {s.lo:g}"
    if s.hi is not None:
        return f"{what} <= {s.hi:g}"
    return what


def read_json(
    path: str | Path, schema: Schema, error: type[HpcvaeError], what: str = "", fmt: str | None = None
) -> Any:
    """Parse ``path`` and check it against ``schema``; any problem is one ``error`` naming the file and key.

    ``fmt``: the ``format`` tag the file must carry, checked first (a file of another kind says so).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such file{f' ({what})' if what else ''}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: unreadable{f' {what}' if what else ''}: {exc}") from None
    if fmt is not None and (not isinstance(data, dict) or data.get("format") != fmt):
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise error(f"{path}: not an hpcvae {what or 'file'} (format {got!r}, expected {fmt!r})")
    try:
        validate(data, schema)
    except ValueError as exc:
        raise error(f"{path}: {exc}") from None
    return data


# -- the schemas of hpcvae's files ---------------------------------------------------------------------

SHARD_NAME = r"(train|val)-\d{6}\.tar"

MANIFEST = obj({
    "format": text(),
    "image": obj({"size": integer(1, MAX_SIDE), "dtype": text(r"float32|float16", optional=True)}, ("size",)),
    "splits": obj(values=obj({"count": integer(0, MAX_COUNT, optional=True), "shards": lst(obj({
        "name": text(SHARD_NAME), "count": integer(0, MAX_COUNT), "sha256": text(r"[0-9a-f]{64}|", optional=True),
    }, ("name", "count")))}, ("shards",))),
    "stats": obj(values=obj(values=ANY), optional=True),
    "has_redshift": Schema("bool", optional=True),
    "conditions": lst(obj({"name": text(r"[A-Za-z_][A-Za-z0-9_]*"), "train": obj(optional=True)}, ("name",)),
                      optional=True),
    "physics": obj({"pixel_scale_arcsec": num(1e-6, 3600, optional=True)}, optional=True),
}, ("format", "image", "splits"))  # fmt: skip
"""manifest.json (``hpcvae.shards.manifest``)."""

MODEL_CONFIG = obj({
    "arch": text(), "flavour": text(optional=True), "image_size": integer(16, MAX_SIDE), "nf": integer(1, MAX_WIDTH),
    "z_dim": integer(1, MAX_WIDTH), "likelihood": text(optional=True), "conditions": lst(text(), optional=True),
}, ("arch", "image_size", "nf", "z_dim"))  # fmt: skip

MODEL_JSON = obj({
    "format": text(), "arch": text(optional=True), "model_config": MODEL_CONFIG,
    "transform": obj({"name": text(), "params": obj(values=ANY, optional=True)}, ("name",), optional=True),
    "training": obj(optional=True), "physics": obj({"pixel_scale_arcsec": num(1e-6, 3600, optional=True)},
                                                   optional=True),
    "flow_prior": obj({"library": text(), "spec": obj(values=ANY)}, ("library", "spec"), optional=True),
    "conditions": lst(obj({"name": text()}, ("name",)), optional=True),
    "output": obj({"inverse": text("noise_mean"), "noise_std": num(1e-30, 1e30)}, ("inverse", "noise_std"),
                  optional=True),
}, ("format", "model_config"))  # fmt: skip
"""model.json (``hpcvae.model_files``)."""

CHECKPOINT_FILES = obj({"files": obj(values=obj({"size": integer(0), "sha256": text(r"[0-9a-f]{64}")},
                                                ("size", "sha256")))}, ("files",))  # fmt: skip
"""A checkpoint's files.json (``hpcvae.checkpoint``)."""

CHECKPOINT_META = obj({"format": text(), "global_step": integer(0), "epoch": integer(0),
                       "step_in_epoch": integer(0)}, ("format", "global_step"))  # fmt: skip
"""A checkpoint's meta.json."""

LAUNCH = obj({"jobs": lst(obj(values=ANY)), "events": lst(obj(values=ANY))}, ("jobs", "events"))
"""A run's launch.json (``hpcvae.launch.history``)."""
