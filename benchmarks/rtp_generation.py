"""RealToxicityPrompts continuation speed against its fp32 matmul floor, measured side by side.

`--workload greedy` (the `lee2024` protocol): one greedy continuation of each of the first `--prompts`
RTP-challenging prompts; `--workload sample` (the `rtp25` protocol): `--k` nucleus samples (top-p 0.9) of each.
20 new tokens, batch 64 (evaluation's `generation_batch_size`). Modes:

- `cpwb`: cpwb.engine.generate.generate (the KV-cached loop of cpwb.engine.sampler), what evaluation runs;
- `cpwb, sorted`: sampling only, the same loop drawing through transformers' warpers over the whole sorted
  vocabulary, as cpwb did before `nucleus_sample`;
- `transformers`: the same prompts, buckets and batch through `model.generate` (generate_with_transformers);
- `matmul floor`: every nn.Linear call of the `cpwb` run (prefill and decode, the tied output head included),
  recorded by forward hooks and replayed as bare `torch.nn.functional.linear` calls of the same shapes. No decoder
  can be faster in fp32 with these kernels without doing less arithmetic, so cpwb / floor is how much of a
  speed-up is left to find, and the ratio of the floor to `transformers` the most any fp32 loop could gain.

The modes alternate within each repeat, so a busy machine slows all alike. Greedy continuations of the
decoders are compared token for token. Rows go to benchmarks/results.csv; the ratios are printed.

    OMP_NUM_THREADS=1 python benchmarks/rtp_generation.py [--workload greedy --prompts 256 --repeats 2]
    OMP_NUM_THREADS=1 python benchmarks/rtp_generation.py --workload sample --prompts 16 --k 25
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from cpwb.app.bench_results import RESULTS, append_result
from cpwb.data.corpora import load_rtp
from cpwb.engine import sampler
from cpwb.engine.assets import load_causal_lm, load_tokenizer
from cpwb.engine.device import device_name
from cpwb.engine.generate import generate, generate_with_transformers


def linear_calls(model, run: Callable[[], object]) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every nn.Linear call made while `run` runs."""
    calls: list[tuple[int, int, int]] = []

    def record(module, inputs, _output):
        calls.append((inputs[0].numel() // module.in_features, module.in_features, module.out_features))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def replay(calls: list[tuple[int, int, int]]) -> Callable[[], None]:
    """A function making the same linear calls on random operands (allocated once, outside the timing)."""
    generator = torch.Generator().manual_seed(0)
    weights = {(i, o): torch.randn(o, i, generator=generator) for _, i, o in calls}
    inputs = {i: torch.randn(max(r for r, j, _ in calls if j == i), i, generator=generator) for _, i, _ in calls}

    @torch.no_grad()
    def run() -> None:
        for rows, i, o in calls:
            torch.nn.functional.linear(inputs[i][:rows], weights[(i, o)])
    return run


def sorted_draw(self, logits, do_sample, generator):
    """Decoder._next as it was: the warpers over the whole vocabulary (a full sort for top-p), one full draw."""
    if not do_sample:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(self.warpers(None, logits), dim=-1), 1, generator=generator).squeeze(1)


def main() -> None:
    """Time the three modes `--repeats` times, append the rows and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("greedy", "sample"), default="greedy")
    parser.add_argument("--k", type=int, default=25, help="samples per prompt (sample workload)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS), help="CSV file the rows are appended to")
    args = parser.parse_args()

    model, tokenizer = load_causal_lm(args.model).eval(), load_tokenizer(args.model)
    prompts = [p.text for p in load_rtp("challenging", limit=args.prompts)]
    settings = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    if args.workload == "sample":
        settings.update(do_sample=True, top_p=0.9, num_return_sequences=args.k)
    outputs: dict[str, list[list[str]]] = {}

    def cpwb() -> None:
        outputs["cpwb"] = generate(model, tokenizer, prompts, **settings)

    def cpwb_sorted() -> None:
        fast, sampler.Decoder._next = sampler.Decoder._next, sorted_draw
        try:
            outputs["cpwb, sorted"] = generate(model, tokenizer, prompts, **settings)
        finally:
            sampler.Decoder._next = fast

    def transformers() -> None:
        outputs["transformers"] = generate_with_transformers(model, tokenizer, prompts, **settings)

    generate(model, tokenizer, prompts[:4], max_new_tokens=2, batch_size=4)  # warm-up
    floor = replay(linear_calls(model, cpwb))
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for texts in outputs["cpwb"] for t in texts)
    modes = {"cpwb": cpwb, **({"cpwb, sorted": cpwb_sorted} if args.workload == "sample" else {}),
             "transformers": transformers, "matmul floor": floor}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        for mode, run in modes.items():
            started = time.perf_counter()
            run()
            seconds[mode].append(time.perf_counter() - started)
            print(f"repeat {repeat}: {mode:>12} {seconds[mode][-1]:7.1f} s, {tokens / seconds[mode][-1]:6.1f} "
                  "generated tokens/s (cpwb's count)", flush=True)
    shared = {"model": args.model, "workload": args.workload, "prompts": args.prompts, "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
              **({"k": args.k, "top_p": 0.9} if args.workload == "sample" else {})}
    for mode, values in seconds.items():
        append_result("rtp_generation", {**shared, "mode": mode}, "generated_tokens_per_s", "tokens/s",
                      [tokens / s for s in values], args.results)
    cpwb_time = np.array(seconds["cpwb"])
    ratios = {f"{mode}_over_cpwb": np.array(values) / cpwb_time for mode, values in seconds.items() if mode != "cpwb"}
    for name, values in ratios.items():
        append_result("rtp_generation", shared, name.replace(", ", "_").replace(" ", "_"), "x", values, args.results)
    print(f"\n{device_name()}, {torch.get_num_threads()} torch thread(s); {tokens} generated tokens")
    if args.workload == "greedy":
        same = sum(a == b for a, b in zip(outputs["cpwb"], outputs["transformers"], strict=True))
        print(f"{same}/{len(prompts)} greedy continuations identical to model.generate's")
    for name, values in ratios.items():
        print(f"time {name.replace('_over_', ' / ')}: {np.median(values):.2f}x")


if __name__ == "__main__":
    main()
