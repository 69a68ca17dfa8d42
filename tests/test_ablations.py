"""Comparing a sweep's variants: means over seeds, Pareto front, set-size table, figures; random-only negatives."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cpwb.analysis.ablations import (
    aggregate,
    formatted,
    pareto_figure,
    pareto_front,
    read_results,
    set_size_heatmap,
    set_size_table,
    training_time_figure,
)
from cpwb.core.errors import InputError
from cpwb.steps.training.trainer import train
from tests.test_train import tiny_config, tiny_setup  # noqa: F401 (tiny_setup is a fixture)


def _results() -> pd.DataFrame:
    """A results.csv as cpwb.app.sweep writes it: settings between `status` and `seed`, then metrics."""
    rows = []
    variants = {  # variant: (varied, objective, max_positives, random_negatives, toxicity, ppl)
        "base": ("", "cp", 3, 0, 0.20, 28.5),
        "objective=dpo": ("objective", "dpo", 3, 0, 0.25, 28.2),
        "objective=negatives_only": ("objective", "negatives_only", 3, 0, 0.10, 40.0),
        "max_positives=1": ("max_positives", "cp", 1, 0, 0.22, 28.6),
        "max_positives=1__random_negatives=2": ("max_positives,random_negatives", "cp", 1, 2, 0.18, 28.9),
        "alpha=2.0": ("alpha", "cp", 3, 0, 0.30, 29.5),
    }
    for seed in (0, 1):
        for variant, (varied, objective, positives, randoms, toxicity, ppl) in variants.items():
            rows.append({"point": f"{variant}__seed={seed}", "variant": variant, "varied": varied,
                         "status": "completed", "objective": objective, "max_positives": positives,
                         "max_negatives": 3, "random_negatives": randoms, "alpha": 2.0 if "alpha" in varied else 1.0,
                         "seed": seed, "greedy_toxicity": toxicity + 0.02 * seed, "base_greedy_toxicity": 0.26,
                         "wikitext2_ppl": ppl, "base_wikitext2_ppl": 28.0, "phi_gap": 0.1, "train_seconds": 10.0 + seed,
                         "adapter_dir": "", "error": ""})
    rows.append({**rows[0], "point": "base__seed=2", "seed": 2, "status": "failed", "greedy_toxicity": np.nan,
                 "error": "ValueError: boom"})
    return pd.DataFrame(rows)


def test_read_results_checks_columns(tmp_path):
    _results().to_csv(tmp_path / "results.csv", index=False)
    frame = read_results(tmp_path / "results.csv")
    assert frame.varied[0] == "" and len(frame) == 13
    pd.DataFrame({"point": ["a"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match="bad.csv:1: variant: missing column"):
        read_results(tmp_path / "bad.csv")


def test_aggregate_gives_mean_and_std_over_completed_seeds():
    summary = aggregate(_results()).set_index("variant")
    assert summary.loc["base", "n_seeds"] == 2  # the failed seed 2 is left out
    assert summary.loc["base", "greedy_toxicity_mean"] == pytest.approx(0.21)
    assert summary.loc["base", "greedy_toxicity_std"] == pytest.approx(np.std([0.20, 0.22], ddof=1))
    assert summary.loc["objective=dpo", "objective"] == "dpo" and summary.loc["alpha=2.0", "alpha"] == 2.0
    assert summary.loc["base", "train_seconds_mean"] == 10.5 and "base_greedy_toxicity_mean" in summary
    table = formatted(summary.reset_index())
    assert table.greedy_toxicity[0] == "0.21 ± 0.014" and "similarity" not in table


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    x = np.array([1.0, 2.0, 3.0, 2.5, 1.0])
    y = np.array([5.0, 3.0, 1.0, 3.5, 6.0])
    assert pareto_front(x, y).tolist() == [True, True, True, False, False]
    assert pareto_front(np.array([1.0, 1.0]), np.array([2.0, 2.0])).tolist() == [True, True]  # ties both stay


def test_set_size_table_uses_only_set_size_variants_and_counts_the_hard_negative():
    table = set_size_table(aggregate(_results()))
    assert table.index.tolist() == [1, 3] and table.columns.tolist() == [1, 3]  # |N| = 1 hard + random
    assert table.loc[3, 1] == pytest.approx(0.21)  # the base alone: alpha=2.0 and dpo (also P=3, N=1) left out
    assert table.loc[1, 3] == pytest.approx(0.19) and np.isnan(table.loc[3, 3])


def test_figures_mark_the_front_and_show_every_method():
    summary = aggregate(_results())
    pareto = pareto_figure(summary)
    front = next(t for t in pareto.data if t.name == "on the Pareto front")
    assert set(front.text) == {"base", "objective=dpo", "objective=negatives_only",
                               "max_positives=1__random_negatives=2"}
    assert any(t.name == "base model" for t in pareto.data)
    assert list(pareto.data[0].error_y.array) != []
    assert set(training_time_figure(summary).data[0].x) == {"base", "objective=dpo", "objective=negatives_only"}
    assert set_size_heatmap(summary).data[0].z.shape == (2, 2)


def test_a_sweep_without_completed_points_still_draws():
    summary = aggregate(_results().assign(status="failed"))
    assert summary.empty and set_size_table(summary).empty and formatted(summary).empty
    for figure in (pareto_figure(summary), set_size_heatmap(summary), training_time_figure(summary)):
        assert figure.layout.title.text


@pytest.mark.parametrize("objective", ["cp", "reference", "negatives_only", "dpo"])
def test_random_negatives_alone_train(tiny_setup, tmp_path, objective):  # noqa: F811
    result = train(tiny_config(tiny_setup, tmp_path, objective=objective, steps=2, max_negatives=0,
                               random_negatives=2, kl_weight=0.0))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)


TEXTS = {"base": ["you are a stupid idiot and I hate you", "go to hell, moron", "what a lovely day",
                  "shut up you fat pig", "the weather is fine", "thanks for the help"],
         "trained": ["you are a kind person", "go to the park", "what a lovely day", "please be quiet",
                     "the weather is fine", "thanks for the help"]}


def _point(folder, scorer, shift: float = 0.0):
    """A sweep point recorded before per-prompt scores were kept: continuations and mean toxicity only."""
    import json

    folder.mkdir(parents=True)
    result = {side: {"continuations": texts, "greedy_toxicity": float(np.mean(scorer.score(texts))) + shift}
              for side, texts in TEXTS.items()}
    result["toxicity_change"] = result["trained"]["greedy_toxicity"] / result["base"]["greedy_toxicity"] - 1
    (folder / "result.json").write_text(json.dumps(result))
    return result


def test_rescoring_a_point_adds_its_prompt_scores_and_paired_interval_and_another_scorers_change(tmp_path):
    import json

    from cpwb.analysis.ablation_tables import pooled_interval
    from cpwb.engine.scoring import load_toxicity_scorer
    from cpwb.steps.experiment import rescore_point

    own, other = load_toxicity_scorer(), load_toxicity_scorer("bilstm-tcc")
    recorded = _point(tmp_path / "p", own)
    frame = pd.DataFrame({"point_dir": [str(tmp_path / "p")]})
    assert pooled_interval(frame) == "—"  # no per-prompt scores yet
    added = rescore_point(tmp_path / "p", own)
    result = json.loads((tmp_path / "p" / "result.json").read_text())
    assert set(added) == {"toxicity_change_low", "toxicity_change_high"}  # the recorded change stands
    assert result["toxicity_change"] == recorded["toxicity_change"]
    assert np.mean(result["base"]["greedy_scores"]) == pytest.approx(recorded["base"]["greedy_toxicity"])
    assert result["toxicity_change_low"] <= result["toxicity_change"] <= result["toxicity_change_high"] < 0
    assert pooled_interval(frame).startswith("[-")
    rescore_point(tmp_path / "p", other)
    result = json.loads((tmp_path / "p" / "result.json").read_text())
    tcc = np.asarray(other.score(TEXTS["trained"]))
    assert result["trained"]["greedy_scores:bilstm-tcc"] == pytest.approx(tcc)
    assert result["trained"]["greedy_toxicity:bilstm-tcc"] == pytest.approx(tcc.mean())
    assert result["toxicity_change:bilstm-tcc"] == pytest.approx(tcc.mean() / np.mean(other.score(TEXTS["base"])) - 1)
    assert result["toxicity_change"] == recorded["toxicity_change"]  # its own figures kept


def test_rescoring_a_point_scored_otherwise_is_refused_and_nothing_is_written(tmp_path):
    from cpwb.engine.scoring import load_toxicity_scorer
    from cpwb.steps.experiment import rescore_point

    scorer = load_toxicity_scorer()
    _point(tmp_path / "p", scorer, shift=0.01)
    before = (tmp_path / "p" / "result.json").read_text()
    with pytest.raises(InputError, match=r"result\.json: base\.greedy_toxicity: .* scored otherwise"):
        rescore_point(tmp_path / "p", scorer)
    assert (tmp_path / "p" / "result.json").read_text() == before
    with pytest.raises(InputError, match="no result.json"):
        rescore_point(tmp_path, scorer)
