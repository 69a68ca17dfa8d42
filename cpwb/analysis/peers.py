"""CP against the methods a researcher would pick instead, on the same pairs, held-out data and quick evaluation.

Reads sweep results (cpwb.app.sweep's results.csv): the ablation grid gives CP, DPO and SimPO at their default
settings (3 seeds); the peers sweep (configs/peers.yaml) gives the training-free methods as curves over their
strength knobs, and DExperts over its alpha. Each row of `method_points` is one completed point; `comparison_table`
gives per method and setting the mean ± std over seeds, or, for one seed, the paired bootstrap 95% interval over
prompts that the point recorded; `comparison_figure` draws toxicity change against perplexity change with each
knob's curve and the Pareto front; `data_figure` the sample-efficiency and label-noise sweeps.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cpwb.analysis.ablations import SECOND_SCORER, pareto_front

# the ablation grid's variants that are the trained methods at their defaults
TRAINED = {"base": "CP", "objective=dpo": "DPO", "objective=simpo": "SimPO"}
PEER_NAMES = {"cp": "CP", "dpo": "DPO", "simpo": "SimPO", "profs": "ProFS", "steering": "steering",
              "dexperts": "DExperts", "grpo": "GRPO (RL)", "rloo": "RLOO (RL)"}
# each training-free method's strength knob (its curve) and the settings that make another curve
KNOBS = {"profs": ("edit_rank", ("edit_layers", "edit_first_layer")),
         "steering": ("steering_strength", ("steering_layer",)), "dexperts": ("dexperts_alpha", ()),
         "grpo": ("", ("rl_scorer",)), "rloo": ("", ("rl_scorer",))}
# methods whose artefact is a LoRA adapter of CP's shape: generation costs what CP's adapter costs
LORA_METHODS = ("DPO", "SimPO", "GRPO (RL)", "RLOO (RL)")
DOWNSTREAM = ("downstream_change", "downstream_change_low", "downstream_change_high")  # `cpwb sweep --downstream`
SECOND = tuple(f"{metric}:{SECOND_SCORER}" for metric in ("toxicity_change", "toxicity_change_low",
                                                          "toxicity_change_high"))
COLUMNS = ("method", "setting", "knob", "knob_value", "seed", "toxicity_change", "toxicity_change_low",
           "toxicity_change_high", "ppl_change", "ppl_change_low", "ppl_change_high", "similarity", "train_seconds",
           *SECOND, *DOWNSTREAM)


def _blocks(value) -> str:
    """A block list as written in results.csv ("[20, 21, ...]") shown as a range when consecutive."""
    import json

    blocks = json.loads(value) if isinstance(value, str) else list(value)
    consecutive = blocks == list(range(blocks[0], blocks[-1] + 1)) if blocks else False
    return f"{blocks[0]}-{blocks[-1]}" if consecutive and len(blocks) > 2 else ",".join(map(str, blocks))


def _setting(row: pd.Series, names: tuple[str, ...]) -> str:
    """The non-default values of `names` in a results row ("default" when all are defaults)."""
    parts = []
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value.startswith("[") and value != "[]":
            parts.append(f"blocks {_blocks(value)}")
        elif isinstance(value, str) and value not in ("", "[]", "default"):  # a named choice, e.g. the reward
            parts.append(f"{'reward' if name == 'rl_scorer' else name} {value}")
        elif value is not None and not isinstance(value, str) and pd.notna(value):
            parts.append(f"blocks {int(value)}-last" if name == "edit_first_layer" else f"block {int(value)}")
    return ", ".join(parts) or "default"


def _knob_value(row: pd.Series, knob: str) -> float:
    """The point's strength knob; a sweep writes only the settings its grid varies, so a point at the knob's default
    (a grid with one setting per method, e.g. configs/peers_lee2024.yaml) takes the default from TrainConfig."""
    if not knob:
        return np.nan
    value = row.get(knob)
    if value is None or pd.isna(value):
        from cpwb.steps.training.config import TrainConfig

        value = TrainConfig.__dataclass_fields__[knob].default
    return float(value)


def method_points(ablations: pd.DataFrame | None, peers: pd.DataFrame | None) -> pd.DataFrame:
    """One row per completed point of the compared methods (COLUMNS; interval columns NaN where not recorded)."""
    rows: list[dict] = []
    if ablations is not None:
        done = ablations[(ablations.status == "completed") & ablations.variant.isin(TRAINED)]
        for _, row in done.iterrows():
            rows.append({**row.to_dict(), "method": TRAINED[row.variant], "setting": "default", "knob": "",
                         "knob_value": np.nan})
    if peers is not None:
        for _, row in peers[peers.status == "completed"].iterrows():
            knob, others = KNOBS.get(row.objective, ("", ()))
            rows.append({**row.to_dict(), "method": PEER_NAMES.get(row.objective, row.objective),
                         "setting": _setting(row, others), "knob": knob, "knob_value": _knob_value(row, knob)})
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = np.nan
    return frame[list(COLUMNS)]


DATA_SETTINGS = ("train_pairs_limit", "swap_fraction")  # configs/peers_data.yaml's settings; 0 (or unset): all, none


def downstream_from(points: pd.DataFrame, sweep: pd.DataFrame | None) -> pd.DataFrame:
    """`points` with the downstream accuracy change filled in where it was not measured, from another sweep's
    completed points of the same method, seed and default settings, on all pairs and none swapped (DATA_SETTINGS).

    The ablation grid ran before downstream accuracy was measured in-line and its artefacts were not kept;
    configs/peers_data.yaml trains CP and DPO again at those settings and seeds and measures it, so its all-pairs
    points give the figure. Only methods without a strength knob are filled (a knob's other values are other
    models); figures measured on the point itself are kept."""
    out = points.copy()
    if sweep is None or not len(sweep) or "downstream_change" not in sweep:
        return out
    defaults = sweep.status.eq("completed")
    for name in DATA_SETTINGS:
        if name in sweep:
            defaults &= pd.to_numeric(sweep[name], errors="coerce").fillna(0).eq(0)
    donors = method_points(None, sweep[defaults])
    donors = donors[donors.setting.eq("default") & donors.knob.fillna("").eq("") & donors.downstream_change.notna()]
    by_key = {(row.method, row.seed): row for row in donors.itertuples(index=False)}
    for index in out.index[out.downstream_change.isna() & out.setting.eq("default") & out.knob.fillna("").eq("")]:
        donor = by_key.get((out.at[index, "method"], out.at[index, "seed"]))
        if donor is not None:
            for column in DOWNSTREAM:
                out.at[index, column] = getattr(donor, column)
    return out


def _cell(values: pd.Series, low: pd.Series, high: pd.Series, digits: int = 0, unit: str = "%") -> str:
    """`mean ± std` over seeds in % (or another `unit` of hundredths), or with one seed its recorded interval."""
    v, f = 100 * values.astype(float), f".{digits}f"
    if len(v) > 1:
        return f"{v.mean():+{f}} ± {v.std(ddof=1):{f}}{unit}"
    if pd.notna(low.iloc[0]) and pd.notna(high.iloc[0]):
        return f"{v.iloc[0]:+{f}}{unit} [{100 * low.iloc[0]:+{f}}, {100 * high.iloc[0]:+{f}}]"
    return f"{v.iloc[0]:+{f}}{unit}"


def _measured_cell(part: pd.DataFrame, columns: tuple[str, str, str], digits: int = 0, unit: str = "%") -> str:
    """`_cell` over the seeds where a figure measured after the fact (second scorer, downstream) is there, saying
    how many of the seeds that is; "—" with none."""
    have = part[part[columns[0]].notna()]
    if not len(have):
        return "—"
    cell = _cell(*(have[c] for c in columns), digits, unit)
    return cell if len(have) == len(part) else f"{cell} ({len(have)} of {len(part)} seeds)"


def _latest(benchmarks: pd.DataFrame, benchmark: str, metric: str) -> dict[str, float]:
    """Method -> the median of its latest run of one benchmark's metric in a benchmarks/results.csv."""
    rows = benchmarks[(benchmarks.benchmark == benchmark) & (benchmarks.metric == metric)]
    rows = rows.assign(method=rows.config.map(lambda text: json.loads(text)["method"])).sort_values("timestamp")
    return {str(m): float(v) for m, v in rows.groupby("method").p50.last().items()}


def generation_costs(benchmarks: pd.DataFrame) -> dict[str, float]:
    """Method -> CPU seconds per 1,000 generated tokens, from benchmarks/method_cost.py's rows of a
    benchmarks/results.csv (each method's latest run, median over its repeats). DPO, SimPO and GRPO train LoRA
    adapters of CP's shape, so they take CP's figure when they were not measured themselves."""
    costs = _latest(benchmarks, "method_cost", "cpu_seconds_per_1k_tokens")
    return {**({name: costs["CP"] for name in LORA_METHODS} if "CP" in costs else {}), **costs}


def fit_costs(benchmarks: pd.DataFrame) -> dict[str, float]:
    """Method -> CPU seconds of one whole fit, from benchmarks/fit_cost.py's rows (each method's latest run, median
    over its repeats): every method fitted on one machine in one process, unlike the sweeps' recorded seconds,
    which come from whichever machine ran each point. Only measured methods: objectives differ in their work."""
    return _latest(benchmarks, "fit_cost", "cpu_seconds_per_fit")


def _setting_label(setting: str, knob: str, value: float) -> str:
    """A table row's setting: the non-default settings, then the knob's value ("edit_rank=2", not "default; ...")."""
    if not knob:
        return setting
    return f"{knob}={value:g}" if setting == "default" else f"{setting}; {knob}={value:g}"


def comparison_table(points: pd.DataFrame, generation: dict[str, float] | None = None,
                     fit: dict[str, float] | None = None) -> pd.DataFrame:
    """Per method, setting and knob value: seeds, toxicity and perplexity change (mean ± std over seeds, or the
    paired 95% interval of a single seed), the toxicity change by the second scorer when the points were rescored
    with it, the downstream accuracy change in points when measured (`cpwb sweep --downstream`), similarity,
    fitting seconds as the points recorded them, and, when benchmarked, the CPU seconds of a fit on one machine
    (`fit`: method -> seconds, `fit_costs`) and of generating 1,000 tokens (`generation`: method -> seconds)."""
    rows = []
    for (method, setting, value), part in points.groupby(["method", "setting", "knob_value"], dropna=False,
                                                           sort=False):
        knob = part.knob.iloc[0]
        rows.append({
            "method": method, "setting": _setting_label(setting, knob, value),
            "seeds": len(part),
            "toxicity change": _cell(part.toxicity_change, part.toxicity_change_low, part.toxicity_change_high),
            **({f"toxicity change, {SECOND_SCORER}": _measured_cell(part, SECOND)}
               if points[SECOND[0]].notna().any() else {}),
            "perplexity change": _cell(part.ppl_change, part.ppl_change_low, part.ppl_change_high, 1),
            **({"downstream change": _measured_cell(part, DOWNSTREAM, 1, " pts")}
               if points[DOWNSTREAM[0]].notna().any() else {}),
            "similarity": f"{part.similarity.astype(float).mean():.3f}",
            "fit seconds": f"{part.train_seconds.astype(float).mean():.0f}",
            **({"fit CPU s, one machine": f"{fit[method]:.0f}" if method in fit else "—"} if fit else {}),
            **({"generation s / 1k tokens": f"{generation[method]:.1f}" if method in generation else "—"}
               if generation else {}),
            "_tox": part.toxicity_change.astype(float).mean()})
    table = pd.DataFrame(rows)
    return table.drop(columns="_tox") if len(table) else table


def comparison_figure(points: pd.DataFrame) -> go.Figure:
    """Toxicity change against WikiText-2 perplexity change: each method's settings (mean over seeds, std bars),
    knob curves joined in knob order, the Pareto front over all, the base model at the origin."""
    means = (points.groupby(["method", "setting", "knob", "knob_value"], dropna=False, sort=False)
             .agg(tox=("toxicity_change", "mean"), tox_sd=("toxicity_change", "std"), ppl=("ppl_change", "mean"),
                  ppl_sd=("ppl_change", "std"), seeds=("seed", "size")).reset_index())
    fig = go.Figure()
    for (method, setting), part in means.groupby(["method", "setting"], sort=False):
        part = part.sort_values("knob_value")
        curve = part.knob.iloc[0] and len(part) > 1
        label = method if setting == "default" else f"{method} ({setting})"
        fig.add_trace(go.Scatter(
            x=100 * part.ppl, y=100 * part.tox, mode="lines+markers" if curve else "markers", name=label,
            error_x=dict(type="data", array=100 * part.ppl_sd.fillna(0)),
            error_y=dict(type="data", array=100 * part.tox_sd.fillna(0)), marker=dict(size=9),
            text=[f"{label}<br>{k}={v:g}" if k else label for k, v in zip(part.knob, part.knob_value)],
            hovertemplate="%{text}<br>perplexity %{x:+.1f}%<br>toxicity %{y:+.0f}%<extra></extra>"))
    front = means[pareto_front(means.ppl.to_numpy(), means.tox.to_numpy())].sort_values("ppl")
    fig.add_trace(go.Scatter(x=100 * front.ppl, y=100 * front.tox, mode="lines", name="Pareto front",
                             line=dict(color="black", dash="dot"), hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[0], y=[0], mode="markers", name="base model",
                             marker=dict(symbol="star", size=15, color="black")))
    fig.update_layout(title="CP and its peers on the same pairs: toxicity vs fluency cost (lower-left is better)",
                      xaxis_title="WikiText-2 perplexity change (%)", yaxis_title="greedy toxicity change (%)",
                      height=560)
    return fig


DATA_SETTINGS = {"train_pairs_limit": 0, "swap_fraction": 0.0}  # each data setting's default: all pairs, none swapped


def data_figure(frame: pd.DataFrame, setting: str) -> go.Figure:
    """Toxicity and perplexity change per method over a data setting (`train_pairs_limit`: 0 shown as "all";
    `swap_fraction`), mean ± std over seeds: the sample-efficiency and label-noise sweeps (configs/peers_data.yaml).

    Only rows whose other data setting is at its default are drawn, so one grid holds both sweeps and shares their
    common point (all pairs, none swapped)."""
    from plotly.subplots import make_subplots

    done = frame[(frame.status == "completed") & frame[setting].notna()].copy()
    for other, default in DATA_SETTINGS.items():
        if other != setting and other in done:
            done = done[done[other].fillna(default).astype(float) == default]
    done["_x"] = done[setting].astype(float)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("greedy toxicity change (%)",
                                                        "WikiText-2 perplexity change (%)"))
    order = sorted(done._x.unique(), key=lambda v: (v == 0, v)) if setting == "train_pairs_limit" else sorted(
        done._x.unique())
    labels = {v: ("all" if setting == "train_pairs_limit" and v == 0 else f"{v:g}") for v in order}
    for method, part in done.groupby("objective", sort=False):
        stats = part.groupby("_x").agg(tox=("toxicity_change", "mean"), tox_sd=("toxicity_change", "std"),
                                       ppl=("ppl_change", "mean"), ppl_sd=("ppl_change", "std")).reindex(order)
        name = PEER_NAMES.get(method, TRAINED.get(f"objective={method}", method.upper() if method != "cp" else "CP"))
        for col, (y, sd) in enumerate((("tox", "tox_sd"), ("ppl", "ppl_sd")), start=1):
            fig.add_trace(go.Scatter(x=[labels[v] for v in order], y=100 * stats[y],
                                     error_y=dict(type="data", array=100 * stats[sd].fillna(0)),
                                     mode="lines+markers", name=name, legendgroup=name, showlegend=col == 1),
                          row=1, col=col)
    title = {"train_pairs_limit": "Sample efficiency: training pairs", "swap_fraction": "Label noise: share of "
             "pairs with their sides swapped"}.get(setting, setting)
    fig.update_layout(title=f"{title} (mean ± std over seeds)", height=450)
    fig.update_xaxes(title_text=setting, type="category")
    return fig
