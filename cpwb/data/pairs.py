"""The contrastive pairs file every later step reads: one JSON object per line, validated line by line.

Record (schema_version 1):
    {"schema_version": 1, "id": str (unique in the file), "anchor": str, "group": str | null,
     "positives": [Text, ...], "negatives": [Text, ...], "meta": {...}}
    Text = {"text": str, "source": "generated" | "human" | "anchor", "generator": str | null,
            "prompt_id": str | null, "scores": {str: float}}
Required: schema_version, id, anchor, positives (>= 1), negatives (>= 1); in a Text: text, source. `group`,
`generator` and `prompt_id` may be left out (= null), `meta` and `scores` too (= {}). Unknown fields are errors (a
misspelt optional field would otherwise vanish silently). Every problem reads `file:line: field: message`.
"""
from __future__ import annotations

import codecs
import copy
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cpwb.core.errors import InputError
from cpwb.core.files import append_jsonl, atomic_path

SCHEMA_VERSION = 1
SOURCES = ("generated", "human", "anchor")
DEFAULT_MAX_TEXT_BYTES = 1_000_000
_RECORD_FIELDS = frozenset({"schema_version", "id", "anchor", "group", "positives", "negatives", "meta"})
_TEXT_FIELDS = frozenset({"text", "source", "generator", "prompt_id", "scores"})

Problem = tuple[str | None, str]  # (field, message)
_ABSENT = object()


@dataclass(frozen=True)
class PairText:
    """One positive or negative text with its provenance and optional scores (toxicity, similarity, ...)."""
    text: str
    source: str
    generator: str | None = None
    prompt_id: str | None = None
    scores: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this text."""
        return {"text": self.text, "source": self.source, "generator": self.generator,
                "prompt_id": self.prompt_id, "scores": dict(self.scores)}

    @classmethod
    def from_dict(cls, obj: Any, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> PairText:
        """Build from a JSON object, raising InputError on the first problem."""
        problems: list[Problem] = []
        _check_text(obj, "", max_text_bytes, problems)
        _raise_first(problems)
        return cls._from_valid(copy.deepcopy(obj))

    @classmethod
    def _from_valid(cls, obj: Mapping[str, Any]) -> PairText:
        """Build from an object already checked by _check_text (shares its dicts)."""
        return cls(obj["text"], obj["source"], obj.get("generator"), obj.get("prompt_id"), obj.get("scores", {}))


@dataclass(frozen=True)
class PairRecord:
    """One anchor with the texts the model should prefer (positives) and disprefer (negatives)."""
    id: str
    anchor: str
    positives: tuple[PairText, ...]
    negatives: tuple[PairText, ...]
    group: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this record (one line of a pairs file)."""
        return {"schema_version": self.schema_version, "id": self.id, "anchor": self.anchor, "group": self.group,
                "positives": [_as_dict(t) for t in self.positives],
                "negatives": [_as_dict(t) for t in self.negatives], "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, obj: Any, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> PairRecord:
        """Build from a JSON object, raising InputError on the first problem."""
        _raise_first(record_problems(obj, max_text_bytes))
        return cls._from_valid(copy.deepcopy(obj))

    @classmethod
    def _from_valid(cls, obj: Mapping[str, Any]) -> PairRecord:
        """Build from an object already checked by record_problems (shares its dicts)."""
        return cls(obj["id"], obj["anchor"], tuple(PairText._from_valid(t) for t in obj["positives"]),
                   tuple(PairText._from_valid(t) for t in obj["negatives"]), obj.get("group"),
                   obj.get("meta", {}), obj["schema_version"])


def _as_dict(value: Any) -> Any:
    """A PairText as its dict; anything else unchanged, so a mistyped record is reported, not crashed on."""
    return value.to_dict() if isinstance(value, PairText) else value


def _raise_first(problems: list[Problem], path: str | Path | None = None, line: int | None = None) -> None:
    """Raise the first problem as InputError, if any."""
    if problems:
        field_name, message = problems[0]
        raise InputError(message, path, line, field_name)


def _join(where: str, key: str) -> str:
    """Dotted field name: `positives[2]` + `text` -> `positives[2].text`."""
    return f"{where}.{key}" if where else key


def _shown(value: Any, limit: int = 60) -> str:
    """repr of a bad value for a message, cut to `limit` characters: a 1 MB value still gives one short line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _is_valid_unicode(text: str) -> bool:
    """False for strings with lone surrogates (JSON allows "\\ud800"; tokenizers and UTF-8 writers fail on them)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _type_name(value: Any) -> str:
    """JSON name of a value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_strings(obj: Mapping[str, Any], keys: tuple[str, ...], where: str, max_bytes: int,
                   problems: list[Problem], nullable: bool = False) -> None:
    """Append problems of string fields: required and non-blank, or optional str|null when `nullable`."""
    for key in keys:
        value = obj.get(key, _ABSENT)
        if value is _ABSENT or value is None and nullable:
            if not nullable:
                problems.append((_join(where, key), "missing field"))
        elif not isinstance(value, str):
            problems.append((_join(where, key),
                             f"expected a string{' or null' if nullable else ''}, got {_type_name(value)}"))
        elif not value or value.isspace():
            problems.append((_join(where, key), "empty or whitespace-only"))
        elif not _is_valid_unicode(value):
            problems.append((_join(where, key), "not valid Unicode (a lone surrogate escape such as \\ud800)"))
        elif 4 * len(value) > max_bytes and (size := len(value.encode("utf-8", "surrogatepass"))) > max_bytes:
            problems.append((_join(where, key), f"text is {size:,} bytes, over the limit of {max_bytes:,} "
                                                "(max_text_bytes)"))


def _check_known(obj: Mapping[str, Any], allowed: frozenset[str], where: str, problems: list[Problem]) -> None:
    """Append one problem per field not in the schema."""
    if not allowed.issuperset(obj):
        problems.extend((_join(where, str(k)), "unknown field") for k in obj if k not in allowed)


def _check_text(obj: Any, where: str, max_bytes: int, problems: list[Problem]) -> None:
    """Append the problems of one Text object found at `where` (e.g. `positives[2]`)."""
    if not isinstance(obj, dict):
        problems.append((where or None, f"expected an object, got {_type_name(obj)}"))
        return
    _check_known(obj, _TEXT_FIELDS, where, problems)
    _check_strings(obj, ("text",), where, max_bytes, problems)
    if "source" not in obj:
        problems.append((_join(where, "source"), "missing field"))
    elif obj["source"] not in SOURCES:
        problems.append((_join(where, "source"), f"expected one of {list(SOURCES)}, got {_shown(obj['source'])}"))
    _check_strings(obj, ("generator", "prompt_id"), where, max_bytes, problems, nullable=True)
    scores = obj.get("scores", _ABSENT)
    if scores is _ABSENT:
        return
    if not isinstance(scores, dict):
        problems.append((_join(where, "scores"), f"expected an object, got {_type_name(scores)}"))
        return
    for name, value in scores.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append((_join(where, f"scores.{name}"), f"expected a finite number, got {_shown(value)}"))


def _check_text_list(obj: Mapping[str, Any], key: str, max_bytes: int, problems: list[Problem]) -> None:
    """Append the problems of the `positives` or `negatives` array and of each Text in it."""
    texts = obj.get(key, _ABSENT)
    if texts is _ABSENT:
        problems.append((key, "missing field"))
    elif not isinstance(texts, list):
        problems.append((key, f"expected an array, got {_type_name(texts)}"))
    elif not texts:
        problems.append((key, f"anchor has no {key}; every record needs at least one"))
    for index, text in enumerate(texts if isinstance(texts, list) else ()):
        _check_text(text, f"{key}[{index}]", max_bytes, problems)


def record_problems(obj: Any, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> list[Problem]:
    """Every schema problem of one parsed line, as (field, message); empty when the record is valid."""
    if not isinstance(obj, dict):
        return [(None, f"expected a JSON object, got {_type_name(obj)}")]
    if "schema_version" not in obj:
        return [("schema_version", "missing field")]
    version = obj["schema_version"]
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        return [("schema_version", f"unknown schema_version {_shown(version)}; this cpwb reads {SCHEMA_VERSION}")]
    problems: list[Problem] = []
    _check_known(obj, _RECORD_FIELDS, "", problems)
    _check_strings(obj, ("id", "anchor"), "", max_text_bytes, problems)
    _check_strings(obj, ("group",), "", max_text_bytes, problems, nullable=True)
    _check_text_list(obj, "positives", max_text_bytes, problems)
    _check_text_list(obj, "negatives", max_text_bytes, problems)
    if "meta" in obj and not isinstance(obj["meta"], dict):
        problems.append(("meta", f"expected an object, got {_type_name(obj['meta'])}"))
    return problems


def _scan(path: str | Path, max_text_bytes: int, drop_torn_tail: bool = False, require_records: bool = True
          ) -> Iterator[tuple[PairRecord | None, Sequence[InputError]]]:
    """Stream (record or None, problems) per non-blank line, reading bytes and decoding line by line.

    A UTF-8 byte-order mark at the start (as Excel and some editors write) is skipped. With `require_records`, a file
    without a single non-blank line is a problem of its own (a pairs file that trains nothing is a mistake).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("pairs file not found", path)
    first_line: dict[str, int] = {}
    seen_any = False
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw or raw.isspace():
                continue
            seen_any = True
            torn = not raw.endswith(b"\n")
            obj, problems = _parse_line(raw, max_text_bytes, torn)
            if problems and torn and drop_torn_tail:
                return
            _check_duplicate(obj, number, first_line, problems)
            if problems:
                yield None, [InputError(message, path, number, name) for name, message in problems]
            else:
                yield PairRecord._from_valid(obj), ()
    if require_records and not seen_any:
        yield None, [InputError("holds no records (the file is empty or has blank lines only)", path)]


def _check_duplicate(obj: Any, number: int, first_line: dict[str, int], problems: list[Problem]) -> None:
    """Append a problem when the record's id was used before; remember where each id was first seen."""
    record_id = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(record_id, str) and (seen := first_line.setdefault(record_id, number)) != number:
        problems.append(("id", f"duplicate id {_shown(record_id)} (first on line {seen})"))


def _parse_line(raw: bytes, max_text_bytes: int, torn: bool) -> tuple[Any, list[Problem]]:
    """(parsed JSON or None, problems) of one non-blank raw line: encoding, JSON syntax, then schema."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [(None, f"invalid UTF-8 (byte {exc.start + 1} of the line: {raw[exc.start:exc.start + 1]!r})")]
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        hint = " (truncated line: the file ends without a newline)" if torn else ""
        return None, [(None, f"invalid JSON{hint}: {exc.msg} at column {exc.colno}")]
    except RecursionError:
        return None, [(None, "invalid JSON: nested too deeply")]
    except ValueError as exc:  # an integer literal over Python's digit limit
        return None, [(None, f"invalid JSON: {exc}")]
    return obj, record_problems(obj, max_text_bytes)


def read_pairs(path: str | Path, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> Iterator[PairRecord]:
    """Stream the records of a pairs file, raising InputError (`file:line: field: message`) at the first problem."""
    for record, problems in _scan(path, max_text_bytes):
        if problems:
            raise problems[0]
        yield record  # type: ignore[misc]


def read_pairs_tolerant(path: str | Path, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> Iterator[PairRecord]:
    """Like read_pairs, but a missing file is empty and a torn last line (crash mid-append) is dropped: for resume."""
    if not Path(path).exists():
        return
    for record, problems in _scan(path, max_text_bytes, drop_torn_tail=True, require_records=False):
        if problems:
            raise problems[0]
        yield record  # type: ignore[misc]


def validate_pairs_file(path: str | Path, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> list[str]:
    """Every problem of a pairs file, one `file:line: field: message` string each (empty: valid; no file: raises)."""
    return [str(problem) for _, problems in _scan(path, max_text_bytes) for problem in problems]


def _serialized(record: PairRecord, max_text_bytes: int) -> tuple[dict[str, Any], list[Problem]]:
    """The record's dict and its problems, including values JSON cannot encode."""
    if not isinstance(record, PairRecord):
        return {}, [(None, f"expected a PairRecord, got {type(record).__name__}")]
    obj = record.to_dict()
    problems = record_problems(obj, max_text_bytes)
    try:
        json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as exc:
        problems.append(("meta", f"not JSON-serialisable: {exc}"))
    return obj, problems


def write_pairs(path: str | Path, records: Iterable[PairRecord],
                max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> Path:
    """Validate every record (schema, duplicate ids) and write the file atomically: nothing is written if any fails."""
    path = Path(path)
    problems: list[InputError] = []
    first_line: dict[str, int] = {}
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for number, record in enumerate(records, start=1):
            obj, found = _serialized(record, max_text_bytes)
            _check_duplicate(obj, number, first_line, found)
            problems += [InputError(message, path, number, name) for name, message in found]
            if not problems:
                handle.write(json.dumps(obj, sort_keys=True) + "\n")
        if problems:
            first = problems[0]
            more = f" (and {len(problems) - 1} more problems; nothing written)" if len(problems) > 1 else ""
            raise InputError(first.reason + more, first.path, first.line, first.field)
    return path


def append_pair(path: str | Path, record: PairRecord, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> None:
    """Validate one record and append it as a line with fsync (resumable generation); a torn tail is cut first.

    Duplicate ids are not checked here (that needs the whole file): resume by skipping the ids that
    read_pairs_tolerant returns.
    """
    obj, problems = _serialized(record, max_text_bytes)
    _raise_first(problems, path)
    _seal_tail(Path(path), max_text_bytes)
    append_jsonl(path, obj)


def _seal_tail(path: Path, max_text_bytes: int) -> None:
    """End `path` with a newline: cut an unterminated last line that is no valid record, else terminate it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        end = handle.seek(0, os.SEEK_END)
        start, tail = end, b""
        while start > 0 and b"\n" not in tail:
            start = max(0, start - 65536)
            handle.seek(start)
            tail = handle.read(end - start)
        cut = start + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        last = tail[cut - start:]
        if not last:
            return
        if _parse_line(last, max_text_bytes, torn=True)[1]:
            handle.truncate(cut)
        else:
            handle.seek(end)
            handle.write(b"\n")
        handle.flush()
        os.fsync(handle.fileno())


TOXIC, NON_TOXIC = "toxic", "non-toxic"  # the two classes: negatives are toxic, anchors and positives are not


def pair_texts(records: Iterable[PairRecord], n_pairs: int | None = None, positives_per_pair: int = 1,
               negatives_per_pair: int = 1, with_anchor: bool = False, source: str = "") -> pd.DataFrame:
    """One row per text of the first `n_pairs` records: source, group, pair_id, role, label, text.

    Each pair gives up to `positives_per_pair` positives and `negatives_per_pair` negatives; `with_anchor` puts its
    anchor first (role "anchor") and then takes positives other than the anchor's text. Negatives are the toxic
    class, anchors and positives the non-toxic one.
    """
    if positives_per_pair < 0:
        raise InputError(f"must be >= 0, got {positives_per_pair}", field="positives_per_pair")
    if negatives_per_pair < 1:
        raise InputError(f"must be >= 1 (the negatives are the toxic class), got {negatives_per_pair}",
                         field="negatives_per_pair")
    rows = []
    for record in list(records)[:n_pairs]:
        positives = [p.text for p in record.positives if not with_anchor or p.text != record.anchor]
        texts = ([("anchor", record.anchor)] if with_anchor else []) \
            + [("positive", t) for t in positives[:positives_per_pair]] \
            + [("negative", n.text) for n in record.negatives[:negatives_per_pair]]
        rows += [{"source": source, "group": record.group or "", "pair_id": record.id, "role": role,
                  "label": TOXIC if role == "negative" else NON_TOXIC, "text": text} for role, text in texts]
    return pd.DataFrame(rows, columns=["source", "group", "pair_id", "role", "label", "text"])
