"""What ProFS's fitted directions are made of on the default pairs: their weight on the largest residual
dimensions and how the pairs' projections follow their length difference, with and without cpwb's linear length
control (docs/peers.md, "First measurements").

    OMP_NUM_THREADS=1 python scripts/profs_direction.py --blocks 15 22 29 --rank 2

Fits the directions as `cpwb train --objective profs` does, from the training pairs of configs/cp_default.yaml's data
settings, through the embedding cache (the first run embeds 2 x 3,521 texts).
"""
from __future__ import annotations

import argparse

import torch
from scipy.stats import spearmanr

from cpwb.engine.assets import cache_dir, load_causal_lm, load_tokenizer
from cpwb.engine.interventions import profs_directions, text_embeddings
from cpwb.steps.training.batches import load_training_pairs
from cpwb.steps.training.config import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[15, 22, 29])
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--model", default="default")
    parser.add_argument("--perplexity-check", type=int, default=0, metavar="WINDOWS",
                        help="also: WikiText-2 perplexity on this many windows of the base, of ProFS on the upper "
                             "half of the blocks, and of a random direction of the same rank projected out there")
    args = parser.parse_args()
    pairs = [r for r in load_training_pairs(TrainConfig(model=args.model))[0] if r.positives and r.negatives]
    model, tokenizer = load_causal_lm(args.model).eval(), load_tokenizer(args.model)
    texts = ([r.positives[0].text for r in pairs], [r.negatives[0].text for r in pairs])
    counts = [[len(tokenizer(x)["input_ids"]) for x in side] for side in texts]
    lengths = torch.tensor([p - n for p, n in zip(*counts)], dtype=torch.float64)
    print(f"{len(pairs)} pairs; mean tokens non-toxic {sum(counts[0]) / len(pairs):.1f}, toxic "
          f"{sum(counts[1]) / len(pairs):.1f}")
    embeddings = [text_embeddings(model, tokenizer, side, args.blocks, cache_dir=cache_dir() / "embeddings")
                  for side in texts]
    for block in args.blocks:
        positive, negative = embeddings[0][block], embeddings[1][block]
        spread = positive.std(0).topk(3)
        print(f"block {block}: largest spread across non-toxic embeddings "
              + ", ".join(f"dim {i} {s:.1f}" for s, i in zip(spread.values.tolist(), spread.indices.tolist())))
        for control in (None, lengths):
            v = profs_directions(positive, negative, args.rank, True, control)
            projection = ((positive - negative) / 2).double() @ v.double()
            parts = []
            for k in range(args.rank):
                top = v[:, k].abs().topk(2)
                rho = spearmanr(projection[:, k].numpy(), lengths.numpy()).statistic
                parts.append(f"direction {k + 1}: {float((top.values ** 2).sum()):.0%} on dims "
                             f"{top.indices.tolist()}, Spearman with the length difference {rho:+.2f}")
            print(f"  {'length control' if control is not None else 'as the paper':<15} " + "; ".join(parts))
    if args.perplexity_check:
        perplexity_check(model, tokenizer, texts, args.rank, args.perplexity_check)


def perplexity_check(model, tokenizer, texts, rank: int, windows: int) -> None:
    """Perplexity of the base, of the fitted ProFS edit and of a random subspace of the same rank, same blocks."""
    from cpwb.engine.interventions import Intervention, detach
    from cpwb.steps.evaluation.likelihood import wikitext2_perplexity

    blocks = list(range(model.config.num_hidden_layers // 2, model.config.num_hidden_layers))
    embedded = [text_embeddings(model, tokenizer, side, blocks, cache_dir=cache_dir() / "embeddings") for side in texts]
    fitted = {b: profs_directions(embedded[0][b], embedded[1][b], rank) for b in blocks}
    generator = torch.Generator().manual_seed(0)
    random = {b: torch.linalg.qr(torch.randn(model.config.hidden_size, rank, generator=generator)).Q for b in blocks}
    base = wikitext2_perplexity(model, tokenizer, max_windows=windows)["perplexity"]
    print(f"WikiText-2 perplexity on {windows} windows: base {base:.2f}")
    for name, tensors in (("ProFS", fitted), ("random subspace", random)):
        Intervention("profs", blocks, tensors).attach(model)
        value = wikitext2_perplexity(model, tokenizer, max_windows=windows)["perplexity"]
        detach(model)
        print(f"  {name} rank {rank}, blocks {blocks[0]}-{blocks[-1]}: {value:.2f} ({value / base - 1:+.1%})")


if __name__ == "__main__":
    main()
