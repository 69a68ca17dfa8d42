"""`cpwb sweep GRID --storage URL`: a grid's points spread over processes and machines by the engine of `cpwb tune`.

Without `--storage`, a sweep runs on one machine (cpwb.app.sweep.run_grid, `--jobs` kernels). With it, the grid
becomes an Optuna study in that storage (SQLite for one machine, any SQLAlchemy URL such as PostgreSQL for many):

- Each chosen point is enqueued once as a fixed trial (`Study.enqueue_trial`, its id as the one parameter). A
  worker takes the next waiting trial; Optuna's RDB storage moves a trial from waiting to running in one
  transaction, so two workers never take the same one.
- Heartbeats (`--heartbeat-seconds`) mark the trial of a worker killed mid-point failed, and
  RetryHeartbeatStaleTrialCallback queues it again with the same point; the retry resumes the point's training from
  its checkpoint in the point's folder, as a re-run sweep does.
- A trial Optuna samples on its own (a worker asking after the queue emptied) and a point already held by an
  earlier live trial (two workers enqueueing the same point at once) are pruned at once and run nothing.
- Each finished point's results.csv row is kept in its trial, and results.csv is written from the storage, so
  workers on machines that share no folder still make one table; a point's files stay where it ran.

Optuna's GridSampler was the other way to do this: each worker draws an unvisited point at random, and under
concurrency a point can run twice (Optuna documents it); enqueued trials cannot. The grid, the point notebook and
the resume-by-folder behaviour are the sweep's own, so a storage-backed sweep writes the same results.csv.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cpwb.app.storage import open_storage
from cpwb.app.study import StudySpec
from cpwb.app.sweep import Grid, Point, prepare, result_row, run_point, select, write_results
from cpwb.core.errors import ConfigError, CpwbError
from cpwb.core.settings import check_settings, same_as, setting

PARAMETER = "point"  # the one parameter of a grid trial: the point's id


@dataclass
class GridStorage:
    """Where and how the workers of a storage-backed sweep meet (`cpwb sweep GRID --storage URL ...`)."""

    storage: str | None = setting(None, "Optuna storage URL (sqlite:///FILE, postgresql://user@host/db, "
                                        "journal:///FILE): the grid's points become an Optuna study there, and every "
                                        "worker given the same URL, on this machine or another, takes points from "
                                        "it; null: the sweep runs on this machine alone")
    heartbeat_seconds: int = same_as(StudySpec, "heartbeat_seconds")
    max_retries: int = same_as(StudySpec, "max_retries")

    def __post_init__(self) -> None:
        check_settings(self)


def study_name(grid: Grid) -> str:
    """The grid's study name in the storage."""
    return f"sweep-{grid.name}"


def grid_digest(grid: Grid) -> str:
    """What makes two workers' grids the same sweep: every field but the file it was read from."""
    fields = {k: v for k, v in dataclasses.asdict(grid).items() if k != "source"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_grid_study(grid: Grid, url: str, heartbeat_seconds: int = 60, max_retries: int = 2):
    """Create or join the grid's study; refuse a storage holding a sweep of that name with other settings."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, heartbeat_seconds, max_retries)
    study = optuna.create_study(study_name=study_name(grid), storage=storage, load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    recorded = study.user_attrs.get("grid_digest")
    if recorded is None:
        study.set_user_attr("grid_digest", grid_digest(grid))
    elif recorded != grid_digest(grid):
        raise ConfigError(f"the storage holds a sweep {grid.name!r} with other settings (digest {recorded}, this "
                          f"grid {grid_digest(grid)}); rename the grid or use another storage", grid.source,
                          field="name")
    return study


def _live_states():
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)


def enqueue(study, points: list[Point]) -> int:
    """Queue every point that no live trial (complete, running, waiting) holds; returns how many were queued."""
    held = {t.params.get(PARAMETER) for t in study.get_trials(deepcopy=False, states=_live_states())}
    missing = [p for p in points if p.id not in held]
    for point in missing:
        study.enqueue_trial({PARAMETER: point.id}, skip_if_exists=False)
    return len(missing)


class PointFailed(CpwbError):
    """A point's notebook failed (its row, with the error, is kept in the trial; the sweep goes on)."""


def make_objective(grid: Grid, points: list[Point], folder: Path, columns: list[str], kernel: str = "python3"
                   ) -> Callable:
    """The Optuna objective of a grid trial: run its point (resuming in the point's folder), keep its row."""
    import optuna

    by_id = {p.id: p for p in points}
    ids = list(by_id)

    def objective(trial) -> float:
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        if "fixed_params" not in frozen.system_attrs:  # sampled by Optuna after the queue emptied: no grid point
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("not an enqueued grid point")
        point_id = trial.suggest_categorical(PARAMETER, ids)
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=_live_states())
                   if t.number < trial.number and t.params.get(PARAMETER) == point_id]
        if earlier:  # two workers queued the same point at once: the earlier trial runs it
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned(f"point {point_id} is held by trial {earlier[0].number}")
        row = run_point(grid, by_id[point_id], folder / point_id, columns, kernel)
        trial.set_user_attr("row", row)
        if row["status"] != "completed":
            raise PointFailed(row["error"])
        value = row.get("toxicity_change")
        return float(value) if isinstance(value, (int, float)) else 0.0

    return objective


def storage_rows(study, points: list[Point], folder: Path, columns: list[str]) -> list[dict[str, Any]]:
    """results.csv rows from the storage: each point's latest finished trial's row, else a pending row."""
    from optuna.trial import TrialState

    latest: dict[str, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        if "row" in t.user_attrs:  # in trial order: a later trial of a point (its retry or re-run) wins
            latest[t.params[PARAMETER]] = t.user_attrs["row"]
    return [latest.get(p.id) or result_row(p, folder / p.id, columns, "pending") for p in points]


def work(grid: Grid, settings: GridStorage, output_root: str | Path = "outputs/sweeps",
         only: str | list[str] | None = None, kernel: str = "python3", say: Callable[[str], None] = print) -> Path:
    """One worker: queue the chosen points the storage does not hold yet, then run waiting points until none is
    waiting or running; returns results.csv (every point of the grid: completed, failed or pending)."""
    import optuna
    from optuna.trial import TrialState

    heartbeat_seconds = settings.heartbeat_seconds
    study = open_grid_study(grid, settings.storage, heartbeat_seconds, settings.max_retries)  # fails before any point
    points, folder, columns = prepare(grid, output_root)
    queued = enqueue(study, select(points, only))
    say(f"sweep {grid.name}: {queued} point(s) queued in {study_name(grid)}")
    objective = make_objective(grid, points, folder, columns, kernel)
    results = folder / "results.csv"
    poll = max(1.0, min(30.0, heartbeat_seconds / 2))
    while True:
        states = [t.state for t in study.get_trials(deepcopy=False)]
        if TrialState.WAITING in states:
            ran: list = []
            study.optimize(objective, n_trials=1, catch=(PointFailed,), gc_after_trial=False,
                           callbacks=[lambda _, trial: ran.append(trial)])
            write_results(results, storage_rows(study, points, folder, columns))
            if ran and ran[-1].state != TrialState.PRUNED:
                say(f"sweep {grid.name}: {ran[-1].params.get(PARAMETER)} {ran[-1].state.name.lower()}")
            continue
        if TrialState.RUNNING not in states:
            break
        optuna.storages.fail_stale_trials(study)  # another worker's point may have lost its heartbeat
        time.sleep(poll)
    return write_results(results, storage_rows(study, points, folder, columns))


def run(grid: Grid, settings: GridStorage, output_root: str | Path = "outputs/sweeps",
        only: str | list[str] | None = None, jobs: int = 1, kernel: str = "python3") -> Path:
    """`jobs` workers in this process (threads: each point runs in its own kernel process, as `cpwb sweep --jobs`
    does); the grid's study is created once before they start, so they do not race to create it."""
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}", field="jobs")
    open_grid_study(grid, settings.storage, settings.heartbeat_seconds, settings.max_retries)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(work, grid, settings, output_root, only, kernel) for _ in range(jobs)]
        return [f.result() for f in futures][0]
