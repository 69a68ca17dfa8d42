"""Per-pair statistics of toxic texts and their neutral paraphrases: toxicity, similarity and phi of each side."""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from cpwb.engine.adapters import base_of
from cpwb.engine.nll import texts_nll
from cpwb.engine.scoring import SentenceEmbedder, ToxicityScorer
from cpwb.steps.evaluation.likelihood import phi_gap


def paired_table(model, tokenizer, scorer: ToxicityScorer, embedder: SentenceEmbedder, toxic: Sequence[str],
                 neutral: Sequence[str], batch_size: int = 16, progress: bool = False) -> pd.DataFrame:
    """One row per (toxic, neutral) pair: both texts, their toxicity, their similarity, their phi and the gap."""
    gap = phi_gap(model, tokenizer, toxic, neutral, batch_size=batch_size, progress=progress)
    return pd.DataFrame({
        "toxic": list(toxic), "neutral": list(neutral),
        "tox_toxic": scorer.score(toxic), "tox_neutral": scorer.score(neutral),
        "similarity": embedder.similarity(toxic, neutral),
        "phi_toxic": gap["phi_toxic"], "phi_neutral": gap["phi_neutral"], "phi_gap": gap["gaps"],
    })


def phi_before_after(peft_model, tokenizer, records: Sequence, batch_size: int = 16) -> pd.DataFrame:
    """phi of each record's first negative and first positive under the base (adapter or intervention off) and with
    it."""
    negatives = [r.negatives[0].text for r in records]
    positives = [r.positives[0].text for r in records]
    texts = negatives + positives
    with base_of(peft_model):
        before = texts_nll(peft_model, tokenizer, texts, batch_size=batch_size).phi
    after = texts_nll(peft_model, tokenizer, texts, batch_size=batch_size).phi
    n = len(records)
    table = pd.DataFrame({"id": [r.id for r in records], "negative": negatives, "positive": positives,
                          "phi_neg_before": before[:n], "phi_pos_before": before[n:],
                          "phi_neg_after": after[:n], "phi_pos_after": after[n:]})
    table["gap_before"] = table.phi_neg_before - table.phi_pos_before
    table["gap_after"] = table.phi_neg_after - table.phi_pos_after
    return table
