"""Shared by the benchmarks: append one row per measured metric to benchmarks/results.csv, atomically.

Rows follow the Liger-Kernel benchmark table: what ran (benchmark, config as JSON), the metric and its unit, the
20th/50th/80th percentiles over the repeats, where it ran (device) and with what (versions), and when.
"""
from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cpwb.core.files import atomic_write_text
from cpwb.core.provenance import REPO_ROOT, versions
from cpwb.engine.device import device_name

RESULTS = REPO_ROOT / "benchmarks" / "results.csv"
COLUMNS = ("benchmark", "config", "metric", "unit", "p20", "p50", "p80", "repeats", "device", "versions",
           "timestamp")


def append_result(benchmark: str, config: Mapping[str, Any], metric: str, unit: str, values: Sequence[float],
                  path: str | Path = RESULTS) -> dict[str, Any]:
    """Append the percentiles of `values` (one per repeat) as a row of `path`; returns the row."""
    p20, p50, p80 = (float(v) for v in np.percentile(np.asarray(values, dtype=float), [20, 50, 80]))
    row = {"benchmark": benchmark, "config": json.dumps(dict(config), sort_keys=True), "metric": metric,
           "unit": unit, "p20": p20, "p50": p50, "p80": p80, "repeats": len(values), "device": device_name(),
           "versions": json.dumps(versions(), sort_keys=True),
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = Path(path)
    previous = path.read_text(encoding="utf-8") if path.is_file() else ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    if not previous:
        writer.writeheader()
    writer.writerow(row)
    atomic_write_text(path, previous + buffer.getvalue())
    return row


def results_figure(path: str | Path = RESULTS, benchmark: str = "train_step", metric: str = "real_tokens_per_s"):
    """Bar chart of one metric of one benchmark, one bar per config (p50 with p20-p80 whiskers), latest row each."""
    import pandas as pd
    import plotly.graph_objects as go

    table = pd.read_csv(path)
    table = table[(table.benchmark == benchmark) & (table.metric == metric)].drop_duplicates(
        ["config", "device"], keep="last")
    labels = [f"{c} | {d}" for c, d in zip(table.config, table.device)]
    fig = go.Figure(go.Bar(x=table.p50, y=labels, orientation="h",
                           error_x=dict(type="data", symmetric=False, array=table.p80 - table.p50,
                                        arrayminus=table.p50 - table.p20)))
    unit = table.unit.iloc[0] if len(table) else ""
    fig.update_layout(title=f"{benchmark}: {metric} (p50, p20-p80)", xaxis_title=unit, height=200 + 30 * len(table),
                      yaxis=dict(automargin=True))
    return fig
