"""The pairs file: every problem is reported as `file:line: field: message`, writes are atomic, reads stream."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from cpwb.core.errors import InputError
from cpwb.data.corpora import load_paradetox, normalize_text
from cpwb.data.pairs import (
    PairRecord,
    PairText,
    append_pair,
    read_pairs,
    read_pairs_tolerant,
    validate_pairs_file,
    write_pairs,
)
from cpwb.data.paradetox import pairs_from_paradetox, split_pairs


def good(record_id: str = "r1", **changes: Any) -> dict[str, Any]:
    """A valid record as a JSON object, with top-level fields replaced by `changes`."""
    obj = {"schema_version": 1, "id": record_id, "anchor": "a calm sentence", "group": None,
           "positives": [{"text": "a kind sentence", "source": "generated", "generator": "m", "prompt_id": "p1",
                          "scores": {"toxicity": 0.01}}],
           "negatives": [{"text": "a rude sentence", "source": "human"}], "meta": {}}
    return {**obj, **changes}


def write_lines(path: Path, *lines: str | bytes | dict) -> Path:
    """Write raw lines (dicts as JSON), each ending with a newline."""
    with open(path, "wb") as handle:
        for line in lines:
            raw = json.dumps(line).encode() if isinstance(line, dict) else line
            handle.write((raw.encode() if isinstance(raw, str) else raw) + b"\n")
    return path


def record(record_id: str = "r1") -> PairRecord:
    """A valid PairRecord."""
    return PairRecord.from_dict(good(record_id))


TEXTS = [{"text": "one", "source": "human"}, {"text": "two", "source": "human"}, {"source": "human"}]
CASES = {
    "invalid json": ('{"schema_version": 1, "id": ', 2, None, "invalid JSON"),
    "not an object": ("[1, 2]", 2, None, "expected a JSON object, got array"),
    "missing nested field": (good("x", positives=TEXTS), 2, "positives[2].text", "missing field"),
    "missing top field": ({k: v for k, v in good("x").items() if k != "negatives"}, 2, "negatives", "missing field"),
    "anchor wrong type": (good("x", anchor=5), 2, "anchor", "expected a string, got number"),
    "positives wrong type": (good("x", positives="text"), 2, "positives", "expected an array, got string"),
    "score wrong type": (good("x", negatives=[{"text": "t", "source": "human", "scores": {"toxicity": "high"}}]),
                         2, "negatives[0].scores.toxicity", "expected a finite number"),
    "bad source": (good("x", negatives=[{"text": "t", "source": "model"}]), 2, "negatives[0].source",
                   "expected one of"),
    "blank anchor": (good("x", anchor=" \t "), 2, "anchor", "empty or whitespace-only"),
    "empty positive": (good("x", positives=[{"text": "", "source": "human"}]), 2, "positives[0].text",
                       "empty or whitespace-only"),
    "blank negative": (good("x", negatives=[{"text": "  ", "source": "human"}]), 2, "negatives[0].text",
                       "empty or whitespace-only"),
    "no positives": (good("x", positives=[]), 2, "positives", "anchor has no positives"),
    "no negatives": (good("x", negatives=[]), 2, "negatives", "anchor has no negatives"),
    "duplicate id": (good("r1"), 2, "id", "duplicate id 'r1' (first on line 1)"),
    "unknown version": (good("x", schema_version=2), 2, "schema_version", "unknown schema_version 2"),
    "unknown field": (good("x", scroes={}), 2, "scroes", "unknown field"),
    "not utf-8": (b'{"id": "caf\xe9"}', 2, None, "invalid UTF-8"),
}


@pytest.mark.parametrize("bad, line, field, message", CASES.values(), ids=CASES.keys())
def test_each_problem_is_located(tmp_path: Path, bad: Any, line: int, field: str | None, message: str) -> None:
    path = write_lines(tmp_path / "p.jsonl", good("r1"), bad, good("r3"))
    where = f"{path}:{line}: " + (f"{field}: " if field else "")
    problems = validate_pairs_file(path)
    assert len(problems) == 1 and problems[0].startswith(where + message), problems
    with pytest.raises(InputError) as info:
        list(read_pairs(path))
    assert str(info.value) == problems[0]
    assert (info.value.line, info.value.field) == (line, field)


def test_truncated_last_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", good("r1"))
    with open(path, "ab") as handle:
        handle.write(json.dumps(good("r2")).encode()[:40])
    problems = validate_pairs_file(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:2: invalid JSON (truncated line: the file ends without a newline): ")
    assert [r.id for r in read_pairs_tolerant(path)] == ["r1"]


def test_all_problems_reported_without_stopping(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", good("r1", anchor="", positives=[]), "", "not json", good("r1"))
    problems = validate_pairs_file(path)
    assert problems == [f"{path}:1: anchor: empty or whitespace-only",
                        f"{path}:1: positives: anchor has no positives; every record needs at least one",
                        f"{path}:3: invalid JSON: Expecting value at column 1",
                        f"{path}:4: id: duplicate id 'r1' (first on line 1)"]


def test_blank_lines_ignored_but_counted(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", "", good("r1"), "   ", good("r2", anchor=""))
    assert validate_pairs_file(path) == [f"{path}:4: anchor: empty or whitespace-only"]
    write_lines(path, "", good("r1"), "   ", good("r2"))
    assert [r.id for r in read_pairs(path)] == ["r1", "r2"]


def test_text_length_limit_is_configurable(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", good("r1", anchor="x" * 30))
    assert validate_pairs_file(path) == []
    assert validate_pairs_file(path, max_text_bytes=20) == [
        f"{path}:1: anchor: text is 30 bytes, over the limit of 20 (max_text_bytes)"]
    write_lines(path, good("r1", anchor="é" * 600_000))  # 1.2 MB in UTF-8: over the 1 MB default
    assert "over the limit of 1,000,000" in validate_pairs_file(path)[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        validate_pairs_file(tmp_path / "none.jsonl")
    assert list(read_pairs_tolerant(tmp_path / "none.jsonl")) == []


def test_roundtrip(tmp_path: Path) -> None:
    records = [record("r1"), PairRecord("r2", "anchor", (PairText("pos", "anchor"),),
                                        (PairText("neg", "generated", "gen", "p7", {"toxicity": 0.9}),),
                                        group="women", meta={"k": [1, 2]})]
    path = write_pairs(tmp_path / "p.jsonl", records)
    assert list(read_pairs(path)) == records
    assert [PairRecord.from_dict(r.to_dict()) for r in records] == records
    assert validate_pairs_file(path) == []


def test_write_is_validated_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    write_pairs(path, [record("old")])
    before = path.read_bytes()
    bad = [record("r1"), PairRecord("r2", " ", (PairText("p", "human"),), (PairText("n", "human"),)), record("r1")]
    with pytest.raises(InputError) as info:
        write_pairs(path, bad)
    assert str(info.value) == f"{path}:2: anchor: empty or whitespace-only (and 1 more problems; nothing written)"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]
    with pytest.raises(InputError, match=r"p2.jsonl:2: id: duplicate id 'r1' \(first on line 1\)"):
        write_pairs(tmp_path / "p2.jsonl", [record("r1"), record("r1")])
    assert not (tmp_path / "p2.jsonl").exists()
    with pytest.raises(InputError, match="positives\\[0\\]: expected an object, got string"):
        write_pairs(path, [PairRecord("r", "a", ("just a string",), (PairText("n", "human"),))])  # type: ignore
    with pytest.raises(InputError, match="meta: not JSON-serialisable"):
        write_pairs(path, [PairRecord("r", "a", (PairText("p", "human"),), (PairText("n", "human"),),
                                      meta={"x": object()})])


def test_append_and_resume_after_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    append_pair(path, record("r1"))
    with open(path, "ab") as handle:  # a crash in the middle of the second append
        handle.write(json.dumps(good("r2")).encode()[:25])
    assert [r.id for r in read_pairs_tolerant(path)] == ["r1"]
    with pytest.raises(InputError, match=":2: invalid JSON"):
        list(read_pairs(path))
    append_pair(path, record("r2"))  # cuts the torn line, then appends
    assert [r.id for r in read_pairs(path)] == ["r1", "r2"]
    with pytest.raises(InputError, match="anchor: empty"):
        append_pair(path, PairRecord("r3", "", (PairText("p", "human"),), (PairText("n", "human"),)))
    assert [r.id for r in read_pairs(path)] == ["r1", "r2"]


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good("r1")))
    append_pair(path, record("r2"))
    assert [r.id for r in read_pairs(path)] == ["r1", "r2"]


def test_tolerant_reader_only_forgives_the_last_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", good("r1"), '{"torn', good("r3"))
    with pytest.raises(InputError, match=":2: invalid JSON"):
        list(read_pairs_tolerant(path))


def test_pairs_from_paradetox_real_rows() -> None:
    rows = load_paradetox(limit=300)
    records = pairs_from_paradetox(rows)
    assert 0 < len(records) <= len(rows)
    first = records[0]
    assert (first.id, first.anchor, first.group) == ("paradetox-00000", "he was brave too!", None)
    assert [t.text for t in first.positives] == ["he was brave too!"]
    assert [(t.text, t.source) for t in first.negatives] == [("he had steel balls too!", "human")]
    for r in records:
        assert r.anchor == r.positives[0].text
        assert len(r.negatives) == 1 and r.meta["negative_provenance"] == ["paired"]
        assert all(p.text == normalize_text(p.text) and p.text != r.negatives[0].text for p in r.positives)
    by_id = {row.id: row for row in rows}
    skipped = [row for row in rows if row.id not in {r.id for r in records}]
    assert all(all(normalize_text(n) == normalize_text(row.toxic) for n in row.neutrals) for row in skipped)
    raw = pairs_from_paradetox(rows, normalize=False)
    assert raw[0].negatives[0].text == by_id["paradetox-00000"].toxic


def test_pairs_from_paradetox_random_negatives_are_seeded() -> None:
    rows = load_paradetox(limit=50)
    records = pairs_from_paradetox(rows, n_negatives_from_others=2, seed=3)
    assert records == pairs_from_paradetox(rows, n_negatives_from_others=2, seed=3)
    assert records != pairs_from_paradetox(rows, n_negatives_from_others=2, seed=4)
    toxic_by_id = {row.id: normalize_text(row.toxic) for row in rows}
    for r in records:
        provenance = r.meta["negative_provenance"]
        assert len(r.negatives) == 3 and provenance[0] == "paired"
        for text, origin in zip(r.negatives[1:], provenance[1:]):
            other = origin.removeprefix("random_negative:")
            assert other != r.id and text.text == toxic_by_id[other]
    with pytest.raises(InputError, match="n_negatives_from_others"):
        pairs_from_paradetox(rows, n_negatives_from_others=50)


def test_split_pairs_is_deterministic_and_disjoint() -> None:
    records = [record(f"r{i}") for i in range(100)]
    train, heldout = split_pairs(records, 0.2, seed=1)
    assert (len(train), len(heldout)) == (80, 20)
    assert {r.id for r in train} | {r.id for r in heldout} == {r.id for r in records}
    assert not {r.id for r in train} & {r.id for r in heldout}
    assert split_pairs(records, 0.2, seed=1) == (train, heldout)
    assert split_pairs(records, 0.2, seed=2) != (train, heldout)
    assert [r.id for r in train] == sorted((r.id for r in train), key=lambda i: int(i[1:]))
    with pytest.raises(InputError, match="holdout_fraction"):
        split_pairs(records, 1.0, seed=0)


def test_reading_streams_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    pad = "x" * 200  # ~78 MB file; holding its 100k records at once would take well over 100 MB
    with open(path, "w") as handle:
        for i in range(100_000):
            handle.write(json.dumps({"schema_version": 1, "id": f"r{i}", "anchor": f"anchor {i} {pad}",
                                     "positives": [{"text": f"pos {i} {pad}", "source": "human"}],
                                     "negatives": [{"text": f"neg {i} {pad}", "source": "human"}]}) + "\n")
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_pairs(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 100_000
    assert peak < 50 * 2**20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("content", [b"", b"\n\n", b"  \n\t\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n  \n"],
                         ids=["empty", "newlines", "blank lines", "bom only", "bom and blanks"])
def test_a_file_without_records_is_refused_in_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    assert validate_pairs_file(path) == [f"{path}: holds no records (the file is empty or has blank lines only)"]
    with pytest.raises(InputError, match="holds no records"):
        list(read_pairs(path))
    assert list(read_pairs_tolerant(path)) == []  # resuming a generation run from an empty file is fine


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "excel.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good("r1")).encode() + b"\n" + json.dumps(good("r2")).encode())
    assert validate_pairs_file(path) == []
    assert [r.id for r in read_pairs(path)] == ["r1", "r2"]
    path.write_bytes(b"\xef\xbb\xbf{broken\n")  # the mark is skipped, the line still checked
    assert validate_pairs_file(path)[0].startswith(f"{path}:1: invalid JSON")


def test_validate_pairs_command_exits_non_zero_on_an_empty_file(tmp_path: Path, capsys) -> None:
    from cpwb.app.cli import main

    path = tmp_path / "p.jsonl"
    path.write_text("\n \n")
    assert main(["validate-pairs", str(path)]) == 1
    assert capsys.readouterr().err.strip() == f"{path}: holds no records (the file is empty or has blank lines only)"
    write_lines(path, good("r1"))
    assert main(["validate-pairs", str(path)]) == 0


def test_the_canonical_held_out_pairs_are_paradetox_s_default_split() -> None:
    from cpwb.data.paradetox import HOLDOUT_FRACTION, PARADETOX_ROWS, paradetox_heldout

    heldout = paradetox_heldout()
    records = pairs_from_paradetox(load_paradetox(limit=PARADETOX_ROWS))
    assert len(heldout) == round(HOLDOUT_FRACTION * len(records)) == 391
    assert [r.id for r in heldout] == [r.id for r in split_pairs(records, HOLDOUT_FRACTION, seed=0)[1]]
