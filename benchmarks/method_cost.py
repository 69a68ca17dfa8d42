"""Generation cost of each detoxification method: CPU seconds per 1,000 generated tokens, side by side.

Every method generates greedy continuations of the same RealToxicityPrompts challenging prompts through
cpwb.engine.generate (what every evaluation protocol runs), loaded as `cpwb evaluate --adapter` loads it: the base
model, a LoRA adapter (CP, DPO, SimPO: unmerged, as evaluated; `cpwb export --merge` removes its cost), a ProFS edit
(weights edited in place: the base model's cost), steering (one hook) and DExperts (three passes a token). The
methods alternate within each repeat so that a busy machine slows all alike. Rows go to benchmarks/results.csv
(`method_cost`, seconds_per_1k_tokens and the ratio to the base); the table is printed.

    OMP_NUM_THREADS=1 python benchmarks/method_cost.py CP=outputs/sweeps/ablations/base__seed=0/adapter \
        ProFS=outputs/sweeps/peers/base__seed=0/adapter [--prompts 64 --repeats 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from cpwb.app.bench_results import RESULTS, append_result
from cpwb.data.corpora import load_rtp
from cpwb.engine.adapters import load_adapter
from cpwb.engine.assets import load_causal_lm, load_tokenizer
from cpwb.engine.device import device_name
from cpwb.engine.generate import generate


def main() -> None:
    """Measure every method `--repeats` times, append the rows and print seconds per 1,000 tokens."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="*", metavar="NAME=ADAPTER_DIR", help="methods besides the base model")
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=str(RESULTS), help="CSV file the rows are appended to")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    models = {"base": load_causal_lm(args.model).eval()}
    for spec in args.methods:
        name, _, folder = spec.partition("=")
        models[name] = load_adapter(folder, args.model)[0]
    prompts = [p.text for p in load_rtp("challenging", limit=args.prompts)]
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(args.repeats):
        for name, model in models.items():
            start = time.process_time()
            texts = [c[0] for c in generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                            batch_size=args.batch_size)]
            cpu = time.process_time() - start
            tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
            seconds[name].append(1000 * cpu / max(tokens, 1))
            print(f"repeat {repeat}: {name:>10} {tokens:5d} tokens, {seconds[name][-1]:6.2f} CPU s / 1k tokens",
                  flush=True)
    shared = {"model": args.model, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
              "batch_size": args.batch_size, "decoding": "greedy"}
    base = np.array(seconds["base"])
    print(f"\n{device_name()}\nmethod       CPU s / 1k tokens (median)   x base")
    for name, values in seconds.items():
        append_result("method_cost", {**shared, "method": name}, "cpu_seconds_per_1k_tokens", "s", values,
                      args.results)
        ratio = np.array(values) / base
        append_result("method_cost", {**shared, "method": name}, "over_base", "x", ratio, args.results)
        print(f"{name:<12} {np.median(values):8.2f}                     {np.median(ratio):5.2f}")


if __name__ == "__main__":
    main()
