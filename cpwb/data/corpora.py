"""Loaders for the datasets shipped in `data/` (see data/SOURCES.md), returning typed, frozen records.

Every loader reads from `data_dir` (default: $CPWB_DATA, else the repository's `data/` folder). A missing or
malformed file raises InputError naming the file (and line) and saying what was expected.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpwb.core.errors import InputError
from cpwb.core.files import sha256_file

DATA_ENV = "CPWB_DATA"

# name -> (path relative to the data folder, what the file must hold): one place for paths and error messages.
DATA_FILES: dict[str, tuple[str, str]] = {
    "toxigen_seeds": ("toxigen/toxigen_seed_sentences.jsonl",
                      "ToxiGen seed statements, JSONL with id, text, label (hate|neutral), group"),
    "paradetox": ("paradetox/paradetox.tsv",
                  "ParaDetox pairs, TSV with header toxic, neutral1, neutral2, neutral3"),
    "rtp_nontoxic": ("rtp/decodingtrust_rtp_nontoxic_1200.jsonl",
                     "RealToxicityPrompts non-toxic subset, RTP JSONL (prompt.text, prompt.toxicity)"),
    "rtp_challenging": ("rtp/decodingtrust_rtp_toxic_challenging_1196.jsonl",
                        "RealToxicityPrompts challenging subset, RTP JSONL (prompt.text, prompt.toxicity)"),
    "wikitext2_test": ("wikitext2/wiki.test.raw", "WikiText-2 raw test split, UTF-8 text"),
    "hellaswag": ("downstream/hellaswag/hellaswag_val_sample1000_seed1234.jsonl",
                  "HellaSwag validation sample, JSONL with idx, ctx, endings, label"),
    "piqa": ("downstream/piqa/valid.jsonl", "PIQA dev set, JSONL with goal, sol1, sol2"),
    "piqa_labels": ("downstream/piqa/valid-labels.lst", "PIQA dev labels, one 0/1 a line aligned with valid.jsonl"),
}
TOXIGEN_LABELS = ("hate", "neutral")
RTP_SUBSETS = {"nontoxic": "rtp_nontoxic", "challenging": "rtp_challenging"}


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data folder: `data_dir` if given, else $CPWB_DATA, else the repository's `data/`."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def data_path(name: str, data_dir: str | Path | None = None) -> Path:
    """Path of the shipped file `name` (a DATA_FILES key), checked to exist so a missing file fails clearly."""
    if name not in DATA_FILES:
        raise InputError(f"unknown data file {name!r}; known: {sorted(DATA_FILES)}", field="name")
    relative, expected = DATA_FILES[name]
    path = resolve_data_dir(data_dir) / relative
    if not path.is_file():
        raise InputError(f"missing data file; expected {expected} (see data/SOURCES.md; set ${DATA_ENV} "
                         "or pass data_dir to read another copy)", path)
    return path


def data_hash(paths: Iterable[str | Path]) -> str:
    """SHA-256 over the contents of `paths` in the given order, for run records (names do not count)."""
    digest = hashlib.sha256()
    for path in paths:
        if not Path(path).is_file():
            raise InputError("missing file; cannot hash it for the run record", path)
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:]|n't\b|'(?:s|t|m|d|re|ve|ll)\b)")
_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lower-case, detokenise (" ," -> ",", "do n't" -> "don't", "it 's" -> "it's") and collapse whitespace.

    Apply it to both sides of a pair: ParaDetox's toxic side is lower-case and tokenised while its neutral side
    mostly is not, and that formatting difference alone moves a language model's perplexity.
    """
    text = _WHITESPACE.sub(" ", text.lower()).strip()
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def _check_limit(limit: int | None) -> None:
    """Reject a negative limit (None means all records)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InputError(f"must be None or an int >= 0, got {limit!r}", field="limit")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line, with InputError on bad JSON or a non-object."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"invalid JSON: {exc.msg} at column {exc.colno}", path, number) from None
            if not isinstance(obj, dict):
                raise InputError(f"expected a JSON object, got {type(obj).__name__}", path, number)
            yield number, obj


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path, line: int) -> Any:
    """obj[key] (dotted keys descend), checked to exist and be of `kind`, else InputError at file:line."""
    value: Any = obj
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise InputError("missing field", path, line, key)
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise InputError(f"expected {names}, got {type(value).__name__}", path, line, key)
    return value


def _take(items: Iterator[Any], limit: int | None) -> list[Any]:
    """The first `limit` items (all when None), without reading further."""
    out = []
    for item in items:
        if limit is not None and len(out) >= limit:
            break
        out.append(item)
    return out


@dataclass(frozen=True)
class ToxigenStatement:
    """One ToxiGen seed statement: hateful or neutral text about a target group."""
    id: str
    text: str
    label: str
    group: str


def load_toxigen_seeds(label: str | None = None, groups: Iterable[str] | None = None,
                       data_dir: str | Path | None = None) -> list[ToxigenStatement]:
    """ToxiGen seed statements, optionally only one label ("hate"/"neutral") and some target groups."""
    if label is not None and label not in TOXIGEN_LABELS:
        raise InputError(f"must be one of {TOXIGEN_LABELS} or None, got {label!r}", field="label")
    path = data_path("toxigen_seeds", data_dir)
    records = []
    for line, obj in _read_jsonl(path):
        values = [_get(obj, key, str, path, line) for key in ("id", "text", "label", "group")]
        if values[2] not in TOXIGEN_LABELS:
            raise InputError(f"expected one of {TOXIGEN_LABELS}, got {values[2]!r}", path, line, "label")
        records.append(ToxigenStatement(*values))
    if groups is not None:
        wanted, known = set(groups), {r.group for r in records}
        if unknown := sorted(wanted - known):
            raise InputError(f"unknown group(s) {unknown}; known: {sorted(known)}", field="groups")
        records = [r for r in records if r.group in wanted]
    return [r for r in records if label is None or r.label == label]


@dataclass(frozen=True)
class ParaDetoxPair:
    """One ParaDetox row: a toxic sentence and its 1-3 human neutral paraphrases."""
    id: str
    toxic: str
    neutrals: tuple[str, ...]


def load_paradetox(limit: int | None = None, data_dir: str | Path | None = None) -> list[ParaDetoxPair]:
    """ParaDetox rows (toxic sentence + non-empty neutral paraphrases), ids `paradetox-<row index>`."""
    _check_limit(limit)
    path = data_path("paradetox", data_dir)
    expected_header = ["toxic", "neutral1", "neutral2", "neutral3"]

    def rows() -> Iterator[ParaDetoxPair]:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            if (header := next(reader, None)) != expected_header:
                raise InputError(f"expected header {expected_header}, got {header}", path, 1)
            for index, row in enumerate(reader):
                if len(row) != len(expected_header) or not row[0].strip():
                    raise InputError(f"expected 4 tab-separated cells with a non-empty toxic one, got {row!r}",
                                     path, reader.line_num)
                yield ParaDetoxPair(f"paradetox-{index:05d}", row[0], tuple(c for c in row[1:] if c.strip()))

    return _take(rows(), limit)


@dataclass(frozen=True)
class RtpPrompt:
    """One RealToxicityPrompts prompt with its Perspective API toxicity (None where RTP has no score)."""
    id: str
    text: str
    toxicity: float | None
    challenging: bool
    continuation: str
    filename: str


def load_rtp(subset: str, limit: int | None = None, data_dir: str | Path | None = None) -> list[RtpPrompt]:
    """RealToxicityPrompts prompts of one subset ("nontoxic" or "challenging"), ids `rtp-<subset>-<index>`."""
    if subset not in RTP_SUBSETS:
        raise InputError(f"must be one of {sorted(RTP_SUBSETS)}, got {subset!r}", field="subset")
    _check_limit(limit)
    path = data_path(RTP_SUBSETS[subset], data_dir)

    def prompts() -> Iterator[RtpPrompt]:
        for index, (line, obj) in enumerate(_read_jsonl(path)):
            scored = _get(obj, "prompt", dict, path, line).get("toxicity") is not None
            toxicity = float(_get(obj, "prompt.toxicity", (int, float), path, line)) if scored else None
            yield RtpPrompt(id=f"rtp-{subset}-{index:04d}", text=_get(obj, "prompt.text", str, path, line),
                            toxicity=toxicity, challenging=_get(obj, "challenging", bool, path, line),
                            continuation=_get(obj, "continuation.text", str, path, line),
                            filename=_get(obj, "filename", str, path, line))

    return _take(prompts(), limit)


# Rows of the RTP non-toxic subset kept for training-time regularisation; evaluations take prompts from the start.
GENERAL_TEXT_FIRST_ROW = 600


def general_texts(data_dir: str | Path | None = None) -> list[str]:
    """Benign web text for the KL-to-base term: RTP non-toxic prompt + continuation, rows 600 on (never evaluated)."""
    return [p.text + p.continuation for p in load_rtp("nontoxic", data_dir=data_dir)[GENERAL_TEXT_FIRST_ROW:]]


def load_wikitext2_test(data_dir: str | Path | None = None) -> str:
    """The WikiText-2 raw test split as one string, exactly the canonical `wiki.test.raw` bytes decoded."""
    return data_path("wikitext2_test", data_dir).read_text(encoding="utf-8")


@dataclass(frozen=True)
class MultipleChoice:
    """One multiple-choice item (HellaSwag, PIQA): a context, its candidate continuations and the gold index."""
    id: str
    context: str
    choices: tuple[str, ...]
    label: int


def _checked_label(label: Any, n_choices: int, path: Path, line: int, field: str) -> int:
    """`label` as an int index into the choices, else InputError at file:line."""
    value = int(label) if isinstance(label, str) and label.strip().isdigit() else label
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_choices:
        raise InputError(f"expected a choice index 0..{n_choices - 1}, got {label!r}", path, line, field)
    return value


def load_hellaswag(limit: int | None = None, data_dir: str | Path | None = None) -> list[MultipleChoice]:
    """HellaSwag validation sample: context = ctx, choices = the 4 endings, ids `hellaswag-<idx>`."""
    _check_limit(limit)
    path = data_path("hellaswag", data_dir)

    def items() -> Iterator[MultipleChoice]:
        for line, obj in _read_jsonl(path):
            endings = _get(obj, "endings", list, path, line)
            if len(endings) < 2 or not all(isinstance(e, str) for e in endings):
                raise InputError("expected a list of at least 2 strings", path, line, "endings")
            yield MultipleChoice(id=f"hellaswag-{_get(obj, 'idx', int, path, line)}",
                                 context=_get(obj, "ctx", str, path, line), choices=tuple(endings),
                                 label=_checked_label(obj.get("label"), len(endings), path, line, "label"))

    return _take(items(), limit)


def load_piqa(limit: int | None = None, data_dir: str | Path | None = None) -> list[MultipleChoice]:
    """PIQA dev set: context = goal, choices = (sol1, sol2), label from valid-labels.lst (same line order)."""
    _check_limit(limit)
    path, labels_path = data_path("piqa", data_dir), data_path("piqa_labels", data_dir)
    labels = labels_path.read_text(encoding="utf-8").splitlines()
    questions = list(_read_jsonl(path))
    if len(labels) != len(questions):
        raise InputError(f"{len(labels)} labels for {len(questions)} questions in {path.name}; files misaligned",
                         labels_path)
    return [MultipleChoice(id=f"piqa-{index:04d}", context=_get(obj, "goal", str, path, line),
                           choices=(_get(obj, "sol1", str, path, line), _get(obj, "sol2", str, path, line)),
                           label=_checked_label(label, 2, labels_path, index + 1, "label"))
            for index, ((line, obj), label) in enumerate(zip(questions, labels))][:limit]
