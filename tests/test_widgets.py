"""The explorers of cpwb.app.widgets: compare, loss playground, pairs browser, and their static renderings."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cpwb.analysis.views import continuation_html, token_pieces
from cpwb.app.widgets import (
    WIDGET_VIEW,
    CompareExplorer,
    LossPlayground,
    PairsBrowser,
    continue_and_score,
    filter_pairs,
    first_negative_push,
    loss_state,
    pairs_table,
    score_records,
)
from cpwb.core.errors import InputError
from cpwb.data.pairs import PairRecord, PairText, write_pairs
from cpwb.engine.adapters import Side, base_and_cp_sides
from cpwb.engine.generate import generate
from cpwb.engine.loss import CPLossConfig
from cpwb.engine.nll import texts_nll


class KeywordScorer:
    """A stand-in toxicity scorer: 0.9 for texts containing 'idiot', else 0.1."""

    name, labels = "keyword", ("toxic",)

    def score(self, texts, batch_size=256, progress=False):
        return np.array([0.9 if "idiot" in t else 0.1 for t in texts])


class BrokenScorer(KeywordScorer):
    def score(self, texts, batch_size=256, progress=False):
        raise RuntimeError("scorer offline")


class LengthEmbedder:
    """A stand-in embedder: similarity = shorter length / longer length."""

    def similarity(self, a, b):
        return np.array([min(len(x), len(y)) / max(len(x), len(y), 1) for x, y in zip(a, b)])


@pytest.fixture
def peft_tiny(fresh_tiny_lm):
    """The tiny Llama with a LoRA adapter large enough to change what it generates."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = fresh_tiny_lm
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 2.0)
    return peft_model.eval(), tokenizer


# ------------------------------------------------------------------------------------------- compare


@pytest.mark.parametrize("text", ["", " hello there, you idiot!", "naïve café — ünïcödé 🙂 ok", "  two  spaces\n\nx"])
def test_token_pieces_join_to_the_text_and_match_the_scored_tokens(tiny_lm, text):
    model, tokenizer = tiny_lm
    pieces = token_pieces(tokenizer, text)
    assert "".join(pieces) == text
    scored = texts_nll(model, tokenizer, [text], contexts=["prompt"], return_token_nll=True)
    assert len(pieces) == int(scored.n_tokens[0]) == len(scored.token_nll[0])


def test_continue_and_score_gives_the_greedy_continuation_with_its_token_nll(tiny_lm):
    model, tokenizer = tiny_lm
    prompt = "The weather today is"
    result = continue_and_score(model, tokenizer, KeywordScorer(), prompt, "tiny", max_new_tokens=8)
    assert result.text == generate(model, tokenizer, [prompt], max_new_tokens=8)[0][0]
    assert "".join(result.tokens) == result.text
    assert len(result.tokens) == len(result.token_nll) > 0
    assert result.phi == pytest.approx(float(np.mean(result.token_nll)), abs=1e-5)
    # a random-init model over a 49k vocabulary: every token costs about log(49152) = 10.8 nats
    assert all(5 < v < 20 for v in result.token_nll)
    assert result.toxicity == 0.1


def test_sampling_is_seeded(tiny_lm):
    model, tokenizer = tiny_lm
    runs = [continue_and_score(model, tokenizer, KeywordScorer(), "Once", "t", max_new_tokens=10, temperature=1.0,
                               top_p=0.95, seed=seed).text for seed in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]


def test_continuation_html_escapes_text_and_colours_each_token():
    from cpwb.analysis.views import Continuation

    html = continuation_html(Continuation("CP", "<b>x</b> idiot", ("<b>x</b>", " idiot"), (0.5, 9.0), 0.9, 4.75))
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert html.count('class="cpwb-token"') == 2
    assert 'title="NLL 9.00 nats"' in html and "toxicity 0.900" in html and "cpwb-side-cp" in html
    empty = continuation_html(Continuation("base", "", (), (), 0.1, math.nan))
    assert "(empty continuation)" in empty and "phi – nats" in empty


def test_compare_shows_base_and_cp_side_by_side_and_the_button_generates(peft_tiny):
    model, tokenizer = peft_tiny
    explorer = CompareExplorer(tokenizer, KeywordScorer(), base_and_cp_sides(model), prompt="I think that",
                               max_new_tokens=6)
    assert "not generated yet" in explorer._repr_mimebundle_()["text/html"]
    explorer.button.click()
    assert explorer.runs == 1 and not explorer.button.disabled
    base, cp = explorer.results
    with model.disable_adapter():
        expected_base = generate(model, tokenizer, ["I think that"], max_new_tokens=6)[0][0]
    assert (base.label, base.text) == ("base", expected_base)
    assert cp.text == generate(model, tokenizer, ["I think that"], max_new_tokens=6)[0][0] != base.text
    assert "run 1: greedy" in explorer.status.value
    assert "toxicity 0.100" in explorer.outputs[0].value and "cpwb-side-cp" in explorer.outputs[1].value
    bundle = explorer._repr_mimebundle_()
    assert bundle[WIDGET_VIEW]["model_id"] == explorer.widget.model_id
    assert "cpwb-side-base" in bundle["text/html"] and "cpwb-side-cp" in bundle["text/html"]


def test_compare_reports_a_failure_in_its_status_line(tiny_lm):
    model, tokenizer = tiny_lm
    explorer = CompareExplorer(tokenizer, BrokenScorer(), [Side("a", model)], prompt="x", max_new_tokens=2)
    explorer.button.click()
    assert "RuntimeError: scorer offline" in explorer.status.value
    assert not explorer.button.disabled and explorer.runs == 0


def test_base_side_needs_a_base_model_or_a_peft_model(tiny_lm):
    model, _ = tiny_lm
    with pytest.raises(InputError, match="cp_model"):
        base_and_cp_sides(model)
    base, cp = base_and_cp_sides(model, base_model=model, labels=("before", "after"))
    assert (base.label, cp.label) == ("before", "after")


# ------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("alpha,tau", [(1.0, 0.5), (2.5, 0.2)])
def test_loss_state_matches_the_closed_form_for_one_positive_and_one_negative(alpha, tau):
    cfg = CPLossConfig(alpha=alpha, tau=tau, anchor_weight=0.3)
    p, n = 3.0, 3.4
    state = loss_state([p], [n], cfg)
    weight = alpha * math.exp(-(n - p) / tau)  # directional: s_neg / s_pos with c = p
    assert state.j == pytest.approx(1 / (1 + weight), rel=1e-6)
    assert state.loss == pytest.approx(math.log(1 + weight) + 0.3 * p, rel=1e-6)
    push_neg = weight / (1 + weight) / tau  # -d/dn log(1 + alpha exp(-(n - p)/tau))
    assert state.push_neg[0] == pytest.approx(push_neg, rel=1e-5)
    assert state.push_pos[0] == pytest.approx(-0.3, rel=1e-5)  # prototype detached: only the anchor term


def test_hard_negatives_get_the_push_and_easy_ones_almost_none():
    state = loss_state([3.0, 3.3, 3.6], [2.8, 4.0, 7.5])
    hard, medium, easy = state.push_neg
    assert hard > medium > easy > 0
    assert easy < 1e-3 * hard
    symmetric = loss_state([3.0, 3.3, 3.6], [2.8, 4.0, 7.5], CPLossConfig(negatives="symmetric"))
    assert symmetric.push_neg[0] < 0  # the printed |phi - c| form pushes a toxic text below c further down


def test_first_negative_push_follows_the_negative_along_phi():
    pos, neg = [3.0, 3.5], [2.0, 5.0]
    grid = [1.0, 2.0, 3.25, 6.0, 9.0]
    curve = first_negative_push(pos, neg, grid)
    assert curve[1] == pytest.approx(loss_state(pos, neg).push_neg[0], rel=1e-6)
    assert curve[3] == pytest.approx(loss_state(pos, [6.0, 5.0]).push_neg[0], rel=1e-6)
    assert np.all(np.diff(curve) < 0)  # directional: the lower a negative's phi, the harder it is pushed


def test_loss_playground_recomputes_when_a_slider_moves():
    playground = LossPlayground()
    before = playground.state()
    assert list(playground.figure.data[2].x) == [2.8, 4.0, 6.5]
    playground.neg_sliders[0].value = 6.0  # the hard negative becomes easy: J rises, the loss falls
    after = playground.state()
    assert after.j > before.j and after.loss < before.loss
    assert playground.figure.data[2].x[0] == 6.0
    assert f"{after.loss:.3f}" in playground.figure.layout.title.text
    playground.n_neg.value = 1
    assert len(playground.figure.data[2].x) == 1
    assert playground.neg_sliders[1].layout.display == "none" and playground.neg_sliders[0].layout.display is None
    playground.tau.value = 0.1
    assert playground.config().tau == pytest.approx(0.1)
    assert playground.state().push_neg[0] == pytest.approx(loss_state([3.0, 3.3, 3.6], [6.0], CPLossConfig(tau=0.1))
                                                           .push_neg[0])
    assert f"{playground.state().loss:.4f}" in playground._repr_mimebundle_()["text/html"]
    assert playground.figure.layout.annotations[0].x == pytest.approx(playground.state().prototype)


def test_loss_playground_refuses_more_texts_than_it_has_sliders():
    with pytest.raises(InputError, match="at most 4"):
        LossPlayground(phi_pos=[1, 2, 3, 4, 5])
    with pytest.raises(InputError, match="phi_neg"):
        loss_state([1.0], [])


# ------------------------------------------------------------------------------------------- pairs


def _record(i: int, group: str | None, toxicity: float | None, similarity: float | None) -> PairRecord:
    scores = {k: v for k, v in (("toxicity", toxicity), ("similarity", similarity)) if v is not None}
    return PairRecord(f"r{i}", f"anchor {i}", (PairText(f"neutral {i}", "human"),),
                      (PairText(f"toxic {i} <script>", "generated", scores=scores),), group=group)


@pytest.fixture
def pairs_file(tmp_path):
    records = [_record(i, ["women", "muslim", None][i % 3], i / 10, 1 - i / 10) for i in range(10)]
    records.append(_record(10, "women", None, None))
    return write_pairs(tmp_path / "pairs.jsonl", records)


def test_pairs_table_summarises_scores_and_keeps_missing_ones_as_nan(pairs_file):
    from cpwb.data.pairs import read_pairs

    table = pairs_table(read_pairs(pairs_file))
    assert len(table) == 11
    assert table.toxicity.iloc[3] == pytest.approx(0.3) and table.similarity.iloc[3] == pytest.approx(0.7)
    assert math.isnan(table.toxicity.iloc[10]) and math.isnan(table.pos_toxicity.iloc[0])


def test_filter_pairs_by_group_and_score_ranges(pairs_file):
    from cpwb.data.pairs import read_pairs

    table = pairs_table(read_pairs(pairs_file))
    assert len(filter_pairs(table)) == 11  # full ranges keep records without scores
    assert list(filter_pairs(table, group="women").id) == ["r0", "r3", "r6", "r9", "r10"]
    assert list(filter_pairs(table, group="(no group)").id) == ["r2", "r5", "r8"]
    assert list(filter_pairs(table, toxicity=(0.5, 1.0)).id) == ["r5", "r6", "r7", "r8", "r9"]
    assert list(filter_pairs(table, group="women", toxicity=(0.5, 1.0), similarity=(0.0, 0.35)).id) == ["r9"]


def test_pairs_browser_pages_and_filters(pairs_file):
    browser = PairsBrowser(pairs_file, page_size=4)
    assert browser.pages() == 3 and browser.previous.disabled
    assert "page 1 / 3 · 11 of 11 pairs match" in browser.position.value
    browser.next.click()
    browser.next.click()
    browser.next.click()  # stays on the last page
    assert browser.page == 2 and browser.next.disabled
    assert "r10" in browser.view.value and "r0<" not in browser.view.value
    browser.toxicity.value = (0.65, 1.0)  # a filter change goes back to page 1
    assert browser.page == 0 and "3 of 11" in browser.position.value
    assert "toxicity 0.70" in browser.view.value and "&lt;script&gt;" in browser.view.value
    browser.group.value = "muslim"
    assert "1 of 11" in browser.position.value and "r7" in browser.view.value
    browser.similarity.value = (0.5, 1.0)
    assert "no pair matches" in browser.view.value
    static = browser._repr_mimebundle_()["text/html"]
    assert "0 of 11" in static and "<script>" not in static


def test_pairs_browser_names_the_bad_line_of_a_broken_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"schema_version": 1, "id": "a", "anchor": "x", "positives": [], "negatives": []}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: positives"):
        PairsBrowser(path)


def test_score_records_scores_every_text_against_its_anchor():
    records = [PairRecord("a", "abcd", (PairText("abcd", "human"), PairText("ab", "human")),
                          (PairText("idiot!!!", "human", scores={"rouge": 0.5}),))]
    (scored,) = score_records(records, KeywordScorer(), LengthEmbedder())
    assert [t.scores for t in scored.positives] == [{"toxicity": 0.1, "similarity": 1.0},
                                                     {"toxicity": 0.1, "similarity": 0.5}]
    assert scored.negatives[0].scores == {"rouge": 0.5, "toxicity": 0.9, "similarity": 0.5}
    assert records[0].negatives[0].scores == {"rouge": 0.5}  # the input is left as it was
