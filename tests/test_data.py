"""The shipped datasets load as typed records with plausible counts, and normalize_text removes ParaDetox's confound."""
from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest

from cpwb.core.errors import InputError
from cpwb.data import corpora as data


def test_toxigen_seeds_counts_labels_and_filters() -> None:
    seeds = data.load_toxigen_seeds()
    assert len(seeds) == 823
    assert {s.label for s in seeds} == {"hate", "neutral"}
    assert len({s.id for s in seeds}) == len(seeds)
    assert all(s.text.strip() and s.group for s in seeds)
    assert len({s.group for s in seeds}) == 16
    assert len(data.load_toxigen_seeds(label="hate")) == 478
    neutral_women = data.load_toxigen_seeds(label="neutral", groups=["women"])
    assert neutral_women and all(s.label == "neutral" and s.group == "women" for s in neutral_women)


@pytest.mark.parametrize("kwargs, field", [({"label": "toxic"}, "label"), ({"groups": ["martians"]}, "groups")])
def test_toxigen_seeds_reject_unknown_filters(kwargs: dict, field: str) -> None:
    with pytest.raises(InputError) as info:
        data.load_toxigen_seeds(**kwargs)
    assert info.value.field == field


def test_paradetox_rows_and_multiline_cells() -> None:
    pairs = data.load_paradetox()
    assert len(pairs) == 11927  # CSV records, not the 11,936 physical lines (some cells hold newlines)
    assert sum(len(p.neutrals) for p in pairs) == 19743
    assert all(p.toxic.strip() and p.neutrals and all(n.strip() for n in p.neutrals) for p in pairs)
    assert max(len(p.neutrals) for p in pairs) == 3
    assert pairs[0].id == "paradetox-00000"
    assert pairs[0].toxic == "he had steel balls too !"
    assert pairs[0].neutrals == ("he was brave too!",)
    assert [p.id for p in data.load_paradetox(limit=3)] == [p.id for p in pairs[:3]]


def test_rtp_subsets() -> None:
    nontoxic, challenging = data.load_rtp("nontoxic"), data.load_rtp("challenging")
    assert (len(nontoxic), len(challenging)) == (1200, 1196)
    for prompts in (nontoxic, challenging):
        assert all(p.text.strip() and p.toxicity is not None and 0 <= p.toxicity <= 1 for p in prompts)
        assert len({p.id for p in prompts}) == len(prompts)
    assert max(p.toxicity for p in nontoxic) < 0.5
    assert all(p.challenging for p in challenging)
    assert statistics.median(p.toxicity for p in challenging) > 0.8
    assert nontoxic[0].text == "Today they're frustrated and doing"
    assert len(data.load_rtp("challenging", limit=7)) == 7
    with pytest.raises(InputError, match="subset"):
        data.load_rtp("toxic")


def test_wikitext2_test_is_the_canonical_raw_file() -> None:
    text = data.load_wikitext2_test()
    lines = text.split("\n")[:-1]
    assert len(lines) == 4358
    assert sum(1 for line in lines if line.strip()) == 2891
    assert lines[1] == " = Robert Boulter = "
    assert len(re.findall(r"^ = [^=].* = $", text, flags=re.M)) == 62


def test_hellaswag_sample() -> None:
    items = data.load_hellaswag()
    assert len(items) == 1000
    assert all(len(i.choices) == 4 and 0 <= i.label < 4 and i.context.strip() for i in items)
    first = items[0]
    assert first.id == "hellaswag-3" and first.context == "A boy is running down a track. the boy"
    assert first.choices[first.label] == "lifts his body above the height of a pole."


def test_piqa_labels_are_aligned_with_questions() -> None:
    items = data.load_piqa()
    assert len(items) == 1838
    assert {i.label for i in items} == {0, 1} and all(len(i.choices) == 2 for i in items)
    # Checked by eye: the correct solution is the sensible one.
    assert "ripped paper strips" in items[0].choices[items[0].label]
    assert items[2].context.startswith("To fight Ivan Drago") and items[2].label == 1
    assert items[100].choices[items[100].label] == "use the pick to scrape out any food stuck in your teeth."
    assert len(data.load_piqa(limit=10)) == 10


def test_piqa_misaligned_labels_are_reported(tmp_path: Path) -> None:
    piqa = tmp_path / "downstream" / "piqa"
    piqa.mkdir(parents=True)
    (piqa / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 2)
    (piqa / "valid-labels.lst").write_text("0\n")
    with pytest.raises(InputError, match="misaligned"):
        data.load_piqa(data_dir=tmp_path)


def test_missing_file_names_path_and_expectation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError) as info:
        data.load_paradetox(data_dir=tmp_path)
    assert str(tmp_path / "paradetox" / "paradetox.tsv") in str(info.value)
    assert "expected ParaDetox pairs" in str(info.value)
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.resolve_data_dir() == tmp_path
    with pytest.raises(InputError, match="WikiText-2"):
        data.load_wikitext2_test()


def test_bad_jsonl_line_is_located(tmp_path: Path) -> None:
    path = tmp_path / "toxigen" / "toxigen_seed_sentences.jsonl"
    path.parent.mkdir()
    path.write_text('{"id": "a", "text": "t", "label": "hate", "group": "g"}\n{"id": "b", "text": "t"}\n')
    with pytest.raises(InputError, match=r"jsonl:2: label: missing field"):
        data.load_toxigen_seeds(data_dir=tmp_path)


def test_negative_limit_rejected() -> None:
    with pytest.raises(InputError, match="limit"):
        data.load_hellaswag(limit=-1)


@pytest.mark.parametrize("raw, expected", [
    ("he had steel balls too !", "he had steel balls too!"),
    ("He was brave too!", "he was brave too!"),
    ("i do n't know , it 's fine .", "i don't know, it's fine."),
    ("burning this bitch down isn 't gonna help", "burning this bitch down isn't gonna help"),
    ("what ?!   really ;  ok :", "what?! really; ok:"),
    ("  line\nbreak\ttab  ", "line break tab"),
    ("rock 'n roll , get 'em", "rock 'n roll, get 'em"),
])
def test_normalize_text_examples(raw: str, expected: str) -> None:
    assert data.normalize_text(raw) == expected


def test_normalize_text_makes_paradetox_sides_alike() -> None:
    pairs = data.load_paradetox()
    toxic = [data.normalize_text(p.toxic) for p in pairs]
    neutral = [data.normalize_text(n) for p in pairs for n in p.neutrals]
    spaced = re.compile(r" [.,!?;:]|\w '(s|t|m|d|re|ve|ll)\b| n't\b")
    for side in (toxic, neutral):
        assert not any(t != t.lower() for t in side)
        assert sum(bool(spaced.search(t)) for t in side) / len(side) < 0.001
    # Before normalising, the two sides differ in exactly this formatting.
    assert sum(" ," in p.toxic or " ." in p.toxic for p in pairs) / len(pairs) > 0.5
    assert sum(n[:1].isupper() for p in pairs for n in p.neutrals) / len(neutral) > 0.5


def test_data_hash_is_content_and_order_sensitive(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("one")
    b.write_text("two")
    assert data.data_hash([a, b]) == data.data_hash([str(a), str(b)])
    assert data.data_hash([a, b]) != data.data_hash([b, a])
    before = data.data_hash([a])
    a.write_text("one!")
    assert data.data_hash([a]) != before
    assert len(data.data_hash([data.data_path("paradetox")])) == 64
    with pytest.raises(InputError, match="missing"):
        data.data_hash([tmp_path / "nope"])
