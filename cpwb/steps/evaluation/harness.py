"""Downstream accuracy through lm-evaluation-harness (`lm-eval`), on the shipped data, offline.

lm-eval's own HellaSwag and PIQA tasks read their datasets from the hub. Here each task is a local task file
that keeps lm-eval's prompt, choices and metrics (acc: summed log-likelihood; acc_norm: normalised by the choice's
length in characters) and reads the shipped data through the `json` dataset builder:

- `cpwb_hellaswag`: lm-eval's `hellaswag` (query `activity_label: ctx`, the endings as choices) on the shipped
  1,000-item seeded sample of the validation set. The shipped text is preprocessed as lm-eval's `preprocess`
  does, except that lm-eval also capitalises `ctx_b`.
- `cpwb_piqa`: lm-eval's `piqa` (`Question: {goal}\\nAnswer:`, choices sol1/sol2) on the full PIQA dev set (1,838).

The model is the in-memory one (base, or base with its LoRA adapter) wrapped by lm-eval's `HFLM`. Besides lm-eval's
aggregates, every question's outcome is kept (from lm-eval's logged samples: the choices' log-likelihoods and
lengths, acc and acc_norm), so the report bootstraps intervals over questions and pairs base and adapter on them.
cpwb's own `hellaswag`/`piqa` protocols stay as the fast smoke test: they normalise per token rather than per
character and put a space before each choice, so their numbers are close to but not lm-eval's (docs/evaluation.md).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from cpwb.core.errors import AssetError, InputError
from cpwb.core.files import atomic_write_text
from cpwb.data.corpora import data_path

REQUIRED_FIELDS = ("task", "dataset_path", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice")
METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
           {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
TASKS: dict[str, dict[str, Any]] = {
    "hellaswag": {"doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices"},
    "piqa": {"doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
             "doc_to_choice": "{{[sol1, sol2]}}"},
}
# Zero-shot figures of the HuggingFaceTB/SmolLM2-135M-Instruct model card (lighteval, full validation sets)
PUBLISHED = {"hellaswag": 0.409, "piqa": 0.663}


def _documents(task: str) -> list[dict[str, Any]]:
    """The shipped items of `task` as the task file's documents."""
    if task == "hellaswag":
        rows = [json.loads(line) for line in data_path("hellaswag").read_text(encoding="utf-8").splitlines() if line]
        return [{"query": r["query"], "choices": r["endings"], "label": int(r["label"])} for r in rows]
    labels = data_path("piqa_labels").read_text(encoding="utf-8").split()
    rows = [json.loads(line) for line in data_path("piqa").read_text(encoding="utf-8").splitlines() if line]
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)}
            for r, label in zip(rows, labels)]


def write_task_files(folder: str | Path, tasks: tuple[str, ...] = ("hellaswag", "piqa")) -> list[Path]:
    """One lm-eval task file per task (and its data as JSONL) in `folder`; returns the task files."""
    folder = Path(folder)
    paths = []
    for task in tasks:
        if task not in TASKS:
            raise InputError(f"unknown lm-eval task {task!r}; shipped: {sorted(TASKS)}", field="harness_tasks")
        data = folder / f"{task}.jsonl"
        atomic_write_text(data, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in _documents(task)))
        spec = {"task": f"cpwb_{task}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation":
                str(data.resolve())}}, "output_type": "multiple_choice", "validation_split": "validation",
                **TASKS[task], "metric_list": METRICS, "metadata": {"version": 1.0}}
        paths.append(atomic_write_text(folder / f"cpwb_{task}.yaml", yaml.safe_dump(spec, sort_keys=False)))
    return paths


def check_task_file(path: str | Path) -> dict[str, Any]:
    """A task file's settings, refused in one line naming the file and the first missing field."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"not a readable YAML task file: {' '.join(str(err).split())[:200]}", path) from None
    if not isinstance(spec, dict):
        raise InputError("a task file is a mapping of settings", path)
    for field in REQUIRED_FIELDS:
        if field not in spec:
            raise InputError("missing in the lm-eval task file", path, field=field)
    return spec


def run_harness(model, tokenizer, tasks: tuple[str, ...] = ("hellaswag", "piqa"), limit: int | None = None,
                batch_size: int = 16, task_files: list[str | Path] | None = None
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """lm-eval on the in-memory model: its figures and its questions.

    Figures: acc and acc_norm with lm-eval's standard errors, one row per (task, metric). Questions: one row per
    (task, question) with lm-eval's acc and acc_norm, the gold index, each choice's log-likelihood and length in
    characters (acc_norm's divisor). `task_files`: extra lm-eval task files (checked for their required fields first);
    `limit`: the first items of each task (None: all)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise AssetError("the lm_eval protocol needs lm-evaluation-harness: pip install -e \".[harness]\"") from error

    extra = [check_task_file(p) for p in task_files or []]
    with tempfile.TemporaryDirectory(prefix="cpwb-lm-eval-") as folder:
        write_task_files(folder, tasks)
        for path in task_files or []:
            atomic_write_text(Path(folder) / Path(path).name, Path(path).read_text(encoding="utf-8"))
        names = [f"cpwb_{t}" for t in tasks] + [spec["task"] for spec in extra]
        manager = TaskManager(include_path=folder, include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        output = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, bootstrap_iters=1000,
                                 log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    figures, questions = [], []
    for name in names:
        task = name.removeprefix("cpwb_")
        result = output["results"][name]
        n = output.get("n-samples", {}).get(name, {}).get("effective")
        for metric in ("acc", "acc_norm"):
            figures.append({"task": task, "metric": metric, "value": result[f"{metric},none"],
                            "stderr": result.get(f"{metric}_stderr,none"), "n_items": n,
                            "published": PUBLISHED.get(task) if metric == "acc_norm" else None})
        questions += [_question(task, sample) for sample in output.get("samples", {}).get(name, [])]
    return pd.DataFrame(figures), pd.DataFrame(questions)


def _question(task: str, sample: dict[str, Any]) -> dict[str, Any]:
    """One lm-eval logged sample of a multiple-choice task as a row: outcome, log-likelihoods, byte lengths."""
    # per choice (context, " " + choice): lm-eval prefixes its target delimiter, a space, and divides by len(choice)
    choices = [arguments[1].removeprefix(" ") for arguments in sample["arguments"]]
    return {"task": task, "id": int(sample["doc_id"]), "gold": sample["target"],
            "acc": float(sample["acc"]), "acc_norm": float(sample["acc_norm"]),
            "loglik": [float(resp[0]) for resp in sample["filtered_resps"]],
            "choice_chars": [len(choice) for choice in choices]}
