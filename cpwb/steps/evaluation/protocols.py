"""The evaluation protocols: each takes the model under test (and its base switch, scorers and settings) and returns
its numbers per split with the per-item table behind them."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from cpwb.data.corpora import RTP_SUBSETS, load_hellaswag, load_piqa, load_rtp, load_toxigen_seeds
from cpwb.steps.evaluation.config import PROTOCOL_NAMES, EvaluateConfig
from cpwb.steps.evaluation.likelihood import (
    conditional_perplexity,
    multiple_choice_accuracy,
    phi_gap,
    wikitext2_perplexity,
)
from cpwb.steps.evaluation.toxicity import (
    blackbox_rewrite,
    greedy_toxicity_rate,
    rtp_continuation_toxicity,
    toxigen_continuation_toxicity,
)


@dataclass
class Evaluation:
    """What every protocol works with: the settings, the model under test, its base switch, the scorers."""

    config: EvaluateConfig
    model: Any
    tokenizer: Any
    scorer: Any  # a cpwb.engine.scoring.ToxicityScorer
    embedder: Any | None  # a cpwb.engine.scoring.SentenceEmbedder, when similarity or blackbox is asked for
    base: Callable[[], contextlib.AbstractContextManager]  # runs the model as its base (adapter disabled)


@dataclass
class Part:
    """The scalar results of a protocol on one split (a subset, a target group) and the data files they used."""

    split: str
    data: tuple[str, ...]
    values: dict[str, Any]


ProtocolOutput = tuple[list[Part], pd.DataFrame | None]


def _judge(ev: Evaluation, inputs: list[str], outputs: list[str], table: pd.DataFrame) -> dict[str, float]:
    """Similarity (added to `table` unless it has it) and conditional perplexity of outputs given their inputs."""
    values = {}
    if ev.config.similarity and ev.embedder is not None:
        if "similarity" not in table:
            table["similarity"] = ev.embedder.similarity(inputs, outputs)
        values["similarity"] = float(table["similarity"].mean())
    if ev.config.conditional_ppl:
        with ev.base():
            values["conditional_ppl"] = conditional_perplexity(ev.model, ev.tokenizer, inputs, outputs,
                                                               ev.config.batch_size, ev.config.progress)
    return values


def _phi_gap(ev: Evaluation) -> ProtocolOutput:
    """phi(toxic) - phi(neutral) on held-out ParaDetox pairs: > 0 means toxic text became the less likely."""
    from cpwb.data.paradetox import paradetox_heldout

    pairs = paradetox_heldout()[:ev.config.heldout_pairs]
    result = phi_gap(ev.model, ev.tokenizer, [p.negatives[0].text for p in pairs],
                     [p.positives[0].text for p in pairs], ev.config.batch_size, ev.config.progress)
    table = pd.DataFrame({"id": [p.id for p in pairs], "toxic": [p.negatives[0].text for p in pairs],
                          "neutral": [p.positives[0].text for p in pairs], "phi_toxic": result.pop("phi_toxic"),
                          "phi_neutral": result.pop("phi_neutral"), "gap": result.pop("gaps")})
    values = {**result, "phi_toxic": float(table.phi_toxic.mean()), "phi_neutral": float(table.phi_neutral.mean())}
    return [Part("heldout", ("paradetox",), values)], table


def _greedy(ev: Evaluation) -> ProtocolOutput:
    """Fast mode: one greedy continuation of each RTP-challenging prompt, scored alone."""
    cfg = ev.config
    prompts = [p.text for p in load_rtp("challenging", limit=cfg.greedy_prompts)]
    result = greedy_toxicity_rate(ev.model, ev.tokenizer, ev.scorer, prompts, cfg.max_new_tokens,
                                  batch_size=cfg.generation_batch_size, progress=cfg.progress)
    table = pd.DataFrame({"prompt": prompts, "continuation": result.pop("continuations"),
                          "toxicity": result.pop("scores")})
    result |= _judge(ev, prompts, table.continuation.tolist(), table)
    return [Part("challenging", ("rtp_challenging",), result)], table


def _rtp(ev: Evaluation) -> ProtocolOutput:
    """RealToxicityPrompts: k top-p samples per prompt of each subset; EMT, TP, dist-n."""
    cfg, parts, tables = ev.config, [], []
    for subset in cfg.rtp_subsets:
        prompts = [p.text for p in load_rtp(subset, limit=cfg.rtp_prompts)]
        result = rtp_continuation_toxicity(ev.model, ev.tokenizer, ev.scorer, prompts, cfg.samples_per_prompt,
                                           cfg.top_p, cfg.max_new_tokens, cfg.seed,
                                           batch_size=max(1, cfg.generation_batch_size // cfg.samples_per_prompt),
                                           progress=cfg.progress)
        table = result.pop("samples")
        table.insert(0, "subset", subset)
        table.insert(2, "prompt", [prompts[i] for i in table.prompt_id])
        result |= _judge(ev, table.prompt.tolist(), table.continuation.tolist(), table)
        parts.append(Part(subset, (RTP_SUBSETS[subset],), result))
        tables.append(table)
    return parts, pd.concat(tables, ignore_index=True)


def toxigen_statements(per_group: int) -> list:
    """The first `per_group` hateful ToxiGen seed statements of every target group, in file order."""
    statements = load_toxigen_seeds(label="hate")
    groups = sorted({s.group for s in statements})
    return [s for g in groups for s in [s for s in statements if s.group == g][:per_group]]


def _toxigen(ev: Evaluation) -> ProtocolOutput:
    """The paper's protocol: continue hateful statements; toxic rate overall and per target group."""
    cfg = ev.config
    statements = toxigen_statements(cfg.toxigen_per_group)
    embedder = ev.embedder if cfg.similarity else None
    result = toxigen_continuation_toxicity(ev.model, ev.tokenizer, ev.scorer, statements, top_p=cfg.top_p,
                                           temperature=cfg.toxigen_temperature,
                                           max_new_tokens=cfg.toxigen_max_new_tokens, seed=cfg.seed,
                                           embedder=embedder, batch_size=cfg.generation_batch_size,
                                           progress=cfg.progress)
    table, per_group = result.pop("samples"), result.pop("per_group")
    result |= _judge(ev, table.statement.tolist(), table.continuation.tolist(), table)
    groups = [Part(str(row.pop("group")), ("toxigen_seeds",), row) for row in per_group.to_dict("records")]
    return [Part("all", ("toxigen_seeds",), result), *groups], table


def _wikitext2(ev: Evaluation) -> ProtocolOutput:
    """Fluency: WikiText-2 test perplexity over the first `wikitext_windows` strided windows (or all)."""
    result = wikitext2_perplexity(ev.model, ev.tokenizer, max_windows=ev.config.wikitext_windows,
                                  batch_size=max(1, ev.config.batch_size // 4), progress=ev.config.progress)
    windows = result.pop("windows")
    return [Part("test", ("wikitext2_test",), result)], windows


def _multiple_choice(name: str, loader: Callable, limit_field: str, data: tuple[str, ...]) -> Callable:
    """A zero-shot multiple-choice protocol (length-normalised log-likelihood of the choices)."""
    def protocol(ev: Evaluation) -> ProtocolOutput:
        items = loader(limit=getattr(ev.config, limit_field))
        result = multiple_choice_accuracy(ev.model, ev.tokenizer, items, batch_size=ev.config.batch_size,
                                          progress=ev.config.progress)
        predictions = result.pop("predictions")
        return [Part("validation", data, result)], predictions
    protocol.__name__ = f"_{name}"
    return protocol


def _blackbox(ev: Evaluation) -> ProtocolOutput:
    """Black-box mode: the model rewrites toxic web text (RTP prompt + original continuation) to be polite."""
    cfg = ev.config
    texts = [p.text + p.continuation for p in load_rtp("challenging", limit=cfg.blackbox_texts)]
    result = blackbox_rewrite(ev.model, ev.tokenizer, ev.scorer, ev.embedder, texts,
                              max_new_tokens=cfg.blackbox_max_new_tokens, batch_size=cfg.generation_batch_size,
                              progress=cfg.progress)
    table = result.pop("samples")
    return [Part("challenging", ("rtp_challenging",), result)], table


def _lm_eval(ev: Evaluation) -> ProtocolOutput:
    """lm-evaluation-harness tasks on the shipped data: acc and acc_norm as lm-eval defines them; the per-item
    table holds every question's outcome."""
    from cpwb.steps.evaluation.harness import run_harness

    cfg = ev.config
    figures, questions = run_harness(ev.model, ev.tokenizer, tuple(cfg.lm_eval_tasks), cfg.lm_eval_limit,
                                     cfg.batch_size, cfg.lm_eval_task_files)
    parts = []
    for task, rows in figures.groupby("task", sort=False):
        values = {f"{m}{suffix}": v for m, value, stderr in zip(rows.metric, rows.value, rows.stderr)
                  for suffix, v in (("", value), ("_stderr", stderr)) if v is not None}
        data = {"hellaswag": ("hellaswag",), "piqa": ("piqa", "piqa_labels")}.get(task, ())
        parts.append(Part(task, data, {**values, "n_items": int(rows.n_items.iloc[0] or 0)}))
    return parts, questions


# name -> (protocol, the settings its numbers depend on besides model, adapter, scorer, seed and batch size)
PROTOCOLS: dict[str, tuple[Callable[[Evaluation], ProtocolOutput], tuple[str, ...]]] = {
    "phi_gap": (_phi_gap, ("heldout_pairs",)),
    "greedy": (_greedy, ("greedy_prompts", "max_new_tokens", "similarity", "conditional_ppl")),
    "rtp": (_rtp, ("rtp_subsets", "rtp_prompts", "samples_per_prompt", "top_p", "max_new_tokens", "similarity",
                   "conditional_ppl", "generation_batch_size")),
    "toxigen": (_toxigen, ("toxigen_per_group", "toxigen_max_new_tokens", "toxigen_temperature", "top_p",
                           "similarity", "conditional_ppl", "generation_batch_size")),
    "wikitext2": (_wikitext2, ("wikitext_windows",)),
    "hellaswag": (_multiple_choice("hellaswag", load_hellaswag, "hellaswag_items", ("hellaswag",)),
                  ("hellaswag_items",)),
    "piqa": (_multiple_choice("piqa", load_piqa, "piqa_items", ("piqa", "piqa_labels")), ("piqa_items",)),
    "blackbox": (_blackbox, ("blackbox_texts", "blackbox_max_new_tokens", "generation_batch_size")),
    "lm_eval": (_lm_eval, ("lm_eval_tasks", "lm_eval_limit", "lm_eval_task_files")),
}
assert tuple(PROTOCOLS) == PROTOCOL_NAMES  # the config's list of names and the table of protocols agree
