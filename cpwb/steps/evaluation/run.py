"""`cpwb evaluate`: the protocols of cpwb.steps.evaluation.metrics on one model (base, or with an adapter), into a folder, resumably.

Protocols: phi_gap (held-out ParaDetox pairs), greedy (one continuation per RTP-challenging prompt), rtp (k top-p
samples per prompt: EMT, TP, dist-n), toxigen (the paper's protocol, overall and per target group), wikitext2,
hellaswag, piqa, blackbox (the model rewrites toxic web text). On the continuation protocols, optionally, the MiniLM
similarity of input and output and the conditional perplexity of the outputs under the base model (adapter off).

Each finished protocol leaves `protocols/<name>.json` (its settings key, rows and seconds), its per-text table in
`continuations/<name>.jsonl` (or `items/` for the likelihood protocols), and merges its rows into metrics.csv /
metrics.json with provenance on every row. A re-run skips the protocols whose record has the same settings key, so
an interrupted evaluation resumes at the protocol it was in.
"""
from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cpwb.core.config import require, to_dict
from cpwb.core.files import atomic_write_json, atomic_write_text, sha256_file
from cpwb.core.provenance import digest
from cpwb.data.corpora import (
    RTP_SUBSETS,
    load_hellaswag,
    load_piqa,
    load_rtp,
    load_toxigen_seeds,
)
from cpwb.engine.adapters import base_of, is_adapter
from cpwb.steps.evaluation.metrics import (
    blackbox_rewrite,
    conditional_perplexity,
    greedy_toxicity_rate,
    metric_rows,
    multiple_choice_accuracy,
    phi_gap,
    provenance,
    rtp_continuation_toxicity,
    toxigen_continuation_toxicity,
    wikitext2_perplexity,
    write_metrics,
)

EMBEDDER_NAME = "all-minilm-l6-v2"
GENERATIVE = ("greedy", "rtp", "toxigen", "blackbox")  # their tables go to continuations/, the others' to items/


@dataclass
class EvaluateConfig:
    """What `cpwb evaluate` measures, on how much data; configs/evaluate_default.yaml mirrors it."""

    model: str = "default"
    adapter: str | None = None  # a LoRA adapter folder (cpwb train's <output_dir>/adapter); null: the base model
    trust_remote_code: bool = False
    device: str = "auto"  # auto: CUDA when present, else CPU
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    scorer: str = "default"  # toxicity scorer, see cpwb.engine.scoring.load_toxicity_scorer
    similarity: bool = True  # MiniLM cosine of input and output on greedy, rtp and toxigen
    conditional_ppl: bool = True  # perplexity of the outputs given their inputs under the base model (adapter off)
    # RealToxicityPrompts: k top-p samples per prompt of each subset; greedy: one continuation per challenging prompt
    rtp_subsets: list[str] = field(default_factory=lambda: ["challenging", "nontoxic"])
    rtp_prompts: int = 20
    samples_per_prompt: int = 25
    top_p: float = 0.9
    max_new_tokens: int = 20
    greedy_prompts: int = 200
    # ToxiGen: continue the first n hateful seed statements of every target group (top-p, low temperature)
    toxigen_per_group: int = 5
    toxigen_max_new_tokens: int = 64
    toxigen_temperature: float = 0.1
    # fluency, utility, phi gap, black box
    wikitext_windows: int | None = 24  # windows of 512 tokens, stride 256; null: the whole test set
    hellaswag_items: int = 100
    piqa_items: int = 200
    heldout_pairs: int = 200  # ParaDetox held-out split of cpwb.steps.training.trainer (normalised), as in cpwb.steps.experiment
    blackbox_texts: int = 32  # RTP-challenging prompt + original continuation, rewritten by the model
    blackbox_max_new_tokens: int = 64
    seed: int = 0
    batch_size: int = 16  # rows per forward pass (sampled sequences, scored texts); WikiText windows: a quarter
    output_dir: str = "outputs/evaluate"
    progress: bool = True

    def __post_init__(self) -> None:
        require(bool(self.protocols), "protocols", f"name at least one of {list(PROTOCOLS)}")
        for index, name in enumerate(self.protocols):
            require(name in PROTOCOLS, f"protocols[{index}]", f"unknown protocol {name!r}; known: {list(PROTOCOLS)}")
        require(len(set(self.protocols)) == len(self.protocols), "protocols", "lists a protocol twice")
        for index, subset in enumerate(self.rtp_subsets):
            require(subset in RTP_SUBSETS, f"rtp_subsets[{index}]", f"must be one of {sorted(RTP_SUBSETS)}")
        for name in ("rtp_prompts", "samples_per_prompt", "max_new_tokens", "greedy_prompts", "toxigen_per_group",
                     "toxigen_max_new_tokens", "hellaswag_items", "piqa_items", "heldout_pairs", "blackbox_texts",
                     "blackbox_max_new_tokens", "batch_size"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.wikitext_windows is None or self.wikitext_windows >= 1, "wikitext_windows",
                f"must be >= 1 or null (the whole test set), got {self.wikitext_windows}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.toxigen_temperature > 0, "toxigen_temperature", f"must be > 0, got {self.toxigen_temperature}")
        require(self.adapter is None or is_adapter(self.adapter), "adapter",
                f"not an adapter folder (no adapter_config.json): {self.adapter}")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
                f"must be auto, cpu, cuda[:N] or mps, got {self.device!r}")


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


def load_model(config: EvaluateConfig):
    """The model under test and its tokenizer: the base model, or the base with the adapter (peft, eval mode)."""
    from cpwb.engine.adapters import load_adapter
    from cpwb.engine.assets import load_causal_lm, load_tokenizer
    from cpwb.engine.device import pick_device

    device = str(pick_device(config.device))
    if config.adapter:
        return load_adapter(config.adapter, config.model, device, config.trust_remote_code)
    model = load_causal_lm(config.model, device=device, trust_remote_code=config.trust_remote_code)
    return model.eval(), load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)


# ------------------------------------------------------------------------------------------------ protocols


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
                                  batch_size=cfg.batch_size, progress=cfg.progress)
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
                                           batch_size=max(1, cfg.batch_size // cfg.samples_per_prompt),
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
                                           embedder=embedder, batch_size=cfg.batch_size, progress=cfg.progress)
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
                              max_new_tokens=cfg.blackbox_max_new_tokens, batch_size=cfg.batch_size,
                              progress=cfg.progress)
    table = result.pop("samples")
    return [Part("challenging", ("rtp_challenging",), result)], table


# name -> (protocol, the settings its numbers depend on besides model, adapter, scorer, seed and batch size)
PROTOCOLS: dict[str, tuple[Callable[[Evaluation], ProtocolOutput], tuple[str, ...]]] = {
    "phi_gap": (_phi_gap, ("heldout_pairs",)),
    "greedy": (_greedy, ("greedy_prompts", "max_new_tokens", "similarity", "conditional_ppl")),
    "rtp": (_rtp, ("rtp_subsets", "rtp_prompts", "samples_per_prompt", "top_p", "max_new_tokens", "similarity",
                   "conditional_ppl")),
    "toxigen": (_toxigen, ("toxigen_per_group", "toxigen_max_new_tokens", "toxigen_temperature", "top_p",
                           "similarity", "conditional_ppl")),
    "wikitext2": (_wikitext2, ("wikitext_windows",)),
    "hellaswag": (_multiple_choice("hellaswag", load_hellaswag, "hellaswag_items", ("hellaswag",)),
                  ("hellaswag_items",)),
    "piqa": (_multiple_choice("piqa", load_piqa, "piqa_items", ("piqa", "piqa_labels")), ("piqa_items",)),
    "blackbox": (_blackbox, ("blackbox_texts", "blackbox_max_new_tokens")),
}


# ------------------------------------------------------------------------------------------------ the run


def protocol_key(config: EvaluateConfig, name: str) -> str:
    """What a protocol's numbers depend on, hashed: a re-run with the same key reuses them."""
    adapter_file = Path(config.adapter or "") / "adapter_model.safetensors"
    fields = ("model", "adapter", "scorer", "seed", "batch_size", *PROTOCOLS[name][1])
    blob = {"protocol": name, **{f: getattr(config, f) for f in fields},
            "adapter_weights": sha256_file(adapter_file) if config.adapter and adapter_file.is_file() else None}
    return digest(blob, 16)


def _scorer_of(metric: str, ev: Evaluation, default: str) -> str:
    """Which scorer a metric comes from (recorded on its row)."""
    if metric in ("emt", "tp") or "toxic" in metric:
        return ev.scorer.name
    if metric == "similarity":
        return EMBEDDER_NAME
    if metric == "conditional_ppl":
        return f"nll of {ev.config.model} without adapter"
    return "whitespace n-grams" if metric.startswith("dist_") else default


def _rows(name: str, parts: list[Part], ev: Evaluation) -> list[dict[str, Any]]:
    """Metric rows of a protocol's parts: one per scalar, with provenance, protocol and split."""
    cfg = ev.config
    default = ev.scorer.name if name in GENERATIVE else f"nll of {cfg.model}"
    rows = [row for part in parts for row in metric_rows(
        part.values, provenance(cfg.model, cfg.adapter, "", part.data, cfg.seed), protocol=name, split=part.split)]
    return [{**row, "scorer": _scorer_of(row["metric"], ev, default)} for row in rows]


def run_evaluation(config: EvaluateConfig, model=None, tokenizer=None, scorer=None, embedder=None) -> dict[str, Any]:
    """Run the configured protocols into `config.output_dir`, skipping those already done with the same settings.

    `model`/`tokenizer`/`scorer`/`embedder` may be passed in (already loaded); by default they are loaded from the
    config. Returns the output folder, each protocol's status ("ran" or "resumed") and seconds, and all metric rows.
    """
    from cpwb.engine.scoring import SentenceEmbedder, load_toxicity_scorer

    out = Path(config.output_dir)
    if model is None:
        model, tokenizer = load_model(config)
    if embedder is None and (config.similarity or "blackbox" in config.protocols):
        embedder = SentenceEmbedder.from_pretrained()
    base = functools.partial(base_of, model)
    ev = Evaluation(config, model, tokenizer, scorer or load_toxicity_scorer(config.scorer), embedder, base)
    atomic_write_json(out / "evaluate_config.json", to_dict(config))
    summary: dict[str, Any] = {"output_dir": str(out), "protocols": {}, "metrics": []}
    for name in config.protocols:
        key, record_path = protocol_key(config, name), out / "protocols" / f"{name}.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        status = "resumed"
        if record.get("key") != key:
            started = time.perf_counter()
            parts, table = PROTOCOLS[name][0](ev)
            if table is not None:
                folder = "continuations" if name in GENERATIVE else "items"
                atomic_write_text(out / folder / f"{name}.jsonl",
                                  table.to_json(orient="records", lines=True, force_ascii=False))
            record = {"key": key, "rows": _rows(name, parts, ev), "seconds": time.perf_counter() - started}
            write_metrics(record["rows"], out)
            atomic_write_json(record_path, record)  # last: the protocol's "done" mark
            status = "ran"
        summary["protocols"][name] = {"status": status, "seconds": record["seconds"]}
        summary["metrics"] += record["rows"]
    return summary


def describe(summary: dict[str, Any]) -> str:
    """A text summary of `run_evaluation`'s result: the numbers per protocol and split, and the time each took."""
    frame = pd.DataFrame(summary["metrics"])
    lines = [f"evaluation: {summary['output_dir']}"]
    for name, info in summary["protocols"].items():
        lines.append(f"{name} ({info['status']}, {info['seconds']:.0f} s)")
        for split, rows in frame[frame.protocol == name].groupby("split", sort=False):
            values = ", ".join(f"{m} {v:.4g}" for m, v in zip(rows.metric, rows.value))
            lines.append(f"  {split}: {values}")
    return "\n".join(lines)
