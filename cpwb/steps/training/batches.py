"""The training data: pairs (a file, ParaDetox, or both), the seeded anchor order, and each step's batch of texts."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import torch

from cpwb.core.errors import ConfigError
from cpwb.data.pairs import PairRecord
from cpwb.steps.training.config import TrainConfig


def load_training_pairs(config: TrainConfig) -> tuple[list[PairRecord], list[PairRecord], dict[str, Any]]:
    """(train, held-out) pairs and a record of where they came from (file hashes, counts).

    ParaDetox pairs are split by `holdout_fraction`. A pairs file is split the same way, or, `with_paradetox`, all
    of it trains together with ParaDetox's training split (its records replace ParaDetox's of the same id) and the
    held-out pairs are ParaDetox's. Whatever the source, the canonical held-out ParaDetox pairs
    (`cpwb.data.pairs.paradetox_heldout`) never train, so every analysis can measure on them.
    """
    from cpwb.data.corpora import data_hash, data_path, load_paradetox
    from cpwb.data.pairs import read_pairs
    from cpwb.data.paradetox import pairs_from_paradetox, paradetox_heldout, split_pairs

    def paradetox_split() -> tuple[list[PairRecord], list[PairRecord]]:
        records = pairs_from_paradetox(load_paradetox(limit=config.paradetox_limit), normalize=config.normalize_text)
        return split_pairs(records, config.holdout_fraction, seed=0)

    paradetox = {"paradetox_hash": data_hash([data_path("paradetox")]), "normalized": config.normalize_text}
    if config.pairs:
        records = list(read_pairs(config.pairs))
        source: dict[str, Any] = {"pairs": config.pairs, "data_hash": data_hash([config.pairs]),
                                  "n_file": len(records)}
        if config.with_paradetox:
            ids = {r.id for r in records}
            extra_train, extra_heldout = paradetox_split()
            train = records + [r for r in extra_train if r.id not in ids]
            heldout = [r for r in extra_heldout if r.id not in ids]
            source |= {"with_paradetox": True, **paradetox}
        else:
            train, heldout = split_pairs(records, config.holdout_fraction, seed=0)
    else:
        train, heldout = paradetox_split()
        source = {"pairs": "paradetox", "data_hash": paradetox["paradetox_hash"], **paradetox}
    reserved = {r.id for r in paradetox_heldout()}
    kept = [r for r in train if r.id not in reserved]
    if not kept:
        raise ConfigError(f"no training anchors left ({len(train)} before the canonical held-out ParaDetox pairs "
                          "were taken out)", field="pairs")
    chosen, swapped = limited_and_swapped(kept, config)
    return chosen, heldout, {**source, "n_train": len(chosen), "n_heldout": len(heldout),
                             "n_reserved_left_out": len(train) - len(kept),
                             **({"n_before_limit": len(kept)} if len(chosen) < len(kept) else {}),
                             **({"n_swapped": swapped} if config.swap_fraction else {})}


def limited_and_swapped(records: list[PairRecord], config: TrainConfig) -> tuple[list[PairRecord], int]:
    """The training pairs a run fits on: `train_pairs_limit` of them drawn with `seed` (in their order), then
    `swap_fraction` of those with their non-toxic and toxic sides exchanged (pairs with both sides); and how many
    were swapped. With the defaults, `records` unchanged."""
    if 0 < config.train_pairs_limit < len(records):
        keep = sorted(random.Random(config.seed).sample(range(len(records)), config.train_pairs_limit))
        records = [records[i] for i in keep]
    both = [i for i, r in enumerate(records) if r.positives and r.negatives]
    flip = set(random.Random(config.seed + 1).sample(both, round(config.swap_fraction * len(both))))
    return [dataclasses.replace(r, positives=r.negatives, negatives=r.positives) if i in flip else r
            for i, r in enumerate(records)], len(flip)


def anchor_order(n_anchors: int, seed: int, count: int, offset: int = 0) -> list[int]:
    """Indices of the anchors used at positions offset..offset+count of a seeded stream of shuffled epochs."""
    order: list[int] = []
    epoch = offset // n_anchors
    while len(order) < (offset % n_anchors) + count:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order += torch.randperm(n_anchors, generator=generator).tolist()
        epoch += 1
    start = offset % n_anchors
    return order[start:start + count]


@dataclass
class AnchorBatch:
    """The texts of a few anchors, flattened, with the slot of each text in the [A, K] layout of cpwb.engine.loss.

    Under data parallelism a batch is one process's share of a micro-batch: `anchor_scale` and `kl_scale` (its
    share of the micro-batch's anchors and KL texts, times the number of processes) make the mean over processes
    of its loss the loss of the whole micro-batch. In one process both are 1.
    """

    texts: list[str]
    role: list[str]  # "pos" | "neg" | "rand" | "kl"
    anchor: list[int]
    slot: list[int]
    n_anchors: int
    sizes: dict[str, int]  # K per role
    anchor_scale: float = 1.0
    kl_scale: float = 1.0


def build_anchor_batch(records: list[PairRecord], indices: list[int], config: TrainConfig,
                       rng: random.Random, general: list[str] | None = None, rank: int = 0,
                       world: int = 1) -> AnchorBatch:
    """Positives and negatives (and optional random negatives from other anchors) of the chosen anchors.

    With a `general` pool, `kl_texts_per_step` of its texts join the batch (role "kl") for the KL-to-base term only.
    Every process draws the random negatives and KL texts of the whole micro-batch with the same `rng`, then keeps
    its share (anchor and KL text i go to process i % world): the union over processes is what one process draws.
    """
    batch = AnchorBatch([], [], [], [], 0, {"pos": 0, "neg": 0, "rand": 0, "kl": 0})

    def add(text: str, role: str, a: int, s: int) -> None:
        batch.texts.append(text)
        batch.role.append(role)
        batch.anchor.append(a)
        batch.slot.append(s)
        batch.sizes[role] = max(batch.sizes[role], s + 1)

    for position, index in enumerate(indices):
        record = records[index]
        others = [j for j in range(len(records)) if j != index]
        drawn = rng.sample(others, min(config.random_negatives, len(others)))
        if position % world != rank:
            continue
        a = batch.n_anchors
        batch.n_anchors += 1
        for s, text in enumerate(record.positives[:config.max_positives]):
            add(text.text, "pos", a, s)
        for s, text in enumerate(record.negatives[:config.max_negatives]):
            add(text.text, "neg", a, s)
        for s, j in enumerate(drawn):
            add(records[j].negatives[0].text, "rand", a, s)
    kl_texts = rng.sample(general, config.kl_texts_per_step) if general else []
    mine = kl_texts[rank::world]
    for s, text in enumerate(mine):
        add(text, "kl", 0, s)
    batch.anchor_scale = batch.n_anchors * world / max(len(indices), 1)
    batch.kl_scale = len(mine) * world / len(kl_texts) if kl_texts else 1.0
    return batch
