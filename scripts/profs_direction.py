"""What a fitted ProFS (or steering) direction is made of: its weight on the largest residual dimensions, the
spread of those dimensions across the pairs' embeddings, and how the pairs' projection on it follows their length
difference (docs/peers.md, "First measurements").

    OMP_NUM_THREADS=1 python scripts/profs_direction.py "outputs/sweeps/peers/base__seed=0/adapter" --block 15

Uses the training pairs of the default run (configs/cp_default.yaml's data settings) and the embedding cache.
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import spearmanr

from cpwb.engine.assets import cache_dir, load_causal_lm, load_tokenizer
from cpwb.engine.interventions import load_intervention, text_embeddings
from cpwb.steps.training.batches import load_training_pairs
from cpwb.steps.training.config import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="a ProFS or steering run's adapter folder")
    parser.add_argument("--block", type=int, default=15)
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    intervention = load_intervention(args.adapter)
    directions = intervention.tensors[args.block]
    directions = directions[:, None] if directions.ndim == 1 else directions
    pairs = [r for r in load_training_pairs(TrainConfig(model=args.model))[0] if r.positives and r.negatives]
    model, tokenizer = load_causal_lm(args.model).eval(), load_tokenizer(args.model)
    texts = ([r.positives[0].text for r in pairs], [r.negatives[0].text for r in pairs])
    positive, negative = (text_embeddings(model, tokenizer, t, [args.block], cache_dir=cache_dir() / "embeddings")
                          [args.block] for t in texts)
    lengths = [np.array([len(tokenizer(x)["input_ids"]) for x in t]) for t in texts]
    spread = positive.std(0)
    print(f"{len(pairs)} pairs; mean tokens non-toxic {lengths[0].mean():.1f}, toxic {lengths[1].mean():.1f}")
    print("largest spread across non-toxic embeddings:",
          ", ".join(f"dim {i} {s:.1f}" for s, i in zip(*spread.topk(5))))
    projection = ((positive - negative) / 2) @ (directions / directions.norm(dim=0))
    for k in range(directions.shape[1]):
        v = directions[:, k] / directions[:, k].norm()
        top = v.abs().topk(2)
        share = float((v[top.indices] ** 2).sum())
        rho = spearmanr(projection[:, k].numpy(), lengths[0] - lengths[1]).statistic
        print(f"direction {k + 1}: {share:.0%} of its weight on dims {top.indices.tolist()}; Spearman with the "
              f"length difference {rho:.2f}")


if __name__ == "__main__":
    main()
