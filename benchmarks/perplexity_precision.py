"""WikiText-2 perplexity in fp32 and with a bfloat16 transformer body: how much faster, and how far off.

The perplexity half of the `lee2024` protocol is a forward pass at the fp32 matmul floor (docs/evaluation.md). CPUs
with AMX or avx512_bf16 run bfloat16 matmuls several times faster. This benchmark scores the same strided windows
(512 tokens, stride 256, spread over the whole test set) of the base model and of each given adapter, twice each,
alternating within each repeat: in fp32 (what every cpwb evaluation runs), and with the transformer body under
torch.autocast(bfloat16) while the LM head and log-sum-exp stay in fp32 (`body_dtype` of
cpwb.engine.nll.scored_states). It prints seconds per window, the speed ratio, each model's perplexity change from
the base in both precisions with the fp32 change's paired 95% interval, and the bias bfloat16 adds to the change:
the figure that decides whether the faster path may be used for a comparison. Rows go to benchmarks/results.csv
(`perplexity_precision`).

    OMP_NUM_THREADS=1 python benchmarks/perplexity_precision.py DPO=outputs/tuning/dpo/trial-000/adapter \
        [--windows 48 --repeats 1]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cpwb.app.bench_results import RESULTS, append_result
from cpwb.core.stats import paired_perplexity_change, perplexity
from cpwb.data.corpora import load_wikitext2_test
from cpwb.engine.adapters import load_adapter
from cpwb.engine.assets import load_causal_lm, load_tokenizer
from cpwb.engine.device import device_name, pad_token_id
from cpwb.steps.evaluation.likelihood import strided_nll, strided_windows, token_stream

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def main() -> None:
    """Score the windows in both precisions for every model, append the rows and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="*", metavar="NAME=ADAPTER_DIR", help="models besides the base")
    parser.add_argument("--model", default="default")
    parser.add_argument("--windows", type=int, default=48, help="windows spread evenly over the test set")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--results", default=str(RESULTS), help="CSV file the rows are appended to")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    ids = token_stream(tokenizer, load_wikitext2_test())
    every = strided_windows(len(ids), 512, 256)
    windows = [every[int(i)] for i in np.linspace(0, len(every) - 1, min(args.windows, len(every)))]
    models = {"base": load_causal_lm(args.model).eval()}
    for spec in args.methods:
        name, _, folder = spec.partition("=")
        models[name] = load_adapter(folder, args.model)[0]
    nll: dict[tuple[str, str], np.ndarray] = {}
    seconds: dict[tuple[str, str], list[float]] = {(m, p): [] for m in models for p in PRECISIONS}
    tokens = None
    for repeat in range(args.repeats):
        for name, model in models.items():
            for precision, dtype in PRECISIONS.items():
                start = time.perf_counter()
                nll[name, precision], tokens = strided_nll(model, ids, windows, args.batch_size,
                                                           pad_token_id(tokenizer), body_dtype=dtype)
                seconds[name, precision].append((time.perf_counter() - start) / len(windows))
                print(f"repeat {repeat}: {name:>8} {precision:>8} {seconds[name, precision][-1]:6.2f} s / window",
                      flush=True)
    shared = {"model": args.model, "windows": len(windows), "batch_size": args.batch_size, "window": 512,
              "stride": 256}
    print(f"\n{device_name()}, {len(windows)} windows of {len(every)}")
    print("model      s/window fp32  bf16   x faster   ppl fp32  ppl bf16   change fp32 [95%]            "
          "change bf16   bias (points)")
    for name in models:
        fast = np.array(seconds[name, "float32"]) / np.array(seconds[name, "bfloat16"])
        for precision in PRECISIONS:
            append_result("perplexity_precision", {**shared, "method": name, "precision": precision},
                          "seconds_per_window", "s", seconds[name, precision], args.results)
        append_result("perplexity_precision", {**shared, "method": name}, "bf16_speedup", "x", fast, args.results)
        ppl = {p: float(perplexity(nll[name, p], tokens)) for p in PRECISIONS}
        line = (f"{name:<10} {np.median(seconds[name, 'float32']):8.2f} {np.median(seconds[name, 'bfloat16']):6.2f}"
                f" {np.median(fast):8.2f}   {ppl['float32']:8.3f} {ppl['bfloat16']:8.3f}")
        if name != "base":
            change = paired_perplexity_change(nll["base", "float32"], nll[name, "float32"], tokens)
            bf16 = float(paired_perplexity_change(nll["base", "bfloat16"], nll[name, "bfloat16"], tokens).value)
            bias = 100 * (bf16 - change.value)
            append_result("perplexity_precision", {**shared, "method": name}, "bf16_change_bias", "points",
                          [bias], args.results)
            line += (f"   {100 * change.value:+6.2f}% [{100 * change.low:+.2f}, {100 * change.high:+.2f}]"
                     f"   {100 * bf16:+6.2f}%     {bias:+.3f}")
        print(line)


if __name__ == "__main__":
    main()
