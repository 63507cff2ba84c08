"""Configs as plain dataclasses: strict loading from dicts, YAML / JSON files and dotted overrides.

A run, an extraction or an evaluation is described by a tree of dataclasses (torchtitan's
per-component configs). This module turns user input into such a tree and back:

* `load_config(cls, base=..., file=..., overrides=[...])`: a recipe's dict, then a config file,
  then `a.b.c=value` overrides, deep-merged in that order, validated into `cls`;
* `config_to_dict` / `dump_config`: the resolved tree as plain data (written next to every run,
  so `--config run/config.yaml` reruns it);
* every mistake is one `ConfigError` line that names the key and the fix: an unknown key comes with
  the closest valid one (`optim.learning_rate: unknown key; did you mean optim.lr?`).

Type checking and coercion are pydantic's (`TypeAdapter` over the stdlib dataclasses: Literal,
tuples, unions, nested dataclasses, "2e-5" -> float), and each dataclass's own `__post_init__`
still validates its values. What is written here is only what pydantic does not do: dotted
overrides, deep merging, file reading, and errors phrased as config keys with suggestions.

Pure Python (no torch): the extraction driver and the CLI import it cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from merv import MervError

T = TypeVar("T")


class ConfigError(MervError, ValueError):
    """A config file, key or value that cannot be used; the message names it and the fix."""


# ------------------------------------------------------------------------------------ reading
def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML (.yaml / .yml) or JSON file holding one mapping."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML or JSON file to --config") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory; pass a YAML or JSON file to --config") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                          f"{' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} holds a {type(data).__name__}; a config is a mapping of keys")
    return data


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["optim.lr=2e-5", "model.encoders=[dinov2,siglip]"]` -> a nested dict. Values are read as
    YAML scalars / flow collections (`true`, `null`, `[a, b]`, `{k: v}`); types are checked later
    against the config's fields."""
    out: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item)
        _set_dotted(out, key.split("."), value, item)
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """One `a.b.c=value` -> ("a.b.c", value), the value read as in `parse_overrides`."""
    import yaml

    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set optim.lr=2e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # a plain string the YAML reader rejects (e.g. with a colon): keep it as written
    return key, value


def unflatten(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """`{"optim.lr": 1}` -> `{"optim": {"lr": 1}}` (the inverse of `flatten`)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        _set_dotted(out, key.split("."), value, f"{key}={value!r}")
    return out


def _set_dotted(tree: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:-1])} is given a value and sub-keys at once")
        node = child
    node[parts[-1]] = value


def merge(base: Mapping[str, Any], *overlays: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else (lists included) replaces."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for overlay in overlays:
        for key, value in overlay.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


# ------------------------------------------------------------------------------------ building
def build_config(cls: type[T], data: Mapping[str, Any], source: str = "config") -> T:
    """Validate `data` into the dataclass `cls` (nested dataclasses included), strictly."""
    from pydantic import ValidationError

    check_keys(cls, data, source)
    try:
        return _adapter(cls).validate_python(dict(data))
    except ValidationError as exc:
        lines = [_describe(cls, err) for err in exc.errors()]
        more = f" (and {len(lines) - 1} more problem(s))" if len(lines) > 1 else ""
        raise ConfigError(f"{source}: {lines[0]}{more}") from None


def build_config_layers(cls: type[T], layers: Sequence[tuple[str, Mapping[str, Any]]]) -> T:
    """(source, data) layers, lowest precedence first, deep-merged and validated into `cls`.

    Unknown keys are reported with the layer that holds them (`--set: unknown key ...`), values
    with the sources merged over the first (the defaults / recipe)."""
    for source, data in layers:
        check_keys(cls, data, source)
    named = [source for source, data in layers[1:] if data]
    return build_config(cls, merge({}, *(data for _, data in layers)), " + ".join(named) or "config")


def check_keys(cls: Any, data: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Raise a ConfigError naming the first key of `data` that is no field of `cls` (nested
    dataclasses included) and the closest valid key; `prefix` is prepended to the keys named."""
    unknown = _unknown_keys(cls, data, tuple(prefix.split(".")) if prefix else ())
    if unknown:
        more = f" (and {len(unknown) - 1} more unknown key(s))" if len(unknown) > 1 else ""
        raise ConfigError(f"{source}: {unknown[0]}{more}")


@functools.cache
def _adapter(cls: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def load_config(cls: type[T], *, base: Mapping[str, Any] | None = None, file: str | os.PathLike[str] | None = None,
                overrides: Sequence[str] = (), extra: Mapping[str, Any] | None = None) -> T:
    """`base` (e.g. a recipe), then `file`, then `extra` (the CLI's shorthand flags), then
    `overrides` (`--set`), merged and validated into `cls`."""
    return build_config_layers(cls, config_layers(base=base, file=file, extra=extra, overrides=overrides))


def config_layers(*, base: Mapping[str, Any] | None = None, file: str | os.PathLike[str] | None = None,
                  extra: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The (source, data) layers of `load_config`, lowest precedence first."""
    return [("defaults", dict(base or {})), (str(file), read_config_file(file) if file is not None else {}),
            ("command-line flags", dict(extra or {})), ("--set", parse_overrides(overrides))]


def config_to_dict(obj: Any) -> dict[str, Any]:
    """Plain data (dicts, lists, scalars) of a config tree: what YAML / JSON files hold."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(obj)


def dump_config(obj: Any, path: str | os.PathLike[str] | None = None) -> str:
    """The config as YAML text (keys in field order, one key per line, lists inline); written to
    `path` when given."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    text = yaml.dump(config_to_dict(obj), Dumper=Dumper, sort_keys=False, default_flow_style=False, width=120)
    if path is not None:
        Path(path).write_text(text)
    return text


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 1}}` -> `{"optim.lr": 1}` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


# ------------------------------------------------------------------------------------ errors
def _fields_at(cls: Any, loc: Sequence[Any]) -> tuple[list[str], list[str]]:
    """(the dotted path, the field names of the dataclass at that path), following pydantic's
    error location through nested dataclasses (union / list members are skipped)."""
    path: list[str] = []
    node = cls
    for part in loc:
        node = _dataclass_in(node)
        if node is None:
            break
        names = {f.name: f for f in dataclasses.fields(node)}
        if isinstance(part, str) and part in names:
            path.append(part)
            node = typing.get_type_hints(node).get(part, names[part].type)
    node = _dataclass_in(node)
    return path, ([f.name for f in dataclasses.fields(node)] if node is not None else [])


def dotted_keys(cls: Any, prefix: str = "") -> list[str]:
    """Every leaf key of a dataclass tree, dotted (`["optim.lr", "model.connector.fusion", ...]`)."""
    out: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner = _dataclass_in(hints.get(f.name, f.type))
        out += dotted_keys(inner, f"{prefix}{f.name}.") if inner is not None else [f"{prefix}{f.name}"]
    return out


def suggest_key(name: str, cls: Any) -> str | None:
    """The key of `cls` that `name` most likely meant: a field at this level, else a nested leaf
    whose own name is close (`lr` at the top of a run config -> `optim.lr`)."""
    leaves = dotted_keys(cls)
    exact = [k for k in leaves if "." in k and k.rsplit(".", 1)[-1] == name]
    if exact:
        return exact[0]
    close = closest(name, [f.name for f in dataclasses.fields(cls)])
    if close:
        return close
    last = closest(name, [k.rsplit(".", 1)[-1] for k in leaves])
    return next((k for k in leaves if k.rsplit(".", 1)[-1] == last), None) if last else None


def _unknown_keys(cls: Any, data: Mapping[str, Any], path: tuple[str, ...] = ()) -> list[str]:
    """Every key of `data` that is no field of the dataclass at its place, described with the
    closest valid key. pydantic silently drops unknown keys of stdlib dataclasses; a typo in a
    config must never be dropped (`learning_rate:` would train with the default)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in data.items():
        if key not in fields:
            close = suggest_key(str(key), cls)
            hint = f"did you mean {'.'.join([*path, close])}?" if close else f"valid keys: {', '.join(fields)}"
            out.append(f"unknown key {'.'.join([*path, str(key)])!r}; {hint}")
            continue
        inner = _dataclass_in(hints.get(key, fields[key].type))
        if inner is not None and isinstance(value, Mapping):
            out.extend(_unknown_keys(inner, value, (*path, key)))
    return out


def closest(name: str, valid: Sequence[str]) -> str | None:
    """The valid name a typo most likely meant: a close spelling, else an abbreviation either way
    (`learning_rate` -> `lr`, `tpf` -> `tokens_per_frame`)."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    if close:
        return close[0]

    def abbreviates(short: str, long: str) -> bool:
        it = iter(long)
        return len(short) >= 2 and short[0] == long[0] and all(ch in it for ch in short)

    hits = [v for v in valid if abbreviates(v, name) or abbreviates(name, v)]
    return min(hits, key=len) if hits else None


def _dataclass_in(tp: Any) -> Any:
    """The dataclass a field type holds, directly or inside Optional / a union."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _describe(cls: Any, err: Mapping[str, Any]) -> str:
    path, _ = _fields_at(cls, [p for p in err.get("loc", ()) if not isinstance(p, int)])
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    given = err.get("input")
    shown = "" if isinstance(given, Mapping) else f" (got {given!r})"
    return f"{'.'.join(path)}: {message}{shown}" if path else f"{message}{shown}"
