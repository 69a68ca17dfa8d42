"""Metric files with provenance: one row per number (what was measured, with which model, adapter, scorer, data
hash and seed), merged into a folder's metrics.json and metrics.csv, atomically."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import cpwb
from cpwb.core.errors import InputError
from cpwb.core.files import atomic_write_json, atomic_write_text
from cpwb.data.corpora import DATA_FILES, data_hash, data_path


def provenance(model_name: str, adapter: str | None, scorer_name: str, data_files: Sequence[str | Path],
               seed: int) -> dict[str, Any]:
    """What a metric was measured with: model, adapter, scorer, hash of the data files, seed, cpwb version.

    `data_files` are paths or names of shipped files (keys of cpwb.data.corpora.DATA_FILES); the hash covers contents.
    """
    paths = [data_path(f) if isinstance(f, str) and f in DATA_FILES else Path(f) for f in data_files]
    return {"model": model_name, "adapter": adapter or "", "scorer": scorer_name,
            "data_files": ";".join(p.name for p in paths), "data_hash": data_hash(paths), "seed": seed,
            "cpwb_version": cpwb.__version__}


def metric_rows(result: Mapping[str, Any], provenance_record: Mapping[str, Any], **extra: Any) -> list[dict]:
    """One metrics row per scalar number of an evaluation result (tables and arrays are left out)."""
    return [{"metric": key, "value": float(value), **provenance_record, **extra} for key, value in result.items()
            if isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))]


def _identity(row: Mapping[str, Any]) -> str:
    """A row's key for merging: every field but the value."""
    return json.dumps({k: v for k, v in row.items() if k != "value"}, sort_keys=True, default=str)


def write_metrics(rows: Sequence[Mapping[str, Any]], run_dir: str | Path) -> tuple[Path, Path]:
    """Merge rows into `run_dir`/metrics.json and metrics.csv, each replaced atomically.

    A row with the same fields as an existing one (all but `value`) replaces it, others are appended.
    metrics.json is the source of truth, written first; metrics.csv is regenerated from it on every call.
    """
    run_dir = Path(run_dir)
    json_path, csv_path = run_dir / "metrics.json", run_dir / "metrics.csv"
    for index, row in enumerate(rows):
        if "metric" not in row or "value" not in row:
            raise InputError("each row needs 'metric' and 'value'", field=f"rows[{index}]")
    try:
        existing = json.loads(json_path.read_text(encoding="utf-8")) if json_path.exists() else []
    except json.JSONDecodeError as error:
        raise InputError(f"not valid JSON ({error.msg}); move it away to start a new table", json_path) from None
    merged = {_identity(row): row for row in existing}
    merged.update((_identity(row), dict(row)) for row in rows)
    table = list(merged.values())
    atomic_write_json(json_path, table)
    frame = pd.DataFrame(table)
    frame = frame[["metric", "value", *sorted(c for c in frame.columns if c not in ("metric", "value"))]]
    atomic_write_text(csv_path, frame.to_csv(index=False))
    return csv_path, json_path
