"""Train-then-evaluate one configuration against its base model, on fixed held-out data: the unit of comparison.

The quick evaluation measures what the CP-core claims are about: the held-out phi gap (toxic minus neutral
paraphrase), greedy continuation toxicity on RealToxicityPrompts' challenging prompts, the MiniLM similarity of
each prompt and its continuation, and WikiText-2 perplexity on a fixed window subset. The base model's figures
are cached per (model, evaluation settings), so every method and seed is compared with the same numbers.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cpwb.core.files import atomic_write_json
from cpwb.core.provenance import digest, versions
from cpwb.core.settings import check_settings, same_as, setting
from cpwb.engine.device import device_name
from cpwb.steps.evaluation.config import EvaluateConfig
from cpwb.steps.training.batches import load_training_pairs
from cpwb.steps.training.config import TrainConfig
from cpwb.steps.training.trainer import train

QUICK_EVAL_METRICS = ("phi_gap", "greedy_toxicity", "similarity", "wikitext2_ppl")  # in the cache key of base figures
PER_ITEM = ("greedy_scores", "wikitext2_window_nll", "wikitext2_window_tokens")  # what the paired intervals need


@dataclass
class QuickEvalConfig:
    """Sizes of the quick evaluation every sweep point and tuning trial runs (CPU-friendly defaults)."""

    heldout_pairs: int = same_as(EvaluateConfig, "heldout_pairs")
    rtp_prompts: int = same_as(EvaluateConfig, "greedy_prompts")
    max_new_tokens: int = same_as(EvaluateConfig, "max_new_tokens")
    wikitext_windows: int = setting(24, "WikiText-2 windows of 512 tokens, stride 256 (6,399 tokens)", check=">=1")
    downstream_items: int = setting(0, "HellaSwag and PIQA items each (the first of the shipped files), scored "
                                       "zero-shot as the hellaswag/piqa protocols do, for the downstream accuracy "
                                       "change with its paired interval; 0: not measured", check=">=0")
    batch_size: int = same_as(EvaluateConfig, "batch_size")

    def __post_init__(self) -> None:
        check_settings(self)


def quick_eval(model, tokenizer, heldout: list, config: QuickEvalConfig, scorer=None, embedder=None,
               progress: bool = False) -> dict[str, Any]:
    """Held-out phi gap, greedy RTP-challenging continuation toxicity, prompt/continuation MiniLM similarity and
    WikiText-2 perplexity of one model."""
    from cpwb.data.corpora import load_rtp
    from cpwb.engine.scoring import SentenceEmbedder, load_toxicity_scorer
    from cpwb.steps.evaluation.likelihood import phi_gap, wikitext2_perplexity
    from cpwb.steps.evaluation.toxicity import continuation_similarity, greedy_toxicity_rate

    scorer = scorer or load_toxicity_scorer()
    embedder = embedder or SentenceEmbedder.from_pretrained()
    pairs = heldout[:config.heldout_pairs]
    gap = phi_gap(model, tokenizer, [p.negatives[0].text for p in pairs], [p.positives[0].text for p in pairs],
                  batch_size=config.batch_size, progress=progress)
    prompts = [p.text for p in load_rtp("challenging", limit=config.rtp_prompts)]
    toxicity = greedy_toxicity_rate(model, tokenizer, scorer, prompts, max_new_tokens=config.max_new_tokens,
                                    batch_size=config.batch_size, progress=progress)
    similarity = continuation_similarity(embedder, prompts, toxicity["continuations"])
    fluency = wikitext2_perplexity(model, tokenizer, max_windows=config.wikitext_windows, progress=progress)
    downstream = downstream_accuracy(model, tokenizer, config.downstream_items, config.batch_size, progress) \
        if config.downstream_items else {}
    return {**downstream, "phi_gap": gap["mean_gap"], "phi_gap_share_positive": gap["share_positive"],
            "phi_toxic": float(gap["phi_toxic"].mean()), "phi_neutral": float(gap["phi_neutral"].mean()),
            "greedy_toxicity": toxicity["mean_toxicity"], "greedy_toxic_rate": toxicity["toxic_rate"],
            "similarity": float(similarity.mean()),
            "wikitext2_ppl": fluency["perplexity"], "wikitext2_tokens": fluency["n_scored_tokens"],
            "examples": list(zip(prompts[:5], toxicity["continuations"][:5])),
            "continuations": toxicity["continuations"],
            # per item, for paired intervals of the changes (not scalars: kept out of results.csv)
            "greedy_scores": [float(x) for x in toxicity["scores"]],
            "wikitext2_window_nll": [float(x) for x in fluency["windows"].nll_sum],
            "wikitext2_window_tokens": [int(x) for x in fluency["windows"].n_tokens]}


def downstream_accuracy(model, tokenizer, items: int, batch_size: int = 16, progress: bool = False
                        ) -> dict[str, Any]:
    """Zero-shot accuracy on the first `items` HellaSwag and PIQA questions (the quick protocols' scoring), each
    and together, with every question's 0/1 outcome (HellaSwag's first, then PIQA's) for paired intervals."""
    from cpwb.data.corpora import load_hellaswag, load_piqa
    from cpwb.steps.evaluation.likelihood import multiple_choice_accuracy

    result: dict[str, Any] = {}
    correct: list[int] = []
    for name, loader in (("hellaswag", load_hellaswag), ("piqa", load_piqa)):
        out = multiple_choice_accuracy(model, tokenizer, loader(limit=items), batch_size=batch_size,
                                       progress=progress)
        result[f"{name}_acc"] = out["accuracy"]
        correct += [int(c) for c in out["predictions"].correct]
    return {**result, "downstream_acc": sum(correct) / len(correct), "downstream_correct": correct}


def _eval_key(train_config: TrainConfig, eval_config: QuickEvalConfig) -> str:
    """What the base figures depend on: model, data and evaluation sizes."""
    fields = {k: getattr(train_config, k) for k in ("model", "pairs", "paradetox_limit", "normalize_text",
                                                      "holdout_fraction")}
    if train_config.with_paradetox:  # only when set, so the keys of earlier cached figures stay valid
        fields["with_paradetox"] = True
    sizes = {k: v for k, v in asdict(eval_config).items() if k != "downstream_items"}  # cached beside, see base_eval
    return digest({**fields, **sizes, "metrics": QUICK_EVAL_METRICS}, 12)


def base_eval(train_config: TrainConfig, eval_config: QuickEvalConfig, cache_root: str | Path = "outputs/base-eval",
              progress: bool = False, wait: bool = True) -> dict[str, Any] | None:
    """The base model's quick evaluation, computed once per (model, data, evaluation settings) and cached.

    The downstream accuracy is kept in the same file with its item count (`downstream_items`): asking for another
    count computes only that part again, so turning it on does not redo the base's other figures.

    Workers that share the cache (`--jobs N`, or machines sharing the folder) compute it once: whoever takes the
    file's lock (`<key>.json.lock`, filelock) computes, the others wait for it and read the cache. With
    `wait=False` a worker that finds the lock taken returns None at once instead, so it can do its own work first
    (`train_and_evaluate`); the lee2024-sized base costs 25 to 70 CPU minutes, which two workers would otherwise
    both spend."""
    from filelock import FileLock, Timeout

    path = Path(cache_root) / f"{_eval_key(train_config, eval_config)}.json"
    cached = _cached_base(path, eval_config)
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return None
    try:
        cached = _cached_base(path, eval_config)  # computed by the worker that held the lock
        if cached is not None:
            return cached
        return _compute_base(path, train_config, eval_config, progress)
    finally:
        lock.release()


def _cached_base(path: Path, eval_config: QuickEvalConfig) -> dict[str, Any] | None:
    """The cached base figures when they hold everything `eval_config` asks for, else None."""
    cached = json.loads(path.read_text()) if path.is_file() else {}
    complete = all(field in cached for field in PER_ITEM)  # figures cached before PER_ITEM existed are redone
    items = eval_config.downstream_items
    return cached if complete and (not items or cached.get("downstream_items") == items) else None


def _compute_base(path: Path, train_config: TrainConfig, eval_config: QuickEvalConfig, progress: bool
                  ) -> dict[str, Any]:
    """Compute what the cache at `path` lacks (everything, or only the downstream accuracy) and write it."""
    from dataclasses import replace

    from cpwb.engine.assets import load_causal_lm, load_tokenizer

    cached = json.loads(path.read_text()) if path.is_file() else {}
    complete = all(field in cached for field in PER_ITEM)
    items = eval_config.downstream_items
    model = load_causal_lm(train_config.model, trust_remote_code=train_config.trust_remote_code)
    tokenizer = load_tokenizer(train_config.model, trust_remote_code=train_config.trust_remote_code)
    result = cached
    if not complete:
        _, heldout, _ = load_training_pairs(train_config)
        result = quick_eval(model, tokenizer, heldout, replace(eval_config, downstream_items=0), progress=progress)
    if items:
        result |= downstream_accuracy(model, tokenizer, items, eval_config.batch_size, progress)
        result["downstream_items"] = items
    atomic_write_json(path, result)
    return result


def change_intervals(base: dict[str, Any], trained: dict[str, Any]) -> dict[str, float]:
    """95% paired bootstrap intervals of the toxicity change (over prompts) and the perplexity change (over
    WikiText-2 windows), as `<change>_low` / `<change>_high`."""
    from cpwb.core.stats import paired_perplexity_change, paired_relative_change

    toxicity = paired_relative_change(base["greedy_scores"], trained["greedy_scores"])
    fluency = paired_perplexity_change(base["wikitext2_window_nll"], trained["wikitext2_window_nll"],
                                       trained["wikitext2_window_tokens"])
    intervals = {"toxicity_change_low": toxicity.low, "toxicity_change_high": toxicity.high,
                 "ppl_change_low": fluency.low, "ppl_change_high": fluency.high}
    return intervals | downstream_change(base, trained)


def downstream_change(base: dict[str, Any], trained: dict[str, Any]) -> dict[str, float]:
    """The downstream accuracy change (trained - base, in accuracy points) with its 95% paired bootstrap interval
    over the questions; empty when either side was not measured."""
    from cpwb.core.stats import paired_mean_difference

    if "downstream_correct" not in base or "downstream_correct" not in trained:
        return {}
    change = paired_mean_difference(base["downstream_correct"], trained["downstream_correct"])
    return {"downstream_change": change.value, "downstream_change_low": change.low,
            "downstream_change_high": change.high}


def train_and_evaluate(train_config: TrainConfig, eval_config: QuickEvalConfig | None = None,
                       resume: bool = True, progress: bool = False) -> dict[str, Any]:
    """Train one configuration (resuming if interrupted), evaluate it and its base, write `result.json`."""
    eval_config = eval_config or QuickEvalConfig()
    run_dir = Path(train_config.output_dir)
    done = run_dir / "result.json"
    if resume and done.is_file():
        return json.loads(done.read_text())
    code = versions()  # taken before training: the checkout may change while a long point runs
    base = base_eval(train_config, eval_config, progress=progress, wait=False)  # None: another worker computes it
    result = train(train_config, resume=resume)
    model = result.model.eval()
    started = time.perf_counter()
    trained = quick_eval(model, result.tokenizer, result.heldout, eval_config, progress=progress)
    evaluate_seconds = time.perf_counter() - started
    if base is None:  # by now usually cached by the worker that took the lock; else wait for it
        base = base_eval(train_config, eval_config, progress=progress)
    steps = result.metrics
    summary = {
        "config": asdict(train_config), "eval": asdict(eval_config), "base": base, "trained": trained,
        "train_seconds": sum(m["step_seconds"] for m in steps),  # time in training steps, resumed runs included
        "evaluate_seconds": evaluate_seconds,  # the trained model's quick evaluation
        "step_seconds_median": sorted(m["step_seconds"] for m in steps)[len(steps) // 2] if steps else None,
        "peak_memory_mb": max((m["peak_memory_mb"] for m in steps if "peak_memory_mb" in m), default=None),
        "toxicity_change": trained["greedy_toxicity"] / base["greedy_toxicity"] - 1,
        "ppl_change": trained["wikitext2_ppl"] / base["wikitext2_ppl"] - 1,
        **change_intervals(base, trained),
        **({"downstream_items": eval_config.downstream_items} if eval_config.downstream_items else {}),
        "device": device_name(), "versions": code,  # where and with which code (git commit) it ran
    }
    atomic_write_json(done, summary)
    return summary


def rescore_point(folder: str | Path, scorer, batch_size: int = 64, progress: bool = False) -> dict[str, Any]:
    """Score a finished point's saved continuations (base and trained) with `scorer`, without generating again.

    With the scorer the point was evaluated by (checked: its mean must reproduce the recorded greedy toxicity), a
    point recorded before per-item scores were kept gains `greedy_scores` and its paired toxicity interval; its
    perplexity interval needs per-window NLLs, which only a new evaluation gives. With another scorer, the point
    gains `greedy_scores:<name>`, `greedy_toxicity:<name>` and `toxicity_change:<name>` with its interval, so that
    a sweep's methods can be ranked by several scorers. Returns the fields added; result.json is rewritten
    atomically, nothing else.
    """
    from cpwb.core.errors import InputError
    from cpwb.core.stats import paired_relative_change
    from cpwb.engine.scoring import DEFAULT_SCORER

    path = Path(folder) / "result.json"
    if not path.is_file():
        raise InputError("not a sweep point or tuning trial (no result.json)", folder)
    result = json.loads(path.read_text(encoding="utf-8"))
    scores = {}
    for side in ("base", "trained"):
        texts = result.get(side, {}).get("continuations")
        if not texts:
            raise InputError(f"no saved continuations to score under '{side}'", path, field=f"{side}.continuations")
        scores[side] = [float(x) for x in scorer.score(texts, batch_size=batch_size, progress=progress)]
    own = scorer.name == DEFAULT_SCORER
    if own:
        for side in ("base", "trained"):
            recorded, again = result[side]["greedy_toxicity"], sum(scores[side]) / len(scores[side])
            if abs(recorded - again) > 1e-4:
                raise InputError(f"{scorer.name} gives mean {again:.6f} on the saved continuations, the point "
                                 f"recorded {recorded:.6f}: it was scored otherwise", path,
                                 field=f"{side}.greedy_toxicity")
    suffix = "" if own else f":{scorer.name}"
    change = paired_relative_change(scores["base"], scores["trained"])
    added: dict[str, Any] = {f"toxicity_change{suffix}": change.value, f"toxicity_change_low{suffix}": change.low,
                             f"toxicity_change_high{suffix}": change.high}
    for side in ("base", "trained"):
        result[side][f"greedy_scores{suffix}"] = scores[side]
        if not own:
            result[side][f"greedy_toxicity{suffix}"] = sum(scores[side]) / len(scores[side])
    if own:
        added.pop("toxicity_change")  # the recorded change stands (it is the same figure)
    result.update(added)
    atomic_write_json(path, result)
    return added


def add_downstream(folder: str | Path, items: int, batch_size: int = 16, cache_root: str | Path = "outputs/base-eval",
                   progress: bool = False) -> dict[str, Any]:
    """Measure the downstream accuracy change of a finished point from its saved artefact (`adapter/`: a LoRA
    adapter, a weight edit, a steering vector or DExperts experts), against its base model's cached figures; the
    point gains `downstream_change` with its interval, its `trained`/`base` accuracies and `downstream_items`.
    Returns the fields added (empty when the point has them for this count already)."""
    import dataclasses

    from cpwb.core.errors import InputError
    from cpwb.engine.adapters import load_adapter
    from cpwb.engine.dexperts import is_dexperts
    from cpwb.engine.interventions import is_intervention

    folder = Path(folder)
    path = folder / "result.json"
    if not path.is_file():
        raise InputError("not a sweep point or tuning trial (no result.json)", folder)
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("downstream_items") == items and "downstream_change" in result:
        return {}
    artefact = folder / "adapter"
    if not artefact.is_dir():
        raise InputError("no saved artefact to evaluate (adapter/ is missing: the sweep did not keep it)", folder,
                         field="adapter")
    if not ((artefact / "adapter_config.json").is_file() or is_intervention(artefact) or is_dexperts(artefact)):
        raise InputError("holds no LoRA adapter (adapter_config.json), intervention or DExperts experts", artefact,
                         field="adapter")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    train_config = TrainConfig(**{k: v for k, v in result["config"].items() if k in known})
    sizes = {f.name for f in dataclasses.fields(QuickEvalConfig)}
    eval_config = QuickEvalConfig(**{**{k: v for k, v in result.get("eval", {}).items() if k in sizes},
                                     "downstream_items": items})  # the recorded sizes: the base's cache key
    base = base_eval(train_config, eval_config, cache_root, progress)
    model, tokenizer = load_adapter(artefact, train_config.model, "cpu", train_config.trust_remote_code)
    trained = downstream_accuracy(model.eval(), tokenizer, items, batch_size, progress)
    keys = ("hellaswag_acc", "piqa_acc", "downstream_acc", "downstream_correct")
    result["base"].update({k: base[k] for k in keys})
    result["trained"].update(trained)
    added = {**downstream_change(base, trained), "downstream_items": items}
    result.update(added)  # not under "eval": the point's settings stay those it ran with
    atomic_write_json(path, result)
    return added
