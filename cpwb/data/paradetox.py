"""CP pairs from ParaDetox, the seeded held-out split, and the canonical held-out pairs every analysis measures on."""
from __future__ import annotations

import random

from cpwb.core.errors import InputError
from cpwb.data.corpora import ParaDetoxPair, load_paradetox, normalize_text
from cpwb.data.pairs import PairRecord, PairText

# The canonical held-out ParaDetox pairs: a seeded 10% of the pairs made from the first 4,000 rows (normalised).
# Training never sees them (whatever pairs it is given) and every analysis measures on them.
PARADETOX_ROWS = 4000
HOLDOUT_FRACTION = 0.1


def pairs_from_paradetox(pairs: list[ParaDetoxPair], normalize: bool = True, n_negatives_from_others: int = 0,
                         seed: int = 0) -> list[PairRecord]:
    """CP pairs from ParaDetox: anchor = first neutral, positives = the neutrals, negative = the toxic source.

    With `normalize` both sides go through normalize_text (removes the case/tokenisation confound). Neutrals
    identical to their toxic source (after normalising) or to an earlier neutral are dropped, and rows left with no
    neutral are skipped. `n_negatives_from_others` adds that many toxic sentences of other rows (seeded) as extra
    negatives; meta.negative_provenance says, per negative, "paired" or "random_negative:<row id>".
    """
    if not 0 <= n_negatives_from_others < max(len(pairs), 1):
        raise InputError(f"must be in 0..{max(len(pairs) - 1, 0)}, got {n_negatives_from_others}",
                         field="n_negatives_from_others")
    clean = normalize_text if normalize else str.strip
    rng = random.Random(seed)
    records = []
    for index, pair in enumerate(pairs):
        toxic = clean(pair.toxic)
        neutrals = [n for n in dict.fromkeys(clean(n) for n in pair.neutrals) if n and n != toxic]
        others = [j + (j >= index) for j in rng.sample(range(len(pairs) - 1), n_negatives_from_others)]
        if not neutrals:
            continue
        negatives = [PairText(toxic, "human")] + [PairText(clean(pairs[j].toxic), "human") for j in others]
        records.append(PairRecord(
            id=pair.id, anchor=neutrals[0], group=None,
            positives=tuple(PairText(n, "human") for n in neutrals), negatives=tuple(negatives),
            meta={"dataset": "paradetox", "normalized": normalize,
                  "negative_provenance": ["paired"] + [f"random_negative:{pairs[j].id}" for j in others]}))
    return records


def split_pairs(records: list[PairRecord], holdout_fraction: float, seed: int = 0
                ) -> tuple[list[PairRecord], list[PairRecord]]:
    """Deterministic (train, heldout) split: a seeded choice of round(fraction * n) records; file order is kept."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise InputError(f"must be in [0, 1), got {holdout_fraction}", field="holdout_fraction")
    heldout = set(random.Random(seed).sample(range(len(records)), round(holdout_fraction * len(records))))
    return ([r for i, r in enumerate(records) if i not in heldout],
            [r for i, r in enumerate(records) if i in heldout])


def paradetox_heldout() -> list[PairRecord]:
    """The canonical held-out ParaDetox pairs (391): what notebooks 02-06 and the evaluations measure on.

    They are the held-out split of cpwb.steps.training's default data, so adapters trained on ParaDetox never saw
    them, and cpwb.steps.training leaves them out of any other training data too (a pairs file, raw text, another
    row limit); notebook 01 never takes them as anchors.
    """
    records = pairs_from_paradetox(load_paradetox(limit=PARADETOX_ROWS), normalize=True)
    return split_pairs(records, HOLDOUT_FRACTION, seed=0)[1]
