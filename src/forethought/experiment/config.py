"""Run records (`config.json`) read back safely: JSON only, every field checked against its type.

`config.json` holds what reproduces a run: `agent`, `env`, `seed`, `on_fault`, the agent's
`config` (its `Config` dataclass as a JSON object) and, for a maze, `env_layout_text`.
`forethought run --config RUN_DIR/config.json` and `--resume RUN_DIR` read it with
`read_record` and rebuild the agent's `Config` with `config_from_dict`; nothing in the file is
executed or imported: an unknown field, a wrong type or a value out of range is a
`ForethoughtError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from forethought.errors import ForethoughtError

_NoneType = type(None)


def read_record(path: Path) -> dict[str, Any]:
    """The run record at `path` (a `config.json`, or a run folder holding one), checked."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ForethoughtError(f"{path} is not a run record: expected a config.json file or a run folder "
                               "holding one")
    try:
        record = json.loads(file.read_text(), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ForethoughtError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(record, dict):
        raise ForethoughtError(f"{file} must hold a JSON object, got {type(record).__name__}")
    for name, kind in (("agent", str), ("env", str), ("seed", int), ("config", dict)):
        if name not in record:
            raise ForethoughtError(f"{file}: field {name!r} is missing")
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            raise ForethoughtError(f"{file}: field {name!r} must be a JSON {_json_name(kind)}, "
                                   f"got {record[name]!r}")
    for name in ("env_layout_text", "on_fault"):
        if name in record and not isinstance(record[name], str):
            raise ForethoughtError(f"{file}: field {name!r} must be a JSON string, got {record[name]!r}")
    return record


def config_from_dict(config_cls: type, data: dict[str, Any], source: str = "config") -> Any:
    """`config_cls(**data)` after checking every field's name and type (JSON lists become tuples
    where the field is a tuple). The dataclass's own checks (`__post_init__`) run as usual."""
    if not isinstance(data, dict):
        raise ForethoughtError(f"{source} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ForethoughtError(f"{source} has unknown field(s) {unknown} for {config_cls.__module__}."
                               f"{config_cls.__name__}; fields are: {', '.join(sorted(fields))}")
    values = {name: _convert(value, hints[name], f"{source} field {name!r}") for name, value in data.items()}
    return config_cls(**values)


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is _NoneType and value is None:
                return None
        errors = []
        for option in (a for a in args if a is not _NoneType):
            try:
                return _convert(value, option, where)
            except ForethoughtError as error:
                errors.append(str(error))
        raise ForethoughtError(errors[0] if len(errors) == 1 else f"{where} must be one of {hint}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ForethoughtError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ForethoughtError(f"{where} must be a JSON list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ForethoughtError(f"{where} must have {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ForethoughtError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ForethoughtError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ForethoughtError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ForethoughtError(f"{where} must be a string, got {value!r}")
        return value
    raise ForethoughtError(f"{where}: fields of type {hint} cannot be read from JSON")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_name(kind: type) -> str:
    return {str: "string", int: "integer", dict: "object"}[kind]
