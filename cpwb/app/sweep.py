"""Parameter-grid sweeps: many train-and-evaluate points run through papermill, resumably, into one results.csv.

A grid file names a base configuration and variations around it (a list of points, a cartesian `grid`,
`one_at_a_time` changes), each run for every seed in `seeds`. Every point's settings are checked against
TrainConfig and QuickEvalConfig before anything runs. Each point is executed with papermill into
`<output_root>/<name>/<point-id>/`; a point whose result.json is there is skipped on re-run, a failing point is
recorded with its error and the sweep goes on, and results.csv (one row per point) is rewritten atomically after
every point, taking in the points that another sweep of the same grid has finished meanwhile.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
import re
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpwb.app.runner import NOTEBOOK_DIR, REPO_ROOT, declared_parameters, execute_notebook, select_parameters
from cpwb.core.config import changed_settings, from_dict, load_yaml_config
from cpwb.core.errors import ConfigError
from cpwb.core.files import atomic_write_json, atomic_write_text
from cpwb.steps.experiment import QuickEvalConfig
from cpwb.steps.training.config import NOT_FITTED, TrainConfig

POINT_NOTEBOOK = NOTEBOOK_DIR / "points" / "train_evaluate.ipynb"
CONFIG_CLASSES = (TrainConfig, QuickEvalConfig)
SET_BY_SWEEP = ("output_dir", "seed")  # the sweep sets these per point (seeds come from `seeds`)
PATH_SETTINGS = ("pairs", "model")  # made absolute when they name an existing path: points run from the repo root
# Always written to results.csv, varied or not: what the ablation figures group by.
DESIGN_COLUMNS = ("objective", "negatives", "max_positives", "max_negatives", "random_negatives", "alpha", "tau",
                  "prototype", "normalize_text", "kl_weight", "anchor_weight", "lr", "steps")
METRIC_ORDER = ("greedy_toxicity", "base_greedy_toxicity", "toxicity_change", "toxicity_change_low",
                "toxicity_change_high", "greedy_toxic_rate",
                "base_greedy_toxic_rate", "wikitext2_ppl", "base_wikitext2_ppl", "ppl_change", "ppl_change_low",
                "ppl_change_high", "phi_gap",
                "base_phi_gap", "phi_gap_share_positive", "base_phi_gap_share_positive", "similarity",
                "base_similarity", "train_seconds", "evaluate_seconds",
                "step_seconds_median", "peak_memory_mb")


@dataclass
class Grid:
    """A sweep: a base configuration, its variations and seeds (the YAML grid file mirrors it)."""

    name: str
    base: dict[str, Any] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)  # explicit variations, each a mapping of settings
    grid: dict[str, list[Any]] = field(default_factory=dict)  # cartesian product of these values
    one_at_a_time: dict[str, list[Any]] = field(default_factory=dict)  # each value alone, the rest as the base
    seeds: list[int] = field(default_factory=lambda: [0])
    include_base: bool = True
    notebook: str | None = None  # default: notebooks/points/train_evaluate.ipynb
    source: str | None = field(default=None, init=False)  # the grid file, for error messages

    def __post_init__(self) -> None:
        if not self.notebook_path.is_file():
            raise ConfigError(f"notebook not found: {self.notebook_path}", field="notebook")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"must be a folder name of letters, digits, '.', '_' or '-', got {self.name!r}",
                              field="name")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"must be a non-empty list of distinct seeds, got {self.seeds}", field="seeds")
        for section in ("grid", "one_at_a_time"):
            for key, values in getattr(self, section).items():
                if not isinstance(values, list) or not values:
                    raise ConfigError(f"must be a non-empty list of values, got {values!r}", field=f"{section}.{key}")
        for i, point in enumerate(self.points):
            if not isinstance(point, dict):
                raise ConfigError(f"must be a mapping of settings, got {point!r}", field=f"points[{i}]")
        sections = [("base", self.base), *((f"points[{i}]", p) for i, p in enumerate(self.points)),
                    ("grid", self.grid), ("one_at_a_time", self.one_at_a_time)]
        for section, settings in sections:
            for key in SET_BY_SWEEP:
                if key in settings:
                    raise ConfigError("is set by the sweep per point (use `seeds` for seeds)",
                                      field=f"{section}.{key}")

    @property
    def notebook_path(self) -> Path:
        """The notebook every point executes."""
        return Path(self.notebook) if self.notebook else POINT_NOTEBOOK


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its id, the settings that differ from the base, its seed and every parameter."""

    id: str
    variant: str  # the id without the seed: what seeds are aggregated over
    varied: dict[str, Any]
    seed: int
    parameters: dict[str, Any]  # everything passed to the notebook, output_dir excepted


def load_grid(path: str | Path, overrides: dict[str, Any] | None = None) -> Grid:
    """Read a grid YAML file (`overrides` are merged into its base) and validate every point it expands to."""
    grid = load_yaml_config(Grid, path)
    if overrides:
        grid = dataclasses.replace(grid, base={**grid.base, **overrides})
    grid.source = str(path)
    expand(grid)
    return grid


# ----------------------------------------------------------------------------------------------- points


def split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(TrainConfig settings, QuickEvalConfig settings, anything else) of a flat mapping."""
    parts: list[dict[str, Any]] = [{}, {}, {}]
    names = [{f.name for f in dataclasses.fields(cls)} for cls in CONFIG_CLASSES]
    for key, value in settings.items():
        index = next((i for i, known in enumerate(names) if key in known), 2)
        parts[index][key] = value
    return parts[0], parts[1], parts[2]


def point_configs(namespace: dict[str, Any]) -> tuple[TrainConfig, QuickEvalConfig]:
    """The two configs from a notebook's namespace (its parameters); used by the point notebook."""
    train, evaluate, _ = split_settings(namespace)
    return from_dict(TrainConfig, train), from_dict(QuickEvalConfig, evaluate)


def _resolve(settings: dict[str, Any], grid: Grid, declared: dict[str, Any], where: str) -> dict[str, Any]:
    """Validated, complete parameters of one point: every config field, plus the notebook's own parameters."""
    train, evaluate, other = split_settings({"progress": False, **settings})
    try:
        unknown = sorted(set(other) - set(declared))
        if unknown:
            raise ConfigError(f"unknown setting: not a field of TrainConfig or QuickEvalConfig, nor a parameter of "
                              f"{grid.notebook_path.name}", field=unknown[0])
        return {**dataclasses.asdict(from_dict(TrainConfig, train)),
                **dataclasses.asdict(from_dict(QuickEvalConfig, evaluate)),
                **(select_parameters(grid.notebook_path, other) if other else {})}
    except ConfigError as err:
        raise ConfigError(f"in {where}: {err.reason}", grid.source, field=err.field) from None


def _absolute_paths(parameters: dict[str, Any]) -> dict[str, Any]:
    """Settings naming an existing file or folder made absolute, since points run from the repository root."""
    return {k: str(Path(v).resolve()) if k in PATH_SETTINGS and isinstance(v, str) and Path(v).exists() else v
            for k, v in parameters.items()}


def _id_value(value: Any) -> str:
    """A setting's value as written in a point id: readable and safe in a folder name."""
    if isinstance(value, (list, tuple)):
        return "+".join(_id_value(v) for v in value)
    text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text)


def variant_id(varied: dict[str, Any]) -> str:
    """`key=value__key=value` over the varied settings in key order, or `base`; a long id ends in a digest."""
    import hashlib

    text = "__".join(f"{k}={_id_value(varied[k])}" for k in sorted(varied)) or "base"
    return text if len(text) <= 120 else f"{text[:100]}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def variations(grid: Grid) -> list[dict[str, Any]]:
    """The grid's variations around its base, in order: base, points, cartesian grid, one at a time."""
    found: list[dict[str, Any]] = [{}] if grid.include_base else []
    found += [dict(p) for p in grid.points]
    if grid.grid:
        keys = list(grid.grid)
        found += [dict(zip(keys, values)) for values in itertools.product(*(grid.grid[k] for k in keys))]
    return found + [{key: value} for key, values in grid.one_at_a_time.items() for value in values]


def expand(grid: Grid) -> list[Point]:
    """Every point of the grid, each validated; seed-major (every variant of the first seed comes first).

    A setting equal to the base's is no variation, and variations that end up identical are kept once.
    """
    declared = declared_parameters(grid.notebook_path)
    base = _resolve(grid.base, grid, declared, "base")
    variants: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for variation in variations(grid):
        parameters = _resolve({**grid.base, **variation}, grid, declared, f"point {variant_id(variation)}")
        varied = {k: parameters[k] for k in variation if parameters[k] != base[k]}
        name = variant_id(varied)
        if name in variants and variants[name][0] != varied:
            raise ConfigError(f"variations {variants[name][0]} and {varied} get the same point id {name!r}",
                              grid.source, field="points")
        variants.setdefault(name, (varied, _absolute_paths(parameters)))
    return [Point(f"{name}__seed={seed}", name, varied, seed, {**parameters, "seed": seed})
            for seed in grid.seeds for name, (varied, parameters) in variants.items()]


def select(points: list[Point], patterns: str | list[str] | None) -> list[Point]:
    """The points whose id contains any of `patterns` (shell-style wildcards allowed); all of them without one."""
    patterns = [patterns] if isinstance(patterns, str) else patterns or []
    return [p for p in points if not patterns or any(fnmatch.fnmatchcase(p.id, f"*{q}*") for q in patterns)]


# ----------------------------------------------------------------------------------------------- results


def _stale_settings(result: dict[str, Any], point: Point) -> list[str]:
    """Settings recorded in a point's result.json that differ from the point's (empty when they agree)."""
    recorded = {**result.get("config", {}), **result.get("eval", {})}
    return changed_settings(recorded, point.parameters, NOT_FITTED, common_only=True)  # what it reused: no change


def _scalars(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The numbers and texts of a mapping (lists and nested mappings left out), keys prefixed."""
    return {prefix + k: v for k, v in values.items() if v is None or isinstance(v, (int, float, str))}


def result_row(point: Point, point_dir: Path, columns: list[str], status: str, error: str = "") -> dict[str, Any]:
    """One results.csv row: the point, its settings in `columns`, and its metrics when it completed."""
    row: dict[str, Any] = {"point": point.id, "variant": point.variant, "varied": ",".join(sorted(point.varied)),
                           "status": status, **{c: point.parameters.get(c) for c in columns}, "seed": point.seed}
    if status == "completed":
        result = json.loads((point_dir / "result.json").read_text())
        metrics = {**_scalars({k: v for k, v in result.items() if k not in ("base", "trained")}),
                   **_scalars(result.get("trained", {})), **_scalars(result.get("base", {}), "base_"),
                   **_scalars(result.get("versions", {}), "version_")}
        row |= {k: metrics[k] for k in METRIC_ORDER if k in metrics}
        row |= {k: metrics[k] for k in sorted(metrics) if k not in row}
    adapter = point_dir / "adapter"  # recorded relative to results.csv, so a moved or committed sweep keeps it
    return row | {"adapter_dir": str(adapter.relative_to(point_dir.parent)) if status == "completed"
                  and adapter.is_dir() else "", "error": error}


def recorded_row(point: Point, point_dir: Path, columns: list[str]) -> dict[str, Any] | None:
    """The row of a point that already has a result.json (failed if it holds other settings), else None."""
    path = point_dir / "result.json"
    if not path.is_file():
        return None
    stale = _stale_settings(json.loads(path.read_text()), point)
    if stale:
        return result_row(point, point_dir, columns, "failed", f"{point_dir} holds a result of other settings "
                          f"({', '.join(stale)}); remove the folder or use another grid name")
    return result_row(point, point_dir, columns, "completed")


def _pick_up_recorded(rows: dict[str, dict[str, Any]], points: list[Point], folder: Path, columns: list[str]
                      ) -> None:
    """Replace pending rows whose point has a result.json by now, so that a sweep run beside this one on the same
    grid (another process or machine) does not have its finished points written back as pending."""
    for point in points:
        if rows[point.id]["status"] == "pending":
            rows[point.id] = recorded_row(point, folder / point.id, columns) or rows[point.id]


def write_results(path: Path, rows: list[dict[str, Any]]) -> Path:
    """results.csv, atomically: the columns are the union over rows in first-seen order, adapter_dir and error last."""
    import pandas as pd

    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c not in ("adapter_dir", "error")]
    return atomic_write_text(path, pd.DataFrame(rows, columns=columns + ["adapter_dir", "error"]).to_csv(index=False))


def _error_line(err: Exception) -> str:
    """One line for results.csv: papermill's cell exception name and value, else the exception itself."""
    name = getattr(err, "ename", None)
    text = f"{name}: {getattr(err, 'evalue', '')}" if name else f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:500]


def run_point(grid: Grid, point: Point, point_dir: Path, columns: list[str], kernel: str = "python3"
              ) -> dict[str, Any]:
    """Execute one point with papermill (unless it has a result already) and return its results.csv row."""
    recorded = recorded_row(point, point_dir, columns)
    if recorded is not None:
        return recorded
    point_dir.mkdir(parents=True, exist_ok=True)
    try:
        execute_notebook(grid.notebook_path, point_dir / grid.notebook_path.name,
                         {**point.parameters, "output_dir": str(point_dir)}, cwd=REPO_ROOT, kernel=kernel)
    except Exception as err:  # papermill raises PapermillExecutionError carrying the cell's exception
        return result_row(point, point_dir, columns, "failed", _error_line(err))
    if not (point_dir / "result.json").is_file():
        return result_row(point, point_dir, columns, "failed", "the notebook finished without writing result.json")
    return result_row(point, point_dir, columns, "completed")


def grid_folder(grid: Grid, output_root: str | Path) -> Path:
    """`<output_root>/<name>/`, a relative `output_root` taken from the repository root."""
    return (Path(output_root) if Path(output_root).is_absolute() else REPO_ROOT / output_root) / grid.name


def point_status(point: Point, point_dir: Path) -> str:
    """What `cpwb sweep` would do with a point, without touching it: `done` (its result.json holds these settings),
    `other settings` (it holds a result of others, which the sweep refuses to reuse) or `to run`."""
    path = point_dir / "result.json"
    if not path.is_file():
        return "to run"
    return "other settings" if _stale_settings(json.loads(path.read_text()), point) else "done"


def prepare(grid: Grid, output_root: str | Path) -> tuple[list[Point], Path, list[str]]:
    """The grid's points, its folder `<output_root>/<name>/` (created, with grid.json) and its results.csv setting
    columns. A relative `output_root` is taken from the repository root."""
    points = expand(grid)
    folder = grid_folder(grid, output_root)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "grid.json", {"grid": dataclasses.asdict(grid), "notebook": str(grid.notebook_path),
                                             "points": [dataclasses.asdict(p) for p in points]})
    varied = [k for p in points for k in p.varied]
    columns = [c for c in dict.fromkeys(varied + list(DESIGN_COLUMNS)) if any(c in p.parameters for p in points)]
    return points, folder, columns


def recorded_rows(grid: Grid, output_root: str | Path
                  ) -> tuple[list[Point], Path, list[str], dict[str, dict[str, Any]]]:
    """The grid's points, folder and setting columns (see `prepare`), and a results.csv row per point: completed
    (or failed, for a result of other settings) where the point's folder holds a result.json, else pending."""
    points, folder, columns = prepare(grid, output_root)
    rows = {p.id: result_row(p, folder / p.id, columns, "pending") for p in points}
    _pick_up_recorded(rows, points, folder, columns)
    return points, folder, columns, rows


def add_downstream_to_points(grid: Grid, items: int, output_root: str | Path = "outputs/sweeps",
                             only: str | list[str] | None = None, say=print) -> Path:
    """`cpwb sweep GRID --downstream N`: the downstream accuracy change of each chosen completed point, measured
    from its saved artefact (cpwb.steps.experiment.add_downstream), then results.csv rewritten. A point without an
    artefact is named and skipped."""
    from cpwb.core.errors import InputError
    from cpwb.steps.experiment import add_downstream

    points, folder, _, rows = recorded_rows(grid, output_root)
    for point in select(points, only):
        if rows[point.id]["status"] != "completed":
            continue
        try:
            added = add_downstream(folder / point.id, items, progress=False)
        except InputError as err:
            say(f"{point.id}: skipped: {err}")
            continue
        change = added.get("downstream_change")
        say(f"{point.id}: " + ("already measured" if not added else f"downstream change {100 * change:+.1f} points"))
    _, _, _, rows = recorded_rows(grid, output_root)
    return write_results(folder / "results.csv", list(rows.values()))


def run_grid(grid: Grid, output_root: str | Path = "outputs/sweeps", progress: bool = True,
             only: str | list[str] | None = None, kernel: str = "python3", jobs: int = 1) -> Path:
    """Run the grid's points (ids containing any pattern of `only`) into `<output_root>/<name>/`; returns results.csv.

    A relative `output_root` is taken from the repository root, and points run there, as with `cpwb run`.
    results.csv lists every point of the grid: completed, failed or pending. `jobs` points run at once, each in
    its own kernel process (on a machine with N cores, N jobs with OMP_NUM_THREADS=1 use it best).
    """
    from tqdm.auto import tqdm

    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}", field="jobs")

    points, folder, columns, rows = recorded_rows(grid, output_root)
    results = write_results(folder / "results.csv", list(rows.values()))
    waiting = select(points, only)[::-1]
    running: dict[Future, Point] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool, \
            tqdm(total=len(waiting), desc=f"sweep {grid.name}", unit="point", disable=not progress) as bar:
        while waiting or running:
            while waiting and len(running) < jobs:  # a new point starts only once results.csv is up to date
                point = waiting.pop()
                running[pool.submit(run_point, grid, point, folder / point.id, columns, kernel)] = point
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:  # results.csv is written here only, by this one thread
                point = running.pop(future)
                rows[point.id] = future.result()
                _pick_up_recorded(rows, points, folder, columns)
                write_results(results, list(rows.values()))
                bar.set_postfix_str(point.id)
                bar.update()
    return results


# ----------------------------------------------------------------------------------------------- command line


def command(args) -> int:
    """`cpwb sweep` (see cpwb.app.cli): list the points (`--dry-run`) or run them; cpwb errors go to the caller."""
    from cpwb.app.grid_study import GridStorage
    from cpwb.core.config import parse_override
    from cpwb.core.settings import given_settings

    storage = GridStorage(**given_settings(args))  # checked before anything runs
    grid = load_grid(args.grid, dict(parse_override(p) for p in args.param))
    points = select(expand(grid), args.only)
    if args.dry_run:  # reads the points' folders, writes nothing
        folder = grid_folder(grid, args.output_root)
        status = {p.id: point_status(p, folder / p.id) for p in points}
        print("\n".join(f"{status[p.id]:<8} {p.id}" for p in points))
        counts = ", ".join(f"{sum(s == k for s in status.values())} {k}" for k in ("done", "to run", "other settings")
                           if k in status.values())
        print(f"{len(points)} point(s) of sweep {grid.name}, {len(grid.seeds)} seed(s) each: {counts} "
              f"(in {folder})")
        return 0
    if getattr(args, "downstream", None) is not None:
        if args.downstream < 1:
            raise ConfigError(f"must be at least 1, got {args.downstream}", field="--downstream")
        print(f"results: {add_downstream_to_points(grid, args.downstream, args.output_root, args.only)}")
        return 0
    if getattr(args, "results_only", False):
        _, folder, _, rows = recorded_rows(grid, args.output_root)
        print(f"results: {write_results(folder / 'results.csv', list(rows.values()))}")
        return 0
    if storage.storage:  # points spread over workers through an Optuna storage
        from cpwb.app.grid_study import run

        print(f"results: {run(grid, storage, args.output_root, only=args.only, jobs=args.jobs)}")
        return 0
    print(f"results: {run_grid(grid, args.output_root, only=args.only, jobs=args.jobs)}")
    return 0
