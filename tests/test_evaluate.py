"""Evaluation metrics on hand-made cases, the strided perplexity against naive references, metric files."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import cpwb
from cpwb.core.errors import InputError
from cpwb.data.corpora import MultipleChoice, ToxigenStatement, data_hash, data_path
from cpwb.engine.nll import encode, texts_nll
from cpwb.steps.evaluation.likelihood import (
    conditional_perplexity,
    multiple_choice_accuracy,
    phi_gap,
    strided_windows,
    wikitext2_perplexity,
)
from cpwb.steps.evaluation.records import metric_rows, provenance, write_metrics
from cpwb.steps.evaluation.toxicity import (
    blackbox_rewrite,
    distinct_n,
    expected_max_toxicity,
    greedy_toxicity_rate,
    rtp_continuation_toxicity,
    toxicity_probability,
    toxigen_continuation_toxicity,
)

SHORT_TEXT = "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest " \
             "structure in Paris. Its base is square, measuring 125 metres on each side."


class LengthScorer:
    """Stand-in toxicity scorer: longer texts are 'more toxic' (deterministic, instant)."""

    name = "length"

    def score(self, texts, batch_size=256, progress=False):
        return np.array([min(len(t) / 40, 1.0) for t in texts])


class CharEmbedder:
    """Stand-in sentence embedder: cosine of letter-count vectors."""

    def similarity(self, a, b):
        def vector(text):
            counts = np.array([text.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz"], dtype=float) + 1e-9
            return counts / np.linalg.norm(counts)
        return np.array([vector(x) @ vector(y) for x, y in zip(a, b)])


def test_emt_and_tp_on_a_hand_made_table():
    scores = np.array([[0.1, 0.7, 0.2], [0.4, 0.3, 0.0], [0.5, 0.5, 0.9]])
    assert expected_max_toxicity(scores) == pytest.approx((0.7 + 0.4 + 0.9) / 3)
    assert toxicity_probability(scores) == pytest.approx(2 / 3)
    assert toxicity_probability(scores, threshold=0.8) == pytest.approx(1 / 3)


def test_distinct_n_is_per_prompt_then_averaged():
    samples = [["a b a b", "a c"], ["x y z"]]
    # prompt 1: unigrams a b a b a c -> 3 / 6; bigrams ab ba ab ac -> 3 / 4 (no bigram across samples)
    assert distinct_n(samples, 1) == pytest.approx((3 / 6 + 1) / 2)
    assert distinct_n(samples, 2) == pytest.approx((3 / 4 + 1) / 2)
    assert math.isnan(distinct_n([["a b", "c"]], 3))  # no trigram at all
    with pytest.raises(InputError):
        distinct_n(samples, 0)


@pytest.mark.parametrize("n_tokens, window, stride", [(10, 4, 2), (10, 4, 3), (11, 5, 3), (3, 8, 4), (8, 8, 1)])
def test_strided_windows_score_every_token_but_the_first_once(n_tokens, window, stride):
    windows = strided_windows(n_tokens, window, stride)
    assert [t for begin, end, first in windows for t in range(first, end)] == list(range(1, n_tokens))
    assert all(end - begin <= window and first > begin for begin, end, first in windows)


def test_strided_windows_need_context():
    with pytest.raises(InputError):
        strided_windows(10, 4, 4)  # the first token of each window would have nothing to be predicted from


def test_strided_nll_equals_naive_when_one_window_holds_the_text(tiny_lm):
    model, tokenizer = tiny_lm
    strided = wikitext2_perplexity(model, tokenizer, text=SHORT_TEXT, window=512, stride=256)
    naive = texts_nll(model, tokenizer, [SHORT_TEXT], max_length=512)
    assert strided["n_windows"] == 1 and strided["n_scored_tokens"] == naive.n_tokens[0] == strided["n_text_tokens"]
    assert strided["nll_sum"] == pytest.approx(naive.nll_sum[0], rel=1e-5)


def test_strided_nll_matches_a_window_by_window_reference(tiny_lm):
    model, tokenizer = tiny_lm
    ids = encode(tokenizer, [SHORT_TEXT], max_length=512).input_ids[0]
    expected = 0.0
    with torch.no_grad():
        for begin, end, first in strided_windows(len(ids), 16, 6):
            logits = model(input_ids=ids[None, begin:end]).logits[0].double()
            nll = -torch.log_softmax(logits[:-1], -1).gather(-1, ids[begin + 1:end, None]).squeeze(-1)
            expected += nll[first - begin - 1:].sum().item()
    got = wikitext2_perplexity(model, tokenizer, text=SHORT_TEXT, window=16, stride=6, batch_size=3)
    assert got["nll_sum"] == pytest.approx(expected, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(expected / (len(ids) - 1)), rel=1e-5)
    subset = wikitext2_perplexity(model, tokenizer, text=SHORT_TEXT, window=16, stride=6, max_windows=2)
    assert subset["n_windows"] == 2 and subset["n_scored_tokens"] == 15 + 6 < got["n_scored_tokens"]


def test_wikitext2_subset_perplexity_of_the_default_model_is_in_band(default_lm):
    model, tokenizer = default_lm
    result = wikitext2_perplexity(model, tokenizer, max_windows=1)
    # measured 20.3 on the first window's 511 tokens (first 8 windows, 2303 tokens: 25.4)
    assert result["n_scored_tokens"] == 511 and result["n_windows_total"] > 1000
    assert 10 < result["perplexity"] < 40


def test_multiple_choice_picks_the_obvious_answer_in_any_order(default_lm):
    model, tokenizer = default_lm
    cases = [("The capital of France is", "Paris.", ["banana keyboard purple.", "Tuesday swimming."]),
             ("Two plus two equals", "four.", ["purple elephant.", "of the of."]),
             ("The sun rises in the", "east.", ["sandwich.", "loudly green."])]
    rng = np.random.default_rng(0)
    items = []
    for index, (context, right, wrong) in enumerate(cases):
        choices = [right, *wrong]
        order = rng.permutation(len(choices)) if index else np.array([1, 2, 0])  # gold last at least once
        items.append(MultipleChoice(f"q{index}", context, tuple(choices[i] for i in order),
                                    int(np.flatnonzero(order == 0)[0])))
    for normalize in ("length", "none"):
        result = multiple_choice_accuracy(model, tokenizer, items, normalize=normalize)
        assert result["accuracy"] == 1.0
        assert result["predictions"]["prediction"].tolist() == [item.label for item in items]


def test_phi_gap_sign(default_lm):
    model, tokenizer = default_lm
    fluent = ["The cat sat on the mat.", "I would like a cup of tea, please."]
    scrambled = ["Mat the on sat cat the.", "Please tea of cup a like would I."]
    result = phi_gap(model, tokenizer, scrambled, fluent)
    assert result["share_positive"] == 1.0 and result["mean_gap"] > 0
    assert phi_gap(model, tokenizer, fluent, scrambled)["mean_gap"] == pytest.approx(-result["mean_gap"])


def test_continuation_protocols_run_end_to_end(tiny_lm):
    model, tokenizer = tiny_lm
    scorer, prompts = LengthScorer(), ["So I told him", "She was", "What a"]
    rtp = rtp_continuation_toxicity(model, tokenizer, scorer, prompts, k=3, max_new_tokens=5, batch_size=2)
    table = rtp["samples"]
    assert len(table) == 9 and rtp["n_prompts"] == 3 and rtp["k"] == 3
    assert rtp["emt"] == pytest.approx(table.groupby("prompt_id")["toxicity"].max().mean())
    assert 0 <= rtp["dist_2"] <= 1
    greedy = greedy_toxicity_rate(model, tokenizer, scorer, prompts, max_new_tokens=5)
    assert greedy["mean_toxicity"] == pytest.approx(scorer.score(greedy["continuations"]).mean())
    statements = [ToxigenStatement(f"s{i}", text, "hate", group)
                  for i, (text, group) in enumerate([("they are all bad", "a"), ("they never work", "a"),
                                                     ("those people are", "b")])]
    toxigen = toxigen_continuation_toxicity(model, tokenizer, scorer, statements, max_new_tokens=5,
                                            embedder=CharEmbedder())
    assert toxigen["per_group"]["n"].tolist() == [2, 1] and "similarity" in toxigen["per_group"]
    assert toxigen["toxic_rate"] == pytest.approx(toxigen["samples"]["toxic"].mean())
    rewrite = blackbox_rewrite(model, tokenizer, scorer, CharEmbedder(), ["you idiot", "go away"], max_new_tokens=4)
    assert len(rewrite["samples"]) == 2 and {"toxic_rate_before", "mean_toxicity_after"} <= rewrite.keys()


def test_conditional_perplexity_weights_tokens(tiny_lm):
    model, tokenizer = tiny_lm
    prompts, continuations = ["Hello", "The sky is"], [" world, how are you?", " blue."]
    out = texts_nll(model, tokenizer, continuations, contexts=prompts)
    expected = math.exp(out.nll_sum.sum() / out.n_tokens.sum())
    assert conditional_perplexity(model, tokenizer, prompts, continuations) == pytest.approx(expected)


def test_provenance_and_metric_rows():
    record = provenance("default", None, "bilstm-toxblock", ["rtp_challenging"], seed=3)
    assert record["data_hash"] == data_hash([data_path("rtp_challenging")])
    assert record["cpwb_version"] == cpwb.__version__ and record["adapter"] == ""
    rows = metric_rows({"emt": 0.5, "n_prompts": 10, "complete": True, "samples": pd.DataFrame()}, record, split="x")
    assert [r["metric"] for r in rows] == ["emt", "n_prompts"] and rows[0]["split"] == "x"


def test_write_metrics_merges_and_replaces_atomically(tmp_path):
    base = {"model": "m", "adapter": "", "scorer": "s", "data_hash": "h", "seed": 0}
    write_metrics([{"metric": "emt", "value": 0.5, **base}, {"metric": "tp", "value": 0.2, **base}], tmp_path)
    csv_path, json_path = write_metrics([{"metric": "emt", "value": 0.4, **base},
                                         {"metric": "emt", "value": 0.6, **base, "seed": 1}], tmp_path)
    table = json.loads(json_path.read_text())
    assert [(r["metric"], r["seed"], r["value"]) for r in table] == [("emt", 0, 0.4), ("tp", 0, 0.2), ("emt", 1, 0.6)]
    frame = pd.read_csv(csv_path)
    assert list(frame.columns[:2]) == ["metric", "value"] and frame["value"].tolist() == [0.4, 0.2, 0.6]
    before = json_path.read_text()
    with pytest.raises(InputError):
        write_metrics([{"value": 1.0}], tmp_path)
    assert json_path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.json"]  # no temporaries left
    json_path.write_text("{torn")
    with pytest.raises(InputError, match="metrics.json"):
        write_metrics([{"metric": "emt", "value": 0.1}], tmp_path)
