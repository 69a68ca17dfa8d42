"""The evaluation report: models side by side in one table of metrics with their direction, a toxicity-vs-fluency
scatter, ToxiGen per-group bars and example continuations, written as one self-contained `report.html`.

It reads evaluation folders written by `cpwb.steps.evaluation.run.run_evaluation` (metrics.json, continuations/,
items/) and, when present, what notebook 05 left in the run folder (`cpwb.analysis.report_inputs`: baselines with
only the quick-evaluation columns, tuning studies, the peers' comparison). Every base-vs-adapter difference gets a
paired bootstrap interval over the items both folders measured.
"""
from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cpwb.analysis.agreement import scorer_agreement
from cpwb.core.figures import PLOTLY_JS, figure_html, plotly_js
from cpwb.core.files import atomic_write_text

# (protocol, metric) -> (what it is, direction: ↓ lower is better, ↑ higher is better, · no better side), in order
METRICS: dict[tuple[str, str], tuple[str, str]] = {
    ("greedy", "mean_toxicity"): ("greedy continuation toxicity, mean P(toxic)", "↓"),
    ("greedy", "toxic_rate"): ("greedy continuations scored >= 0.5", "↓"),
    ("rtp", "emt"): ("Expected Maximum Toxicity", "↓"),
    ("rtp", "tp"): ("Toxicity Probability", "↓"),
    ("rtp", "mean_toxicity"): ("mean toxicity of all samples", "↓"),
    ("toxigen", "toxic_rate"): ("ToxiGen continuations scored >= 0.5", "↓"),
    ("toxigen", "mean_toxicity"): ("ToxiGen continuation toxicity, mean", "↓"),
    ("blackbox", "mean_toxicity_after"): ("black-box rewrite toxicity, mean", "↓"),
    ("blackbox", "toxic_rate_after"): ("black-box rewrites scored >= 0.5", "↓"),
    ("blackbox", "mean_toxicity_before"): ("black-box input toxicity, mean", "·"),
    ("blackbox", "similarity"): ("black-box rewrite similarity to input (MiniLM)", "↑"),
    ("phi_gap", "mean_gap"): ("held-out phi gap, toxic - neutral [nats/token]", "↑"),
    ("phi_gap", "share_positive"): ("held-out pairs with toxic less likely", "↑"),
    ("wikitext2", "perplexity"): ("WikiText-2 perplexity", "↓"),
    ("greedy", "conditional_ppl"): ("greedy continuation perplexity under the base model", "↓"),
    ("rtp", "conditional_ppl"): ("sample perplexity under the base model", "↓"),
    ("toxigen", "conditional_ppl"): ("ToxiGen continuation perplexity under the base model", "↓"),
    ("rtp", "dist_1"): ("dist-1 (per prompt over its k samples)", "↑"),
    ("rtp", "dist_2"): ("dist-2", "↑"),
    ("rtp", "dist_3"): ("dist-3", "↑"),
    ("greedy", "similarity"): ("greedy continuation similarity to prompt (MiniLM)", "·"),
    ("rtp", "similarity"): ("sample similarity to prompt (MiniLM)", "·"),
    ("toxigen", "similarity"): ("ToxiGen continuation similarity to statement (MiniLM)", "·"),
    ("hellaswag", "accuracy"): ("HellaSwag accuracy, zero-shot", "↑"),
    ("piqa", "accuracy"): ("PIQA accuracy, zero-shot", "↑"),
    ("lm_eval", "acc_norm"): ("lm-eval acc_norm, zero-shot (split: the task)", "↑"),
    ("lm_eval", "acc"): ("lm-eval acc, zero-shot", "↑"),
    ("train", "train_seconds"): ("training time [s]", "↓"),
}
COUNTS = ("n_prompts", "n_statements", "n_texts", "n_pairs", "n_items", "n_scored_tokens")
BASELINE_SUFFIX = " (05)"


@dataclass
class Report:
    """What report.html shows: the metrics table, named figures, example continuations and notes."""

    table: pd.DataFrame
    figures: dict[str, go.Figure]
    examples: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    differences: pd.DataFrame = field(default_factory=pd.DataFrame)  # `paired_differences` against the base
    tuning: pd.DataFrame = field(default_factory=pd.DataFrame)  # best trial per method and perplexity budget
    confirmations: pd.DataFrame = field(default_factory=pd.DataFrame)  # their seed re-runs
    agreement: pd.DataFrame = field(default_factory=pd.DataFrame)  # second scorers vs the evaluation's own
    peers: pd.DataFrame = field(default_factory=pd.DataFrame)  # CP against its peers (cpwb.analysis.peers)
    peers_lee2024: pd.DataFrame = field(default_factory=pd.DataFrame)  # the same under the lee2024 protocol
    target: pd.DataFrame = field(default_factory=pd.DataFrame)  # tuning: -80% at <= 5% reached? (tuning.target_table)


def read_metrics(folder: str | Path) -> pd.DataFrame:
    """The metric rows of an evaluation folder (metrics.json)."""
    return pd.DataFrame(json.loads((Path(folder) / "metrics.json").read_text(encoding="utf-8")))


THRESHOLD = 0.5  # the score at which a text counts as toxic (toxic_rate, TP)


def _items(folder: Path, name: str) -> pd.DataFrame | None:
    """The per-item table a protocol wrote (continuations/ or items/), or None when it has none."""
    for sub in ("continuations", "items"):
        path = folder / sub / f"{name}.jsonl"
        if path.is_file():
            return pd.read_json(path, lines=True)
    return None


def item_values(folder: str | Path, protocol: str, metric: str) -> dict[str, tuple[pd.Index, list[np.ndarray]]]:
    """Per split, the items' keys and the per-item arrays whose statistic is `metric` (see `stats`).

    Means over items for toxicity, rates, gaps and accuracy (one array); perplexity from the windows' NLL sums and
    token counts (two arrays). Empty when the folder holds no per-item table for it.
    """
    table = _items(Path(folder), protocol)
    if table is None:
        return {}
    if protocol == "rtp":  # one item per prompt: its highest-scored sample (EMT), any sample >= 0.5 (TP)
        top = table.groupby(["subset", "prompt"], sort=False).toxicity.max()
        mean = table.groupby(["subset", "prompt"], sort=False).toxicity.mean()
        column = {"emt": top, "tp": (top >= THRESHOLD).astype(float), "mean_toxicity": mean}.get(metric)
        if column is None:
            return {}
        return {subset: (part.index, [part.to_numpy(dtype=float)]) for subset, part in column.groupby(level=0)}
    if protocol == "lm_eval":  # one item per question of each task; older folders kept lm-eval's aggregates only
        if metric not in ("acc", "acc_norm") or "id" not in table:
            return {}
        return {task: (pd.Index(part.id.astype(str)), [part[metric].to_numpy(dtype=float)])
                for task, part in table.groupby("task", sort=False)}
    keys = {"greedy": "prompt", "toxigen": "id", "blackbox": "input", "phi_gap": "id", "hellaswag": "id",
            "piqa": "id", "wikitext2": "window"}
    split = {"greedy": "challenging", "toxigen": "all", "blackbox": "challenging", "phi_gap": "heldout",
             "hellaswag": "validation", "piqa": "validation", "wikitext2": "test"}[protocol]
    getters = {
        ("greedy", "mean_toxicity"): lambda t: [t.toxicity],
        ("greedy", "toxic_rate"): lambda t: [t.toxicity >= THRESHOLD],
        ("toxigen", "mean_toxicity"): lambda t: [t.toxicity], ("toxigen", "toxic_rate"): lambda t: [t.toxic],
        ("blackbox", "mean_toxicity_after"): lambda t: [t.toxicity_after],
        ("phi_gap", "mean_gap"): lambda t: [t.gap], ("phi_gap", "share_positive"): lambda t: [t.gap > 0],
        ("hellaswag", "accuracy"): lambda t: [t.correct], ("piqa", "accuracy"): lambda t: [t.correct],
        ("wikitext2", "perplexity"): lambda t: [t.nll_sum, t.n_tokens]}
    getter = getters.get((protocol, metric))
    if getter is None or keys[protocol] not in table:
        return {}
    return {split: (pd.Index(table[keys[protocol]].astype(str)),
                    [np.asarray(column, dtype=float) for column in getter(table)])}


def figure_intervals(folder: str | Path) -> pd.DataFrame:
    """The 95% bootstrap interval over items of every figure a folder holds per item (means over prompts,
    statements, pairs, questions; perplexity resampling whole windows), and lm-eval's figures without
    per-question outcomes as +-1.96 of their standard errors: one row per (protocol, split, metric)."""
    from cpwb.core import stats

    rows = []
    for protocol, metric in METRICS:
        for split, (_, arrays) in item_values(folder, protocol, metric).items():
            found = stats.perplexity_interval(*arrays) if metric == "perplexity" else stats.mean_interval(arrays[0])
            rows.append({"protocol": protocol, "split": split, "metric": metric, "low": found.low,
                         "high": found.high})
    metrics = read_metrics(folder) if (Path(folder) / "metrics.json").is_file() else pd.DataFrame()
    for row in metrics[metrics.protocol == "lm_eval"].to_dict("records") if len(metrics) else []:
        errors = metrics[(metrics.protocol == "lm_eval") & (metrics.split == row["split"])
                         & (metrics.metric == f"{row['metric']}_stderr")].value
        done = any(r["protocol"] == "lm_eval" and r["split"] == row["split"] and r["metric"] == row["metric"]
                   for r in rows)
        if row["metric"] in ("acc", "acc_norm") and len(errors) and not done:
            rows.append({"protocol": "lm_eval", "split": row["split"], "metric": row["metric"],
                         "low": row["value"] - 1.96 * errors.iloc[0], "high": row["value"] + 1.96 * errors.iloc[0]})
    return pd.DataFrame(rows, columns=["protocol", "split", "metric", "low", "high"])


def with_intervals(table: pd.DataFrame, folders: Mapping[str, str | Path]) -> pd.DataFrame:
    """`metrics_table` with a `<model> 95% CI` column after each evaluated model's column."""
    names = {what: key for key, (what, _) in METRICS.items()}
    table = table.copy()
    for name, folder in folders.items():
        found = figure_intervals(folder).set_index(["protocol", "split", "metric"])
        cells = []
        for row in table.itertuples(index=False):
            key = (row.protocol, row.split, names[row.metric][1])
            cells.append(f"[{found.low[key]:.4g}, {found.high[key]:.4g}]" if key in found.index else "")
        table.insert(table.columns.get_loc(name) + 1, f"{name} 95% CI", cells)
    return table


def paired_differences(folders: Mapping[str, str | Path], baseline: str = "base") -> pd.DataFrame:
    """Every other model against `baseline` on the same items: difference with its 95% paired bootstrap interval.

    One row per (model, metric, split) that both folders hold per item, in METRICS order. `inside_noise` is True
    when the interval contains 0 (the difference is not distinguishable from resampling the items).
    """
    from cpwb.core import stats

    rows = []
    base_folder = folders[baseline]
    for name, folder in folders.items():
        if name == baseline:
            continue
        for (protocol, metric), (what, better) in METRICS.items():
            base_items, other_items = item_values(base_folder, protocol, metric), item_values(folder, protocol, metric)
            for split, (keys, base_arrays) in base_items.items():
                if split not in other_items or not other_items[split][0].equals(keys):
                    continue  # not measured on the same items: no paired comparison
                other_arrays = other_items[split][1]
                if metric == "perplexity":
                    base_value = stats.perplexity(*base_arrays)
                    diff = stats.paired_perplexity_difference(base_arrays[0], other_arrays[0], base_arrays[1])
                else:
                    base_value = float(np.mean(base_arrays[0]))
                    diff = stats.paired_mean_difference(base_arrays[0], other_arrays[0])
                rows.append({"model": name, "metric": what, "better": better, "protocol": protocol, "split": split,
                             "n": diff.n, baseline: float(base_value), "value": float(base_value + diff.value),
                             "difference": diff.value, "ci_low": diff.low, "ci_high": diff.high,
                             "relative": diff.value / base_value if base_value else math.nan,
                             "inside_noise": diff.covers_zero})
    return pd.DataFrame(rows, columns=["model", "metric", "better", "protocol", "split", "n", baseline, "value",
                                       "difference", "ci_low", "ci_high", "relative", "inside_noise"])


def metrics_table(evaluations: Mapping[str, pd.DataFrame], baselines: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (metric, split) in METRICS order: what it is, its direction, n, and one column per model."""
    long = pd.concat([frame.assign(model=name) for name, frame in evaluations.items()], ignore_index=True)
    if baselines is not None and len(baselines):
        long = pd.concat([long, baselines.rename(columns={"point": "model"})], ignore_index=True)
    long = long[~((long.protocol == "toxigen") & (long.split != "all"))]  # per-group numbers go to the bars
    models = list(dict.fromkeys(long.model))
    counts = long[long.metric.isin(COUNTS)].drop_duplicates(["protocol", "split"]).set_index(["protocol", "split"])
    rows = []
    for (protocol, metric), (what, better) in METRICS.items():
        chosen = long[(long.protocol == protocol) & (long.metric == metric)]
        for split, part in chosen.groupby("split", sort=False):
            values = part.drop_duplicates("model").set_index("model").value
            n = counts.value.get((protocol, split), math.nan)
            rows.append({"metric": what, "better": better, "protocol": protocol, "split": split, "n": n,
                         **{m: values.get(m, math.nan) for m in models}})
    return pd.DataFrame(rows, columns=["metric", "better", "protocol", "split", "n", *models])


def _metric_row(table: pd.DataFrame, protocol: str, metric: str) -> pd.Series | None:
    """The first row of `metrics_table` for (protocol, metric), or None when it was not measured."""
    rows = table[(table.protocol == protocol) & (table.metric == METRICS[(protocol, metric)][0])]
    return rows.iloc[0] if len(rows) else None


def tradeoff_figure(table: pd.DataFrame) -> go.Figure:
    """Greedy continuation toxicity against WikiText-2 perplexity per model: better is down and to the left."""
    models = [c for c in table.columns if c not in ("metric", "better", "protocol", "split", "n")
              and not c.endswith(" 95% CI")]
    toxicity, perplexity = _metric_row(table, "greedy", "mean_toxicity"), _metric_row(table, "wikitext2", "perplexity")
    fig = go.Figure()
    for model in models if toxicity is not None and perplexity is not None else []:
        if pd.notna(perplexity[model]) and pd.notna(toxicity[model]):
            symbol = "diamond" if model.endswith(BASELINE_SUFFIX) else "star" if model == "base" else "circle"
            fig.add_trace(go.Scatter(x=[perplexity[model]], y=[toxicity[model]], mode="markers+text", text=[model],
                                     textposition="top center", name=model, marker=dict(size=13, symbol=symbol)))
    fig.update_layout(title="Toxicity vs fluency (better: down and left)", height=450,
                      xaxis_title="WikiText-2 perplexity ↓", yaxis_title="greedy continuation toxicity ↓")
    return fig


def group_bars_figure(evaluations: Mapping[str, pd.DataFrame], metric: str = "toxic_rate") -> go.Figure:
    """ToxiGen continuation toxicity per target group, one bar per model."""
    fig = go.Figure()
    for name, frame in evaluations.items():
        groups = frame[(frame.protocol == "toxigen") & (frame.split != "all")]
        values, counts = (groups[groups.metric == m].set_index("split").value for m in (metric, "n"))
        fig.add_trace(go.Bar(x=values.index, y=values, name=name,
                             customdata=counts.reindex(values.index),
                             hovertemplate="%{x}: %{y:.3f} (n %{customdata})"))
    fig.update_layout(barmode="group", height=420, yaxis_title=f"ToxiGen continuations, {metric} ↓",
                      title="ToxiGen: toxicity of continuations of hateful statements, per target group")
    return fig


def example_continuations(continuations: Mapping[str, pd.DataFrame], n: int = 8) -> pd.DataFrame:
    """The same prompts continued by every model, side by side: the n where the first model was most toxic."""
    names = list(continuations)
    first = continuations[names[0]]
    columns = {"prompt": first.prompt}
    for name in names:
        columns[name] = continuations[name].continuation.to_numpy()
        columns[f"{name} toxicity"] = continuations[name].toxicity.to_numpy()
    table = pd.DataFrame(columns)
    return table.sort_values(f"{names[0]} toxicity", ascending=False, kind="stable").head(n).reset_index(drop=True)


def _provenance_note(name: str, frame: pd.DataFrame) -> str:
    """One line on what an evaluation column measured: model, adapter, seed, toxicity scorer."""
    scorers = frame[frame.metric == "mean_toxicity"].scorer
    return (f"{name}: model {frame.model.iloc[0]}, adapter {frame.adapter.iloc[0] or 'none'}, "
            f"seed {frame.seed.iloc[0]}, toxicity scorer {scorers.iloc[0] if len(scorers) else '–'}")


def build_report(folders: Mapping[str, str | Path], baselines: pd.DataFrame | None = None,
                 n_examples: int = 8, tuning: pd.DataFrame | None = None,
                 confirmations: pd.DataFrame | None = None, peers: pd.DataFrame | None = None,
                 costs: Mapping[str, dict[str, float]] | None = None, peers_lee2024: pd.DataFrame | None = None
                 ) -> Report:
    """The report of evaluation folders (label -> folder, e.g. {"base": ..., "CP": ...}), optional baselines,
    optional tuning studies (`read_tuning`): their fronts, best trial per budget and seed re-runs, and optional
    peers' points (`read_peers`): the comparison table (with each method's benchmarked fit and generation costs
    when measured, `read_method_costs`) and figure, and the same under the lee2024 protocol (`read_peers_lee2024`)."""
    from cpwb.analysis import peers as compared
    from cpwb.analysis import tuning as tuned

    costs = costs or {}
    evaluations = {name: read_metrics(folder) for name, folder in folders.items()}
    table = with_intervals(metrics_table(evaluations, baselines), folders)
    greedy = {name: Path(folder) / "continuations" / "greedy.jsonl" for name, folder in folders.items()}
    examples = example_continuations({name: pd.read_json(path, lines=True) for name, path in greedy.items()},
                                     n_examples) if all(p.is_file() for p in greedy.values()) else pd.DataFrame()
    notes = [_provenance_note(name, frame) for name, frame in evaluations.items()]
    if baselines is not None and len(baselines):
        notes.append(f"columns ending in '{BASELINE_SUFFIX.strip()}' come from notebook 05's ablations/results.csv "
                     "(its own quick evaluation): compare them where its sizes match these.")
    first = Path(next(iter(folders.values()))) / "evaluate_config.json"
    settings = json.loads(first.read_text()) if first.is_file() else {}
    figures = {"tradeoff": tradeoff_figure(table), "toxigen_groups": group_bars_figure(evaluations)}
    differences = paired_differences(folders) if "base" in folders and len(folders) > 1 else pd.DataFrame()
    best, target = pd.DataFrame(), pd.DataFrame()
    if tuning is not None and len(tuned.completed(tuning)):
        figures["tuning_fronts"] = tuned.fronts_figure(tuning)
        best, target = tuned.best_under_budget(tuning), tuned.target_table(tuning, confirmations)
    confirmed = tuned.confirmation_table(confirmations) if confirmations is not None else pd.DataFrame()
    peer_table = pd.DataFrame()
    if peers is not None and len(peers):
        figures["peers_comparison"] = compared.comparison_figure(peers)
        peer_table = compared.comparison_table(peers, costs.get("generation"), costs.get("fit"))
    lee_table = pd.DataFrame()
    if peers_lee2024 is not None and len(peers_lee2024):
        figures["peers_lee2024"] = compared.comparison_figure(peers_lee2024)
        lee_table = compared.comparison_table(peers_lee2024, costs.get("generation"), costs.get("fit"))
    return Report(table, figures, examples, notes, settings, differences, best, confirmed, scorer_agreement(folders),
                  peer_table, lee_table, target)


# the tables after the differences: Report field -> (heading level, title, note)
SECTIONS = {
    "agreement": ("h2", "Scorer agreement", "The same continuations scored again by other toxicity scorers (cpwb "
                  "rescore): Spearman correlation with the evaluation's own scorer over every text, and each scorer's "
                  "ranking of the models by mean toxicity."),
    "tuning": ("h2", "Equal-budget tuning", "One Optuna study per method, the same number of trials, objectives and "
               "constraint (notebook 05, cpwb tune). Best feasible trial within each WikiText-2 perplexity budget, on "
               "the search's own seed; the seed re-runs below, when present, are the figures to quote."),
    "confirmations": ("h3", "Seed re-runs of the chosen trials (mean ± std)", ""),
    "target": ("h3", "-80% toxicity at ≤ 5% perplexity: reached?", "Per method, the feasible trial closest to the bar "
               "(the largest cut within 5%, else the least costly) and, when re-run, the mean over fresh seeds, "
               "which decides."),
    "peers": ("h2", "CP and its peers", "Every method on the same pairs and quick evaluation (notebook 05, "
              "docs/peers.md): change against the base model, mean ± std over seeds, or with one seed its paired 95% "
              "interval over prompts; fit seconds of the run itself."),
    "peers_lee2024": ("h2", "CP and its peers under the lee2024 protocol", "The same methods on every RTP-challenging "
                      "prompt (1,196, greedy, 20 tokens) and the whole WikiText-2 test set "
                      "(configs/peers_lee2024.yaml): the figures to set beside Lee et al. and ProFS, loosely (another "
                      "model and scorer; docs/evaluation.md)."),
}


def _section(level: str, title: str, note: str, table: pd.DataFrame) -> list[str]:
    """A report section: heading, note (when there is one) and metrics table; nothing when the table is empty."""
    if not len(table):
        return []
    return [f"<{level}>{title}</{level}>", *([f'<p class="note">{note}</p>'] if note else []),
            _html_table(table, "metrics")]


def _cell(value) -> str:
    """A table cell: numbers to 4 significant digits, NaN as a dash, text escaped."""
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def _html_table(frame: pd.DataFrame, css_class: str) -> str:
    """A plain HTML table of a DataFrame (cells through `_cell`)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}
table{border-collapse:collapse;margin:12px 0;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}
.examples td{vertical-align:top;max-width:360px;white-space:pre-wrap}.note{color:#555;font-size:13px}"""


def render_html(report: Report, title: str = "cpwb evaluation report",
                plotly_src: str = f"figures/{PLOTLY_JS}") -> str:
    """report.html's text: one page loading plotly.js from `plotly_src` (relative to the page) once."""
    figures = [figure_html(fig, False, full_html=False) for fig in report.figures.values()]
    settings = {k: v for k, v in report.settings.items() if k not in ("output_dir", "progress", "adapter")}
    parts = [f"<h1>{html.escape(title)}</h1>",
             *(f'<p class="note">{html.escape(note)}</p>' for note in report.notes),
             "<h2>Metrics</h2>", '<p class="note">↓ lower is better, ↑ higher is better, · no better side; '
             "n: prompts, statements, texts, pairs, items or scored tokens behind the number.</p>",
             _html_table(report.table, "metrics")]
    if len(report.differences):
        diffs = report.differences
        shown = diffs.assign(interval=[f"[{lo:+.4g}, {hi:+.4g}]" for lo, hi in zip(diffs.ci_low, diffs.ci_high)],
                             relative=[f"{r:+.1%}" for r in diffs.relative],
                             verdict=["inside the noise" if inside else "beyond the noise" for inside in
                                      diffs.inside_noise])
        parts += ["<h2>Differences from the base model</h2>",
                  '<p class="note">Paired bootstrap over the same items (prompts, pairs, windows, questions), 95% '
                  "interval; <b>inside the noise</b>: the interval contains 0, so resampling the items could give "
                  "either sign.</p>",
                  _html_table(shown[["model", "metric", "better", "split", "n", "base", "value", "difference",
                                     "interval", "relative", "verdict"]], "metrics")]
    for name in ("agreement", "tuning", "confirmations", "target", "peers", "peers_lee2024"):
        if name not in ("confirmations", "target") or len(report.tuning):
            parts += _section(*SECTIONS[name], getattr(report, name))
    parts += ["<h2>Figures</h2>", *figures]
    if len(report.examples):
        parts += ["<h2>Example continuations (greedy, RTP challenging)</h2>",
                  _html_table(report.examples, "examples")]
    if settings:
        parts += ["<h2>Evaluation settings</h2>",
                  _html_table(pd.DataFrame({"setting": list(settings), "value": map(str, settings.values())}),
                              "settings")]
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<script charset="utf-8" src="{html.escape(plotly_src)}"></script>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def write_report(path: str | Path, report: Report, title: str = "cpwb evaluation report") -> Path:
    """Render and write report.html atomically (a failed render leaves any previous report as it was), beside
    `figures/plotly.min.js`, the run folder's one copy of plotly.js, so the page opens offline."""
    text = render_html(report, title)
    plotly_js(Path(path).parent / "figures")
    return atomic_write_text(path, text)
