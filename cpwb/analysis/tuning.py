"""Reading tuning studies' results.csv (cpwb.app.tune) and comparing methods at equal budget: fronts, best points
under a perplexity budget, trial history, and the seed re-runs of the chosen points.

Only pandas and plotly: a fresh clone draws the fronts from the exported results.csv files kept in git, without
opening the Optuna storages (the parameter importances, which need Optuna, are the one exception).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cpwb.analysis.ablations import pareto_front
from cpwb.core.errors import InputError

REQUIRED_COLUMNS = ("trial", "method", "state", "feasible", "pareto")
BUDGETS = (0.02, 0.05)  # WikiText-2 perplexity cost the comparison allows
TARGET = (-0.80, 0.05)  # the bar: -80% toxicity at <= 5% perplexity cost
COLOURS = ("crimson", "steelblue", "darkorange", "seagreen", "purple", "saddlebrown", "black")


def read_studies(paths: list[str | Path]) -> pd.DataFrame:
    """The trials of several studies' results.csv, one row per trial, checked for the columns the figures need."""
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise InputError("results file not found", path)
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
        missing = [c for c in REQUIRED_COLUMNS if c not in frame]
        if missing:
            raise InputError(f"missing column(s) {missing}; expected a results.csv written by cpwb tune", path,
                             line=1, field=missing[0])
        frames.append(frame.assign(study=path.parent.name))
    if not frames:
        return pd.DataFrame(columns=[*REQUIRED_COLUMNS, "study"])
    frame = pd.concat(frames, ignore_index=True)
    frame["feasible"] = frame.feasible.astype(str).str.lower().eq("true")
    frame["pareto"] = frame.pareto.astype(str).str.lower().eq("true")
    return frame


def completed(frame: pd.DataFrame) -> pd.DataFrame:
    """The trials that completed (failed, pruned-as-surplus and running ones left out)."""
    return frame[frame.state == "complete"]


def parameters(frame: pd.DataFrame) -> list[str]:
    """The searched settings (the `param_*` columns) present in `frame`."""
    return [c for c in frame.columns if c.startswith("param_")]


def settings_text(row: pd.Series) -> str:
    """`lr=0.0004, tau=0.5, ...` of a trial's sampled settings (4 significant digits)."""
    values = {c.removeprefix("param_"): row[c] for c in parameters(row.to_frame().T) if pd.notna(row[c])}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def progress_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per study: trials completed, failed, running, pruned as surplus; feasible; on the front."""
    table = frame.groupby("study").agg(method=("method", "first"),
                                       complete=("state", lambda s: (s == "complete").sum()),
                                       failed=("state", lambda s: (s == "fail").sum()),
                                       running=("state", lambda s: s.isin(["running", "waiting"]).sum()),
                                       feasible=("feasible", "sum"), on_front=("pareto", "sum"))
    return table.reset_index()


def best_under_budget(frame: pd.DataFrame, budgets: tuple[float, ...] = BUDGETS) -> pd.DataFrame:
    """Per method and perplexity budget: the feasible completed trial with the largest toxicity cut whose
    perplexity cost is within the budget (one seed: the search's own), with its settings."""
    rows = []
    for method, trials in completed(frame).groupby("method", sort=False):
        feasible = trials[trials.feasible]
        for budget in budgets:
            within = feasible[feasible.ppl_change <= budget]
            if within.empty:
                closest = feasible.loc[feasible.ppl_change.idxmin()] if len(feasible) else None
                rows.append({"method": method, "budget": budget, "trial": None, "toxicity_change": np.nan,
                             "ppl_change": np.nan, "settings": "none within the budget" + (
                                 f"; least costly: trial {closest.trial} at {closest.ppl_change:+.1%}"
                                 if closest is not None else "")})
                continue
            best = within.loc[within.toxicity_change.idxmin()]
            rows.append({"method": method, "budget": budget, "trial": int(best.trial),
                         "toxicity_change": best.toxicity_change, "ppl_change": best.ppl_change,
                         "similarity": best.get("similarity", np.nan), "settings": settings_text(best)})
    return pd.DataFrame(rows)


def fronts_figure(frame: pd.DataFrame, reference: pd.DataFrame | None = None) -> go.Figure:
    """Toxicity change against perplexity change: every completed trial of every method (faint; infeasible as
    crosses), each method's Pareto front over its feasible trials joined, and the budgets as dotted lines.
    `reference`: optional points (method, toxicity_change, ppl_change), e.g. the ablation grid's defaults."""
    fig = go.Figure()
    done = completed(frame)
    for i, (method, trials) in enumerate(done.groupby("method", sort=False)):
        colour = COLOURS[i % len(COLOURS)]
        feasible = trials[trials.feasible]
        hover = [f"{method} trial {t}<br>{settings_text(r)}" for t, (_, r) in zip(trials.trial, trials.iterrows())]
        fig.add_trace(go.Scatter(
            x=trials.ppl_change * 100, y=trials.toxicity_change * 100, mode="markers", name=f"{method} trials",
            legendgroup=method, hovertext=hover, hoverinfo="text+x+y", opacity=0.45,
            marker=dict(color=colour, size=8, symbol=np.where(trials.feasible, "circle", "x"))))
        if len(feasible):
            front = feasible[pareto_front(feasible.ppl_change.to_numpy(), feasible.toxicity_change.to_numpy())]
            front = front.sort_values("ppl_change")
            fig.add_trace(go.Scatter(x=front.ppl_change * 100, y=front.toxicity_change * 100, mode="lines+markers",
                                     name=f"{method} front", legendgroup=method,
                                     line=dict(color=colour, width=2), marker=dict(color=colour, size=11)))
    if reference is not None and len(reference):
        fig.add_trace(go.Scatter(x=reference.ppl_change * 100, y=reference.toxicity_change * 100,
                                 mode="markers+text", text=reference.method, textposition="top center",
                                 name="defaults (ablation grid, mean of 3 seeds)",
                                 marker=dict(symbol="star", size=13, color="black")))
    for budget in BUDGETS:
        fig.add_vline(x=budget * 100, line=dict(color="grey", dash="dot"), annotation_text=f"{budget:.0%} budget")
    fig.update_layout(title="Equal-budget tuning: toxicity change vs perplexity cost (lower-left is better; "
                            "x: infeasible)", xaxis_title="WikiText-2 perplexity change [%]",
                      yaxis_title="greedy continuation toxicity change [%]", height=560)
    return fig


def history_figure(frame: pd.DataFrame, metric: str = "toxicity_change") -> go.Figure:
    """Each method's `metric` per completed trial in trial order, with the best feasible value so far."""
    fig = go.Figure()
    for i, (method, trials) in enumerate(completed(frame).sort_values("trial").groupby("method", sort=False)):
        colour = COLOURS[i % len(COLOURS)]
        fig.add_trace(go.Scatter(x=trials.trial, y=trials[metric] * 100, mode="markers", name=f"{method}",
                                 legendgroup=method, marker=dict(color=colour)))
        best = trials[metric].where(trials.feasible).cummin()
        fig.add_trace(go.Scatter(x=trials.trial, y=best * 100, mode="lines", name=f"{method} best feasible so far",
                                 legendgroup=method, line=dict(color=colour, shape="hv")))
    fig.update_layout(title=f"Trial history: {metric}", xaxis_title="trial", yaxis_title=f"{metric} [%]",
                      height=420)
    return fig


def importance_figure(storage: str, study: str, index: int = 0, name: str = "toxicity_change") -> go.Figure:
    """Optuna's fANOVA parameter importances for one objective of a study (reads its storage)."""
    import optuna

    loaded = optuna.load_study(study_name=study, storage=storage)
    fig = optuna.visualization.plot_param_importances(loaded, target=lambda t: t.values[index], target_name=name)
    fig.update_layout(title=f"{study}: parameter importance for {name}", height=360)
    return fig


def confirmation_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The seed re-runs of the chosen points (a sweep results.csv, cpwb tune --confirm): per method and budget,
    mean ± std over seeds of toxicity and perplexity change, and whether the mean stays within the budget."""
    done = frame[frame.status == "completed"]
    rows = []
    for (method, budget), runs in done.groupby(["method", "budget"], sort=False):
        rows.append({"method": method, "budget": budget, "seeds": len(runs),
                     "toxicity_change": f"{runs.toxicity_change.mean():+.1%} ± {runs.toxicity_change.std():.1%}",
                     "ppl_change": f"{runs.ppl_change.mean():+.1%} ± {runs.ppl_change.std():.1%}",
                     "within_budget": bool(runs.ppl_change.mean() <= budget), "settings": runs.settings.iloc[0]})
    return pd.DataFrame(rows)


def target_table(frame: pd.DataFrame, confirmations: pd.DataFrame | None = None,
                 target: tuple[float, float] = TARGET) -> pd.DataFrame:
    """Per method: does it reach `target` (toxicity change, perplexity budget), and if not, how close it comes.

    The closest trial is the feasible one with the largest cut within the budget, or, when none is within it, the
    least costly feasible one. Its seed re-runs (`confirmations`, cpwb tune --confirm, for the same budget) say
    whether the figure holds on fresh seeds: a method reaches the target only if their mean does too (or, without
    re-runs yet, the search seed's trial does, marked as such)."""
    toxicity, budget = target
    done = completed(frame)
    rows = []
    for method, trials in done.groupby("method", sort=False):
        feasible = trials[trials.feasible]
        if feasible.empty:
            rows.append({"method": method, "reached": False, "closest": "no feasible trial", "trial": None})
            continue
        within = feasible[feasible.ppl_change <= budget]
        best = (within.loc[within.toxicity_change.idxmin()] if len(within)
                else feasible.loc[feasible.ppl_change.idxmin()])
        row = {"method": method, "trial": int(best.trial),
               "closest": f"{best.toxicity_change:+.1%} at {best.ppl_change:+.1%}"
                          + ("" if len(within) else " (nothing within the budget; least costly)"),
               "gap": f"{100 * (best.toxicity_change - toxicity):+.1f} points of toxicity, "
                      f"{100 * max(best.ppl_change - budget, 0):.1f} of perplexity over",
               "settings": settings_text(best)}
        reached = bool(best.toxicity_change <= toxicity and best.ppl_change <= budget)
        runs = pd.DataFrame()
        if confirmations is not None and len(confirmations):
            runs = confirmations[(confirmations.status == "completed") & (confirmations.method == method)
                                 & np.isclose(confirmations.budget, budget) & (confirmations.trial == best.trial)]
        if len(runs):
            row["re-run"] = (f"{runs.toxicity_change.mean():+.1%} at {runs.ppl_change.mean():+.1%} "
                             f"({len(runs)} seeds)")
            reached = bool(runs.toxicity_change.mean() <= toxicity and runs.ppl_change.mean() <= budget)
        elif reached:
            row["re-run"] = "not yet: the search seed only"
        rows.append({**row, "reached": reached})
    columns = ["method", "reached", "closest", "gap", "re-run", "trial", "settings"]
    return pd.DataFrame(rows).reindex(columns=columns)
