"""The options engine every command shares: dataclasses from TOML, ``--set`` and flags, type-checked.

``load_options(cls, toml, --set, flags)`` builds any ``@dataclass(kw_only=True)`` options class, field by
field, so a bad value names its key; ``add_options``/``options_from_args`` give a command one flag per
field with the field's docstring as help.  The schema itself (what the options are) lives in
``hpcvae.config`` and in each command's own ``*Config``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from hpcvae.errors import ConfigError

T = TypeVar("T")


# ----------------------------------------------------------------------------------------
# Loading, overriding and dumping


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where TOML/CLI is lossy."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}", key=where)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}", key=where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}", key=where)
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}", key=where)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}", key=where)
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}", key=where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}", key=where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML and --set both accept inf and nan
                raise ConfigError(f"{where}: {value!r} is not a finite number", key=where)
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}", key=where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}", key=where)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}", key=where)
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a (TOML) dict, rejecting unknown keys and naming missing ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})",
            key=f"{prefix}{unknown[0]}",
        )
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and _required(f)]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]} is required", key=f"{prefix}{missing[0]}")
    kwargs = {}
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in data.items():
        key = f"{where}.{k}" if where else k
        f = by_name[k]
        if (
            isinstance(v, dict)
            and dataclasses.is_dataclass(hints[k])
            and f.default_factory is not dataclasses.MISSING
        ):
            v = {
                **dataclasses.asdict(f.default_factory()),
                **v,
            }  # a partial table keeps this field's defaults
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - kw_only mismatch
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form (TOML/JSON-safe: tuples become lists, ``None`` is dropped)."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return clean(dataclasses.asdict(cfg))


def _parse_scalar(text: str) -> Any:
    """Parse a CLI override value the way TOML would (``3``, ``1e-3``, ``true``, ``[1, 2]``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string such as ``cosine`` or a path


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder, not a TOML file (e.g. configs/demo.toml)")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p}: invalid TOML: {exc}") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"unknown config key {key}")
        node = nxt
    node[parts[-1]] = value


def _pairs(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    pairs: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        k, v = item.split("=", 1)
        if not k.strip():
            raise ConfigError(f"override {item!r} has no key before '=' (e.g. train.epochs=3)")
        pairs[k.strip()] = _parse_scalar(v.strip())
    return pairs


def load_options(
    cls: type[T],
    path: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    flags: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> T:
    """Every command's options, loaded the same way: defaults < TOML file < ``--set`` < named flags.

    ``overrides`` and ``flags`` map dotted keys (``train.epochs``) to values (``--set`` strings are
    parsed the way TOML would); ``base`` is a dict under the file (a site profile's implied name,
    say).  Everything is type-checked once, field by field, so a bad value names its key; an error
    in a key that came from the file names the file.
    """
    data: dict[str, Any] = dict(base or {})
    file_keys: set[str] = set()
    if path is not None:
        file_data = read_toml(path)
        file_keys = _flat_keys(file_data)
        for k, v in _flatten(file_data).items():
            _set_dotted(data, k, v)
    later = {**_pairs(overrides), **(flags or {})}
    for k, v in later.items():
        _set_dotted(data, k, v)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        key = exc.key or ""
        if path is not None and key in file_keys and key not in later:
            raise ConfigError(f"config file {path}: {exc}", key=exc.key) from None
        raise


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _flat_keys(data: dict[str, Any]) -> set[str]:
    return set(_flatten(data))


# ----------------------------------------------------------------------------------------
# Command lines: one flag per field, from the dataclass


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and its bases): the help text of its flag."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass).lstrip())
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name):
                if (
                    isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant)
                    and isinstance(b.value.value, str)
                ):
                    docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _leaf(cls: type, key: str) -> tuple[type, dataclasses.Field]:
    """The dataclass and field a dotted key names."""
    parts = key.split(".")
    for p in parts[:-1]:
        cls = typing.get_type_hints(cls)[p]
    f = next((f for f in dataclasses.fields(cls) if f.name == parts[-1]), None)
    if f is None:
        raise KeyError(key)
    return cls, f


def add_options(
    parser: Any,
    cls: type,
    *,
    flags: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
    config: bool = True,
) -> dict[str, str]:
    """Add ``--config FILE``, ``--set KEY=VALUE`` and one ``--flag`` per scalar field of ``cls``.

    ``flags`` adds named flags for nested keys (``{"resume": "checkpoint.resume"}``) or renames
    (``{"workers": "num_workers"}``).  A bool field gets ``--name`` (or ``--no-name`` when its
    default is true).  Returns ``dest -> dotted key`` for :func:`options_from_args`.
    """
    table: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.name not in skip and not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
            table.setdefault(f.name, f.name)
    for name, key in (flags or {}).items():
        table.pop(key, None) if key in table and key != name else None
        table[name] = key
    for name, key in table.items():
        owner, f = _leaf(cls, key)
        tp = typing.get_type_hints(owner)[f.name]
        doc = field_docs(owner).get(f.name, "").replace("%", "%%")  # argparse %-formats help texts
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + name.replace("_", "-")
        if tp is bool:
            if default is True:
                parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                                    default=None, help=f"Turns off (on by default): {doc}".strip())  # fmt: skip
            else:
                parser.add_argument(flag, dest=name, action="store_true", default=None, help=doc)
            continue
        if tp == bool | None:  # ``--flag`` = true, ``--flag false``, absent = None (auto)
            parser.add_argument(flag, dest=name, nargs="?", const="true", default=None, metavar="true|false",
                                help=(doc + " Default: auto.").strip())  # fmt: skip
            continue
        # Choices are checked by the config (one line naming the key), not by argparse (a usage dump).
        choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
        shown = (f" One of: {', '.join(map(str, choices))}." if choices else "") + (
            f" Default: {default}." if default not in (None, "") else "")  # fmt: skip
        parser.add_argument(
            flag, dest=name, default=None, metavar=name.upper(), help=(doc + shown).strip() or None
        )
    if config:
        parser.add_argument("--config", help="TOML file of options (the command line overrides it)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="any option, e.g. --set checkpoint.every_steps=100 (repeatable)")  # fmt: skip
    return table


def options_from_args(cls: type[T], args: Any, table: dict[str, str], **given: Any) -> T:
    """The options of ``cls`` from parsed arguments: ``--config``, ``--set``, then the named flags.

    ``given`` holds values the command sets itself (positional arguments), as dotted keys.
    """
    flags: dict[str, Any] = {}
    for name, key in table.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        owner, f = _leaf(cls, key)
        flags[key] = _flag_value(value, typing.get_type_hints(owner)[f.name])
    flags.update({k: v for k, v in given.items() if v is not None})
    try:
        return load_options(
            cls, getattr(args, "config", None), list(getattr(args, "set", []) or []), flags=flags
        )
    except ConfigError as exc:
        flag = next((n for n, k in table.items() if k == exc.key), None)
        if flag and str(exc).endswith(" is required"):  # name the flag the user types
            raise ConfigError(f"--{flag.replace('_', '-')} is required") from None
        raise


def _flag_value(text: Any, tp: Any) -> Any:
    """A flag's string as its field wants it: strings stay strings, ``64,64`` is a list, the rest as TOML."""
    if not isinstance(text, str):
        return text
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    base = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
    if str in base or Path in base or any(typing.get_origin(a) is Literal for a in base):
        return text
    if any(typing.get_origin(a) in (list, tuple) for a in base) and not text.startswith("["):
        return [_parse_scalar(x.strip()) for x in text.split(",") if x.strip()]
    return _parse_scalar(text)


def dump_toml(cfg: Any) -> str:
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))
