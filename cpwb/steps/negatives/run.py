"""Hard negatives by adversarial paraphrasing: generate, filter for hardness, choose, append per anchor, resumably.

For each anchor (a neutral ParaDetox paraphrase or a neutral ToxiGen seed) a generator LM writes k non-toxic and k
toxic paraphrases through its chat template, with few-shot examples drawn from ParaDetox rows that are never
anchors (zero-shot, small models mostly copy the input). The candidates go through the filters of cpwb.steps.negatives.hardness,
scored by the toxicity scorer, MiniLM similarity and the NLL engine under the model that will be trained; the
hardest |P| positives and |N| negatives are kept, with ParaDetox's human paraphrases as an optional fallback.

Output folder: `pairs.jsonl` (the pairs schema, appended per anchor), `generation_log.jsonl` (every candidate with
its scores and fate, appended per anchor), `generate_config.yaml`, `prompts.json` (system prompts and few-shot
examples), `pairs_card.json` / `pairs_card.md` (counts, funnel, distributions) and `figures/hard_negatives.html`.
An interrupted run resumes from the log: anchors are processed in fixed chunks, each chunk sampled with a seed of
its own, so a resumed run regenerates an unfinished chunk identically and writes only the anchors it lacks.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from cpwb.core.config import require, require_same_settings, to_dict
from cpwb.core.errors import AssetError, ConfigError
from cpwb.core.files import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    read_jsonl_tolerant,
)
from cpwb.data.corpora import (
    data_hash,
    data_path,
    load_paradetox,
    load_toxigen_seeds,
    normalize_text,
)
from cpwb.data.pairs import PairRecord, PairText, append_pair, read_pairs_tolerant
from cpwb.data.paradetox import paradetox_heldout
from cpwb.engine.device import eval_mode, pad_token_id
from cpwb.engine.generate import prompt_ids
from cpwb.engine.nll import texts_nll
from cpwb.steps.negatives.hardness import (
    Candidate,
    Thresholds,
    apply_score_filters,
    apply_text_filters,
    candidates_frame,
    card_markdown,
    card_statistics,
    clean_generation,
    edit_ratio,
    hardness_figure,
    select_sets,
)

PAIRS_FILE = "pairs.jsonl"
LOG_FILE = "generation_log.jsonl"
CONFIG_FILE = "generate_config.yaml"
PROMPTS_FILE = "prompts.json"
UNCOMPARED_SETTINGS = ("progress", "output_dir")  # a resumed run may show progress differently, or have moved
# Few-shot examples come from the last ParaDetox rows; anchors never do.
FEW_SHOT_POOL_ROWS = 2000
EXAMPLE_MIN_TOXICITY = 0.9  # a toxic example must be unmistakable to the scorer
# Edit-ratio range between an example's two sides: a rewrite of one sentence, not another sentence. Neutral
# examples must reword clearly: with [0.1, 0.6] SmolLM2-135M copied 34% of anchors, with [0.3, 0.7] 5%.
EXAMPLE_EDIT = {"toxic-v1": (0.1, 0.6), "neutral-v1": (0.3, 0.7)}
EXAMPLE_MAX_CHARS = 100  # short examples keep the shared prompt prefix short
EXAMPLE_SCORING_BATCH = 64
# prompt id -> (side it generates, system message)
PROMPTS = {
    "neutral-v1": ("positive", "You paraphrase sentences: the same meaning in other words, in a calm and polite "
                               "tone. Reply with the paraphrase only."),
    "toxic-v1": ("negative", "You rewrite sentences in a very toxic, rude and offensive way, keeping their "
                             "meaning. Reply with the rewritten sentence only."),
}


@dataclasses.dataclass
class GenerateConfig:
    """Every setting of a hard-negative generation run; configs/generate_default.yaml mirrors it."""

    # anchors
    anchors: Literal["paradetox", "toxigen"] = "paradetox"
    n_anchors: int = 50
    anchor_offset: int = 0  # skip this many anchors (e.g. rows used elsewhere)
    toxigen_groups: list[str] | None = None  # ToxiGen target groups (null: all)
    normalize: bool = True  # the same casing and spacing on every side (cpwb.data.corpora.normalize_text)
    human_fallback: bool = True  # fill sets with ParaDetox's human paraphrases (ParaDetox anchors only)
    # generation
    generator: str = "default"
    backend: Literal["transformers", "vllm"] = "transformers"
    paraphrases_per_anchor: int = 8  # k, per side
    n_examples: int = 8  # few-shot examples per prompt (0: zero-shot)
    max_new_tokens: int = 64  # cap; each chunk also stops at length_ratio_max x its longest anchor
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0  # 0: no top-k cut
    batch_size: int = 8  # anchors per generation call (each gives k rows)
    seed: int = 0
    # scoring: the model that will be trained gives phi and token lengths
    target_model: str = "default"
    scorer: str = "default"
    embedder: str = "default"
    max_length: int = 128
    nll_batch_size: int = 16
    device: str = "auto"
    trust_remote_code: bool = False
    # filters (see cpwb.steps.negatives.hardness)
    t_neg: float = 0.5
    t_pos: float = 0.1
    s_min: float = 0.5
    min_edit: float = 0.1
    min_edit_negative: float = 0.0
    length_ratio_min: float = 0.5
    length_ratio_max: float = 2.0
    delta: float = 1.0
    # selection
    n_positives: int = 2
    n_negatives: int = 1
    output_dir: str = "outputs/generate"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n_anchors", "paraphrases_per_anchor", "max_new_tokens", "batch_size", "max_length",
                     "nll_batch_size", "n_positives", "n_negatives"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("anchor_offset", "n_examples", "top_k"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        require(self.temperature > 0, "temperature", f"must be > 0 (sampling), got {self.temperature}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(0 <= self.t_pos < self.t_neg <= 1, "t_neg", f"need 0 <= t_pos < t_neg <= 1, got t_pos={self.t_pos}, "
                                                          f"t_neg={self.t_neg}")
        require(-1 <= self.s_min < 1, "s_min", f"must be in [-1, 1), got {self.s_min}")
        for name in ("min_edit", "min_edit_negative"):
            require(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        require(0 < self.length_ratio_min < self.length_ratio_max, "length_ratio_max",
                f"need 0 < length_ratio_min < length_ratio_max, got {self.length_ratio_min}, {self.length_ratio_max}")
        require(self.delta > 0, "delta", f"must be > 0, got {self.delta}")
        require(not (self.human_fallback and self.anchors != "paradetox"), "human_fallback",
                "human paraphrases exist for ParaDetox anchors only; set human_fallback: false")
        for name in ("n_positives", "n_negatives"):
            require(self.human_fallback or getattr(self, name) <= self.paraphrases_per_anchor, name,
                    f"{getattr(self, name)} > paraphrases_per_anchor ({self.paraphrases_per_anchor}) can never be "
                    "filled without human_fallback")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
                f"must be auto, cpu, cuda[:N] or mps, got {self.device!r}")

    def thresholds(self) -> Thresholds:
        """The filter thresholds of this run."""
        return Thresholds(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Thresholds)})


# ---------------------------------------------------------------------------------------- anchors, prompts


@dataclasses.dataclass(frozen=True)
class Anchor:
    """A non-toxic statement to paraphrase, with the human paraphrases a fallback may use."""

    id: str
    text: str
    group: str | None = None
    human_positives: tuple[str, ...] = ()
    human_negatives: tuple[str, ...] = ()


def load_anchors(config: GenerateConfig) -> list[Anchor]:
    """The run's anchors, normalised, repeats skipped: ParaDetox rows outside the few-shot pool, or ToxiGen seeds.

    A ParaDetox anchor is the row's first neutral side; its other neutrals and its toxic source are the human
    texts a fallback may use. Rows of the canonical held-out pairs (`cpwb.data.pairs.paradetox_heldout`) are never
    anchors. A ToxiGen anchor is a neutral seed statement, with its target group.
    """
    clean = normalize_text if config.normalize else str.strip
    anchors: list[Anchor] = []
    if config.anchors == "paradetox":
        rows = load_paradetox()
        reserved = {r.id for r in paradetox_heldout()}  # the held-out pairs every analysis measures on
        for row in rows[:len(rows) - FEW_SHOT_POOL_ROWS]:
            if row.id in reserved:
                continue
            toxic = clean(row.toxic)
            neutrals = [n for n in dict.fromkeys(clean(n) for n in row.neutrals) if n and n != toxic]
            if neutrals:
                anchors.append(Anchor(row.id, neutrals[0], None, tuple(neutrals[1:]), (toxic,)))
    else:
        for seed in load_toxigen_seeds("neutral", config.toxigen_groups):
            anchors.append(Anchor(seed.id, clean(seed.text), seed.group))
    unique, seen = [], set()
    for anchor in anchors:
        if anchor.text and anchor.text not in seen:
            unique.append(anchor)
            seen.add(anchor.text)
    chosen = unique[config.anchor_offset:config.anchor_offset + config.n_anchors]
    if len(chosen) < config.n_anchors:
        raise ConfigError(f"only {len(unique)} {config.anchors} anchors are available (anchor_offset "
                          f"{config.anchor_offset}), {config.n_anchors} asked", field="n_anchors")
    return chosen


def few_shot_examples(config: GenerateConfig, scorer) -> dict[str, list[tuple[str, str]]]:
    """Seeded few-shot examples per prompt id from ParaDetox's last rows (never anchors).

    Toxic prompt: neutral -> toxic pairs whose toxic side the scorer calls toxic (>= EXAMPLE_MIN_TOXICITY) and
    whose neutral side is not (<= t_pos). Neutral prompt: two human neutral paraphrases of one row, both <= t_pos.
    Both kinds are rewrites of one sentence, with an edit ratio within EXAMPLE_EDIT.
    """
    clean = normalize_text if config.normalize else str.strip
    rows = [r for r in load_paradetox()[-FEW_SHOT_POOL_ROWS:] if len(r.toxic) <= EXAMPLE_MAX_CHARS]
    pairs = {"toxic-v1": [(clean(r.neutrals[0]), clean(r.toxic)) for r in rows if r.neutrals],
             "neutral-v1": [(clean(r.neutrals[0]), clean(r.neutrals[1])) for r in rows if len(r.neutrals) > 1]}
    bounds = {"toxic-v1": ((0.0, config.t_pos), (EXAMPLE_MIN_TOXICITY, 1.0)),
              "neutral-v1": ((0.0, config.t_pos), (0.0, config.t_pos))}
    rng = random.Random(config.seed)
    examples = {}
    for prompt_id, candidates in pairs.items():
        rng.shuffle(candidates)
        (s_low, s_high), (t_low, t_high) = bounds[prompt_id]
        edit_low, edit_high = EXAMPLE_EDIT[prompt_id]
        chosen: list[tuple[str, str]] = []
        for start in range(0, len(candidates), EXAMPLE_SCORING_BATCH):  # score only as many rows as needed
            if len(chosen) >= config.n_examples:
                break
            batch = candidates[start:start + EXAMPLE_SCORING_BATCH]
            sources, targets = scorer.score([s for s, _ in batch]), scorer.score([t for _, t in batch])
            chosen += [pair for pair, s, t in zip(batch, sources, targets)
                       if s_low <= s <= s_high and t_low <= t <= t_high
                       and edit_low <= edit_ratio(*pair) <= edit_high]
        if len(chosen) < config.n_examples:
            raise ConfigError(f"only {len(chosen)} ParaDetox rows fit as {prompt_id} examples", field="n_examples")
        examples[prompt_id] = chosen[:config.n_examples]
    return examples


# --------------------------------------------------------------------------------------------- generators


class Generator(Protocol):
    """Samples k continuations of each chat prompt given as token ids."""

    name: str
    tokenizer: Any

    def sample(self, rows: Sequence[Sequence[int]], k: int, seed: int, max_new_tokens: int) -> list[list[str]]:
        """For each prompt, k sampled continuations as text (special tokens skipped)."""
        ...


def _shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix common to every row, leaving each row at least one token of its own."""
    limit = min(len(row) for row in rows) - 1
    length = 0
    while length < limit and all(row[length] == rows[0][length] for row in rows):
        length += 1
    return length


class TransformersGenerator:
    """Batched sampling with transformers: shared prompt prefixes computed once, finished rows leave the batch.

    The prompts' common prefix (system message and few-shot examples) is run once and its key/value cache
    broadcast; each prompt's own tail is run once and broadcast to its k samples. Decoding then drops every row
    that has emitted its end token, so the work per step follows the rows still writing (a synchronous batch
    keeps computing finished rows until the longest is done). Rows are laid out [prefix][padding][own tail] with
    position ids from the attention mask, which gives the same tokens as left-padded prompts alone.
    """

    def __init__(self, model, tokenizer, name: str, temperature: float = 0.8, top_p: float = 0.95,
                 top_k: int = 0) -> None:
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.pad_id = pad_token_id(tokenizer)
        eos = model.generation_config.eos_token_id
        self.eos_ids = torch.tensor(sorted({tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
                                           - {None}))
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                           + ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
                                           + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))

    def _layout(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token ids and attention mask [B, T] of the rows as [prefix][pad][tail], and the prefix length."""
        common = _shared_prefix_length(rows)
        width = max(len(row) for row in rows) - common
        ids = torch.full((len(rows), common + width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[:, :common], mask[:, :common] = torch.tensor(list(rows[0][:common]), dtype=torch.long), 1
        for i, row in enumerate(rows):
            tail = list(row[common:])
            ids[i, ids.shape[1] - len(tail):], mask[i, ids.shape[1] - len(tail):] = torch.tensor(tail), 1
        return ids, mask, common

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, common: int, k: int):
        """The key/value cache of the prompts, each repeated k times, and the next-token logits of every row."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if common:
            self.model(input_ids=ids[:1, :common], past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(ids.shape[0])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids[:, common:], attention_mask=mask, position_ids=positions[:, common:],
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        cache.batch_repeat_interleave(k)
        return cache, logits.float().repeat_interleave(k, 0)

    @torch.no_grad()
    def sample(self, rows: Sequence[Sequence[int]], k: int, seed: int, max_new_tokens: int) -> list[list[str]]:
        """For each prompt (token ids), k samples; reproducible for the same rows, k, seed and length."""
        ids, mask, common = self._layout(rows)
        device = next(self.model.parameters()).device
        ids, mask, eos_ids = ids.to(device), mask.to(device), self.eos_ids.to(device)
        with eval_mode(self.model):
            cache, logits = self._prefill(ids, mask, common, k)
            mask = mask.repeat_interleave(k, 0)
            out = torch.full((mask.shape[0], max_new_tokens), self.pad_id, dtype=torch.long, device=device)
            active = torch.arange(mask.shape[0], device=device)
            generator = torch.Generator(device=device).manual_seed(seed)
            for step in range(max_new_tokens):
                probabilities = torch.softmax(self.warpers(None, logits), dim=-1)
                tokens = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
                out[active, step] = tokens
                writing = ~torch.isin(tokens, eos_ids)
                if step == max_new_tokens - 1 or not writing.any():
                    break
                if not writing.all():  # finished rows leave the batch and the cache
                    keep = writing.nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    active, mask, tokens = active[keep], mask[keep], tokens[keep]
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                logits = self.model(input_ids=tokens[:, None], attention_mask=mask,
                                    position_ids=mask.sum(-1, keepdim=True) - 1, past_key_values=cache,
                                    use_cache=True).logits[:, -1].float()
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [texts[i * k:(i + 1) * k] for i in range(len(rows))]


class VLLMGenerator:
    """The same interface on vLLM (GPU users generating at scale); needs the optional `vllm` package."""

    def __init__(self, config: GenerateConfig) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as error:
            raise AssetError("backend 'vllm' needs the optional package vllm (`pip install vllm`, on a CUDA "
                             "machine); use backend: transformers otherwise") from error
        from cpwb.engine.assets import resolve_model

        self._sampling_params = SamplingParams
        self._llm = LLM(model=resolve_model(config.generator), seed=config.seed, enable_prefix_caching=True,
                        trust_remote_code=config.trust_remote_code)
        self.tokenizer = self._llm.get_tokenizer()
        self.name = _model_label(config.generator)
        self.decoding = {"temperature": config.temperature, "top_p": config.top_p,
                         "top_k": config.top_k if config.top_k > 0 else -1}

    def sample(self, rows: Sequence[Sequence[int]], k: int, seed: int, max_new_tokens: int) -> list[list[str]]:
        """For each prompt (token ids), k samples from vLLM, seeded per call."""
        params = self._sampling_params(n=k, seed=seed, max_tokens=max_new_tokens, **self.decoding)
        outputs = self._llm.generate([{"prompt_token_ids": list(row)} for row in rows], params, use_tqdm=False)
        return [[choice.text for choice in output.outputs] for output in outputs]


def _model_label(name: str) -> str:
    """The provenance name of a model setting (the embedded default's real name for "default")."""
    from cpwb.engine.assets import DEFAULT_LM

    return DEFAULT_LM if name == "default" else name


@dataclasses.dataclass
class GenerationModels:
    """What a run needs loaded: the generator, the model to be trained (phi, token lengths) and the scorers."""

    generator: Generator
    target_model: Any
    target_tokenizer: Any
    scorer: Any
    embedder: Any


def load_models(config: GenerateConfig) -> GenerationModels:
    """Load the generator (sharing the target model when it is the same), the target model and the scorers."""
    from cpwb.engine.assets import load_causal_lm, load_tokenizer
    from cpwb.engine.device import pick_device
    from cpwb.engine.scoring import SentenceEmbedder, load_toxicity_scorer

    device = str(pick_device(config.device))
    target = load_causal_lm(config.target_model, device, trust_remote_code=config.trust_remote_code)
    target_tokenizer = load_tokenizer(config.target_model, trust_remote_code=config.trust_remote_code)
    if config.backend == "vllm":
        generator: Generator = VLLMGenerator(config)
    elif config.generator == config.target_model:
        generator = TransformersGenerator(target, target_tokenizer, _model_label(config.generator),
                                          config.temperature, config.top_p, config.top_k)
    else:
        generator = TransformersGenerator(
            load_causal_lm(config.generator, device, trust_remote_code=config.trust_remote_code),
            load_tokenizer(config.generator, trust_remote_code=config.trust_remote_code),
            _model_label(config.generator), config.temperature, config.top_p, config.top_k)
    return GenerationModels(generator, target, target_tokenizer, load_toxicity_scorer(config.scorer),
                            SentenceEmbedder.from_pretrained(config.embedder))


# ------------------------------------------------------------------------------------------------ one chunk


def chunk_seed(seed: int, chunk: int, prompt_index: int) -> int:
    """The sampling seed of one prompt kind in one chunk: independent of which chunks ran before."""
    return int(np.random.SeedSequence([seed, chunk, prompt_index]).generate_state(1)[0])


def _score(models: GenerationModels, anchors: Sequence[Anchor], candidates: Sequence[list[Candidate]],
           config: GenerateConfig) -> list[dict[str, float]]:
    """Fill toxicity, similarity, phi and tokens of the candidates that passed the text filters; anchors' own."""
    alive = [(i, c) for i, group in enumerate(candidates) for c in group if c.rejected_by is None]
    texts = [a.text for a in anchors] + [c.text for _, c in alive]
    toxicity = models.scorer.score(texts)
    vectors = models.embedder.embed(texts)
    nll = texts_nll(models.target_model, models.target_tokenizer, texts, batch_size=config.nll_batch_size,
                    max_length=config.max_length)
    for row, (i, candidate) in enumerate(alive, start=len(anchors)):
        candidate.scores.update(toxicity=float(toxicity[row]), similarity=float(vectors[row] @ vectors[i]),
                                phi=float(nll.phi[row]), tokens=int(nll.n_tokens[row]))
    return [{"toxicity": float(toxicity[i]), "phi": float(nll.phi[i]), "tokens": int(nll.n_tokens[i])}
            for i in range(len(anchors))]


def process_chunk(anchors: Sequence[Anchor], models: GenerationModels, examples: dict[str, list[tuple[str, str]]],
                  config: GenerateConfig, chunk: int) -> list[dict[str, Any]]:
    """Generate, filter and choose for one chunk of anchors: one generation-log record per anchor."""
    generator, thresholds = models.generator, config.thresholds()
    longest = max(len(generator.tokenizer(a.text, add_special_tokens=False)["input_ids"]) for a in anchors)
    max_new_tokens = min(config.max_new_tokens, math.ceil(config.length_ratio_max * longest) + 1)
    candidates: list[list[Candidate]] = [[] for _ in anchors]
    for prompt_index, (prompt_id, (side, system)) in enumerate(PROMPTS.items()):
        rows = [prompt_ids(generator.tokenizer, a.text, chat=True, system=system, examples=examples[prompt_id])
                for a in anchors]
        samples = generator.sample(rows, config.paraphrases_per_anchor, chunk_seed(config.seed, chunk, prompt_index),
                                   max_new_tokens)
        for group, raws in zip(candidates, samples):
            group += [Candidate(clean_generation(raw, config.normalize), side, "generated", generator.name, prompt_id,
                                raw) for raw in raws]
    for anchor, group in zip(anchors, candidates):
        if config.human_fallback:
            group += [Candidate(t, "positive", "human", raw=t) for t in anchor.human_positives]
            group += [Candidate(t, "negative", "human", raw=t) for t in anchor.human_negatives]
        apply_text_filters(anchor.text, group, thresholds)
    records = []
    for anchor, group, own in zip(anchors, candidates, _score(models, anchors, candidates, config)):
        apply_score_filters(group, own["tokens"], thresholds)
        prototype, reason = select_sets(group, own["phi"], config.n_positives, config.n_negatives, thresholds)
        records.append({"id": anchor.id, "anchor": anchor.text, "group": anchor.group, "chunk": chunk,
                        "kept": reason is None, "reason": reason, "prototype_phi": prototype, "anchor_scores": own,
                        "candidates": [c.to_dict() for c in group]})
    return records


def pair_record(record: dict[str, Any], config: GenerateConfig) -> PairRecord:
    """The pairs-schema record of a kept anchor: its chosen texts, hardest first, with provenance and scores."""
    def chosen(side: str) -> tuple[PairText, ...]:
        picked = sorted((c for c in record["candidates"] if c["selected"] and c["side"] == side),
                        key=lambda c: c["rank"])
        return tuple(PairText(c["text"], c["source"], c["generator"], c["prompt_id"], c["scores"]) for c in picked)

    meta = {"dataset": config.anchors, "normalized": config.normalize, "prototype_phi": record["prototype_phi"],
            "anchor_phi": record["anchor_scores"]["phi"], "anchor_toxicity": record["anchor_scores"]["toxicity"],
            "target_model": _model_label(config.target_model), "seed": config.seed}
    return PairRecord(record["id"], record["anchor"], chosen("positive"), chosen("negative"), record["group"], meta)


# ------------------------------------------------------------------------------------------------ the run


def _claim_output_dir(out: Path, config: GenerateConfig) -> None:
    """Record the run's settings in a new folder, or check that an existing folder was started with the same."""
    saved = out / CONFIG_FILE
    settings = {k: v for k, v in to_dict(config).items() if k not in UNCOMPARED_SETTINGS}
    if saved.is_file():
        require_same_settings(saved, settings, UNCOMPARED_SETTINGS, what="a generation run")
        return
    if (out / LOG_FILE).exists() or (out / PAIRS_FILE).exists():
        raise ConfigError(f"{out} already holds {PAIRS_FILE} or {LOG_FILE} without {CONFIG_FILE}: not a run of "
                          "cpwb generate; choose another output_dir", out, field="output_dir")
    atomic_write_text(saved, yaml.safe_dump(settings, sort_keys=True))


def _read_log(path: Path) -> list[dict[str, Any]]:
    """The generation log without a torn last line (cut atomically when a crash left one, so appends stay clean)."""
    records = read_jsonl_tolerant(path)
    if path.exists() and not path.read_bytes().endswith(b"\n") and path.stat().st_size:
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))
    return records


def _prompts(out: Path, config: GenerateConfig, models: GenerationModels | None) -> dict[str, Any]:
    """System prompts and few-shot examples of the run: read back when the run already chose them."""
    path = out / PROMPTS_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    from cpwb.engine.scoring import load_toxicity_scorer

    scorer = models.scorer if models is not None else load_toxicity_scorer(config.scorer)
    examples = few_shot_examples(config, scorer)
    prompts = {p: {"side": side, "system": system, "examples": [list(e) for e in examples[p]]}
               for p, (side, system) in PROMPTS.items()}
    atomic_write_json(path, prompts)
    return prompts


def run_generation(config: GenerateConfig, models: GenerationModels | None = None,
                   on_anchor: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Generate, filter and choose for every anchor, appending per anchor and resuming a stopped run; the pairs path.

    `models` defaults to `load_models(config)` (loaded only if some anchor is left); `on_anchor` is called with each
    anchor's log record after it is written. Ends by writing the dataset card and its figure.
    """
    out = Path(config.output_dir)
    _claim_output_dir(out, config)
    pairs_path, log_path = out / PAIRS_FILE, out / LOG_FILE
    log = _read_log(log_path)
    done = {r["id"] for r in log}
    anchors = load_anchors(config)
    chunks = [anchors[i:i + config.batch_size] for i in range(0, len(anchors), config.batch_size)]
    todo = [c for c, chunk in enumerate(chunks) if any(a.id not in done for a in chunk)]
    if todo:
        models = models or load_models(config)
        examples = {p: [tuple(e) for e in v["examples"]] for p, v in _prompts(out, config, models).items()}
        written = {r.id for r in read_pairs_tolerant(pairs_path)}
        with tqdm(total=len(anchors), initial=len(done), desc="anchors", disable=not config.progress) as bar:
            for c in todo:
                for record in process_chunk(chunks[c], models, examples, config, c):
                    if record["id"] in done:
                        continue
                    if record["kept"] and record["id"] not in written:
                        append_pair(pairs_path, pair_record(record, config))
                    append_jsonl(log_path, record)
                    log.append(record)
                    done.add(record["id"])
                    bar.update(1)
                    if on_anchor is not None:
                        on_anchor(record)
    if not pairs_path.exists():
        atomic_write_text(pairs_path, "")
    write_card(out, config, log, _prompts(out, config, models))
    return pairs_path


# ------------------------------------------------------------------------------------------------ the card


def write_card(out: Path, config: GenerateConfig, log: Sequence[dict[str, Any]], prompts: dict[str, Any]
               ) -> dict[str, Any]:
    """Write pairs_card.json, pairs_card.md and figures/hard_negatives.html for a run's log; returns the card."""
    from cpwb.analysis.plots import save_figure

    source = data_path("paradetox" if config.anchors == "paradetox" else "toxigen_seeds")
    card = {"config": to_dict(config), "data_hash": data_hash([source]), "prompts": prompts,
            "models": {"generator": _model_label(config.generator), "target_model": _model_label(config.target_model)},
            "files": {"pairs": PAIRS_FILE, "log": LOG_FILE}, **card_statistics(log)}
    atomic_write_json(out / "pairs_card.json", card)
    atomic_write_text(out / "pairs_card.md", card_markdown(card))
    save_figure(hardness_figure(candidates_frame(log), config.thresholds()), out, "hard_negatives")
    return card


def read_log(output_dir: str | Path) -> list[dict[str, Any]]:
    """The generation log of a run folder: one record per anchor processed so far, with every candidate."""
    return read_jsonl_tolerant(Path(output_dir) / LOG_FILE)


def describe_run(output_dir: str | Path) -> str:
    """A few lines on a finished run, from its card: what the CLI prints."""
    card = json.loads((Path(output_dir) / "pairs_card.json").read_text(encoding="utf-8"))
    counts, quantiles = card["counts"], card["quantiles"]

    def median(key: str) -> str:
        value = (quantiles.get(key) or {}).get("p50")
        return "n/a" if value is None else f"{value:.3f}"

    return (f"anchors: {counts['anchors']}, kept {counts['anchors_kept']}, dropped {counts['anchors_dropped']} "
            f"{counts['dropped_by_reason']}\nnegatives chosen: median toxicity {median('negatives selected toxicity')}"
            f", median similarity {median('negatives selected similarity')}, median phi gap "
            f"{median('negatives selected phi_gap')}\npairs: {Path(output_dir) / PAIRS_FILE}\n"
            f"card:  {Path(output_dir) / 'pairs_card.md'}")


def main(argv: list[str] | None = None) -> int:
    """`python -m cpwb.steps.negatives.run --config FILE [-p key=value]`: the same as `cpwb generate`."""
    from cpwb.app.cli import main as cli_main

    return cli_main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
