"""Settings dataclasses as the one source of every run option: default, help, choices, range.

A run's config dataclass declares each field with :func:`setting`; the CLI builds its
options from that metadata, ``__post_init__`` checks values with :func:`check` whichever way
they arrive (flags, a ``--config`` file, Python), and :func:`read_config_file` reads a YAML or
JSON file of them (a run's own ``config.json`` included), so nothing repeats a default or a
choice by hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

RESOLVED_KEY = "resolved"
"""Key of a run's ``config.json`` that records what the run resolved (device, versions);
not a setting, so it is skipped when that file is read back as ``--config``."""


class SettingError(InputError, ValueError):
    """A setting out of its type, choices or range: a one-line error in the CLI, and a
    ValueError to Python callers, like any bad argument."""


@dataclass(frozen=True)
class Spec:
    """What the CLI and the checks need to know about one setting."""

    help: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    """``min`` itself is excluded (a learning rate must be > 0)."""
    aliases: tuple[str, ...] = ()
    """Further flag names, e.g. ``--lr`` for ``--lr-peak``."""


def setting(default: Any = dataclasses.MISSING, help: str = "", **spec: Any) -> Any:
    """A dataclass field carrying its :class:`Spec`; without ``default`` it is required."""
    if not help:
        raise ValueError("every setting needs help text")
    return dataclasses.field(default=default, metadata={"spec": Spec(help=help, **spec)})


def spec_of(field: dataclasses.Field) -> Spec | None:
    return field.metadata.get("spec")


def flag(name: str) -> str:
    """The CLI flag of a field name: ``lr_peak`` -> ``--lr-peak``."""
    return "--" + name.replace("_", "-")


def field_types(cls) -> dict[str, tuple[type, bool]]:
    """Each field's base type and whether ``None`` is allowed (``int | None`` -> (int, True))."""
    hints = typing.get_type_hints(cls)
    out = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        args = (
            typing.get_args(hint)
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
            else (hint,)
        )
        base = [a for a in args if a is not type(None)]
        out[field.name] = (base[0], len(base) < len(args))
    return out


def _type_ok(value: Any, base: type) -> bool:
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, base)


def _range_text(spec: Spec) -> str:
    low = "" if spec.min is None else f"{'>' if spec.min_open else '>='} {spec.min:g}"
    high = "" if spec.max is None else f"<= {spec.max:g}"
    return " and ".join(t for t in (low, high) if t)


def check(cfg) -> None:
    """Types, choices and ranges of every :func:`setting` of ``cfg``; raises :class:`SettingError`
    naming the flag. Integers given for float settings become floats."""
    types_ = field_types(type(cfg))
    for field in dataclasses.fields(cfg):
        spec = spec_of(field)
        value = getattr(cfg, field.name)
        base, optional = types_[field.name]
        if spec is None or (value is None and optional):
            continue
        name = flag(field.name)
        if not _type_ok(value, base):
            kind = {int: "an integer", float: "a number", bool: "true or false"}.get(base, f"a {base.__name__}")
            raise SettingError(f"{name} must be {kind}, got {value!r}")
        if base is float:
            value = float(value)
            if not math.isfinite(value):
                raise SettingError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(cfg, field.name, value)
        if spec.choices is not None and value not in spec.choices:
            raise SettingError(f"{name} must be one of {', '.join(spec.choices)}, got {value!r}")
        too_low = spec.min is not None and (value <= spec.min if spec.min_open else value < spec.min)
        if too_low or (spec.max is not None and value > spec.max):
            raise SettingError(f"{name} must be {_range_text(spec)}, got {value!r}")


def read_config_file(path: Path | str, *classes) -> dict[str, Any]:
    """Settings for the settings dataclasses ``classes`` (one flat mapping for all of them)
    from a YAML (``.yaml``/``.yml``) or JSON file, keys as field names or flags (``lr_peak``
    or ``lr-peak``). Unknown keys are an error naming them; a run's ``config.json`` works as
    is (its ``resolved`` record is skipped)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"--config {path}: cannot read it ({exc.strerror or exc})") from exc
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        data = _load_yaml(text) if yaml_file else json.loads(text, object_pairs_hook=_unique_keys)
    except Exception as exc:  # both parsers' errors: one line naming the file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"--config {path} is not valid {'YAML' if yaml_file else 'JSON'}: {first}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"--config {path} must hold a mapping of settings, got {type(data).__name__}")
    names = {}
    for f in (f for cls in classes for f in dataclasses.fields(cls)):
        spec = spec_of(f)
        if spec is None:
            continue  # a nested settings class (given flat)
        for alias in (f.name, *(spec.aliases if spec else ())):
            names[alias.lstrip("-").replace("-", "_")] = f.name
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == RESOLVED_KEY:
            continue
        name = names.get(str(key).lstrip("-").replace("-", "_"))
        if name is None:
            raise InputError(f"--config {path}: unknown setting {key!r} (known: {', '.join(sorted(set(names)))})")
        if name in values:
            raise InputError(f"--config {path}: {flag(name)} is given twice (as {key!r} and before)")
        values[name] = value
    return values


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are each given once: the last of two would silently win."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"{key!r} is given twice")
        seen[key] = value
    return seen


_YAML_FLOAT = (
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)


def _load_yaml(text: str) -> Any:
    """YAML with two fixes to PyYAML's safe loader: ``1e-4`` (YAML 1.2, no dot) is a number,
    not text, so a quoted ``"0.5"`` can stay text and be refused like any string; and a key
    given twice is an error instead of the last one silently winning."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
            keys.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_YAML_FLOAT), list("-+0123456789."))
    return yaml.load(text, Loader=Loader)
