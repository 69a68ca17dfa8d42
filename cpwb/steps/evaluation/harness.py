"""Downstream accuracy through lm-evaluation-harness (`lm-eval`), on the shipped data, offline.

lm-eval's own HellaSwag and PIQA tasks read their datasets from the hub. Here each task is a local task file
that keeps lm-eval's prompt, choices and metrics (acc: summed log-likelihood; acc_norm: normalised by the choice's
length in characters) and reads the shipped data through the `json` dataset builder:

- `cpwb_hellaswag`: lm-eval's `hellaswag` (query `activity_label: ctx`, the endings as choices) on the shipped
  1,000-item seeded sample of the validation set. The shipped text is preprocessed as lm-eval's `preprocess`
  does, except that lm-eval also capitalises `ctx_b`.
- `cpwb_piqa`: lm-eval's `piqa` (`Question: {goal}\\nAnswer:`, choices sol1/sol2) on the full PIQA dev set (1,838).

The model is the in-memory one (base, or base with its LoRA adapter, weight edit or steering hook) wrapped by
lm-eval's `HFLM`. A DExperts model (cpwb.engine.dexperts) is not a `PreTrainedModel`: `HFLM` is built on its base
and its log-likelihood call (`_model_call`) returns the combined logits instead, so the choices are scored on the
DExperts distribution; lm-eval's generation tasks are refused for it. Besides lm-eval's
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
import torch
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
    for path, spec in zip(task_files or [], extra):
        if spec.get("output_type") == "generate_until" and _is_dexperts(model):
            raise InputError("a generation task does not run on a DExperts model (its decoding is cpwb's sampler, "
                             "not transformers' generate); use multiple-choice tasks", path, field="output_type")
    with tempfile.TemporaryDirectory(prefix="cpwb-lm-eval-") as folder:
        write_task_files(folder, tasks)
        for path in task_files or []:
            atomic_write_text(Path(folder) / Path(path).name, Path(path).read_text(encoding="utf-8"))
        names = [f"cpwb_{t}" for t in tasks] + [spec["task"] for spec in extra]
        manager = TaskManager(include_path=folder, include_defaults=False)
        lm = _harness_model(HFLM, model, tokenizer, batch_size)
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


def _is_dexperts(model) -> bool:
    from cpwb.engine.dexperts import DExpertsLM

    return isinstance(model, DExpertsLM)


def _harness_model(hflm: type, model, tokenizer, batch_size: int):
    """lm-eval's `HFLM` on `model`; for a DExperts model, on its base with the combined logits (module docstring)."""
    if not _is_dexperts(model):
        return hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))

    class Combined(hflm):
        def _model_call(self, inps, attn_mask=None, labels=None):
            with torch.no_grad():
                return model(inps).logits

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            raise InputError("a generation task does not run on a DExperts model", field="lm_eval_task_files")

    return Combined(pretrained=model.peft.get_base_model(), tokenizer=tokenizer, batch_size=batch_size,
                    device=str(model.device))


def _question(task: str, sample: dict[str, Any]) -> dict[str, Any]:
    """One lm-eval logged sample of a multiple-choice task as a row: outcome, log-likelihoods, byte lengths."""
    # per choice (context, " " + choice): lm-eval prefixes its target delimiter, a space, and divides by len(choice)
    choices = [arguments[1].removeprefix(" ") for arguments in sample["arguments"]]
    return {"task": task, "id": int(sample["doc_id"]), "gold": sample["target"],
            "acc": float(sample["acc"]), "acc_norm": float(sample["acc_norm"]),
            "loglik": [float(resp[0]) for resp in sample["filtered_resps"]],
            "choice_chars": [len(choice) for choice in choices]}
