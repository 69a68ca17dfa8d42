"""Tuning study files: the method, its search space, objectives, constraints and budget, checked before any trial.

A study file (YAML, see configs/tuning/) mirrors `StudySpec`. Every setting in `base` and every parameter in `space`
is checked the way a sweep point is (a field of TrainConfig or QuickEvalConfig, or a parameter of the point
notebook, within its range), at both ends of its range, so a bad study fails in one line before any training. The
storage (cpwb.app.storage) is `sqlite:///` (the default, a file under the study's folder), any SQLAlchemy URL
(PostgreSQL, MySQL) or a journal file (`journal:///FILE`) for workers on many machines.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cpwb.app.sweep import METRIC_ORDER, Grid, _resolve, declared_parameters
from cpwb.core.config import load_yaml_config
from cpwb.core.errors import ConfigError
from cpwb.core.settings import check_settings, setting
from cpwb.steps.training.config import Objective

METHODS = Objective.__args__  # what `method` may name: TrainConfig's objectives (cp, dpo, simpo, ...)
OBJECTIVE_METRICS = METRIC_ORDER  # the numbers a trial's result.json gives (cpwb.app.sweep.result_row)
NOT_DIGESTED = ("storage", "source", "heartbeat_seconds", "max_retries", "confirm_seeds")
SET_BY_STUDY = ("objective", "output_dir", "seed")  # `method`, the trial folder and `seed` set these
Direction = Literal["minimize", "maximize"]


@dataclass
class StudySpec:
    """A tuning study (the YAML study file mirrors it); one study per method, the same budget for each."""

    name: str = setting("", "the study's name: its folder under --output-root and its name in the storage")
    method: str = setting("cp", f"the training objective tuned: one of {list(METHODS)}")
    base_file: str | None = setting(None, "a YAML file of settings (e.g. ../cp_default.yaml, relative to the study "
                                          "file) under `base`; its objective, seed and output_dir are the study's")
    base: dict[str, Any] = setting({}, "settings every trial shares (TrainConfig, QuickEvalConfig or point-notebook "
                                       "parameters), as a sweep grid's base")
    space: dict[str, Any] = setting({}, "parameter -> {low, high[, log, step]} or {choices: [...]}; integers when "
                                        "low and high are integers")
    objectives: dict[str, Any] = setting({"toxicity_change": "minimize", "ppl_change": "minimize"},
                                         "metric of the trial's result -> minimize or maximize")
    constraints: dict[str, Any] = setting({"similarity": {"min": 0.2}},
                                          "metric -> {min and/or max}: trials outside are infeasible (never on the "
                                          "front), e.g. collapsed continuations of low prompt similarity")
    trials: int = setting(16, "completed trials the study runs to, over all workers", check=">=1")
    seed: int = setting(0, "training seed of every trial, and the sampler's seed (worker 0)")
    startup_trials: int = setting(6, "trials sampled at random before the multi-objective TPE sampler models the "
                                     "results", check=">=1")
    confirm_seeds: list[int] = setting([1, 2, 3], "seeds `cpwb tune --confirm` re-runs each method's best trial "
                                                 "under each perplexity budget on: fresh ones, not the search's own, "
                                                 "so the winner is not judged on the seed it was picked on")
    storage: str | None = setting(None, "Optuna storage URL (sqlite:///FILE, postgresql://..., journal:///FILE); null: "
                                        "sqlite:///<study folder>/study.db")
    heartbeat_seconds: int = setting(60, "a running trial's heartbeat period; a trial silent for twice this is "
                                         "marked failed and retried", check=">=1")
    max_retries: int = setting(2, "retries of a trial whose worker died (heartbeat lost)", check=">=0")
    notebook: str | None = setting(None, "the notebook each trial executes; null: notebooks/points/"
                                         "train_evaluate.ipynb, as sweep points")
    source: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        check_settings(self)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"must be a folder name of letters, digits, '.', '_' or '-', got {self.name!r}",
                              field="name")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; known: {list(METHODS)}", field="method")
        if not self.objectives:
            raise ConfigError("name at least one metric to optimise", field="objectives")
        for metric, direction in self.objectives.items():
            _known_metric(metric, f"objectives.{metric}")
            if direction not in Direction.__args__:
                raise ConfigError(f"must be minimize or maximize, got {direction!r}", field=f"objectives.{metric}")
        for metric, bounds in self.constraints.items():
            _known_metric(metric, f"constraints.{metric}")
            if not isinstance(bounds, dict) or not bounds or set(bounds) - {"min", "max"} or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds.values()):
                raise ConfigError(f"must be {{min: number}} and/or {{max: number}}, got {bounds!r}",
                                  field=f"constraints.{metric}")
        if not self.confirm_seeds or len(set(self.confirm_seeds)) != len(self.confirm_seeds):
            raise ConfigError(f"must be distinct seeds, got {self.confirm_seeds}", field="confirm_seeds")
        if not self.space:
            raise ConfigError("name at least one parameter to search", field="space")
        for key in SET_BY_STUDY:
            if key in self.base or key in self.space:
                raise ConfigError("is set by the study (method, seed, one folder per trial)",
                                  field=f"{'base' if key in self.base else 'space'}.{key}")

    @property
    def grid(self) -> Grid:
        """The study as a one-point sweep grid: the trial runner and the settings checks are the sweep's."""
        grid = Grid(name=self.name, base={**self.base, "objective": self.method}, notebook=self.notebook)
        grid.source = self.source
        return grid

    def digest(self) -> str:
        """What makes two workers' study files the same study: the settings that decide which trials run and how
        they are judged. Where the storage is, the retry policy and the confirmation seeds may differ."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_DIGESTED}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _known_metric(metric: str, where: str) -> None:
    if metric not in OBJECTIVE_METRICS:
        raise ConfigError(f"unknown metric {metric!r}; known: {list(OBJECTIVE_METRICS)}", field=where)


def load_study_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> StudySpec:
    """Read and check a study file (`overrides` replace top-level keys); every trial's settings are checked here."""
    try:
        spec = load_yaml_config(StudySpec, path, overrides)
    except ConfigError as err:
        raise ConfigError(err.reason, path, field=err.field) from None
    spec.source = str(path)
    if spec.base_file:
        spec.base = {**_base_file(Path(path).parent / spec.base_file, spec), **spec.base}
    distributions(spec)
    return spec


def _base_file(path: Path, spec: StudySpec) -> dict[str, Any]:
    """The settings of `base_file`, less those the study sets."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"file not found: {path}", spec.source, field="base_file")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a mapping of settings", spec.source, field="base_file")
    return {k: v for k, v in data.items() if k not in SET_BY_STUDY}


# ----------------------------------------------------------------------------------------------- search space


def _distribution(name: str, spec: Any, where: str):
    """One parameter's Optuna distribution from its study-file entry."""
    import optuna.distributions as od

    if not isinstance(spec, dict):
        raise ConfigError(f"must be {{low, high}} or {{choices}}, got {spec!r}", field=where)
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ConfigError(f"empty or malformed choices: {spec!r}", field=where)
        return od.CategoricalDistribution(spec["choices"])
    unknown = set(spec) - {"low", "high", "log", "step"}
    if unknown or not {"low", "high"} <= set(spec):
        raise ConfigError(f"needs low and high (optional log, step), got {sorted(spec)}", field=where)
    low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
    numbers = (low, high) + ((step,) if step is not None else ())
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise ConfigError(f"low, high and step must be finite numbers, got {spec!r}", field=where)
    if not low < high:
        raise ConfigError(f"empty range: low {low} must be below high {high}", field=where)
    if log and low <= 0:
        raise ConfigError(f"a log range needs low > 0, got {low}", field=where)
    if step is not None and (step <= 0 or log):
        raise ConfigError("step must be positive and cannot go with log", field=where)
    if all(isinstance(v, int) for v in numbers):
        return od.IntDistribution(low, high, log=log, step=step or 1)
    return od.FloatDistribution(float(low), float(high), log=log, step=step)


def _ends(distribution) -> list[Any]:
    """The values that bound a distribution: what the settings checks are run on."""
    choices = getattr(distribution, "choices", None)
    return list(choices) if choices is not None else [distribution.low, distribution.high]


def distributions(spec: StudySpec) -> dict[str, Any]:
    """Every parameter's Optuna distribution, each end of its range checked like a sweep point's settings."""
    grid = spec.grid
    declared = declared_parameters(grid.notebook_path)

    def check(settings: dict[str, Any], section: str, what: str) -> None:
        try:
            _resolve(settings, grid, declared, section)
        except ConfigError as err:
            reason = err.reason.split(": ", 1)[-1]  # _resolve's own "in <where>: " prefix
            field = section if err.field in (None, section.rsplit(".", 1)[-1]) else f"{section}: {err.field}"
            raise ConfigError(f"{what}{reason}", spec.source, field=field) from None

    check(grid.base, "base", "")
    result = {}
    for name, entry in spec.space.items():
        try:
            result[name] = _distribution(name, entry, f"space.{name}")
        except ConfigError as err:
            raise ConfigError(err.reason, spec.source, field=err.field) from None
        for value in _ends(result[name]):
            check({**grid.base, name: value}, f"space.{name}", f"at {value!r}: ")
    return result


def trial_parameters(spec: StudySpec, values: dict[str, Any]) -> dict[str, Any]:
    """A trial's complete point parameters (everything the notebook gets but output_dir) for sampled `values`."""
    from cpwb.app.sweep import _absolute_paths

    grid = spec.grid
    resolved = _resolve({**grid.base, **values}, grid, declared_parameters(grid.notebook_path), "trial")
    return {**_absolute_paths(resolved), "seed": spec.seed}
