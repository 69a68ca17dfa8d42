"""What notebook 05 leaves in a run folder for the evaluation report: the ablation grid's method variants as
baseline metric rows, the tuning studies and their seed re-runs, and the peers' comparison points."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cpwb.analysis.report import BASELINE_SUFFIX

# notebook 05's results.csv column -> the (protocol, split, metric) of the same quantity here
BASELINE_COLUMNS = {"greedy_toxicity": ("greedy", "challenging", "mean_toxicity"),
                    "wikitext2_ppl": ("wikitext2", "test", "perplexity"),
                    "phi_gap": ("phi_gap", "heldout", "mean_gap"),
                    "train_seconds": ("train", "", "train_seconds")}

def read_baselines(run_dir: str | Path) -> pd.DataFrame | None:
    """Notebook 05's `ablations/results.csv` as long metric rows (point, protocol, split, metric, value), or None.

    A sweep's results (with `variant` and `varied` columns) give one column per method variant (those varying only
    the objective, the negatives' form or the KL weight; the grid's base is CP), the mean over its completed seeds;
    other tables give one column per completed point.
    """
    path = Path(run_dir) / "ablations" / "results.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    frame = frame[frame.get("status", pd.Series("completed", index=frame.index)) == "completed"]
    if {"variant", "varied"} <= set(frame.columns):
        from cpwb.analysis.ablations import METHOD_SETTINGS

        methods = frame.varied.fillna("").map(lambda v: set(filter(None, str(v).split(","))) <= METHOD_SETTINGS)
        chosen = frame[methods]
        seeds = chosen.groupby("variant", sort=False).size()
        frame = chosen.groupby("variant", sort=False)[[c for c in BASELINE_COLUMNS if c in chosen]].mean()
        frame = frame.reset_index().rename(columns={"variant": "point"})
        frame["point"] = [f"{v}, {seeds[v]} seed{'s' if seeds[v] > 1 else ''}" for v in frame.point]
    rows = [{"point": f"{row['point']}{BASELINE_SUFFIX}", "protocol": protocol, "split": split, "metric": metric,
             "value": float(row[column])}
            for row in frame.to_dict("records") for column, (protocol, split, metric) in BASELINE_COLUMNS.items()
            if column in row and pd.notna(row[column])]
    return pd.DataFrame(rows, columns=["point", "protocol", "split", "metric", "value"])


def read_tuning(run_dir: str | Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """Notebook 05's copies of the tuning studies (`tuning/*/results.csv`) and of their seed re-runs
    (`tuning/confirm.csv`), each None when absent."""
    from cpwb.analysis.tuning import read_studies

    paths = sorted(Path(run_dir).glob("tuning/*/results.csv"))
    confirm = Path(run_dir) / "tuning" / "confirm.csv"
    return (read_studies(paths) if paths else None,
            pd.read_csv(confirm) if confirm.is_file() else None)


def read_peers(run_dir: str | Path) -> pd.DataFrame | None:
    """The compared methods' points (cpwb.analysis.peers.method_points) from notebook 05's copies of the ablation
    grid and the peers' sweeps (`peers/*/results.csv`), or None when there are no peers' sweeps; the downstream
    figures the grid did not keep come from its copy of the data grid (`peers_data/results.csv`,
    cpwb.analysis.peers.downstream_from) when there is one."""
    from cpwb.analysis.ablations import read_results
    from cpwb.analysis.peers import downstream_from, method_points

    paths = sorted(Path(run_dir).glob("peers/*/results.csv"))
    if not paths:
        return None
    grid, data = Path(run_dir) / "ablations" / "results.csv", Path(run_dir) / "peers_data" / "results.csv"
    points = method_points(read_results(grid) if grid.is_file() else None,
                           pd.concat([read_results(p) for p in paths], ignore_index=True))
    return downstream_from(points, read_results(data)) if data.is_file() else points


def read_peers_lee2024(run_dir: str | Path) -> pd.DataFrame | None:
    """The compared methods' points under the `lee2024` protocol (configs/peers_lee2024.yaml), from notebook 05's
    copy `peers_lee2024/results.csv`, or None when that sweep has not run. Kept apart from `read_peers`: another
    protocol, so never on the quick evaluation's table or figure."""
    from cpwb.analysis.ablations import read_results
    from cpwb.analysis.peers import method_points

    path = Path(run_dir) / "peers_lee2024" / "results.csv"
    return method_points(None, read_results(path)) if path.is_file() else None


def read_method_costs(run_dir: str | Path) -> dict[str, dict[str, float]]:
    """Notebook 05's `peers/costs.json`: {"generation": method -> CPU seconds per 1,000 generated tokens, "fit":
    method -> CPU seconds of a fit}, from the benchmarks (benchmarks/method_cost.py, fit_cost.py), or {}."""
    import json

    path = Path(run_dir) / "peers" / "costs.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def merge_evaluations(folders: list[str | Path], into: str | Path) -> Path:
    """One model's evaluations in several folders (e.g. its `lee2024`, `rtp25` and `toxigen` presets) as one
    evaluation folder `into`, so the report shows them in one column: metrics.json concatenated, per-item tables
    linked, the first folder's evaluate_config.json.

    Refused in one line when the folders evaluate different models or adapters, or two of them hold the same
    protocol (the report could not tell which figure to show). Nothing is written then."""
    import json
    import os

    from cpwb.core.errors import InputError
    from cpwb.core.files import atomic_write_json

    folders = [Path(f) for f in folders]
    rows, owner, models = [], {}, {}
    for folder in folders:
        found = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        models[folder] = {(r.get("model"), r.get("adapter") or "") for r in found}
        for protocol in sorted({r["protocol"] for r in found}):
            if protocol in owner:
                raise InputError(f"{owner[protocol]} holds protocol {protocol!r} too: one folder per protocol",
                                 folder)
            owner[protocol] = folder
        rows += found
    first = folders[0]
    for folder in folders[1:]:
        if models[folder] != models[first]:
            raise InputError(f"another model or adapter than {first} ({sorted(models[first])[0]} vs "
                             f"{sorted(models[folder])[0]}): one model per report column", folder)
    into = Path(into)
    for folder in folders:
        for table in sorted(folder.glob("continuations/*.jsonl")) + sorted(folder.glob("items/*.jsonl")):
            (into / table.parent.name).mkdir(parents=True, exist_ok=True)
            os.symlink(table.resolve(), into / table.parent.name / table.name)
    atomic_write_json(into / "metrics.json", rows)
    if (first / "evaluate_config.json").is_file():
        atomic_write_json(into / "evaluate_config.json",
                          json.loads((first / "evaluate_config.json").read_text(encoding="utf-8")))
    return into
