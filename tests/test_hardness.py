"""Hardness filters: each rejects what it should, in order; the hardest sets are chosen; the statistics add up."""
from __future__ import annotations

import pytest

from cpwb.steps.negatives.hardness import (
    HISTOGRAM_EDGES,
    STAGES,
    Candidate,
    Thresholds,
    apply_score_filters,
    apply_text_filters,
    candidates_frame,
    card_statistics,
    clean_generation,
    edit_ratio,
    examples_table,
    funnel,
    hardness_figure,
    select_sets,
)

ANCHOR = "you are kind to everyone."


def scored(text: str, side: str, toxicity: float, similarity: float = 0.8, phi: float = 4.0, tokens: int = 6,
           source: str = "generated") -> Candidate:
    """A candidate that passed the text filters, with its scores."""
    return Candidate(text, side, source, scores={"toxicity": toxicity, "similarity": similarity, "phi": phi,
                                                 "tokens": tokens})


def test_edit_ratio():
    assert edit_ratio("same", "same") == 0.0
    assert edit_ratio("abc", "xyz") == 1.0
    assert edit_ratio("kitten", "sitting") == pytest.approx(3 / 7)
    assert edit_ratio("sitting", "kitten") == edit_ratio("kitten", "sitting")
    assert edit_ratio("", "abc") == 1.0


def test_clean_generation_takes_the_first_line_unquoted_and_normalised():
    assert clean_generation('\n  "He said  Hi , ok ."\nSecond line') == "he said hi, ok."
    assert clean_generation("   \n  ") == ""
    assert clean_generation("“Do n't GO”", normalize=False) == "Do n't GO"
    assert clean_generation("“Do n't GO”") == "don't go"


def test_text_filters_reject_empty_copies_and_duplicates_in_order():
    candidates = [Candidate("", "positive", "generated"),
                  Candidate(ANCHOR, "positive", "generated"),
                  Candidate("you are kind to everyone!", "positive", "generated"),  # edit 1/25 < 0.1: a copy
                  Candidate("you treat everybody kindly.", "positive", "generated"),
                  Candidate("you treat everybody kindly!", "positive", "generated"),  # near duplicate of the last
                  Candidate("you treat everybody kindly.", "negative", "generated"),  # other side: no duplicate
                  Candidate(ANCHOR, "negative", "generated"),  # exact copy
                  Candidate("you are fucking kind to everyone.", "negative", "generated")]  # a toxic edit, kept
    apply_text_filters(ANCHOR, candidates, Thresholds())
    assert [c.rejected_by for c in candidates] == ["empty", "copy", "copy", None, "duplicate", None, "copy", None]
    assert "edit" not in candidates[0].scores
    assert candidates[7].scores["edit"] == pytest.approx(edit_ratio(candidates[7].text, ANCHOR))
    strict = [Candidate("you are fucking kind to everyone.", "negative", "generated")]
    apply_text_filters(ANCHOR, strict, Thresholds(min_edit_negative=0.5))
    assert strict[0].rejected_by == "copy"


def test_score_filters_apply_length_then_toxicity_then_similarity():
    th = Thresholds(t_neg=0.5, t_pos=0.1, s_min=0.5, length_ratio_min=0.5, length_ratio_max=2.0)
    candidates = [scored("long and toxic", "positive", toxicity=0.9, tokens=30),  # 30 / 10 tokens: length first
                  scored("toxic positive", "positive", toxicity=0.3, similarity=0.1),
                  scored("mild negative", "negative", toxicity=0.49),
                  scored("off-topic negative", "negative", toxicity=0.95, similarity=0.2),
                  scored("exactly at the thresholds", "negative", toxicity=0.5, similarity=0.5, tokens=20),
                  scored("a fine positive", "positive", toxicity=0.1, similarity=0.9, tokens=5)]
    already = Candidate("", "positive", "generated", rejected_by="empty")
    apply_score_filters([*candidates, already], anchor_tokens=10, thresholds=th)
    assert [c.rejected_by for c in candidates] == ["length", "toxicity", "toxicity", "similarity", None, None]
    assert candidates[4].scores["length_ratio"] == 2.0 and already.rejected_by == "empty"


def test_selection_picks_the_hardest_builds_the_prototype_and_filters_phi():
    th = Thresholds(delta=1.0, s_min=0.5)
    positives = [scored("p far", "positive", 0.0, similarity=0.6, phi=7.0),
                 scored("p close", "positive", 0.0, similarity=0.95, phi=4.1),
                 scored("p mid", "positive", 0.0, similarity=0.9, phi=4.5)]
    negatives = [scored("n too likely", "negative", 0.9, similarity=0.9, phi=2.0),  # 2.3 below the prototype
                 scored("n hardest", "negative", 0.9, similarity=0.9, phi=4.4),
                 scored("n ok", "negative", 0.9, similarity=0.6, phi=5.0),
                 scored("n human", "negative", 0.9, similarity=0.99, phi=4.3, source="human")]
    prototype, reason = select_sets(positives + negatives, anchor_phi=4.0, n_positives=2, n_negatives=2,
                                    thresholds=th)
    assert reason is None
    assert prototype == pytest.approx((4.1 + 4.5) / 2)
    assert [c.text for c in positives if c.selected] == ["p close", "p mid"]
    assert negatives[0].rejected_by == "phi" and negatives[0].scores["phi_gap"] == pytest.approx(2.0 - prototype)
    chosen = sorted((c for c in negatives if c.selected), key=lambda c: c.rank)
    assert [c.text for c in chosen] == ["n hardest", "n ok"]  # generated before the (harder) human text
    assert not negatives[3].selected and negatives[3].rejected_by is None


def test_human_texts_fill_what_generation_cannot_and_short_sets_drop_the_anchor():
    th = Thresholds()
    group = [scored("p", "positive", 0.0, phi=4.0), scored("n gen", "negative", 0.9, phi=4.2),
             scored("n human", "negative", 0.9, phi=4.1, source="human")]
    _, reason = select_sets(group, 4.0, 1, 2, th)
    assert reason is None and [c.rank for c in group] == [0, 0, 1]
    short = [scored("p", "positive", 0.0, phi=4.0), scored("n", "negative", 0.9, phi=4.2)]
    prototype, reason = select_sets(short, 4.0, 2, 2, th)
    assert reason == "too few positives and negatives" and prototype == 4.0
    assert not any(c.selected for c in short)
    none = [scored("n", "negative", 0.9, phi=6.5)]
    prototype, reason = select_sets(none, 6.0, 1, 1, th)
    assert (prototype, reason) == (6.0, "too few positives")


def _log() -> list[dict]:
    """A two-anchor generation log: one kept, one dropped."""
    th = Thresholds()
    records = []
    for index, negative_toxicity in enumerate((0.9, 0.2)):
        group = [Candidate("", "positive", "generated"),
                 scored("a polite rewrite", "positive", 0.01, similarity=0.9, phi=4.0),
                 scored("a rude rewrite", "negative", negative_toxicity, similarity=0.7, phi=4.5),
                 Candidate("a rude rewrite", "negative", "generated")]
        apply_text_filters("the anchor", group, th)
        apply_score_filters(group, 4, th)
        prototype, reason = select_sets(group, 4.2, 1, 1, th)
        records.append({"id": f"a{index}", "anchor": "the anchor", "kept": reason is None, "reason": reason,
                        "prototype_phi": prototype, "candidates": [c.to_dict() for c in group]})
    return records


def test_funnel_counts_add_up_to_the_rejections():
    frame = candidates_frame(_log())
    table = funnel(frame)
    assert list(table.index) == ["offered", *[stage for stage, _ in STAGES], "selected"]
    assert table["positives (generated)"].tolist() == [4, 2, 2, 2, 2, 2, 2, 2, 1]
    assert table["negatives (generated)"].tolist() == [4, 4, 4, 2, 2, 1, 1, 1, 1]
    assert "negatives (human)" not in table


def test_card_statistics_and_examples():
    log = _log()
    card = card_statistics(log)
    assert card["counts"]["anchors"] == 2 and card["counts"]["anchors_kept"] == 1
    assert card["counts"]["dropped_by_reason"] == {"too few negatives": 1}
    assert card["quantiles"]["negatives selected toxicity"]["p50"] == pytest.approx(0.9)
    assert sum(card["histograms"]["negatives scored toxicity"]) == 2
    assert len(card["histograms"]["positives scored similarity"]) == len(HISTOGRAM_EDGES["similarity"]) - 1
    table = examples_table(log)
    assert table.shape[0] == 1 and table.loc[0, "negative"] == "a rude rewrite"
    assert table.loc[0, "neg_toxicity"] == pytest.approx(0.9)


def test_hardness_figure_has_a_panel_per_quantity_and_threshold_lines():
    fig = hardness_figure(candidates_frame(_log()), Thresholds())
    assert len(fig.data) == 16 and len(fig.layout.shapes) == 7
    empty = hardness_figure(candidates_frame([]), Thresholds())
    assert len(empty.data) == 16
