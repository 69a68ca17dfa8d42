"""Several models evaluated at once, each by `cpwb evaluate` in a process of its own.

Notebook 06 evaluates the base model and the CP adapter; on a CPU of N cores, N single-threaded processes side by
side get somewhat more out of it than one process with N threads (measured on 2 cores by
benchmarks/parallel_evaluation.py: 1.16x the throughput on greedy generation, 1.15x on WikiText-2 NLL). Each child
is the `cpwb evaluate` command with its config file, so it resumes, records and fails exactly as that command does;
its output goes to `evaluate.log` in its folder. The parent shows one bar over the protocols finished by all
children, then reads each summary back from the protocol records (no model loaded).

A pool of subprocesses is all this needs (concurrent.futures + subprocess); torch.multiprocessing would share
tensors we do not need to share, and accelerate launches one program many times rather than several programs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cpwb.core.config import to_dict, yaml_text
from cpwb.core.errors import ConfigError, CpwbError
from cpwb.core.files import atomic_write_text
from cpwb.steps.evaluation.config import EvaluateConfig
from cpwb.steps.evaluation.run import recorded_keys, recorded_summary, run_evaluation

LOG = "evaluate.log"


def threads_per_job(jobs: int, cpus: int | None = None) -> int:
    """Torch threads for each of `jobs` processes sharing `cpus` cores (at least one)."""
    return max(1, (cpus or os.cpu_count() or 1) // jobs)


def _child(config: EvaluateConfig, threads: int) -> None:
    """Run `cpwb evaluate` on `config` in a new process; a failure raises with the log's last line and its path."""
    out = Path(config.output_dir)
    config_file = out / "evaluate_request.yaml"
    atomic_write_text(config_file, yaml_text({**to_dict(config), "progress": False}))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    with open(out / LOG, "w", encoding="utf-8") as log:
        code = subprocess.run([sys.executable, "-m", "cpwb", "evaluate", "--config", str(config_file)],
                              stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        lines = [line for line in (out / LOG).read_text(encoding="utf-8").splitlines() if line.strip()]
        raise CpwbError(f"evaluation of {out} failed (exit {code}): {lines[-1] if lines else 'no output'} "
                        f"(log: {out / LOG})")


def _finished(configs: dict[str, EvaluateConfig], keys: dict[str, dict[str, str]]) -> int:
    """Protocols recorded so far with the settings asked for, across the folders."""
    count = 0
    for label, config in configs.items():
        for name, key in keys[label].items():
            path = Path(config.output_dir) / "protocols" / f"{name}.json"
            try:
                count += path.is_file() and json.loads(path.read_text()).get("key") == key
            except (OSError, ValueError):  # being replaced right now: counted at the next look
                pass
    return count


def run_evaluations(configs: dict[str, EvaluateConfig], jobs: int = 1) -> dict[str, dict[str, Any]]:
    """Evaluate each labelled config; `jobs` at once. Returns each label's summary, as `run_evaluation` gives it.

    With `jobs` 1 they run one after the other in this process (progress bars as configured). With more, each runs
    in a process of its own with cores/jobs torch threads; a finished protocol is not run again (each child resumes
    as `cpwb evaluate` does), and a failed child stops the lot with its log's last line.
    """
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}", field="jobs")
    folders = [str(Path(c.output_dir).resolve()) for c in configs.values()]
    if len(set(folders)) != len(folders):
        raise ConfigError("two evaluations share one output_dir", field="output_dir")
    if jobs == 1 or len(configs) == 1:
        return {label: run_evaluation(config) for label, config in configs.items()}
    from tqdm.auto import tqdm

    for config in configs.values():
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    threads = threads_per_job(min(jobs, len(configs)))
    keys = {label: recorded_keys(config) for label, config in configs.items()}
    total = sum(len(k) for k in keys.values())
    show = any(c.progress for c in configs.values())
    with ThreadPoolExecutor(max_workers=jobs) as pool, \
            tqdm(total=total, desc=f"evaluating {', '.join(configs)}", unit="protocol", disable=not show) as bar:
        futures = [pool.submit(_child, config, threads) for config in configs.values()]
        while not all(f.done() for f in futures):
            time.sleep(1.0)
            bar.update(_finished(configs, keys) - bar.n)
        for future in futures:
            future.result()  # the first failure, with its log line
        bar.update(_finished(configs, keys) - bar.n)
    return {label: recorded_summary(config, keys[label]) for label, config in configs.items()}
