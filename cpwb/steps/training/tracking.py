"""Experiment tracking through accelerate's trackers: TensorBoard, trackio or MLflow, beside metrics.jsonl.

metrics.jsonl stays the record of truth and is always written; `report_to` adds the trackers named there (those
installed), which get the run's settings as hyper-parameters and every step's metrics (loss, log J, phi of
positives and negatives, KL, lr, tokens/s, memory), from the main process only.
"""
from __future__ import annotations

import importlib.util
from typing import Any

from cpwb.core.config import to_dict

# tracker name (report_to) -> the package it needs
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "mlflow": "mlflow"}


def missing_tracker(names: list[str]) -> str | None:
    """The first tracker of `names` whose package is not installed, as a one-line reason, else None."""
    for name in names:
        package = TRACKER_PACKAGES.get(name)
        if package is None:
            return f"unknown tracker {name!r}; known: {sorted(TRACKER_PACKAGES)}"
        if importlib.util.find_spec(package) is None:
            return f"tracker {name!r} needs the package {package} (pip install {package})"
    return None


def hyperparameters(config) -> dict[str, Any]:
    """A config as trackers accept it: numbers, strings and booleans (lists and nulls written as text)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in to_dict(config).items()}


class Tracking:
    """The run's trackers (none when `report_to` is empty): started with the settings, fed every step's metrics."""

    def __init__(self, accelerator, config) -> None:
        self.accelerator, self.enabled = accelerator, bool(config.report_to)
        if self.enabled:
            accelerator.init_trackers("cpwb", config=hyperparameters(config))

    def log(self, record: dict[str, Any], step: int) -> None:
        """One step's numbers (all but the step itself)."""
        if self.enabled:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def finish(self) -> None:
        """Flush and close the trackers."""
        if self.enabled:
            self.accelerator.end_training()
