"""`cpwb evaluate`: the evaluation protocols on one model (base, or with an adapter), into a folder, resumably.

Protocols: phi_gap (held-out ParaDetox pairs), greedy (one continuation per RTP-challenging prompt), rtp (k top-p
samples per prompt: EMT, TP, dist-n), toxigen (the paper's protocol, overall and per target group), wikitext2,
hellaswag, piqa, blackbox (the model rewrites toxic web text). On the continuation protocols, optionally, the MiniLM
similarity of input and output and the conditional perplexity of the outputs under the base model (adapter off).

Each finished protocol leaves `protocols/<name>.json` (its settings key, rows and seconds), its per-text table in
`continuations/<name>.jsonl` (or `items/` for the likelihood protocols), and merges its rows into metrics.csv /
metrics.json with provenance on every row. A re-run skips the protocols whose record has the same settings key, so
an interrupted evaluation resumes at the protocol it was in."""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from cpwb.core.config import to_dict
from cpwb.core.errors import CpwbError
from cpwb.core.files import atomic_write_json, atomic_write_text
from cpwb.core.provenance import digest
from cpwb.engine.adapters import adapter_fingerprint, base_of
from cpwb.steps.evaluation.config import EMBEDDER_NAME, GENERATIVE, EvaluateConfig
from cpwb.steps.evaluation.protocols import PROTOCOLS, Evaluation, Part
from cpwb.steps.evaluation.records import metric_rows, provenance, write_metrics


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


def protocol_key(config: EvaluateConfig, name: str) -> str:
    """What a protocol's numbers depend on, hashed: a re-run with the same key reuses them."""
    fields = ("model", "adapter", "scorer", "seed", "batch_size", *PROTOCOLS[name][1])
    blob = {"protocol": name, **{f: getattr(config, f) for f in fields},
            "adapter_weights": adapter_fingerprint(config.adapter) if config.adapter else None}
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
    scorer = scorer or load_toxicity_scorer(config.scorer, **config.scorer_options)  # a bad scorer fails first
    if model is None:
        model, tokenizer = load_model(config)
    if embedder is None and (config.similarity or "blackbox" in config.protocols):
        embedder = SentenceEmbedder.from_pretrained()
    base = functools.partial(base_of, model)
    ev = Evaluation(config, model, tokenizer, scorer, embedder, base)
    atomic_write_json(out / "evaluate_config.json", to_dict(config))
    summary: dict[str, Any] = {"output_dir": str(out), "protocols": {}, "metrics": []}
    for name in config.protocols:
        key, record_path = protocol_key(config, name), out / "protocols" / f"{name}.json"
        record = _record(record_path)
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


def _record(path: Path) -> dict[str, Any]:
    """A protocol's record, or {} when it has none yet."""
    return json.loads(path.read_text()) if path.is_file() else {}


def recorded_keys(config: EvaluateConfig) -> dict[str, str]:
    """Each protocol's settings key (what a finished record must carry to count for this config)."""
    return {name: protocol_key(config, name) for name in config.protocols}


def recorded_summary(config: EvaluateConfig, keys: dict[str, str] | None = None) -> dict[str, Any]:
    """`run_evaluation`'s summary read back from a folder whose every protocol is recorded with this config's key
    (each "resumed"); no model is loaded. A missing or stale record raises."""
    out = Path(config.output_dir)
    summary: dict[str, Any] = {"output_dir": str(out), "protocols": {}, "metrics": []}
    for name, key in (keys or recorded_keys(config)).items():
        record = _record(out / "protocols" / f"{name}.json")
        if record.get("key") != key:
            raise CpwbError(f"{out / 'protocols' / name}.json: no record of protocol {name} with these settings")
        summary["protocols"][name] = {"status": "resumed", "seconds": record["seconds"]}
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
