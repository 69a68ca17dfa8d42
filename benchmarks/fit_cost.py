"""Fitting cost of each detoxification method on one machine: CPU seconds of a whole fit, side by side.

Each sweep point records the seconds its own fit took on the machine that ran it, and machines differ (the same
DExperts expert training took 0.84 to 2.5 s a step on different days), so fit seconds read across points mix
machines. This script fits every method in one process, one after another within each repeat (a busy machine slows
all alike), with the settings of a sweep point (`NAME=GRID:POINT`, the point's id as `cpwb sweep --dry-run` lists it),
in a temporary folder, with the run cache and the embedding cache off (every fit from nothing):

- methods with optimizer steps (CP, DPO, SimPO, DExperts' two experts, GRPO) are fitted once for one step as a
  warm-up (the first imports and loads of a library would count as steps), then with `--short` and with
  `--short + --long` steps; the difference gives the CPU seconds of one step (start-up cancels), and the whole
  fit at the point's configured steps is `short fit + (configured - short) x one step`. Fitting 200 steps per
  method and repeat would take hours on 2 cores; a step's cost does not depend on the step's number (the learning
  rate changes, not the work).
- the training-free methods (ProFS, steering) are fitted whole: one forward pass over every training pair, then an
  SVD or a mean.

Rows go to benchmarks/results.csv (`fit_cost`: cpu_seconds_per_step and cpu_seconds_per_fit, with the steps) and
the table is printed; `cpwb.analysis.peers.fit_costs` reads them for the comparison table.

    OMP_NUM_THREADS=1 python benchmarks/fit_cost.py [--repeats 2 --short 2 --long 6]
    OMP_NUM_THREADS=1 python benchmarks/fit_cost.py CP=configs/ablations.yaml:base__seed=0 --repeats 1
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import numpy as np

from cpwb.app.bench_results import RESULTS, append_result
from cpwb.app.sweep import expand, load_grid, point_configs, select
from cpwb.engine.device import device_name
from cpwb.steps.training.config import TRAINING_FREE, TrainConfig
from cpwb.steps.training.trainer import train

# each method at a setting of its sweep (the knobs ProFS rank, steering strength and DExperts alpha do not change
# the fit's work)
METHODS = {"CP": "configs/ablations.yaml:base__seed=0", "DPO": "configs/ablations.yaml:objective=dpo__seed=0",
           "SimPO": "configs/ablations.yaml:objective=simpo__seed=0",
           "ProFS": "configs/peers.yaml:base__seed=0",
           "steering": "configs/peers.yaml:objective=steering__seed=0",
           "DExperts": "configs/peers_trained.yaml:base__seed=0",
           "GRPO (RL)": "configs/peers_trained.yaml:objective=grpo__seed=0"}


def point_config(spec: str) -> TrainConfig:
    """The TrainConfig of `GRID:POINT_ID` (exactly one point's id must match), caches off, quiet."""
    path, _, point_id = spec.rpartition(":")
    points = [p for p in select(expand(load_grid(path)), point_id) if p.id == point_id]
    if len(points) != 1:
        raise SystemExit(f"{path}: no point with id {point_id!r} (see `cpwb sweep {path} --dry-run`)")
    config = point_configs(points[0].parameters)[0]
    return dataclasses.replace(config, run_cache=False, embedding_cache=False, progress=False)


def cpu_seconds(config: TrainConfig) -> float:
    """CPU seconds of one whole fit of `config` (all threads of this process), in a fresh temporary folder."""
    with tempfile.TemporaryDirectory(prefix="cpwb-fit-cost-") as folder:
        start = time.process_time()
        result = train(dataclasses.replace(config, output_dir=folder))
        seconds = time.process_time() - start
        del result
    return seconds


def measure(config: TrainConfig, short: int, long: int) -> tuple[float, float, int]:
    """(CPU seconds of one step, of the whole fit, the configured steps) of one method; a training-free fit has
    one "step", the fit (the embedding of the pairs by the base model dominates it; nothing to warm up apart)."""
    if config.objective in TRAINING_FREE:
        whole = cpu_seconds(config)
        return whole, whole, 1
    steps = config.steps or 200
    cpu_seconds(dataclasses.replace(config, steps=1))  # warm-up: first imports and loads would count as steps
    first = cpu_seconds(dataclasses.replace(config, steps=short))
    second = cpu_seconds(dataclasses.replace(config, steps=short + long))
    step = max(second - first, 0.0) / long
    return step, first + (steps - short) * step, steps


def main() -> None:
    """Fit every method `--repeats` times, append the rows and print CPU seconds per step and per fit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="*", metavar="NAME=GRID:POINT",
                        help="methods and the sweep point whose settings they fit with (default: the seven peers)")
    parser.add_argument("--short", type=int, default=2, help="steps of the shorter fit of a trained method")
    parser.add_argument("--long", type=int, default=6, help="steps the longer fit adds: one step = difference / this")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS), help="CSV file the rows are appended to")
    args = parser.parse_args()
    if args.short < 1 or args.long < 1:
        parser.error("--short and --long must be at least 1")
    specs = dict(spec.split("=", 1) for spec in args.methods) if args.methods else METHODS
    configs = {name: point_config(spec) for name, spec in specs.items()}
    per_step: dict[str, list[float]] = {name: [] for name in configs}
    per_fit: dict[str, list[float]] = {name: [] for name in configs}
    steps: dict[str, int] = {}
    for repeat in range(args.repeats):
        for name, config in configs.items():
            step, whole, steps[name] = measure(config, args.short, args.long)
            per_step[name].append(step)
            per_fit[name].append(whole)
            print(f"repeat {repeat}: {name:>10} {step:8.2f} CPU s / step, {whole:8.0f} CPU s / fit "
                  f"({steps[name]} steps)", flush=True)
    print(f"\n{device_name()}\nmethod       CPU s / step (median)   steps   CPU s / fit (median)")
    for name, spec in specs.items():
        shared = {"method": name, "point": spec, "steps": steps[name], "short": args.short, "long": args.long}
        append_result("fit_cost", shared, "cpu_seconds_per_step", "s", per_step[name], args.results)
        append_result("fit_cost", shared, "cpu_seconds_per_fit", "s", per_fit[name], args.results)
        print(f"{name:<12} {np.median(per_step[name]):10.2f}           {steps[name]:5d}   "
              f"{np.median(per_fit[name]):10.0f}")


if __name__ == "__main__":
    main()
