"""One point of the CP-core study: train configs/cp_default.yaml with overrides, evaluate it against its base.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/cp_study.py NAME -p lr=2e-4 -p kl_weight=2 -p seed=1

Writes outputs/study/NAME/result.json (resumable) and prints one summary line; the study table of docs/method.md is
built from these lines.
"""
from __future__ import annotations

import argparse
import json

from cpwb.core.config import load_yaml_config, parse_override
from cpwb.steps.experiment import train_and_evaluate
from cpwb.steps.training.config import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--config", default="configs/cp_default.yaml")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = dict(parse_override(p) for p in args.param)
    config = load_yaml_config(TrainConfig, args.config, {**overrides, "output_dir": f"outputs/study/{args.name}",
                                                         "progress": False})
    result = train_and_evaluate(config)
    keys = ("phi_gap", "phi_gap_share_positive", "greedy_toxicity", "wikitext2_ppl")
    pairs = {k: [round(result["base"][k], 4), round(result["trained"][k], 4)] for k in keys}
    print(args.name, json.dumps(pairs), f"tox_change {result['toxicity_change']:+.3f}",
          f"ppl_change {result['ppl_change']:+.3f}", f"step_s {result['step_seconds_median']:.3f}",
          f"peakMB {result['peak_memory_mb']:.0f}", flush=True)


if __name__ == "__main__":
    main()
