"""Generated tokens per second: cpwb.steps.negatives.run's batched sampler vs a batch-1 loop, measured side by side.

Both sample toxic paraphrases of the same ParaDetox anchors with the same few-shot chat prompt and decoding
settings. Batched: all anchors in one call, k samples each, the shared prompt prefix computed once and finished
rows leaving the batch (TransformersGenerator, what `cpwb generate` runs). Batch-1: one prompt and one sample per
model.generate call (cpwb.engine.generate.generate_with_transformers with batch_size 1, the reference
implementation's loop), one sample per anchor. The two alternate
within each repeat so that a busy machine slows both alike; tokens are counted on the decoded texts the same
way for both. Rows go to benchmarks/results.csv; the ratio of medians is printed.

    OMP_NUM_THREADS=1 python benchmarks/generation_throughput.py [--anchors 8 --k 8 --repeats 3]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from cpwb.app.bench_results import RESULTS, append_result
from cpwb.engine.assets import load_causal_lm, load_tokenizer
from cpwb.engine.device import device_name
from cpwb.engine.generate import generate_with_transformers, prompt_ids
from cpwb.engine.sampler import TransformersGenerator
from cpwb.engine.scoring import load_toxicity_scorer
from cpwb.steps.negatives.anchors import PROMPTS, few_shot_examples, load_anchors
from cpwb.steps.negatives.config import GenerateConfig


def timed(run: Callable[[], list[str]], tokenizer) -> tuple[float, int]:
    """Generated tokens per second of one call of `run`, and the token count."""
    start = time.perf_counter()
    texts = run()
    seconds = time.perf_counter() - start
    tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    return tokens / seconds, tokens


def main() -> None:
    """Measure both modes `--repeats` times, append the results and print the speed-up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--anchors", type=int, default=8, help="prompts (the default run's batch_size)")
    parser.add_argument("--k", type=int, default=8, help="samples per prompt in the batched mode")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(RESULTS), help="CSV file the rows are appended to")
    args = parser.parse_args()

    config = GenerateConfig(n_anchors=args.anchors, generator=args.model, target_model=args.model)
    model, tokenizer = load_causal_lm(args.model), load_tokenizer(args.model)
    anchors = [a.text for a in load_anchors(config)]
    examples = few_shot_examples(config, load_toxicity_scorer())["toxic-v1"]
    system = PROMPTS["toxic-v1"][1]
    sampler = TransformersGenerator(model, tokenizer, args.model, config.temperature, config.top_p, config.top_k)
    rows = [prompt_ids(tokenizer, anchor, chat=True, system=system, examples=examples) for anchor in anchors]
    decoding = dict(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=config.temperature,
                    top_p=config.top_p, top_k=config.top_k, chat=True, system=system, examples=examples,
                    batch_size=1)

    def batched(repeat: int) -> list[str]:
        return [t for texts in sampler.sample(rows, args.k, args.seed + repeat, args.max_new_tokens) for t in texts]

    def batch_1(repeat: int) -> list[str]:
        return [generate_with_transformers(model, tokenizer, [anchor], seed=args.seed + repeat + i, **decoding)[0][0]
                for i, anchor in enumerate(anchors)]

    speeds: dict[str, list[float]] = {"batched": [], "batch-1": []}
    for repeat in range(args.repeats):
        for mode, run in (("batched", batched), ("batch-1", batch_1)):
            speed, tokens = timed(lambda: run(repeat), tokenizer)
            speeds[mode].append(speed)
            print(f"repeat {repeat}: {mode:>8} {tokens:5d} tokens, {speed:7.1f} tokens/s", flush=True)
    shared = {"model": args.model, "anchors": args.anchors, "max_new_tokens": args.max_new_tokens,
              "temperature": config.temperature, "top_p": config.top_p}
    for mode, values in speeds.items():
        append_result("generation_throughput", {**shared, "mode": mode, "k": args.k if mode == "batched" else 1},
                      "generated_tokens_per_s", "tokens/s", values, args.results)
    ratios = np.array(speeds["batched"]) / np.array(speeds["batch-1"])
    append_result("generation_throughput", {**shared, "k": args.k}, "batched_over_batch1", "x", ratios, args.results)
    print(f"\n{device_name()}\nmedian tokens/s: batched {np.median(speeds['batched']):.1f}, batch-1 "
          f"{np.median(speeds['batch-1']):.1f}; batched / batch-1 = {np.median(ratios):.1f}x "
          f"(per repeat: {', '.join(f'{r:.1f}' for r in ratios)})")


if __name__ == "__main__":
    main()
