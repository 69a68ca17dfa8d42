"""Hard negatives by adversarial paraphrasing: generate, filter for hardness, choose, append per anchor, resumably.

For each anchor (a neutral ParaDetox paraphrase or a neutral ToxiGen seed) a generator LM writes k non-toxic and k
toxic paraphrases through its chat template, with few-shot examples drawn from ParaDetox rows that are never
anchors (zero-shot, small models mostly copy the input; see cpwb.steps.negatives.anchors). The candidates go through
the filters of cpwb.steps.negatives.hardness, scored by the toxicity scorer, MiniLM similarity and the NLL engine under
the model that will be trained; the hardest |P| positives and |N| negatives are kept, with ParaDetox's human
paraphrases as an optional fallback.

Output folder: `pairs.jsonl` (the pairs schema, appended per anchor), `generation_log.jsonl` (every candidate with
its scores and fate, appended per anchor), `generate_config.yaml`, `prompts.json` (system prompts and few-shot
examples), `pairs_card.json` / `pairs_card.md` (counts, funnel, distributions) and `figures/hard_negatives.html`.
An interrupted run resumes from the log: anchors are processed in fixed chunks, each chunk sampled with a seed of
its own, so a resumed run regenerates an unfinished chunk identically and writes only the anchors it lacks."""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from cpwb.core.config import require_same_settings, to_dict
from cpwb.core.errors import AssetError, ConfigError
from cpwb.core.files import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl_tolerant
from cpwb.data.corpora import data_hash, data_path
from cpwb.data.pairs import PairRecord, PairText, append_pair, read_pairs_tolerant
from cpwb.engine.assets import model_label
from cpwb.engine.generate import prompt_ids
from cpwb.engine.nll import texts_nll
from cpwb.engine.sampler import Generator, TransformersGenerator
from cpwb.steps.negatives.anchors import PROMPTS, Anchor, few_shot_examples, load_anchors
from cpwb.steps.negatives.config import GenerateConfig
from cpwb.steps.negatives.hardness import (
    Candidate,
    apply_score_filters,
    apply_text_filters,
    candidates_frame,
    card_markdown,
    card_statistics,
    clean_generation,
    hardness_figure,
    select_sets,
)

PAIRS_FILE = "pairs.jsonl"


LOG_FILE = "generation_log.jsonl"


CONFIG_FILE = "generate_config.yaml"


PROMPTS_FILE = "prompts.json"


UNCOMPARED_SETTINGS = ("progress", "output_dir")  # a resumed run may show progress differently, or have moved


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
        self.name = model_label(config.generator)
        self.decoding = {"temperature": config.temperature, "top_p": config.top_p,
                         "top_k": config.top_k if config.top_k > 0 else -1}

    def sample(self, rows: Sequence[Sequence[int]], k: int, seed: int, max_new_tokens: int) -> list[list[str]]:
        """For each prompt (token ids), k samples from vLLM, seeded per call."""
        params = self._sampling_params(n=k, seed=seed, max_tokens=max_new_tokens, **self.decoding)
        outputs = self._llm.generate([{"prompt_token_ids": list(row)} for row in rows], params, use_tqdm=False)
        return [[choice.text for choice in output.outputs] for output in outputs]


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
        generator = TransformersGenerator(target, target_tokenizer, model_label(config.generator),
                                          config.temperature, config.top_p, config.top_k)
    else:
        generator = TransformersGenerator(
            load_causal_lm(config.generator, device, trust_remote_code=config.trust_remote_code),
            load_tokenizer(config.generator, trust_remote_code=config.trust_remote_code),
            model_label(config.generator), config.temperature, config.top_p, config.top_k)
    return GenerationModels(generator, target, target_tokenizer, load_toxicity_scorer(config.scorer),
                            SentenceEmbedder.from_pretrained(config.embedder))


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
            "target_model": model_label(config.target_model), "seed": config.seed}
    return PairRecord(record["id"], record["anchor"], chosen("positive"), chosen("negative"), record["group"], meta)


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


def write_card(out: Path, config: GenerateConfig, log: Sequence[dict[str, Any]], prompts: dict[str, Any]
               ) -> dict[str, Any]:
    """Write pairs_card.json, pairs_card.md and figures/hard_negatives.html for a run's log; returns the card."""
    from cpwb.core.figures import save_figure

    source = data_path("paradetox" if config.anchors == "paradetox" else "toxigen_seeds")
    card = {"config": to_dict(config), "data_hash": data_hash([source]), "prompts": prompts,
            "models": {"generator": model_label(config.generator), "target_model": model_label(config.target_model)},
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
