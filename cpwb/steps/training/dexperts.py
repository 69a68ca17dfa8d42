"""DExperts fitted on CP's pairs: an expert adapter tuned on the positives and an anti-expert on the negatives.

Both are plain likelihood fine-tunes (objective positives_only, no KL term) with the run's LoRA, step and seed
settings; the anti-expert's pairs have their sides swapped (swap_fraction 1), so its "positives" are the toxic
texts. They train into `<output_dir>/expert/` and `<output_dir>/anti/` (each resumable like any run), then
`<output_dir>/adapter/` gets both and `dexperts.json` (alpha): what `cpwb evaluate --adapter` and the sweeps load
(cpwb.engine.dexperts). The fitting cost is both trainings' steps.

alpha only matters at decoding time, so a curve over alpha needs one pair of trainings, not one per point: with
`expert_cache` each finished expert run (its last checkpoint, metrics and settings) is stored under
`$CPWB_CACHE/dexperts/<digest of its settings and pairs file>/` and copied into the next run with the same
settings, which then resumes at its last step. The copied metrics keep the original step times, so the fitting
cost a sweep reports stays that of the training. The key does not cover cpwb's own code: clear the folder after
changing the training loop.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from cpwb.core.config import to_dict, yaml_text
from cpwb.core.files import atomic_path, atomic_write_text, sha256_file
from cpwb.core.provenance import digest
from cpwb.steps.training.checkpoints import latest_checkpoint
from cpwb.steps.training.config import TrainConfig

RUN_FILES = ("config.yaml", "data.json", "metrics.jsonl")  # with the last checkpoint: what resuming a run reads


def expert_configs(config: TrainConfig) -> tuple[TrainConfig, TrainConfig]:
    """The expert's and the anti-expert's training runs of a DExperts run."""
    run_dir = Path(config.output_dir)  # alpha back to its default: the experts do not depend on it
    common = {"objective": "positives_only", "kl_weight": 0.0,
              "dexperts_alpha": TrainConfig.__dataclass_fields__["dexperts_alpha"].default}
    return (dataclasses.replace(config, **common, output_dir=str(run_dir / "expert")),
            dataclasses.replace(config, **common, swap_fraction=1.0, output_dir=str(run_dir / "anti")))


def fit_dexperts(config: TrainConfig, resume: bool = False):
    """Train both experts (resuming each), save the DExperts artefact, return a TrainResult whose model is the
    DExperts combination on a fresh base model."""
    from cpwb.engine.assets import load_causal_lm
    from cpwb.engine.device import pick_device
    from cpwb.engine.dexperts import load_dexperts, save_dexperts
    from cpwb.steps.training.trainer import TrainResult

    expert_config, anti_config = expert_configs(config)
    expert = _train_cached(expert_config, resume, config.expert_cache)
    anti = _train_cached(anti_config, resume, config.expert_cache)
    run_dir, adapter_dir = Path(config.output_dir), Path(config.output_dir) / "adapter"
    atomic_write_text(run_dir / "config.yaml", yaml_text(to_dict(config)))
    save_dexperts(adapter_dir, expert.adapter_dir, anti.adapter_dir, config.dexperts_alpha,
                  {"steps": config.steps, "model": config.model})
    del expert.model, anti.model
    base = load_causal_lm(config.model, device=str(pick_device(config.device)), dtype=config.dtype,
                          trust_remote_code=config.trust_remote_code)
    model = load_dexperts(adapter_dir, base)
    history = [{**m, "expert": "expert"} for m in expert.metrics] + [{**m, "expert": "anti"} for m in anti.metrics]
    return TrainResult(run_dir, adapter_dir, history, anti.heldout, model, anti.tokenizer)


def cached_run(config: TrainConfig) -> Path:
    """Where a finished expert run with these settings (and this pairs file's content) is kept."""
    from cpwb.engine.assets import cache_dir

    settings = {k: v for k, v in to_dict(config).items() if k not in ("output_dir", "progress", "report_to")}
    pairs = sha256_file(config.pairs) if config.pairs else None
    return cache_dir() / "dexperts" / digest({"settings": settings, "pairs": pairs})


def _train_cached(config: TrainConfig, resume: bool, use_cache: bool):
    """Train one expert; with the cache, start from a stored finished run of the same settings, and store this
    one when it finishes."""
    from cpwb.steps.training.trainer import train

    run_dir, stored = Path(config.output_dir), cached_run(config)
    if use_cache and latest_checkpoint(run_dir) is None and latest_checkpoint(stored) is not None:
        with atomic_path(run_dir) as tmp:  # no checkpoint there: nothing of its own to keep
            _copy_run(stored, tmp)
        resume = True
    result = train(config, resume=resume)
    if use_cache and latest_checkpoint(stored) is None and (run_dir / "adapter").is_dir():
        with atomic_path(stored) as tmp:
            _copy_run(run_dir, tmp)
    return result


def _copy_run(source: Path, target: Path) -> None:
    """The files a finished run resumes from: its settings, data record, metrics and last checkpoint (into a
    temporary folder of atomic_path, renamed whole)."""
    checkpoint = latest_checkpoint(source)
    target.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    shutil.copytree(checkpoint, target / "checkpoints" / checkpoint.name, dirs_exist_ok=True)
