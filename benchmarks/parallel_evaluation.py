"""Evaluation throughput: one process with every core vs one single-threaded process per core, side by side.

What notebook 06's `jobs = 2` rests on (cpwb.steps.evaluation.parallel). Each worker is this script in `--work`
mode: it loads the default model and times one workload, greedy (RTP-challenging prompts continued greedily by
cpwb.engine.generate, 20 tokens, 64 rows per call) or nll (WikiText-2 windows of 512 tokens, stride 256, scored by
cpwb.steps.evaluation.likelihood). "one": a single worker with torch threads = cores. "side by side": as many
one-thread workers as cores, started together, each doing the same work. Throughput ratio = (workers x work / the
slowest worker's time) / (work / the single worker's time). Rows go to benchmarks/results.csv.

    python benchmarks/parallel_evaluation.py [--repeats 2 --prompts 64 --windows 12]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from cpwb.app.bench_results import RESULTS, append_result

WORKLOADS = ("greedy", "nll")


def work(workload: str, prompts: int, windows: int) -> float:
    """Seconds for one workload in this process (model loading and a short warm-up not counted)."""
    from cpwb.data.corpora import load_rtp
    from cpwb.engine.assets import load_causal_lm, load_tokenizer
    from cpwb.engine.generate import generate
    from cpwb.steps.evaluation.likelihood import wikitext2_perplexity

    model, tokenizer = load_causal_lm("default").eval(), load_tokenizer("default")
    texts = [p.text for p in load_rtp("challenging", limit=prompts)]
    generate(model, tokenizer, texts[:4], max_new_tokens=2, batch_size=4)  # warm-up
    started = time.perf_counter()
    if workload == "greedy":
        generate(model, tokenizer, texts, max_new_tokens=20, batch_size=64)
    else:
        wikitext2_perplexity(model, tokenizer, max_windows=windows)
    return time.perf_counter() - started


def _workers(count: int, threads: int, args: argparse.Namespace, workload: str) -> list[float]:
    """Start `count` workers with `threads` torch threads each, together; their seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    argv = [sys.executable, __file__, "--work", workload, "--prompts", str(args.prompts), "--windows",
            str(args.windows)]
    children = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                for _ in range(count)]
    outputs = [child.communicate()[0] for child in children]
    if any(child.returncode for child in children):
        raise SystemExit(f"a {workload} worker failed: {[c.returncode for c in children]}")
    return [json.loads(out.strip().splitlines()[-1])["seconds"] for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64, help="RTP-challenging prompts of the greedy workload")
    parser.add_argument("--windows", type=int, default=12, help="WikiText-2 windows of the nll workload")
    parser.add_argument("--work", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(RESULTS), help="CSV file the rows are appended to")
    args = parser.parse_args()
    if args.work:
        print(json.dumps({"seconds": work(args.work, args.prompts, args.windows)}))
        return
    cores = os.cpu_count() or 1
    for workload in WORKLOADS:
        one, side = [], []
        for _ in range(args.repeats):  # alternating, so a busy machine slows both alike
            one.append(_workers(1, cores, args, workload)[0])
            side.append(max(_workers(cores, 1, args, workload)))
        ratios = [cores * o / s for o, s in zip(one, side)]
        config = {"workload": workload, "cores": cores, "prompts": args.prompts, "windows": args.windows}
        append_result("parallel_evaluation", {**config, "mode": "one"}, "seconds", "s", one, path=args.results)
        append_result("parallel_evaluation", {**config, "mode": "side by side"}, "seconds", "s", side,
                      path=args.results)
        append_result("parallel_evaluation", config, "throughput_ratio", "x", ratios, path=args.results)
        print(f"{workload}: one process x {cores} threads {statistics.median(one):.1f} s; {cores} processes x 1 "
              f"thread {statistics.median(side):.1f} s each (slowest); throughput x{statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
