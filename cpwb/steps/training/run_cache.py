"""Finished training runs kept and reused: a run with the settings, pairs and training code of one already trained
on this machine is copied in instead of trained again.

The same adapter serves several grids: a DExperts alpha curve trains its expert and anti-expert once; the `lee2024`
comparison (configs/peers_lee2024.yaml) trains CP, DPO and GRPO at the settings and seeds of the quick grids'
points (configs/peers_data.yaml, configs/peers_trained.yaml), and a GRPO run alone costs about an hour of CPU. With
`run_cache` (off by default, so a test or a one-off run always trains; on in the research grids) each finished run
(settings, data record, metrics, adapter and last checkpoint) is stored under `$CPWB_CACHE/runs/<key>/`, and a run
that finds the entry of its key copies it in and resumes from it, so it trains no step and saves the same adapter.
The copied metrics keep the original step times, so the fitting cost a sweep reports stays that of the training.

The key digests every setting that changes what is fitted (all but config.NOT_FITTED: where the run is written,
how it reports, what it reuses), the pairs file's content, the
source of the code a training depends on (cpwb.core, data, engine and steps.training) and the versions of torch,
transformers, peft, trl and accelerate: a change to any of them trains again. Runs under a launcher (several
processes) neither read nor write the cache. Entries and copied files are written with atomic_path: whole or absent.

No library offers this: Hugging Face's caches hold downloads and datasets, not trained runs.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path

from cpwb.core.config import to_dict
from cpwb.core.files import atomic_path, sha256_file
from cpwb.core.provenance import digest
from cpwb.steps.training.checkpoints import latest_checkpoint
from cpwb.steps.training.config import NOT_FITTED, TrainConfig

RUN_FILES = ("config.yaml", "data.json", "metrics.jsonl")  # with adapter/ and the last checkpoint: a finished run
CODE = ("core", "data", "engine", "steps/training")  # the packages a training's result depends on
LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate")


@lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 over the source of the code a training depends on (CODE, file names and contents)."""
    root = Path(__file__).resolve().parents[2]
    sha = hashlib.sha256()
    for package in CODE:
        for path in sorted((root / package).rglob("*.py")):
            sha.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = ""
    return found


def cached_run(config: TrainConfig) -> Path:
    """The cache entry of a run with these settings, pairs, code and libraries (it may not exist)."""
    from cpwb.engine.assets import cache_dir

    settings = {k: v for k, v in to_dict(config).items() if k not in NOT_FITTED}
    pairs = sha256_file(config.pairs) if config.pairs else None
    key = {"settings": settings, "pairs": pairs, "code": code_digest(), "libraries": _library_versions()}
    return cache_dir() / "runs" / digest(key)


def usable(config: TrainConfig) -> bool:
    """Whether this run reads and writes the cache: asked for, and one process (not under a launcher)."""
    return config.run_cache and int(os.environ.get("WORLD_SIZE", "1")) == 1


def _finished(folder: Path) -> bool:
    return (folder / "adapter").is_dir() and (folder / "metrics.jsonl").is_file()


def restore(config: TrainConfig) -> bool:
    """Copy the stored run of this config into its output_dir when that holds no training of its own (no checkpoint,
    no adapter, no TRL checkpoint); True when it did, and the run then resumes from it. The folder's other files
    (a sweep point's executing notebook) stay."""
    run_dir, stored = Path(config.output_dir), cached_run(config)
    if not usable(config) or not _finished(stored) or latest_checkpoint(run_dir) is not None or _finished(run_dir):
        return False
    if run_dir.is_dir() and any(run_dir.glob("*/checkpoint-*")):  # TRL's own checkpoints: a started RL run
        return False
    copy_run(stored, run_dir)
    return True


def store(config: TrainConfig) -> None:
    """Keep a finished run (adapter saved) under its key, unless an entry is there already."""
    run_dir, stored = Path(config.output_dir), cached_run(config)
    if usable(config) and _finished(run_dir) and not _finished(stored):
        with atomic_path(stored) as tmp:
            copy_run(run_dir, tmp)


def copy_run(source: Path, target: Path) -> None:
    """The files a finished run resumes from, each written whole: its settings, data record and metrics, then its
    adapter (with the metrics, what marks a TRL run finished), then its last checkpoint (what the CP loop resumes
    from). Interrupted, the target holds no checkpoint and trains from the start."""
    target.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (source / name).is_file():
            with atomic_path(target / name) as tmp:
                shutil.copy2(source / name, tmp)
    with atomic_path(target / "adapter") as tmp:
        shutil.copytree(source / "adapter", tmp)
    checkpoint = latest_checkpoint(source)
    if checkpoint is not None:
        with atomic_path(target / "checkpoints" / checkpoint.name) as tmp:
            shutil.copytree(checkpoint, tmp)
