"""The trainer's step in one process, through accelerate (what `cpwb train` runs) vs the bare loop, side by side.

Both take the same anchor batches of the default configuration (configs/cp_default.yaml) on the same LoRA model:
bare: `objective_loss`, `backward`, gradient clipping and an AdamW step, as the trainer did before it ran on
accelerate; cpwb: the trainer's own path (the `Objective` module, `Accelerator.backward`,
`Accelerator.clip_grad_norm_`).
The two alternate within each repeat, so a busy machine slows both alike. Rows go to benchmarks/results.csv; the
ratio of median step times is printed (target: within 5%).

    OMP_NUM_THREADS=1 python benchmarks/trainer_overhead.py [--repeats 10]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from cpwb.app.bench_results import RESULTS, append_result
from cpwb.data.corpora import general_texts
from cpwb.steps.training.batches import anchor_order, build_anchor_batch, load_training_pairs
from cpwb.steps.training.config import TrainConfig
from cpwb.steps.training.distributed import Objective, make_accelerator, wrap
from cpwb.steps.training.model import build_model, make_optimizer, use_packing
from cpwb.steps.training.objective import objective_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS), help="CSV file the rows are appended to")
    args = parser.parse_args()

    config = TrainConfig(device="cpu", progress=False, output_dir="outputs/bench-trainer")
    pairs = load_training_pairs(config)[0]
    accelerator = make_accelerator(config)
    model, tokenizer = build_model(config, accelerator.device)
    packed = use_packing(model, tokenizer, pairs, config, accelerator.device)
    module = wrap(Objective(model, tokenizer, config, accelerator.device, packed), accelerator, config)
    optimizer, _ = make_optimizer(module, config, total_steps=1000)
    general = general_texts()
    params = [p for p in module.parameters() if p.requires_grad]

    def bare(batch) -> None:
        value, _, _ = objective_loss(model, tokenizer, batch, config, accelerator.device, packed)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def cpwb(batch) -> None:
        value, _, _ = module(batch)
        accelerator.backward(value)
        accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    module.train()
    seconds: dict[str, list[float]] = {"bare": [], "cpwb": []}
    for repeat in range(args.warmup + args.repeats):
        order = anchor_order(len(pairs), config.seed, config.anchors_per_step, offset=repeat * config.anchors_per_step)
        for name, step in (("bare", bare), ("cpwb", cpwb)) if repeat % 2 == 0 else (("cpwb", cpwb), ("bare", bare)):
            batch = build_anchor_batch(pairs, order, config, random.Random(repeat), general)
            started = time.perf_counter()
            step(batch)
            if repeat >= args.warmup:
                seconds[name].append(time.perf_counter() - started)
        print(f"repeat {repeat}: bare {seconds['bare'][-1:]} cpwb {seconds['cpwb'][-1:]}", flush=True)
    for name, values in seconds.items():
        append_result("trainer_step", {"config": "cp_default", "path": name, "processes": 1}, "step_time", "s",
                      values, args.results)
    ratio = statistics.median(seconds["cpwb"]) / statistics.median(seconds["bare"])
    append_result("trainer_step", {"config": "cp_default", "processes": 1}, "step_time_ratio_cpwb_over_bare", "x",
                  [ratio], args.results)
    print(f"median step: bare {statistics.median(seconds['bare']):.3f} s, cpwb {statistics.median(seconds['cpwb']):.3f}"
          f" s; cpwb/bare x{ratio:.3f}")


if __name__ == "__main__":
    main()
