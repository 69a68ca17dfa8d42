"""One source of truth per setting: a config dataclass field declares its default, its range and its help text once.

    tau: float = setting(0.5, "temperature of the CP scores s = exp(-(phi - c) / tau)", check=">0")

`check_settings` enforces every declared range (call it from `__post_init__`), `settings_table` and `settings_help`
list them for `--help` and the docs, and `same_as` gives a second dataclass the very field of a first (a trainer
setting that is a loss setting), so a default, a range or a help text is never written twice.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cpwb.core.errors import ConfigError

Check = Callable[[Any], bool]

def _real(value: Any) -> bool:
    """A finite int or float (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What marks a folder as something `cpwb evaluate --adapter` loads: a peft adapter, a ProFS/steering intervention
# (cpwb.engine.interventions), a DExperts pair (cpwb.engine.dexperts).
ADAPTER_MARKERS = ("adapter_config.json", "intervention.json", "dexperts.json")
# name -> (test, how the range reads in help and messages). A value of None is never checked (optional settings).
CHECKS: dict[str, tuple[Check, str]] = {
    ">0": (lambda v: _real(v) and v > 0, "> 0"),
    ">=0": (lambda v: _real(v) and v >= 0, ">= 0"),
    ">=1": (lambda v: _real(v) and v >= 1, ">= 1"),
    ">=2": (lambda v: _real(v) and v >= 2, ">= 2"),
    "[0,1)": (lambda v: _real(v) and 0 <= v < 1, "in [0, 1)"),
    "(0,1]": (lambda v: _real(v) and 0 < v <= 1, "in (0, 1]"),
    "[0,1]": (lambda v: _real(v) and 0 <= v <= 1, "in [0, 1]"),
    "[-1,1)": (lambda v: _real(v) and -1 <= v < 1, "in [-1, 1)"),
    "finite": (_real, "finite"),
    "device": (lambda v: v == "auto" or v.split(":")[0] in ("cpu", "cuda", "mps"), "auto, cpu, cuda[:N] or mps"),
    "dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "null, float32, bfloat16 or float16"),
    "file": (lambda v: Path(v).is_file(), "an existing file"),
    "adapter": (lambda v: any((Path(v) / marker).is_file() for marker in ADAPTER_MARKERS),
                "an adapter folder (a LoRA adapter, an intervention or a DExperts pair)"),
    "nonempty": (lambda v: len(v) > 0, "not empty"),
}
MESSAGES = {"file": "file not found: {value}",
            "adapter": "not an adapter folder (no adapter_config.json, intervention.json or dexperts.json): {value}",
            "nonempty": "must name at least one"}


def setting(default: Any, help: str, *, check: str | None = None) -> Any:
    """A dataclass field with its default (lists and dicts copied per instance), help text and range check."""
    if check is not None and check not in CHECKS:
        raise ValueError(f"unknown check {check!r}; known: {sorted(CHECKS)}")
    metadata = {"help": help, "check": check}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def same_as(cls: type, name: str) -> Any:
    """The field `name` of dataclass `cls` again (default, help and check), for a config that embeds its settings."""
    source = {f.name: f for f in dataclasses.fields(cls)}[name]
    return setting(default_of(source), source.metadata.get("help", ""), check=source.metadata.get("check"))


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh copy for list and dict defaults)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def check_settings(config: Any) -> None:
    """Raise ConfigError naming the first field whose value is outside its declared range."""
    for f in dataclasses.fields(config):
        name = f.metadata.get("check")
        value = getattr(config, f.name)
        if name is None or value is None:
            continue
        test, text = CHECKS[name]
        try:
            ok = test(value)
        except (TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            infinite = isinstance(value, float) and math.isinf(value)
            message = MESSAGES.get(name, "must be a finite number {text}, got {value!r}" if infinite
                                   else "must be {text}, got {value!r}")
            raise ConfigError(message.format(text=text, value=value), field=f.name)


def _type_text(annotation: Any) -> str:
    """A short readable type: float, int, str, bool, list[str], 'cp' | 'dpo', str | null."""
    text = str(annotation).replace("typing.", "").replace("NoneType", "null").replace("| None", "| null")
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return text


def settings_table(cls: type) -> list[dict[str, str]]:
    """One row per setting of dataclass `cls`: name, type, default, range and help, in declaration order."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        check = f.metadata.get("check")
        rows.append({"name": f.name, "type": _type_text(hints[f.name]), "default": repr(default_of(f)),
                     "range": CHECKS[check][1] if check else "", "help": f.metadata.get("help", "")})
    return rows


def settings_help(cls: type, width: int = 100) -> str:
    """The settings of `cls` as an indented list for `--help`: name (type, default, range) then the help text."""
    lines = []
    for row in settings_table(cls):
        facts = ", ".join(filter(None, (row["type"], f"default {row['default']}", row["range"])))
        lines.append(f"  {row['name']}  ({facts})")
        lines += textwrap.wrap(row["help"], width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def undocumented(cls: type) -> list[str]:
    """Fields of `cls` without help text (a test keeps this empty for every config)."""
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("help")]


def add_setting_options(parser, cls: type) -> None:
    """One `--name` option per setting of dataclass `cls` (value read as YAML, like `-p name=value`), with its help,
    default and range; options not given stay absent from the parsed namespace (argparse.SUPPRESS)."""
    import argparse

    for row in settings_table(cls):
        facts = "; ".join(filter(None, (f"default {row['default']}", row["range"])))
        kind = row["type"]
        metavar = ("{" + ",".join(c.strip(" '") for c in kind.split("|")) + "}" if kind.startswith("'")
                   else kind.upper().replace(" ", ""))
        parser.add_argument(f"--{row['name'].replace('_', '-')}", dest=f"setting:{row['name']}", metavar=metavar,
                            default=argparse.SUPPRESS,
                            help=f"{row['help']} ({facts})".replace("%", "%%"))


def given_settings(namespace) -> dict[str, Any]:
    """The settings given as `--name value` options (see `add_setting_options`), values read as YAML."""
    import yaml

    return {key.removeprefix("setting:"): yaml.safe_load(value) for key, value in vars(namespace).items()
            if key.startswith("setting:")}
