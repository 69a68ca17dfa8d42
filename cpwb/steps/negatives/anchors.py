"""What the generator paraphrases and how it is asked: the anchors (ParaDetox neutral sides or ToxiGen neutral
seeds, never a canonical held-out pair), the system prompts, and few-shot examples from ParaDetox rows that are
never anchors (zero-shot, small models mostly copy the input)."""
from __future__ import annotations

import dataclasses
import random

from cpwb.core.errors import ConfigError
from cpwb.data.corpora import load_paradetox, load_toxigen_seeds, normalize_text
from cpwb.data.paradetox import paradetox_heldout
from cpwb.steps.negatives.config import GenerateConfig
from cpwb.steps.negatives.hardness import edit_ratio

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
