"""Sectioned config dataclasses from YAML recipes and `--section.key VALUE` overrides."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

from tinylm.core.errors import TinylmError


def load_config(cls: type, path: str | os.PathLike | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Any:
    """Build a sectioned config dataclass from a YAML recipe plus overrides; the command line wins.

    Args:
        cls: the config class (TrainConfig, or a stage's own with more sections); its fields are
            section dataclasses.
        path: a YAML recipe whose top-level keys are section names.
        overrides: `["--section.key", "value", ...]` (as typed on the command line; `--a.b=v` works
            too) or a dict {"section.key": value}.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    pairs = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    sections = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for name, body in raw.items():
        if name not in sections:
            raise TinylmError(f"{path}: unknown section {name!r} (known: {', '.join(sections)})")
        if not isinstance(body, dict):
            raise TinylmError(f"{path}: section {name!r} must be a mapping of keys to values")
        values[name].update({k: (v, False) for k, v in body.items()})
    for dotted, value in pairs.items():
        name, _, key = dotted.partition(".")
        if name not in sections or not key:
            raise TinylmError(f"unknown option --{dotted} (use --section.key with a section of: {', '.join(sections)})")
        values[name][key] = (value, isinstance(value, str))
    kwargs = {name: _build_section(sections[name].default_factory, name, values[name]) for name in sections}
    return cls(**kwargs)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise TinylmError(f"no recipe at {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TinylmError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise TinylmError(f"{path}: a recipe is a mapping of sections (model, data, optim, ...)")
    return data


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`["--a.b", "v", "--c.d=w", "--flag"]` -> {"a.b": "v", "c.d": "w", "flag": "true"}.

    Args:
        args: command-line words after the known options.
    """
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--") or len(word) == 2:
            raise TinylmError(f"unexpected argument {word!r} (options look like --section.key VALUE)")
        key, eq, value = word[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            value = args[i + 1] if has_value else "true"
            i += has_value
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _build_section(cls: type, section: str, values: dict[str, tuple[Any, bool]]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, (value, from_text) in values.items():
        if key not in hints:
            raise TinylmError(f"unknown key {section}.{key} (known: {', '.join(hints)})")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", from_text)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str, from_text: bool) -> Any:
    """Check (YAML) or convert (command-line text) one value to its field's type."""
    if typing.get_origin(hint) is list:  # e.g. distill.losses: a YAML list, or YAML flow text on the command line
        return _coerce_list(value, name, from_text)
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (from_text and optional and str(value).lower() in ("none", "null")):
        if optional:
            return None
        raise TinylmError(f"{name} must be {base.__name__}, got none")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if from_text and str(value).lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return str(value).lower() in ("true", "yes", "1", "on")
        elif base is int and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            if isinstance(value, str) and from_text:  # "1e6" is a fine step count on a command line
                return int(float(value)) if float(value).is_integer() else int(value)
        elif base is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
                return float(value)
        elif base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    except ValueError:
        pass
    raise TinylmError(f"{name} must be {base.__name__}{' or none' if optional else ''}, got {value!r}")


def _coerce_list(value: Any, name: str, from_text: bool) -> list[Any]:
    import yaml

    if from_text and isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise TinylmError(f"{name} must be a YAML list, e.g. '[{{kind: fkl, weight: 1}}]', got {value!r}") from None
    if not isinstance(value, list):
        raise TinylmError(f"{name} must be a list, got {value!r}")
    return value
