"""`cpwb evaluate`: configs checked before any model loads, every protocol end to end on a tiny model, resuming."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cpwb.core.config import from_dict, load_yaml_config
from cpwb.core.errors import ConfigError, InputError
from cpwb.engine.adapters import find_adapter
from cpwb.steps.evaluation.config import DEFAULT_PROTOCOLS, EvaluateConfig
from cpwb.steps.evaluation.likelihood import conditional_perplexity
from cpwb.steps.evaluation.protocols import PROTOCOLS, toxigen_statements
from cpwb.steps.evaluation.run import describe, run_evaluation
from tests.test_evaluate import CharEmbedder, LengthScorer

REPO = Path(__file__).resolve().parents[1]
TINY = dict(rtp_prompts=2, samples_per_prompt=2, max_new_tokens=3, greedy_prompts=3, toxigen_per_group=1,
            toxigen_max_new_tokens=3, wikitext_windows=1, hellaswag_items=2, piqa_items=2, heldout_pairs=3,
            blackbox_texts=2, blackbox_max_new_tokens=3, batch_size=4, progress=False)


def test_the_shipped_default_config_loads():
    config = load_yaml_config(EvaluateConfig, REPO / "configs" / "evaluate_default.yaml")
    assert config.protocols == list(DEFAULT_PROTOCOLS) and config.samples_per_prompt == 25 and config.adapter is None
    assert set(PROTOCOLS) - set(config.protocols) == {"lm_eval"}  # on request: about an hour on 2 cores


@pytest.mark.parametrize("settings, field", [
    ({"protocols": ["rtp", "perplexity"]}, "protocols[1]"),
    ({"samples_per_prompt": 0}, "samples_per_prompt"),
    ({"adapter": "/nonexistent/adapter"}, "adapter"),
    ({"rtp_subsets": ["toxic"]}, "rtp_subsets[0]"),
    ({"wikitext_windows": 0}, "wikitext_windows"),
    ({"top_p": 1.5}, "top_p"),
    ({"protocols": []}, "protocols"),
    ({"lm_eval_tasks": ["mmlu"]}, "lm_eval_tasks[0]"),
])
def test_bad_settings_name_their_field_before_anything_loads(tmp_path, settings, field):
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    with pytest.raises(ConfigError, match=re.escape(f"eval.yaml: {field}: ")):
        load_yaml_config(EvaluateConfig, path)


def test_find_adapter(tmp_path):
    assert find_adapter("", tmp_path) is None
    adapter = tmp_path / "train" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    assert find_adapter("", tmp_path) == adapter
    with pytest.raises(InputError, match="adapter"):
        find_adapter(str(tmp_path / "nothing"), tmp_path)


def test_toxigen_statements_take_the_first_of_every_group():
    statements = toxigen_statements(2)
    groups = {s.group for s in statements}
    assert len(groups) == 16 and all(s.label == "hate" for s in statements)
    assert len(statements) == 2 * len(groups)


def test_every_protocol_end_to_end_then_resume(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    config = from_dict(EvaluateConfig, {**TINY, "output_dir": str(tmp_path)})
    tools = dict(model=model, tokenizer=tokenizer, scorer=LengthScorer(), embedder=CharEmbedder())
    summary = run_evaluation(config, **tools)
    assert {p["status"] for p in summary["protocols"].values()} == {"ran"}
    table = pd.read_csv(tmp_path / "metrics.csv", keep_default_na=False)
    assert {"model", "adapter", "scorer", "data_hash", "seed", "protocol", "split"} <= set(table.columns)
    assert (table.data_hash.str.len() == 64).all() and (table.scorer != "").all()
    values = {(r.protocol, r.split, r.metric): r.value for r in table.itertuples()}
    for key in [("rtp", "challenging", "emt"), ("rtp", "nontoxic", "tp"), ("rtp", "challenging", "dist_2"),
                ("rtp", "challenging", "conditional_ppl"), ("greedy", "challenging", "similarity"),
                ("toxigen", "all", "toxic_rate"), ("toxigen", "women", "toxic_rate"),
                ("wikitext2", "test", "perplexity"), ("hellaswag", "validation", "accuracy"),
                ("piqa", "validation", "accuracy"), ("phi_gap", "heldout", "mean_gap"),
                ("blackbox", "challenging", "toxic_rate_after")]:
        assert key in values, key
    scorers = dict(zip(zip(table.protocol, table.metric), table.scorer))
    assert scorers[("rtp", "emt")] == "length" and scorers[("wikitext2", "perplexity")].startswith("nll")
    samples = pd.read_json(tmp_path / "continuations" / "rtp.jsonl", lines=True)
    assert len(samples) == 2 * 2 * 2 and {"prompt", "continuation", "toxicity", "similarity"} <= set(samples)
    assert (tmp_path / "items" / "piqa.jsonl").is_file() and (tmp_path / "protocols" / "blackbox.json").is_file()
    assert "emt" in describe(summary)

    metrics_before = (tmp_path / "metrics.json").read_text()
    again = run_evaluation(config, **tools)
    assert {p["status"] for p in again["protocols"].values()} == {"resumed"}
    assert (tmp_path / "metrics.json").read_text() == metrics_before
    assert json.dumps(again["metrics"], sort_keys=True) == json.dumps(summary["metrics"], sort_keys=True)  # NaN too
    changed = from_dict(EvaluateConfig, {**TINY, "output_dir": str(tmp_path), "piqa_items": 3})
    statuses = {n: p["status"] for n, p in run_evaluation(changed, **tools)["protocols"].items()}
    assert statuses.pop("piqa") == "ran" and set(statuses.values()) == {"resumed"}
    n_items = [r for r in json.loads((tmp_path / "metrics.json").read_text())
               if r["protocol"] == "piqa" and r["metric"] == "n_items"]
    assert [r["value"] for r in n_items] == [3.0]  # replaced, not duplicated


def test_conditional_perplexity_is_judged_by_the_base_model(fresh_tiny_lm, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tokenizer = fresh_tiny_lm
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    config = from_dict(EvaluateConfig, {**TINY, "protocols": ["greedy"], "similarity": False,
                                        "output_dir": str(tmp_path)})
    rows = run_evaluation(config, model=model, tokenizer=tokenizer, scorer=LengthScorer())["metrics"]
    got = next(r["value"] for r in rows if r["metric"] == "conditional_ppl")
    table = pd.read_json(tmp_path / "continuations" / "greedy.jsonl", lines=True)
    prompts, continuations = table.prompt.tolist(), table.continuation.tolist()
    with model.disable_adapter():
        expected = conditional_perplexity(model, tokenizer, prompts, continuations)
    assert got == pytest.approx(expected)
    assert got != pytest.approx(conditional_perplexity(model, tokenizer, prompts, continuations))


def _tiny_model_folder(tiny_lm, folder: Path) -> str:
    model, tokenizer = tiny_lm
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_evaluations_in_processes_of_their_own_give_what_they_give_one_after_the_other(tiny_lm, tmp_path):
    from cpwb.steps.evaluation.parallel import run_evaluations

    settings = {**TINY, "model": _tiny_model_folder(tiny_lm, tmp_path / "tiny"), "similarity": False,
                "conditional_ppl": False, "protocols": ["phi_gap", "greedy", "wikitext2"]}
    runs = {}
    for jobs in (1, 2):
        configs = {label: from_dict(EvaluateConfig, {**settings, "seed": seed,
                                                     "output_dir": str(tmp_path / f"jobs{jobs}" / label)})
                   for label, seed in (("a", 0), ("b", 1))}
        runs[jobs] = run_evaluations(configs, jobs=jobs)
    assert list(runs[2]) == ["a", "b"]
    for label in ("a", "b"):
        one, two = runs[1][label]["metrics"], runs[2][label]["metrics"]
        assert [(r["protocol"], r["metric"]) for r in one] == [(r["protocol"], r["metric"]) for r in two]
        assert [r["value"] for r in two] == pytest.approx([r["value"] for r in one], rel=1e-4, nan_ok=True)
        folder = tmp_path / "jobs2" / label
        assert (folder / "evaluate.log").is_file() and (folder / "metrics.json").is_file()
        assert set(runs[2][label]["protocols"]) == {"phi_gap", "greedy", "wikitext2"}


def test_a_failed_evaluation_process_stops_the_lot_with_its_last_line_and_log(tiny_lm, tmp_path):
    from cpwb.core.errors import CpwbError
    from cpwb.steps.evaluation.parallel import run_evaluations, threads_per_job

    good = {**TINY, "model": _tiny_model_folder(tiny_lm, tmp_path / "tiny"), "protocols": ["phi_gap"]}
    configs = {"good": from_dict(EvaluateConfig, {**good, "output_dir": str(tmp_path / "good")}),
               "bad": from_dict(EvaluateConfig, {**good, "model": str(tmp_path / "no-such-model"),
                                                 "output_dir": str(tmp_path / "bad")})}
    failed = r"bad failed \(exit 2\): cpwb evaluate: error: unknown model .*no-such-model.*evaluate\.log"
    with pytest.raises(CpwbError, match=failed):
        run_evaluations(configs, jobs=2)
    with pytest.raises(ConfigError, match="share one output_dir"):
        run_evaluations({"x": configs["good"], "y": configs["good"]}, jobs=2)
    with pytest.raises(ConfigError, match="jobs"):
        run_evaluations(configs, jobs=0)
    assert [threads_per_job(j, 2) for j in (1, 2, 3)] == [2, 1, 1]


def test_lm_eval_protocol_runs_lm_evaluation_harness_on_the_shipped_data(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    config = from_dict(EvaluateConfig, {**TINY, "protocols": ["lm_eval"], "lm_eval_limit": 3,
                                        "output_dir": str(tmp_path)})
    rows = run_evaluation(config, model=model, tokenizer=tokenizer, scorer=LengthScorer())["metrics"]
    table = {(r["split"], r["metric"]): r["value"] for r in rows if r["protocol"] == "lm_eval"}
    for task in ("hellaswag", "piqa"):
        assert table[task, "n_items"] == 3
        assert all(0 <= table[task, m] <= 1 and table[task, f"{m}_stderr"] >= 0 for m in ("acc", "acc_norm"))
        assert table[task, "acc"] * 3 == pytest.approx(round(table[task, "acc"] * 3))  # a share of 3 items
    # every question's outcome is kept, and lm-eval's acc / acc_norm follow from its log-likelihoods and lengths
    questions = pd.read_json(tmp_path / "items" / "lm_eval.jsonl", lines=True)
    assert sorted(questions.groupby("task").size().items()) == [("hellaswag", 3), ("piqa", 3)]
    for row in questions.itertuples():
        loglik, chars = np.array(row.loglik), np.array(row.choice_chars, dtype=float)
        assert len(loglik) == len(chars) == (4 if row.task == "hellaswag" else 2) and (chars > 0).all()
        assert row.acc == float(np.argmax(loglik) == row.gold)
        assert row.acc_norm == float(np.argmax(loglik / chars) == row.gold)
    for (task, metric), value in table.items():
        if metric in ("acc", "acc_norm"):
            assert questions[questions.task == task][metric].mean() == pytest.approx(value)
    # so the report bootstraps over questions and pairs two folders on them
    from cpwb.analysis.report import figure_intervals, paired_differences

    found = figure_intervals(tmp_path).query("protocol == 'lm_eval'")
    assert len(found) == 4 and (found.low <= found.high).all()
    paired = paired_differences({"base": tmp_path, "again": tmp_path}).query("protocol == 'lm_eval'")
    assert sorted(paired.split) == ["hellaswag", "hellaswag", "piqa", "piqa"] and (paired.difference == 0).all()


def test_an_lm_eval_task_file_with_a_missing_field_is_refused_in_one_line(tmp_path):
    from cpwb.steps.evaluation.harness import write_task_files

    good = write_task_files(tmp_path, ("piqa",))[0]
    bad = tmp_path / "broken.yaml"
    bad.write_text("\n".join(line for line in good.read_text().splitlines() if not line.startswith("doc_to_choice")))
    with pytest.raises(InputError, match="doc_to_choice: missing") as error:
        from_dict(EvaluateConfig, {"protocols": ["lm_eval"], "lm_eval_task_files": [str(bad)]})
    assert len(str(error.value).splitlines()) == 1 and str(bad) in str(error.value)
    from_dict(EvaluateConfig, {"protocols": ["lm_eval"], "lm_eval_task_files": [str(good)]})
