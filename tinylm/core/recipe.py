"""Config dataclasses from YAML recipes and the command line, and the command line from them.

A command's config is a dataclass, flat (`GrowConfig`: fields are values) or sectioned (`TrainConfig`:
fields are flat dataclasses, one per YAML section). Each field carries its type, its default and a one-line
`# comment` on its line (or on the comment lines just above it). `add_options` turns a config class into
argparse options whose --help text is that comment with the type and default, so a default is written once,
beside its field. The options' own defaults are argparse.SUPPRESS: only what was typed reaches `load_config`,
which lays it over the YAML recipe (the command line wins) and checks every value the same way.

A field may declare its valid range or set with `typing.Annotated[type, Check(...)]` (or the aliases below:
`Count`, `Interval`, `Positive`, `Beta`, `one_of(...)`); `load_config` checks it with the field's dotted name
in the message, and --help shows it. Every float must be finite. A value out of range is an error, never
replaced by a default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import math
import os
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from tinylm.core.errors import TinylmError

# ----- declared ranges -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """The valid values of one config field: bounds (any of gt, ge, lt, le) or a set of choices."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        """`> 0`, `in [0, 1)`, `one of wsd, cosine, constant`."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        low = (f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}"
               if self.gt is not None else None)
        high = (f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})"
                if self.lt is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if self.ge is not None else '>'} {low[1:]}"
        if high:
            return f"{'<=' if self.le is not None else '<'} {high[:-1]}"
        return ""

    def ok(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


Count = Annotated[int, Check(ge=1)]  # rows, steps, layers, samples: at least one
Interval = Annotated[int, Check(ge=0)]  # steps between events, 0 meaning "only at the end" / "off"
Positive = Annotated[float, Check(gt=0)]  # rates, temperatures, scales
NonNegative = Annotated[float, Check(ge=0)]  # weights, penalties that may be off
Beta = Annotated[float, Check(ge=0, lt=1)]  # Adam's betas, momentum
Fraction = Annotated[float, Check(ge=0, le=1)]  # a share of something
# numpy's generators refuse negative seeds and torch's take at most 2**64 - 1; below 2**63 leaves room for
# seed + i (generate's sample i)
Seed = Annotated[int, Check(ge=0, lt=2**63)]


def one_of(*choices: str) -> Any:
    """The type of a str field whose value is one of `choices`."""
    return Annotated[str, Check(choices=choices)]


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field of a config dataclass (sections too) against its declared range, and every float
    for finiteness; the first bad value is a one-line TinylmError naming the field as `section.key`.

    Args:
        cfg: a config dataclass instance.
        prefix: the dotted name of `cfg` itself ("" at the top).
    """
    checks = _checks(type(cfg))
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, f"{name}.")
            continue
        check_value(name, value, checks.get(f.name))


def check_value(name: str, value: Any, check: Check | None) -> None:
    """One value (or each item of a list / tuple value) against its declared range, and every float for
    finiteness; a one-line TinylmError naming the field otherwise.

    Args:
        name: the field's dotted name ("optim.lr") or flat key ("max_tokens", shown as --max-tokens).
        value: its value.
        check: its declared range or set, or None.
    """
    for item in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(item, float) and not math.isfinite(item):
            raise TinylmError(f"{_spell(name)} must be a finite number, got {item}")
        if check is not None and item is not None and not isinstance(item, (list, dict)) \
                and not check.ok(item):
            raise TinylmError(f"{_spell(name)} must be {check.describe()}, got {item!r}")


def check_context(name: str, seq_len: int | None, max_seq_len: int, model: str = "the model",
                  extend: str = "") -> None:
    """Refuse a context longer than a model's max_seq_len (HF max_position_embeddings): positions past it
    were never trained, and a longer run must say so explicitly.

    Args:
        name: the field that set the context ("--seq-len", "data.seq_len"), spelt as the user wrote it.
        seq_len: the context asked for (None: the model's own, always fine).
        max_seq_len: the model's.
        model: what the model is, for the message ("the teacher", "model.init").
        extend: the option that allows a longer context, if there is one ("model.extend_context").
    """
    if seq_len is not None and seq_len > max_seq_len:
        hint = f"; set {extend} to train it on a longer one" if extend else ""
        raise TinylmError(f"{name} {seq_len} is longer than the context of {model} "
                          f"(max_position_embeddings {max_seq_len}){hint}")


def _spell(name: str) -> str:
    return name if "." in name else f"--{name.replace('_', '-')}"


@functools.cache
def _checks(cls: type) -> dict[str, Check]:
    """{field: its Check} for the fields of a dataclass declared `Annotated[..., Check(...)]` (or Optional)."""
    out = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        for part in (hint, *typing.get_args(hint)):
            found = [m for m in getattr(part, "__metadata__", ()) if isinstance(m, Check)]
            if found:
                out[name] = found[0]
    return out


def load_config(cls: type, path: str | os.PathLike | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Any:
    """Build a config dataclass from a YAML recipe plus overrides; the command line wins.

    Args:
        cls: the config class: flat, or sectioned (TrainConfig, or a stage's own with more sections).
        path: a YAML recipe: a mapping of the fields (flat), or of section names to mappings (sectioned).
        overrides: `["--section.key", "value", ...]` (as typed on the command line; `--a.b=v` works
            too) or a dict {"section.key": value} ({"key": value} for a flat config); strings are parsed
            as command-line text, other values are checked as YAML values.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    pairs = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    if not is_sectioned(cls):
        values = {k: (v, False) for k, v in raw.items()}
        values.update({k: (v, isinstance(v, str)) for k, v in pairs.items()})
        config = _build_section(cls, "", values)
        validate(config)
        return config
    sections = {f.name: f for f in dataclasses.fields(cls)}
    per_section: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for name, body in raw.items():
        if name not in sections:
            raise TinylmError(f"{path}: unknown section {name!r} (known: {', '.join(sections)})")
        if not isinstance(body, dict):
            raise TinylmError(f"{path}: section {name!r} must be a mapping of keys to values")
        per_section[name].update({k: (v, False) for k, v in body.items()})
    for dotted, value in pairs.items():
        name, _, key = dotted.partition(".")
        if name not in sections or not key:
            raise TinylmError(f"unknown option --{dotted} (use --section.key with a section of: {', '.join(sections)})")
        per_section[name][key] = (value, isinstance(value, str))
    kwargs = {name: _build_section(sections[name].default_factory, name, per_section[name]) for name in sections}
    config = cls(**kwargs)
    validate(config)
    return config


def is_sectioned(cls: type) -> bool:
    """Whether every field of the config class `cls` is itself a dataclass (a YAML section)."""
    return all(dataclasses.is_dataclass(hint) for hint in _hints(cls).values())


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise TinylmError(f"no recipe at {path}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise TinylmError(f"{path}: a recipe is UTF-8 text, but byte {e.start} is not ({e.reason})") from None
    except OSError as e:
        raise TinylmError(f"cannot read the recipe {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise TinylmError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise TinylmError(f"{path}: a recipe is a mapping of sections (model, data, optim, ...) or of keys")
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
            raise TinylmError(f"unexpected argument {word!r} (options look like --key VALUE)")
        key, eq, value = word[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            value = args[i + 1] if has_value else "true"
            i += has_value
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _build_section(cls: type, section: str, values: dict[str, tuple[Any, bool]]) -> Any:
    hints, checks = _hints(cls), _checks(cls)
    prefix = f"{section}." if section else ""
    kwargs = {}
    for key, (value, from_text) in values.items():
        if key not in hints:
            raise TinylmError(f"unknown key {prefix}{key} (known: {', '.join(hints)})")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", from_text)
        # checked before the class is built, so that its __post_init__ (cross-field checks, derived
        # values) only ever sees values in their declared ranges
        check_value(f"{prefix}{key}", kwargs[key], checks.get(key))
    for f in dataclasses.fields(cls):
        if f.init and f.name not in kwargs and _default(f) is dataclasses.MISSING:
            raise TinylmError(f"{prefix}{f.name} is required (give it on the command line or in the recipe)")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str, from_text: bool) -> Any:
    """Check (YAML) or convert (command-line text) one value to its field's type."""
    if typing.get_origin(hint) in (list, tuple):
        return _coerce_list(value, hint, name, from_text)
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


def _coerce_list(value: Any, hint: Any, name: str, from_text: bool) -> list[Any] | tuple[Any, ...]:
    """A list field (a YAML list, or YAML flow text on the command line) or a tuple field (also "a,b")."""
    import yaml

    item = _item_type(hint)
    one_word = from_text and isinstance(value, str) and not value.lstrip().startswith("[")
    if one_word and typing.get_origin(hint) is tuple:  # "width,depth"
        value = [v.strip() for v in value.split(",")]
    elif one_word and item is str:  # one path of a list of paths
        value = [value]
    elif from_text and isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise TinylmError(f"{name} must be a YAML list, e.g. '[{{kind: fkl, weight: 1}}]', "
                              f"got {value!r}") from None
    if not isinstance(value, (list, tuple)):
        raise TinylmError(f"{name} must be a list, got {value!r}")
    if item in (str, int, float, bool):
        value = [_coerce(v, item, f"{name}[{i}]", from_text) for i, v in enumerate(value)]
    return tuple(value) if typing.get_origin(hint) is tuple else list(value)


def _item_type(hint: Any) -> Any:
    """`list[str]` -> str, `tuple[str, ...]` -> str, `list[dict[...]]` -> dict[...]."""
    args = typing.get_args(hint)
    return args[0] if args else Any


# ----- keys, their comments, and argparse options made from them ---------------------------------------

@dataclasses.dataclass(frozen=True)
class Key:
    """One settable value of a config: `name` is "key" (flat) or "section.key" (sectioned)."""

    name: str
    hint: Any
    default: Any  # dataclasses.MISSING when the key is required
    comment: str
    check: Check | None = None  # its declared range or set


def config_keys(cls: type) -> list[Key]:
    """Every key of a config class, in declaration order, with type, default and comment."""
    if is_sectioned(cls):
        return [dataclasses.replace(key, name=f"{section}.{key.name}")
                for section, hint in _hints(cls).items() for key in config_keys(hint)]
    hints, comments, checks = _hints(cls), field_comments(cls), _checks(cls)
    return [Key(f.name, hints[f.name], _default(f), comments.get(f.name, ""), checks.get(f.name))
            for f in dataclasses.fields(cls) if f.init]


def _hints(cls: type) -> dict[str, Any]:
    """The resolved type of every init field of a dataclass (its module's `from __future__` strings evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field: comment} from the class source (base classes first): the `# comment` on the field's line,
    or else the comment lines right above it."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_class_comments(klass))
    return out


def _class_comments(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source (a class made at run time): no comments
        return {}
    lines = source.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        out[node.target.id] = comments.get(node.end_lineno or node.lineno) or " ".join(above)
    return out


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are TinylmErrors (one line on stderr, exit 2) and that takes no
    abbreviations (`--optim.l` must not silently mean `--optim.lr`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)
        # a value such as -1e-3 or -inf is a (bad) value, not an option: argparse's own pattern knows
        # only -1 and -1.5, and `--optim.lr -1e-3` was "expected one argument" instead of the range
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message: str) -> typing.NoReturn:
        raise TinylmError(message)


def add_options(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = (),
                aliases: dict[str, str] | None = None) -> None:
    """Add `--config FILE` and one option per key of the config class `cls` to `parser`.

    A sectioned config's keys are `--section.key VALUE` (grouped by section in --help); a flat config's
    are `--key-with-dashes VALUE` (`--key_with_underscores` is accepted too). Booleans: `--flag` /
    `--no-flag` in a flat config (a flag never takes a value there, so it cannot swallow a positional
    argument that follows it), `--section.flag [VALUE]` in a sectioned one (recipes set true/false).
    A `list[str]` key takes several words (`--corpus a b`, or repeated: `--prompt a --prompt b`).

    Args:
        parser: the command's parser.
        cls: its config class.
        positional: keys given as positional arguments (as well as by their option).
        aliases: extra option spellings, e.g. {"--out": "run.out", "--from": "source"}.
    """
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="a YAML recipe that sets defaults; the command line wins")
    sectioned = is_sectioned(cls)
    if sectioned:  # the generated usage line would list every key
        parser.usage = "%(prog)s [--config FILE] [--section.key VALUE ...]"
    groups: dict[str, Any] = {}
    keys = config_keys(cls)
    for key in keys:
        section = key.name.partition(".")[0] if sectioned else ""
        if section and section not in groups:
            doc = (inspect.getdoc(_hints(cls)[section]) or "").splitlines()
            groups[section] = parser.add_argument_group(section, doc[0] if doc else None)
        target = groups.get(section, parser)
        if key.name in positional:
            target.add_argument(key.name, nargs="*" if _is_list(key.hint) else "?", default=argparse.SUPPRESS,
                                metavar=key.name.upper(), help=f"{help_text(key)}; or --{key.name}")
        _add_key(target, key, sectioned, argparse.SUPPRESS if key.name in positional else help_text(key))
    by_name = {key.name: key for key in keys}
    for alias, name in (aliases or {}).items():
        _add_option(parser, [alias], by_name[name], sectioned, f"same as --{spelling(name)}")


def spelling(name: str) -> str:
    """The option of a key as --help shows it: `run.decay_from` (recipe keys keep their YAML spelling) or
    `max-tokens` (a flat key, spelt as the README always did)."""
    return name if "." in name else name.replace("_", "-")


def _add_key(parser: Any, key: Key, sectioned: bool, help: str) -> None:
    shown = spelling(key.name)
    _add_option(parser, [f"--{shown}"], key, sectioned, help)
    other = key.name.replace("_", "-") if sectioned else key.name
    if other != shown:  # the other spelling works, without a second line in --help
        _add_option(parser, [f"--{other}"], key, sectioned, argparse.SUPPRESS)


def _add_option(parser: Any, flags: list[str], key: Key, sectioned: bool, help: str) -> None:
    kwargs: dict[str, Any] = dict(dest=key.name, default=argparse.SUPPRESS, help=help)
    base = _base(key.hint)
    if base is bool and not sectioned:
        parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
    elif base is bool:
        parser.add_argument(*flags, nargs="?", const="true", metavar="BOOL", **kwargs)
    elif _is_list(key.hint) and _item_type(key.hint) is str:
        parser.add_argument(*flags, nargs="+", action="extend", metavar="STR", **kwargs)
    else:
        parser.add_argument(*flags, metavar=_type_name(key.hint).split()[0].upper(), **kwargs)


def _is_list(hint: Any) -> bool:
    return typing.get_origin(hint) is list


def _base(hint: Any) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (list, tuple) or not args:
        return hint
    return next((a for a in args if a is not type(None)), hint)


def help_text(key: Key) -> str:
    """The --help line of a key: its comment, then its type and default."""
    default = "required" if key.default is dataclasses.MISSING else f"default {_show(key.default)}"
    kind = _type_name(key.hint)
    if key.check is not None:
        base, optional = kind.removesuffix(" or none"), kind.endswith(" or none")
        kind = f"{base}, {key.check.describe()}" if key.check.choices else f"{base} {key.check.describe()}"
        kind += " or none" if optional else ""
    text = f"{key.comment} ({kind}; {default})".strip()
    return text.replace("%", "%%")  # argparse formats help with %


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return "list of str" if args and args[0] is str else "list (YAML)"
    if origin is tuple:
        return "str,str,..."
    if args and type(None) in args:
        return f"{_type_name(_base(hint))} or none"
    return getattr(hint, "__name__", str(hint))


def _show(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "''"


def config_from_args(cls: type, args: argparse.Namespace, extra: list[str]) -> Any:
    """The config of a parsed command line: what was typed (`args`, from `add_options`) over the recipe
    (`--config`). `extra` holds the words argparse did not know: they are checked as overrides, so an
    unknown key is the same one-line error as in a recipe.

    Args:
        cls: the command's config class.
        args: the parsed options.
        extra: the words left over.
    """
    given = {k: v for k, v in vars(args).items() if k != "config"}
    return load_config(cls, getattr(args, "config", None), {**given, **parse_overrides(extra)})
