"""Flat typed dataclass configs, read from YAML or dicts, checked before any model loads.

One validation serves the CLI, the notebooks' parameters and the sweeps: `from_dict` rejects unknown keys and
wrong types, then the dataclass's own `__post_init__` checks ranges; every error names the file and the field.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from cpwb.core.errors import ConfigError

T = TypeVar("T")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    """Readable name of a type annotation for error messages."""
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, field: str, source: str | None) -> Any:
    """Check `value` against annotation `tp` (int accepted for float; lists and tuples element-wise)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(value, option, field, source)
            except ConfigError:
                continue
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", source, field=field)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"must be one of {list(get_args(tp))}, got {value!r}", source, field=field)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", source, field=field)
        (inner, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, inner, f"{field}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", source, field=field)
        return dict(value)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"expected null, got {value!r}", source, field=field)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"expected {tp.__name__}, got {value!r}", source, field=field)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"expected {tp.__name__}, got {type(value).__name__} {value!r}", source, field=field)
    return value


def _suggestion(unknown: list[str], fields: Any) -> str:
    """The valid settings closest to the unknown ones (difflib), or, with none close, where the list is."""
    import difflib

    close = sorted({m for name in unknown for m in difflib.get_close_matches(name, list(fields), n=3, cutoff=0.6)})
    return f"did you mean {close}? (--help lists every setting)" if close else "--help lists every setting"


def from_dict(cls: type[T], data: dict[str, Any], source: str | Path | None = None) -> T:
    """Build dataclass `cls` from `data`, naming the offending field (and file) on any problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of settings, got {type(data).__name__}", source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; {_suggestion(unknown, fields)}", source, field=unknown[0])
    values = {name: _coerce(value, hints[name], name, str(source) if source else None) for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(err.reason, source, field=err.field) from None
    except TypeError as err:
        raise ConfigError(str(err), source) from None


def load_yaml_config(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Read a YAML file into dataclass `cls`, applying `overrides` (e.g. from the command line) on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:  # one line: the problem and where (PyYAML's own message spans several)
        mark = getattr(err, "problem_mark", None)
        reason = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"not valid YAML: {reason}", path, mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of settings, got {type(data).__name__}", path)
    return from_dict(cls, {**data, **(overrides or {})}, path)


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (for YAML/JSON records of a run)."""
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line, the value read as YAML (so 0.5, true, [1, 2] and null work)."""
    if "=" not in text:
        raise ConfigError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def require(condition: bool, field: str, message: str) -> None:
    """Raise a ConfigError for `field` unless `condition` holds (used in __post_init__ range checks)."""
    if not condition:
        raise ConfigError(message, field=field)


def changed_settings(before: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = (),
                     common_only: bool = False) -> list[str]:
    """The settings whose values differ between two records of a run, sorted; `ignore` never counts.

    `common_only` compares only the settings both records hold (a result recorded before a setting existed
    still matches); otherwise a setting present in one record only counts as changed.
    """
    keys = (before.keys() & now.keys()) if common_only else (before.keys() | now.keys())
    return sorted(k for k in keys if k not in ignore
                  and json.dumps(before.get(k), sort_keys=True, default=str)
                  != json.dumps(now.get(k), sort_keys=True, default=str))


def require_same_settings(saved: str | Path, now: dict[str, Any], ignore: tuple[str, ...] = ("progress", "output_dir"),
                          what: str = "a run", config_type: type | None = None) -> None:
    """Refuse to resume a folder started with other settings (recorded in the YAML file `saved`; moved is fine).

    One line names the folder and every setting that differs; a missing file means a new folder. With
    `config_type` (the settings' dataclass), a setting added to cpwb after the folder was started is no change when
    it holds its default now: the run was made with what that default does.
    """
    from cpwb.core.settings import default_of

    saved = Path(saved)
    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    added = {f.name: default_of(f) for f in dataclasses.fields(config_type)
             if f.name not in before} if config_type is not None else {}
    changed = [k for k in changed_settings(before, now, ignore)
               if not (k in added and json.dumps(now.get(k), sort_keys=True, default=str)
                       == json.dumps(added[k], sort_keys=True, default=str))]
    if changed:
        raise ConfigError(f"{saved.parent} holds {what} with other settings ({', '.join(changed)}); resume it with "
                          "the same settings, or use another output_dir", saved, field=changed[0])


def yaml_text(data: dict[str, Any]) -> str:
    """A settings record as YAML, in the order given (what run folders keep as config.yaml)."""
    return yaml.safe_dump(data, sort_keys=False)
