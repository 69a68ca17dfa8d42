"""The evaluation report: the table with directions, baselines from notebook 05 when present, report.html written
atomically beside the run folder's one copy of plotly.js."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from cpwb.analysis.report import BASELINE_SUFFIX, METRICS, build_report, render_html, tradeoff_figure, write_report
from cpwb.analysis.report_inputs import read_baselines, read_tuning
from cpwb.core.files import atomic_write_json, atomic_write_text
from cpwb.steps.evaluation.records import write_metrics


def _evaluation(folder, adapter: str, toxicity: float, perplexity: float, group_rates: dict[str, float]) -> None:
    """A fake evaluation folder as cpwb.steps.evaluation.run writes it."""
    record = {"model": "default", "adapter": adapter, "scorer": "bilstm", "data_hash": "h", "seed": 0}
    rows = [{"metric": "mean_toxicity", "value": toxicity, "protocol": "greedy", "split": "challenging", **record},
            {"metric": "n_prompts", "value": 3, "protocol": "greedy", "split": "challenging", **record},
            {"metric": "emt", "value": toxicity + 0.2, "protocol": "rtp", "split": "challenging", **record},
            {"metric": "emt", "value": toxicity + 0.1, "protocol": "rtp", "split": "nontoxic", **record},
            {"metric": "perplexity", "value": perplexity, "protocol": "wikitext2", "split": "test", **record},
            {"metric": "toxic_rate", "value": 0.5, "protocol": "toxigen", "split": "all", **record}]
    for group, rate in group_rates.items():
        rows += [{"metric": "toxic_rate", "value": rate, "protocol": "toxigen", "split": group, **record},
                 {"metric": "n", "value": 2, "protocol": "toxigen", "split": group, **record}]
    write_metrics(rows, folder)
    greedy = pd.DataFrame({"prompt": ["So I", "You are <b>", "Well"], "continuation": ["said", "an idiot", "ok"],
                           "toxicity": [0.1, 0.9 * toxicity / 0.3, 0.0]})
    atomic_write_text(folder / "continuations" / "greedy.jsonl", greedy.to_json(orient="records", lines=True))
    atomic_write_json(folder / "evaluate_config.json", {"greedy_prompts": 3, "output_dir": str(folder)})


@pytest.fixture
def run_dir(tmp_path):
    _evaluation(tmp_path / "evaluation" / "base", "", 0.3, 28.0, {"women": 0.5, "muslim": 0.0})
    _evaluation(tmp_path / "evaluation" / "cp", "train/adapter", 0.15, 28.5, {"women": 0.0, "muslim": 0.0})
    return tmp_path


def _folders(run_dir):
    return {"base": run_dir / "evaluation" / "base", "CP": run_dir / "evaluation" / "cp"}


def test_report_without_baselines(run_dir):
    assert read_baselines(run_dir) is None
    report = build_report(_folders(run_dir), read_baselines(run_dir), n_examples=2)
    table = report.table.set_index(["protocol", "split", "metric"])
    row = table.loc[("greedy", "challenging", METRICS[("greedy", "mean_toxicity")][0])]
    assert (row.better, row.n, row.base, row.CP) == ("↓", 3, 0.3, 0.15)
    assert table.loc[("rtp", "nontoxic", "Expected Maximum Toxicity")].CP == pytest.approx(0.25)
    assert "women" not in report.table.split.tolist()  # per-group numbers are in the bars, not the table
    assert report.examples.prompt.tolist() == ["You are <b>", "So I"]  # most toxic under base first
    bars = report.figures["toxigen_groups"]
    assert [t.name for t in bars.data] == ["base", "CP"] and list(bars.data[0].y) == [0.5, 0.0]
    path = write_report(run_dir / "report.html", report)
    text = path.read_text(encoding="utf-8")
    assert text.count('class="plotly-graph-div"') == 2 and text.count("<script") >= 3  # library once + 2 figures
    assert text.count('src="figures/plotly.min.js"') == 1 and len(text) < 500_000  # the library is referenced
    assert (run_dir / "figures" / "plotly.min.js").stat().st_size > 1_000_000  # ... and lies beside it: offline
    assert 'class="metrics"' in text and "Expected Maximum Toxicity" in text and "↓" in text
    assert "You are &lt;b&gt;" in text and "You are <b>" not in text  # texts escaped
    assert sorted(p.name for p in run_dir.iterdir()) == ["evaluation", "figures", "report.html"]  # no temporaries


def test_baselines_from_notebook_05_join_the_table_and_the_scatter(run_dir):
    (run_dir / "ablations").mkdir()
    pd.DataFrame({"point": ["dpo", "simpo", "broken"], "status": ["completed", "completed", "failed"],
                  "greedy_toxicity": [0.2, 0.25, math.nan], "wikitext2_ppl": [29.0, 30.0, math.nan],
                  "phi_gap": [0.1, 0.05, math.nan], "train_seconds": [100.0, 120.0, math.nan],
                  "adapter_dir": ["a", "b", ""], "other": [1, 2, 3]}).to_csv(run_dir / "ablations" / "results.csv",
                                                                             index=False)
    baselines = read_baselines(run_dir)
    assert set(baselines.point) == {"dpo" + BASELINE_SUFFIX, "simpo" + BASELINE_SUFFIX}
    report = build_report(_folders(run_dir), baselines)
    assert list(report.table.columns[-6:]) == ["base", "base 95% CI", "CP", "CP 95% CI", "dpo (05)", "simpo (05)"]
    table = report.table.set_index(["protocol", "metric"])
    assert table.loc[("wikitext2", "WikiText-2 perplexity"), "dpo (05)"] == 29.0
    assert math.isnan(table.loc[("rtp", "Expected Maximum Toxicity"), "dpo (05)"].iloc[0])
    assert table.loc[("train", "training time [s]"), "simpo (05)"] == 120.0
    scatter = tradeoff_figure(report.table)
    assert [(t.name, t.x[0], t.y[0]) for t in scatter.data] == [
        ("base", 28.0, 0.3), ("CP", 28.5, 0.15), ("dpo (05)", 29.0, 0.2), ("simpo (05)", 30.0, 0.25)]
    assert "notebook 05" in render_html(report)


def test_a_failed_render_leaves_the_previous_report(run_dir):
    report = build_report(_folders(run_dir))
    path = write_report(run_dir / "report.html", report)
    before = path.read_text()
    report.figures["broken"] = object()  # not a figure: rendering fails before anything is written
    with pytest.raises(AttributeError):
        write_report(path, report)
    assert path.read_text() == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["evaluation", "figures", "report.html"]


def test_a_single_model_report(run_dir):
    report = build_report({"base": run_dir / "evaluation" / "base"})
    assert list(report.table.columns[-2:]) == ["base", "base 95% CI"] and len(tradeoff_figure(report.table).data) == 1
    greedy = report.table.set_index(["protocol", "metric"]).loc[("greedy", METRICS["greedy", "mean_toxicity"][0])]
    low, high = map(float, greedy["base 95% CI"].strip("[]").split(", "))
    scores = pd.read_json(run_dir / "evaluation" / "base" / "continuations" / "greedy.jsonl", lines=True).toxicity
    assert scores.min() <= low <= scores.mean() <= high <= scores.max() and low < high  # the bootstrap over prompts
    assert json.loads(json.dumps(report.settings)) == {"greedy_prompts": 3, "output_dir": str(
        run_dir / "evaluation" / "base")}
    assert "output_dir" not in render_html(report)


def test_tuning_studies_from_notebook_05_add_their_fronts_best_trials_and_seed_reruns(run_dir):
    for method, cut in (("cp", -0.5), ("dpo", -0.4)):
        (run_dir / "tuning" / method).mkdir(parents=True)
        pd.DataFrame({"trial": [0, 1, 2], "method": method, "state": ["complete", "complete", "fail"],
                      "param_lr": [1e-4, 2e-4, 3e-4], "toxicity_change": [cut, cut - 0.2, math.nan],
                      "ppl_change": [0.01, 0.04, math.nan], "feasible": [True, True, ""],
                      "pareto": [True, True, False]}).to_csv(run_dir / "tuning" / method / "results.csv", index=False)
    pd.DataFrame({"method": "cp", "budget": 0.05, "trial": 1, "settings": "lr=0.0002", "status": "completed",
                  "seed": [1, 2], "toxicity_change": [-0.6, -0.7], "ppl_change": [0.03, 0.05]}).to_csv(
        run_dir / "tuning" / "confirm.csv", index=False)
    tuning, confirmations = read_tuning(run_dir)
    report = build_report(_folders(run_dir), tuning=tuning, confirmations=confirmations)
    best = report.tuning.set_index(["method", "budget"])
    assert best.loc[("cp", 0.02), "toxicity_change"] == -0.5 and best.loc[("dpo", 0.05), "trial"] == 1
    assert report.confirmations.toxicity_change.tolist() == ["-65.0% ± 7.1%"]
    assert report.confirmations.within_budget.iloc[0]  # the mean cost over seeds, 4%, is within 5%
    page = render_html(report)
    assert "Equal-budget tuning" in page and "Seed re-runs" in page and "tuning_fronts" in report.figures
    assert {t.name for t in report.figures["tuning_fronts"].data} >= {"cp front", "dpo front"}
    target = report.target.set_index("method")  # -80% at <= 5%: neither; cp's closest judged on its re-runs
    assert not target.reached.any() and target.loc["cp", "re-run"] == "-65.0% at +4.0% (2 seeds)"
    assert "-80% toxicity at ≤ 5% perplexity: reached?" in page


def test_peers_sweeps_from_notebook_05_add_the_comparison_table_and_figure(run_dir):
    from cpwb.analysis.report_inputs import read_method_costs, read_peers

    assert read_peers(run_dir) is None and read_method_costs(run_dir) == {}  # no peers' sweep copied: no section
    common = {"status": "completed", "varied": "", "ppl_change": 0.01, "similarity": 0.27, "train_seconds": 9.0}
    (run_dir / "ablations").mkdir()
    pd.DataFrame([{**common, "point": f"base__seed={s}", "variant": "base", "objective": "cp", "seed": s,
                   "toxicity_change": -0.5} for s in (0, 1)]).to_csv(run_dir / "ablations" / "results.csv",
                                                                   index=False)
    (run_dir / "peers" / "peers").mkdir(parents=True)
    pd.DataFrame([{**common, "point": f"r{r}", "variant": f"r{r}", "objective": "profs", "seed": 0, "edit_rank": r,
                   "edit_layers": "[]", "toxicity_change": -0.1 * r} for r in (1, 2)]).to_csv(
        run_dir / "peers" / "peers" / "results.csv", index=False)
    report = build_report(_folders(run_dir), peers=read_peers(run_dir))
    assert report.peers.method.tolist() == ["CP", "ProFS", "ProFS"] and report.peers.seeds.tolist() == [2, 1, 1]
    assert "fit CPU s, one machine" not in report.peers  # no benchmark figures: no columns for them
    (run_dir / "peers" / "costs.json").write_text(json.dumps({"generation": {"CP": 12.5}, "fit": {"ProFS": 35.0}}))
    costed = build_report(_folders(run_dir), peers=read_peers(run_dir), costs=read_method_costs(run_dir)).peers
    assert costed["fit CPU s, one machine"].tolist() == ["—", "35", "35"]
    assert costed["generation s / 1k tokens"].tolist() == ["12.5", "—", "—"]
    assert "CP and its peers" in render_html(report) and "peers_comparison" in report.figures
    assert "downstream change" not in costed  # measured nowhere: no column
    (run_dir / "peers_data").mkdir()  # notebook 05's copy of the data grid: CP's downstream figure on seed 1
    pd.DataFrame([{**common, "point": "base__seed=1", "variant": "base", "objective": "cp", "seed": 1,
                   "toxicity_change": -0.5, "downstream_change": 0.004, "downstream_change_low": -0.01,
                   "downstream_change_high": 0.02},
                  {**common, "point": "train_pairs_limit=50__seed=0", "variant": "l50", "objective": "cp", "seed": 0,
                   "train_pairs_limit": 50, "toxicity_change": -0.2, "downstream_change": -0.5}]).to_csv(
        run_dir / "peers_data" / "results.csv", index=False)
    filled = build_report(_folders(run_dir), peers=read_peers(run_dir)).peers
    assert filled["downstream change"].tolist() == ["+0.4 pts [-1.0, +2.0] (1 of 2 seeds)", "—", "—"]


def test_a_second_scorer_rescoring_the_continuations_shows_its_agreement_and_leaves_the_table(run_dir):
    from cpwb.engine.scoring import load_toxicity_scorer
    from cpwb.steps.evaluation.rescore import rescore

    before = build_report(_folders(run_dir)).table
    scorer = load_toxicity_scorer("bilstm-tcc")
    for folder in _folders(run_dir).values():
        rows = rescore(folder, scorer)
        greedy = pd.read_json(folder / "continuations" / "greedy.jsonl", lines=True)
        mean = next(r["value"] for r in rows if r["metric"] == "mean_toxicity" and r["protocol"] == "greedy")
        assert mean == pytest.approx(greedy["toxicity:bilstm-tcc"].mean())
        assert {r["scorer"] for r in rows} == {"bilstm-tcc"} and {r["model"] for r in rows} == {"default"}
    report = build_report(_folders(run_dir))
    pd.testing.assert_frame_equal(report.table, before)  # the evaluation's own scorer stays the table's
    row = report.agreement.iloc[0]
    assert (row.protocol, row.scorer, row.n_texts) == ("greedy", "bilstm-tcc", 6)
    texts = pd.concat([pd.read_json(f / "continuations" / "greedy.jsonl", lines=True) for f in
                       _folders(run_dir).values()])
    from scipy.stats import spearmanr
    assert row.spearman == pytest.approx(spearmanr(texts.toxicity, texts["toxicity:bilstm-tcc"]).statistic)
    assert row["same ranking"] == (row["ranking (own scorer)"] == row["ranking (this scorer)"])
    assert "Scorer agreement" in render_html(report)


def test_cpwb_report_writes_the_page_of_named_folders_and_refuses_a_non_evaluation(run_dir, tmp_path, capsys):
    from cpwb.app.cli import main

    folders = [f"{name}={folder}" for name, folder in _folders(run_dir).items()]
    assert main(["report", *folders, "--out", str(tmp_path / "page" / "report.html")]) == 0
    page = (tmp_path / "page" / "report.html").read_text()
    assert "Differences from the base model" in page and (tmp_path / "page" / "figures" / "plotly.min.js").is_file()
    assert main(["report", f"base={tmp_path}", "--out", str(tmp_path / "x.html")]) == 2
    assert "no metrics.json" in capsys.readouterr().err and not (tmp_path / "x.html").exists()


def _lm_eval_evaluation(folder, adapter: str, correct: list[int]) -> None:
    """A fake lm_eval evaluation folder with one row per PIQA question."""
    record = {"model": "default", "adapter": adapter, "scorer": "bilstm", "data_hash": "h", "seed": 0}
    acc = sum(correct) / len(correct)
    write_metrics([{"metric": "acc", "value": acc, "protocol": "lm_eval", "split": "piqa", **record},
                   {"metric": "acc_stderr", "value": 0.1, "protocol": "lm_eval", "split": "piqa", **record}], folder)
    questions = pd.DataFrame({"task": "piqa", "id": range(len(correct)), "gold": 0, "acc": correct,
                              "acc_norm": correct})
    atomic_write_text(folder / "items" / "lm_eval.jsonl", questions.to_json(orient="records", lines=True))


def test_a_name_given_several_folders_shows_one_models_presets_in_one_column(run_dir, tmp_path, capsys):
    from cpwb.app.cli import main

    _lm_eval_evaluation(run_dir / "lm-eval" / "base", "", [1, 1, 0, 1, 0, 1, 1, 0])
    _lm_eval_evaluation(run_dir / "lm-eval" / "cp", "train/adapter", [1, 0, 0, 1, 0, 1, 1, 0])
    folders = _folders(run_dir)
    out = tmp_path / "page" / "report.html"
    assert main(["report", f"base={folders['base']}", f"CP={folders['CP']}", f"base={run_dir / 'lm-eval' / 'base'}",
                 f"CP={run_dir / 'lm-eval' / 'cp'}", "--out", str(out)]) == 0
    page = out.read_text()
    assert "lm-eval acc, zero-shot" in page and "greedy continuation toxicity" in page
    printed = capsys.readouterr().out  # the paired differences: both presets' protocols, one column per model
    assert "lm-eval acc" in printed and "-0.125" in printed and "greedy continuation toxicity" in printed
    # the same protocol in two folders, or another model's folder under the same name: one line each, no page
    for extra, reason in ((folders["base"], "one folder per protocol"),
                          (run_dir / "lm-eval" / "cp", "one model per report column")):
        assert main(["report", f"base={folders['base']}", f"base={extra}", "--out", str(tmp_path / "x.html")]) == 2
        error = capsys.readouterr().err
        assert reason in error and len(error.strip().splitlines()) == 1 and not (tmp_path / "x.html").exists()


def test_the_peers_under_lee2024_get_their_own_section_never_the_quick_evaluations(run_dir):
    from cpwb.analysis.report_inputs import read_peers, read_peers_lee2024

    assert read_peers_lee2024(run_dir) is None
    common = {"status": "completed", "varied": "", "ppl_change": 0.01, "similarity": 0.27, "train_seconds": 9.0,
              "seed": 0}
    (run_dir / "peers_lee2024").mkdir()
    pd.DataFrame([{**common, "point": "base__seed=0", "variant": "base", "objective": "cp", "rl_scorer": "default",
                   "toxicity_change": -0.5},
                  {**common, "point": "g", "variant": "g", "objective": "grpo", "rl_scorer": "bilstm-tcc",
                   "toxicity_change": -0.9}]).to_csv(run_dir / "peers_lee2024" / "results.csv", index=False)
    assert read_peers(run_dir) is None  # another protocol: not among the quick evaluation's peers
    report = build_report(_folders(run_dir), peers_lee2024=read_peers_lee2024(run_dir))
    assert report.peers_lee2024.method.tolist() == ["CP", "GRPO (RL)"]
    assert report.peers_lee2024.setting.tolist() == ["default", "reward bilstm-tcc"]
    page = render_html(report)
    assert "under the lee2024 protocol" in page and "CP and its peers</h2>" not in page
