"""`cpwb tune`: equal-budget multi-objective tuning on Optuna, one worker or many, over one shared storage.

Each trial is one train-and-evaluate point, executed with papermill as a sweep point is (cpwb.app.sweep.run_point),
into `<output_root>/<study>/trial-NNN/`, so it stays inspectable and resumes its training when retried. Optuna does
the search (a multi-objective TPE sampler with constraints) and the bookkeeping: the study lives in its storage
(SQLite by default, any SQLAlchemy URL for many machines), heartbeats mark a killed worker's trial failed and
RetryHeartbeatStaleTrialCallback queues it again with the same parameters (it resumes in the same folder).

What Optuna does not do and this module adds: an exact trial count over concurrent workers. `study.optimize(
n_trials=...)` counts per worker, and MaxTrialsCallback stops only after a trial ends, so two workers overshoot.
Here a trial runs only if its rank among the live trials (complete, running or waiting, by number) is within the
budget; a trial asked beyond it is pruned at once as surplus, and a failed trial leaves the live set, so its retry
takes its place. After every trial the worker exports the storage to results.csv (one row per trial), so the study
can be read, plotted and kept in git without Optuna.
"""
from __future__ import annotations

import hashlib
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from cpwb.app.runner import REPO_ROOT
from cpwb.app.storage import open_storage, storage_url
from cpwb.app.study import StudySpec, distributions, load_study_spec, trial_parameters
from cpwb.app.sweep import Point, run_point, write_results
from cpwb.core.errors import ConfigError, CpwbError

RESULT_METRICS = ("greedy_toxicity", "base_greedy_toxicity", "toxicity_change", "wikitext2_ppl",
                  "base_wikitext2_ppl", "ppl_change", "phi_gap", "similarity", "base_similarity", "train_seconds",
                  "evaluate_seconds")


class TrialFailed(CpwbError):
    """A trial's notebook failed or gave no usable metrics (the trial is marked failed; the study goes on)."""


def study_folder(spec: StudySpec, output_root: str | Path) -> Path:
    """`<output_root>/<study name>/`, a relative root taken from the repository root (as sweeps do)."""
    root = Path(output_root)
    return (root if root.is_absolute() else REPO_ROOT / root) / spec.name


def _sampler(spec: StudySpec, seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials, multivariate=True,
                                      constant_liar=True)  # constraints: Trial.set_constraint, per trial


def open_study(spec: StudySpec, url: str):
    """Create or join the study in its storage; refuse a storage that holds the same name with other settings."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, spec.heartbeat_seconds, spec.max_retries)
    try:
        study = optuna.create_study(study_name=spec.name, storage=storage, load_if_exists=True,
                                    directions=list(spec.objectives.values()), sampler=_sampler(spec, spec.seed))
    except ValueError as err:  # same name, other directions
        raise ConfigError(f"the storage holds a study {spec.name!r} that differs: {err}", spec.source,
                          field="name") from None
    recorded = study.user_attrs.get("spec_digest")
    if recorded is None:
        study.set_user_attr("spec_digest", spec.digest())
        study.set_user_attr("method", spec.method)
    elif recorded != spec.digest():
        raise ConfigError(f"the storage holds a study {spec.name!r} with other settings (digest {recorded}, this "
                          f"file {spec.digest()}); rename the study or use another storage", spec.source, field="name")
    return study


# ----------------------------------------------------------------------------------------------- one trial


def _suggest(trial, name: str, distribution) -> Any:
    import optuna.distributions as od

    if isinstance(distribution, od.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, od.IntDistribution):  # integers always carry a step (1 when log-uniform)
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)
    step = None if distribution.log else distribution.step
    return trial.suggest_float(name, distribution.low, distribution.high, step=step, log=distribution.log)


def constraint_values(spec: StudySpec, metrics: dict[str, float]) -> dict[str, float]:
    """Optuna's constraint values (<= 0 is feasible): floor - value for a min, value - ceiling for a max."""
    values = {}
    for metric, bounds in spec.constraints.items():
        value = metrics.get(metric, math.nan)
        for side, bound in sorted(bounds.items()):
            gap = bound - value if side == "min" else value - bound
            values[f"{metric}.{side}"] = gap if math.isfinite(gap) else 1.0  # an unmeasured metric is infeasible
    return values


def make_objective(spec: StudySpec, folder: Path, kernel: str = "python3") -> Callable:
    """The Optuna objective: run one trial's point notebook, return its objective metrics."""
    import optuna
    from optuna.trial import TrialState

    space = distributions(spec)
    live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)

    def objective(trial) -> list[float]:
        trials = trial.study.get_trials(deepcopy=False, states=live)
        if sum(t.number <= trial.number for t in trials) > spec.trials:  # asked beyond the budget meanwhile
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("beyond the study's trial count")
        frozen = next(t for t in trials if t.number == trial.number)
        history = frozen.system_attrs.get("retry_history", [])
        point_id = f"trial-{(history or [trial.number])[0]:03d}"  # a retry resumes in its original's folder
        trial.set_user_attr("folder", point_id)
        values = {name: _suggest(trial, name, distribution) for name, distribution in space.items()}
        point = Point(point_id, point_id, values, spec.seed, trial_parameters(spec, values))
        row = run_point(spec.grid, point, folder / point_id, [], kernel)
        if row["status"] != "completed":
            trial.set_user_attr("error", row["error"])
            raise TrialFailed(row["error"])
        metrics = {k: float(v) for k, v in row.items() if k in RESULT_METRICS and isinstance(v, (int, float))}
        trial.set_user_attr("metrics", metrics)
        constraints = constraint_values(spec, metrics)
        trial.set_user_attr("constraints", constraints)
        for key, value in constraints.items():
            trial.set_constraint(key, value)
        missing = [m for m in spec.objectives if not math.isfinite(metrics.get(m, math.nan))]
        if missing:
            trial.set_user_attr("error", f"no finite {missing[0]} in {point_id}/result.json")
            raise TrialFailed(trial.user_attrs["error"])
        return [metrics[m] for m in spec.objectives]

    return objective


# ----------------------------------------------------------------------------------------------- results


def trial_rows(study, spec: StudySpec) -> list[dict[str, Any]]:
    """One row per trial of the storage: state, folder, parameters, metrics, feasibility and the Pareto front."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    front = {t.number for t in study.best_trials} if any(t.state == TrialState.COMPLETE for t in trials) else set()
    rows = []
    for t in trials:
        constraints = t.user_attrs.get("constraints")
        history = t.system_attrs.get("retry_history", [])
        rows.append({"trial": t.number, "method": spec.method, "state": t.state.name.lower(),
                     "folder": t.user_attrs.get("folder", ""), "retry_of": history[-1] if history else "",
                     **{f"param_{k}": v for k, v in t.params.items()},
                     **t.user_attrs.get("metrics", {}),
                     "feasible": all(c <= 0 for c in constraints.values()) if constraints is not None else "",
                     "pareto": t.number in front, "seed": spec.seed,
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else "",
                     "error": t.user_attrs.get("error", "surplus" if t.user_attrs.get("surplus") else "")})
    return rows


def export(study, spec: StudySpec, folder: Path) -> Path:
    """results.csv of the study (atomic; written by every worker after every trial, from the storage)."""
    return write_results(folder / "results.csv", trial_rows(study, spec))


# ----------------------------------------------------------------------------------------------- workers


def _worker_seed(spec: StudySpec, worker: int, asked: int) -> int:
    """The sampler seed before a worker's next trial: reproducible for one worker, distinct between workers."""
    return int.from_bytes(hashlib.sha256(f"{spec.seed}/{worker}/{asked}".encode()).digest()[:4], "little")


def work(spec: StudySpec, url: str, output_root: str | Path = "outputs/tuning", worker: int | None = None,
         kernel: str = "python3", say: Callable[[str], None] = print) -> Path:
    """One worker: run trials until the study holds `spec.trials` completed ones; returns results.csv.

    With a worker index of None, the worker is 0 unless trials are already running (another worker is on the
    study), then one drawn from this host and process, so that two workers never draw the same random trials.
    """
    import optuna
    from optuna.trial import TrialState

    folder = study_folder(spec, output_root)
    study = open_study(spec, url)  # before anything is written: an unreachable storage fails in one line
    folder.mkdir(parents=True, exist_ok=True)
    if worker is None:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        worker = int(hashlib.sha256(f"{socket.gethostname()}/{os.getpid()}".encode()).hexdigest()[:6], 16) \
            if running else 0
    objective = make_objective(spec, folder, kernel)
    poll = max(1.0, min(30.0, spec.heartbeat_seconds / 2))
    while True:
        trials = study.get_trials(deepcopy=False)
        count = Counter(t.state for t in trials)
        errors = [t for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs]
        if len(errors) >= max(3, spec.trials):
            last = errors[-1].user_attrs
            raise CpwbError(f"study {spec.name}: {len(errors)} trials failed; the last: {last['error']} "
                            f"({folder / last.get('folder', '')})")
        live = count[TrialState.COMPLETE] + count[TrialState.RUNNING] + count[TrialState.WAITING]
        if live < spec.trials or count[TrialState.WAITING]:
            study.sampler = _sampler(spec, _worker_seed(spec, worker, len(trials)))
            ran: list = []
            study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=False,
                           callbacks=[lambda _, trial: ran.append(trial)])
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            say(f"study {spec.name}: trial {ran[-1].number if ran else '?'} "
                f"{ran[-1].state.name.lower() if ran else 'not run'} ({done}/{spec.trials} complete)")
            export(study, spec, folder)
            continue
        if not count[TrialState.RUNNING]:
            break
        optuna.storages.fail_stale_trials(study)  # another worker's trial may have lost its heartbeat
        time.sleep(poll)
    return export(study, spec, folder)


def run_workers(spec: StudySpec, url: str, jobs: int, argv: list[str], output_root: str | Path = "outputs/tuning",
                progress: bool = True) -> Path:
    """`--jobs N`: N worker processes (indices 0..N-1, cores shared out), a progress bar over completed trials."""
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    folder = study_folder(spec, output_root)
    study = open_study(spec, url)  # created once here, so the workers do not race to create it
    folder.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    procs = []
    for index in range(jobs):
        log = (folder / f"worker-{index}.log").open("w")
        procs.append((subprocess.Popen([sys.executable, "-m", "cpwb", "tune", *argv, "--storage", url, "--jobs",
                                        "1", "--worker-index", str(index), "--output-root", str(output_root)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT), log, index))
    with tqdm(total=spec.trials, desc=f"tune {spec.name}", unit="trial", disable=not progress) as bar:
        while any(p.poll() is None for p, _, _ in procs):
            time.sleep(5)
            bar.n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            bar.refresh()
    for _, log, _ in procs:
        log.close()
    failed = [(p.returncode, i) for p, _, i in procs if p.returncode != 0]
    if failed:
        code, index = failed[0]
        lines = (folder / f"worker-{index}.log").read_text().strip().splitlines() or ["(no output)"]
        raise CpwbError(f"worker {index} exited with {code}: {lines[-1]} (log: {folder / f'worker-{index}.log'})")
    return export(study, spec, folder)


# ----------------------------------------------------------------------------------------------- seed re-runs


def _sampled_value(distribution, value: Any) -> Any:
    """A parameter read back from results.csv in its distribution's type (CSV turns ints into floats)."""
    choices = getattr(distribution, "choices", None)
    if choices is not None:
        return next(c for c in choices if c == value or str(c) == str(value))
    return int(value) if type(distribution).__name__ == "IntDistribution" else float(value)


def confirm(spec: StudySpec, output_root: str | Path = "outputs/tuning", jobs: int = 1, progress: bool = True
            ) -> Path:
    """Re-run each perplexity budget's best trial (cpwb.analysis.tuning.best_under_budget) on `confirm_seeds`,
    as a sweep grid in `<study>/confirm/`; returns confirm.csv: the sweep's rows with method, budget and trial."""
    import pandas as pd

    from cpwb.analysis.tuning import best_under_budget, completed, read_studies
    from cpwb.app.sweep import Grid, expand, run_grid

    folder = study_folder(spec, output_root)
    frame = read_studies([folder / "results.csv"])
    if len(completed(frame)) < spec.trials:
        raise CpwbError(f"study {spec.name} has {len(completed(frame))} of {spec.trials} trials complete; run "
                        f"`cpwb tune {spec.source}` first")
    chosen = best_under_budget(frame).dropna(subset=["trial"])
    if chosen.empty:
        raise CpwbError(f"study {spec.name}: no feasible trial within any perplexity budget")
    space = distributions(spec)
    trials = {int(t): {k: _sampled_value(d, frame.loc[frame.trial == t, f"param_{k}"].iloc[0])
                       for k, d in space.items()} for t in chosen.trial.unique()}
    grid = Grid(name="confirm", base=spec.grid.base, points=list(trials.values()), seeds=list(spec.confirm_seeds),
                include_base=False, notebook=spec.notebook)
    grid.source = spec.source
    sweep = pd.read_csv(run_grid(grid, output_root=folder, progress=progress, jobs=jobs))
    variant = {p.variant: t for p in expand(grid) for t, values in trials.items()
               if all(p.parameters[k] == v for k, v in values.items())}
    sweep["trial"] = sweep.variant.map(variant)
    rows = sweep.merge(chosen[["method", "budget", "trial", "settings"]].astype({"trial": int}), on="trial")
    return write_results(folder / "confirm.csv", rows.to_dict("records"))


def progress_line(study, spec: StudySpec, folder: Path) -> str:
    """Where a study stands: its completed trials against the budget, the other states (failed ones are retried,
    `pruned` ones were surplus and never ran), and whether its seed re-runs (`--confirm`) are written."""
    from collections import Counter

    states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    complete = states.pop("complete", 0)
    others = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
    confirmed = folder / "confirm.csv"
    return (f"{complete} of {spec.trials} trials complete" + (f" ({others})" if others else "")
            + f"; seed re-runs: {confirmed if confirmed.is_file() else 'not yet (--confirm)'}")


def command(args) -> int:
    """`cpwb tune` (see cpwb.app.cli): check the study, then run one worker or `--jobs` of them."""
    from cpwb.core.config import parse_override

    if args.jobs < 1:
        raise ConfigError(f"must be at least 1, got {args.jobs}", field="--jobs")
    spec = load_study_spec(args.study, dict(parse_override(p) for p in args.param))
    url = storage_url(spec, study_folder(spec, args.output_root), args.storage)
    if args.dry_run:
        study = open_study(spec, url)  # reachable, and the same study if it exists
        print(f"study {spec.name}: method {spec.method}, {spec.trials} trials, storage {url}")
        for name, distribution in distributions(spec).items():
            print(f"  {name}: {distribution}")
        print(f"  progress: {progress_line(study, spec, study_folder(spec, args.output_root))}")
        return 0
    if args.confirm:
        print(f"confirmation: {confirm(spec, args.output_root, args.jobs)}")
        return 0
    if args.jobs > 1:
        argv = [args.study, *(x for p in args.param for x in ("-p", p))]
        results = run_workers(spec, url, args.jobs, argv, args.output_root)
    else:
        results = work(spec, url, args.output_root, args.worker_index)
    print(f"results: {results}")
    return 0
