"""phi distributions: separation statistics with known answers, the long table, figures and the token view."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cpwb.analysis.distributions import (
    TOXIGEN_SOURCE,
    ecdf_figure,
    example_texts,
    group_violin_figure,
    histogram_figure,
    ks_statistic,
    phi_separation,
    phi_table,
    roc_auc,
    separation_table,
    token_nll_html,
    toxigen_texts,
)
from cpwb.core.errors import InputError
from cpwb.data.pairs import NON_TOXIC, TOXIC, PairRecord, PairText, pair_texts
from cpwb.engine.adapters import Side, base_and_cp_sides
from cpwb.engine.nll import texts_nll


def test_roc_auc_known_answers():
    assert roc_auc([3, 4, 1, 2], [True, True, False, False]) == 1.0
    assert roc_auc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    # positives 1 and 3 against negatives 2 and 0: 3 of the 4 pairs ordered right
    assert roc_auc([1, 3, 2, 0], [True, True, False, False]) == pytest.approx(0.75)
    assert roc_auc([1, 1, 1], [True, False, False]) == pytest.approx(0.5)  # ties count half
    assert math.isnan(roc_auc([1, 2], [True, True]))


def test_roc_auc_matches_sklearn_on_random_data_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 10, 200).astype(float), rng.random(200) < 0.4
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_ks_statistic_known_answers():
    assert ks_statistic([0, 1, 2], [10, 11]) == 1.0
    assert ks_statistic([1, 2, 3], [3, 2, 1]) == 0.0
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(0.5)  # at x=2: F_a 0.5, F_b 0
    assert math.isnan(ks_statistic([], [1.0]))


def test_separation_and_its_table():
    result = phi_separation([5.0, 6.0, 3.0, 4.0], [TOXIC, TOXIC, NON_TOXIC, NON_TOXIC])
    assert result["roc_auc"] == 1.0 and result["ks"] == 1.0 and result["mean_gap"] == pytest.approx(2.0)
    assert result["n_toxic"] == result["n_non_toxic"] == 2
    with pytest.raises(InputError, match="labels"):
        phi_separation([1.0], ["hate"])
    table = pd.DataFrame({"source": ["a"] * 4 + ["b"] * 2, "model": ["base", "base", "CP", "CP", "base", "base"],
                          "label": [TOXIC, NON_TOXIC] * 3, "phi": [1.0, 2.0, 3.0, 2.0, 1.0, 1.0]})
    stats = separation_table(table).set_index(["source", "model"])
    assert stats.loc[("a", "base"), "roc_auc"] == 0.0 and stats.loc[("a", "CP"), "roc_auc"] == 1.0
    assert stats.loc[("a", "CP"), "mean_gap"] == pytest.approx(1.0) and stats.loc[("b", "base"), "roc_auc"] == 0.5


def _records():
    return [PairRecord(f"p{i}", f"anchor {i}", (PairText(f"nice {i}", "human"), PairText(f"kind {i}", "human")),
                       (PairText(f"rude {i}", "generated"),), group="g" if i else None) for i in range(3)]


def test_pair_texts_roles_labels_and_source():
    table = pair_texts(_records(), n_pairs=2, positives_per_pair=2, source="mine")
    assert len(table) == 2 * 3 and set(table.source) == {"mine"}
    assert table[table.role == "negative"].label.eq(TOXIC).all()
    assert table[table.role == "positive"].text.tolist() == ["nice 0", "kind 0", "nice 1", "kind 1"]
    assert table.group.tolist()[:3] == ["", "", ""]


def test_toxigen_texts_per_group_and_label():
    table = toxigen_texts(2)
    counts = table.groupby(["group", "label"]).size()
    assert counts.max() == 2 and set(table.label) == {TOXIC, NON_TOXIC} and set(table.source) == {TOXIGEN_SOURCE}
    assert ("trans", NON_TOXIC) not in counts.index  # ToxiGen has no neutral 'trans' seeds


@pytest.fixture
def sides(fresh_tiny_lm):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = fresh_tiny_lm
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return base_and_cp_sides(get_peft_model(model, lora).eval()), tokenizer


def test_phi_table_scores_every_text_under_every_side(sides):
    (base, cp), tokenizer = sides
    texts = pair_texts(_records(), source="mine")
    table = phi_table((base, cp), tokenizer, texts, batch_size=2)
    assert len(table) == 2 * len(texts) and table.model.tolist() == ["base"] * 6 + ["CP"] * 6
    with cp.model.disable_adapter():
        expected = texts_nll(cp.model, tokenizer, texts.text.tolist()).phi
    np.testing.assert_allclose(table[table.model == "base"].phi, expected, rtol=1e-5)
    assert not np.allclose(table[table.model == "CP"].phi, expected)
    chosen = example_texts(table, 2)
    moved = (table[table.model == "CP"].phi.to_numpy() - expected)[texts.label.to_numpy() == TOXIC]
    assert chosen[0] == texts[texts.label == TOXIC].text.tolist()[int(np.argmax(moved))]
    html = token_nll_html((base, cp), tokenizer, chosen[:1], [0.9])
    assert html.count("cpwb-side ") == 2 and "cpwb-token" in html and "toxicity 0.900" in html


def test_figures_have_a_trace_per_panel_and_label():
    rng = np.random.default_rng(0)
    rows = [{"source": s, "group": g, "model": m, "label": label, "phi": rng.normal(5, 1)}
            for s in ("a", TOXIGEN_SOURCE) for g in ("x", "y") for m in ("base", "CP")
            for label in (TOXIC, NON_TOXIC) for _ in range(5)]
    table = pd.DataFrame(rows)
    assert len(histogram_figure(table).data) == 2 * 2 * 2
    ecdf = ecdf_figure(table)
    assert len(ecdf.data) == 2 * 2 * 2 and all(np.all(np.diff(t.y) > 0) for t in ecdf.data)
    violins = group_violin_figure(table[table.source == TOXIGEN_SOURCE])
    assert len(violins.data) == 2 * 2 and {t.side for t in violins.data} == {"positive", "negative"}
    single = table[table.model == "base"]
    assert example_texts(single.assign(text=[f"t{i}" for i in range(len(single))]), 1)
    assert len(histogram_figure(single).data) == 2 * 2


def test_base_only_side_list(fresh_tiny_lm):
    model, tokenizer = fresh_tiny_lm
    table = phi_table([Side("base", model)], tokenizer, pair_texts(_records(), source="mine"))
    assert set(table.model) == {"base"} and table.phi.notna().all()
