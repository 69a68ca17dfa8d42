"""Reading a sweep's results.csv and comparing its variants: means over seeds, Pareto front, set sizes, time.

A variant is a point of the grid without its seed; every figure shows the mean over seeds with the standard
deviation as error bars, since seed-to-seed differences are as large as many of the effects compared.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cpwb.core.errors import InputError

REQUIRED_COLUMNS = ("point", "variant", "varied", "status", "seed")
# the other shipped BiLSTM, a second yardstick: `cpwb rescore POINTS --scorer bilstm-tcc` adds its columns
SECOND_SCORER = "bilstm-tcc"
METRICS = ("greedy_toxicity", "toxicity_change", "wikitext2_ppl", "ppl_change", "phi_gap", "phi_gap_share_positive",
           "similarity", "train_seconds", "step_seconds_median")
BASE_METRICS = ("base_greedy_toxicity", "base_wikitext2_ppl", "base_phi_gap")
SET_SIZE_SETTINGS = {"max_positives", "random_negatives"}
# What tells the methods apart: CP forms, ablations, baselines.
METHOD_SETTINGS = {"objective", "negatives", "kl_weight"}


def read_results(path: str | Path) -> pd.DataFrame:
    """A sweep's results.csv (cpwb.app.sweep), checked for the columns the comparison needs."""
    path = Path(path)
    if not path.is_file():
        raise InputError("results file not found", path)
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    missing = [c for c in REQUIRED_COLUMNS if c not in frame]
    if missing:
        raise InputError(f"missing column(s) {missing}; expected a results.csv written by cpwb.app.sweep", path, line=1,
                         field=missing[0])
    frame["varied"] = frame["varied"].fillna("")
    return frame


def setting_columns(frame: pd.DataFrame) -> list[str]:
    """The settings columns of a results.csv: cpwb.app.sweep writes them between `status` and `seed`."""
    columns = list(frame.columns)
    return columns[columns.index("status") + 1:columns.index("seed")]


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per variant of the completed points: its settings, n_seeds, and mean and std of every metric."""
    done = frame[frame.status == "completed"]
    metrics = [m for m in (*METRICS, *BASE_METRICS) if m in done]
    groups = done.groupby("variant", sort=False)
    summary = groups[["varied", *setting_columns(done)]].first()
    summary["n_seeds"] = groups.size()
    for metric in metrics:
        summary[f"{metric}_mean"] = groups[metric].mean()
        summary[f"{metric}_std"] = groups[metric].std(ddof=1)
    return summary.reset_index()


def varying_only(summary: pd.DataFrame, settings: set[str]) -> pd.DataFrame:
    """The variants that change nothing but (some of) `settings` from the base, the base included."""
    return summary.loc[summary.varied.map(lambda varied: set(filter(None, varied.split(","))) <= settings)]


def formatted(summary: pd.DataFrame, metrics: tuple[str, ...] = ("greedy_toxicity", "wikitext2_ppl", "phi_gap",
                                                                  "similarity", "train_seconds"),
              digits: int = 4) -> pd.DataFrame:
    """The summary as a readable table: one `mean ± std` column per metric present (std left out for one seed)."""
    table = summary[["variant", "n_seeds"]].copy()
    for metric in metrics:
        if f"{metric}_mean" not in summary:
            continue
        mean, std = summary[f"{metric}_mean"], summary[f"{metric}_std"]
        table[metric] = [f"{m:.{digits}g}" + (f" ± {s:.2g}" if np.isfinite(s) else "") for m, s in zip(mean, std)]
    return table


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bool mask of the points no other point beats on both x and y (lower is better on both)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    front = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        dominated = (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        front[i] = not dominated.any()
    return front


def pareto_figure(summary: pd.DataFrame, x: str = "wikitext2_ppl", y: str = "greedy_toxicity") -> go.Figure:
    """Toxicity against fluency per variant (mean ± std over seeds), the Pareto front joined, base model starred."""
    frame = summary.dropna(subset=[f"{x}_mean", f"{y}_mean"])
    front = pareto_front(frame[f"{x}_mean"].to_numpy(), frame[f"{y}_mean"].to_numpy())
    fig = go.Figure()
    for on_front, label in ((False, "variant"), (True, "on the Pareto front")):
        part = frame[front == on_front]
        fig.add_trace(go.Scatter(
            x=part[f"{x}_mean"], y=part[f"{y}_mean"], mode="markers+text", name=label, text=part.variant,
            textposition="top center", textfont=dict(size=9),
            error_x=dict(type="data", array=part[f"{x}_std"].fillna(0)),
            error_y=dict(type="data", array=part[f"{y}_std"].fillna(0)),
            marker=dict(size=11 if on_front else 8, color="crimson" if on_front else "steelblue"),
            hovertext=[f"{v}<br>{n} seed(s)" for v, n in zip(part.variant, part.n_seeds)], hoverinfo="text+x+y"))
    line = frame[front].sort_values(f"{x}_mean")
    fig.add_trace(go.Scatter(x=line[f"{x}_mean"], y=line[f"{y}_mean"], mode="lines", name="front",
                             line=dict(color="crimson", dash="dot"), hoverinfo="skip"))
    if f"base_{x}_mean" in frame and f"base_{y}_mean" in frame:
        fig.add_trace(go.Scatter(x=[frame[f"base_{x}_mean"].mean()], y=[frame[f"base_{y}_mean"].mean()],
                                 mode="markers", name="base model", marker=dict(symbol="star", size=16, color="black")))
    fig.update_layout(title="Toxicity vs fluency per variant (mean ± std over seeds; lower-left is better)",
                      xaxis_title=f"{x} (lower: more fluent)", yaxis_title=f"{y} (lower: less toxic)", height=550)
    return fig


def set_size_table(summary: pd.DataFrame, metric: str = "greedy_toxicity", hard_negatives: int = 1
                   ) -> pd.DataFrame:
    """Mean `metric` per (|P| setting, |N|) over the variants that change only the set sizes (or nothing).

    |N| = min(max_negatives, hard_negatives) + random_negatives, `hard_negatives` being what each anchor has
    (ParaDetox pairs: 1). Rows: max_positives; columns: |N|; cells without a variant are NaN.
    """
    needed = {"max_positives", "max_negatives", "random_negatives", f"{metric}_mean"}
    if not needed <= set(summary.columns):
        return pd.DataFrame()
    sized = varying_only(summary, SET_SIZE_SETTINGS).copy()
    sized["P"] = sized.max_positives.astype(int)
    sized["N"] = np.minimum(sized.max_negatives.astype(int), hard_negatives) + sized.random_negatives.astype(int)
    return sized.pivot_table(index="P", columns="N", values=f"{metric}_mean", aggfunc="mean")


def set_size_heatmap(summary: pd.DataFrame, metric: str = "greedy_toxicity", hard_negatives: int = 1) -> go.Figure:
    """Heat map of `metric` (mean over seeds) over |P| x |N|."""
    table = set_size_table(summary, metric, hard_negatives)
    fig = go.Figure(go.Heatmap(z=table.to_numpy(), x=[str(c) for c in table.columns],
                               y=[str(i) for i in table.index], colorscale="RdYlGn_r", colorbar=dict(title=metric),
                               text=[[f"{v:.3f}" if np.isfinite(v) else "" for v in row] for row in table.to_numpy()],
                               texttemplate="%{text}"))
    fig.update_layout(title=f"{metric} by set sizes (mean over seeds; other settings as the base)",
                      xaxis_title="|N| negatives per anchor", yaxis_title="max_positives (|P| <= this)", height=420)
    return fig


def training_time_figure(summary: pd.DataFrame, metric: str = "train_seconds") -> go.Figure:
    """Training time per method (the variants changing only the objective, negatives form or KL weight)."""
    frame = varying_only(summary, METHOD_SETTINGS).dropna(subset=[f"{metric}_mean"]).sort_values(f"{metric}_mean")
    fig = go.Figure(go.Bar(x=frame.variant, y=frame[f"{metric}_mean"],
                           error_y=dict(type="data", array=frame[f"{metric}_std"].fillna(0))))
    fig.update_layout(title="Training time per method at the same steps (mean ± std over seeds)",
                      yaxis_title=f"{metric} [s]", xaxis_tickangle=-30, height=450)
    return fig
