"""phi distributions of toxic and non-toxic texts under the base model and a CP adapter: tables, separation, figures.

phi is a text's mean token NLL (cpwb.engine.nll). One long table holds a row per (text, model). Separation statistics
read phi as a toxicity detector: ROC AUC with toxic as the positive class and higher phi meaning "toxic" (0.5: no
separation; above 0.5: toxic texts are the less likely ones, which is what CP aims at; below: the more likely),
the two-sample Kolmogorov-Smirnov statistic, and the mean gap phi(toxic) - phi(non-toxic).
"""
from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cpwb.analysis.plots import LABEL_COLOURS
from cpwb.analysis.views import NLL_LEGEND, Continuation, continuation_html, token_pieces
from cpwb.core.errors import InputError
from cpwb.data.corpora import load_toxigen_seeds
from cpwb.data.pairs import NON_TOXIC, TOXIC
from cpwb.engine.adapters import Side
from cpwb.engine.nll import texts_nll

TOXIGEN_SOURCE = "ToxiGen seeds"
MODEL_DASHES = {"base": "dot"}  # any other model (the CP adapter) is drawn solid


# ------------------------------------------------------------------------------------------------------ texts


def toxigen_texts(per_group: int) -> pd.DataFrame:
    """The first `per_group` hateful (toxic) and neutral seed statements of every ToxiGen target group."""
    statements = pd.DataFrame(load_toxigen_seeds())
    chosen = statements.groupby(["group", "label"], sort=True).head(per_group)
    return pd.DataFrame({"source": TOXIGEN_SOURCE, "group": chosen.group, "pair_id": chosen.id, "role": "statement",
                         "label": np.where(chosen.label == "hate", TOXIC, NON_TOXIC), "text": chosen.text}
                        ).reset_index(drop=True)


def phi_table(sides: Sequence[Side], tokenizer, texts: pd.DataFrame, batch_size: int = 16,
              progress: bool = False) -> pd.DataFrame:
    """The long table: every row of `texts` once per side (model), with its phi under that side."""
    frames = []
    for side in sides:
        with side.context():
            phi = texts_nll(side.model, tokenizer, texts.text.tolist(), batch_size=batch_size, progress=progress).phi
        frames.append(texts.assign(model=side.label, phi=phi))
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------------- separation


def roc_auc(scores: Sequence[float], is_positive: Sequence[bool]) -> float:
    """P(score of a random positive > that of a random negative), ties counting half (scikit-learn's ROC AUC); NaN
    if a class is empty."""
    from sklearn.metrics import roc_auc_score

    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        return float("nan")
    return float(roc_auc_score(is_positive, np.asarray(scores, dtype=float)))


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (scipy): the largest gap between the two empirical CDFs (NaN if one is
    empty)."""
    from scipy.stats import ks_2samp

    if not len(a) or not len(b):
        return float("nan")
    return float(ks_2samp(np.asarray(a, dtype=float), np.asarray(b, dtype=float)).statistic)


def phi_separation(phi: Sequence[float], labels: Sequence[str]) -> dict[str, float]:
    """How well phi tells toxic from non-toxic texts: ROC AUC, KS statistic, mean gap and the counts."""
    phi, toxic = np.asarray(phi, dtype=float), np.asarray(labels) == TOXIC
    unknown = set(np.asarray(labels)) - {TOXIC, NON_TOXIC}
    if unknown:
        raise InputError(f"labels must be {TOXIC!r} or {NON_TOXIC!r}, got {sorted(unknown)}", field="labels")
    mean_toxic = float(phi[toxic].mean()) if toxic.any() else float("nan")
    mean_non_toxic = float(phi[~toxic].mean()) if (~toxic).any() else float("nan")
    return {"roc_auc": roc_auc(phi, toxic), "ks": ks_statistic(phi[toxic], phi[~toxic]),
            "mean_gap": mean_toxic - mean_non_toxic, "phi_toxic": mean_toxic, "phi_non_toxic": mean_non_toxic,
            "n_toxic": int(toxic.sum()), "n_non_toxic": int((~toxic).sum())}


def separation_table(table: pd.DataFrame, by: Sequence[str] = ("source", "model")) -> pd.DataFrame:
    """`separation` of each group of the long table (by default per source and model), one row each."""
    rows = [{**dict(zip(by, key if isinstance(key, tuple) else (key,))), **phi_separation(part.phi, part.label)}
            for key, part in table.groupby(list(by), sort=False)]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------ figures


def _label_traces(fig: go.Figure, part: pd.DataFrame, trace, row: int, col: int, shown: set, **kwargs) -> None:
    """One trace per label of `part` into a subplot; each label enters the legend once."""
    for label in (NON_TOXIC, TOXIC):
        values = part[part.label == label]
        if len(values):
            fig.add_trace(trace(values, label, name=label, legendgroup=label, showlegend=label not in shown,
                                marker_color=LABEL_COLOURS[label], **kwargs), row=row, col=col)
            shown.add(label)


def histogram_figure(table: pd.DataFrame, bins: int = 40) -> go.Figure:
    """Overlaid phi histograms (densities) of toxic vs non-toxic texts: one row per source, one column per model."""
    sources, models = list(dict.fromkeys(table.source)), list(dict.fromkeys(table.model))
    fig = make_subplots(rows=len(sources), cols=len(models), shared_xaxes=True,
                        subplot_titles=[f"{s} · {m}" for s in sources for m in models])
    low, high = float(np.nanmin(table.phi)), float(np.nanmax(table.phi))
    xbins = dict(start=low, end=high, size=max((high - low) / bins, 1e-6))
    shown: set = set()
    for r, source in enumerate(sources, start=1):
        for c, model in enumerate(models, start=1):
            part = table[(table.source == source) & (table.model == model)]
            _label_traces(fig, part, lambda v, label, **kw: go.Histogram(
                x=v.phi, histnorm="probability density", xbins=xbins, opacity=0.55, **kw), r, c, shown)
    fig.update_layout(barmode="overlay", height=260 * len(sources) + 80,
                      title="phi (mean token NLL, nats) of toxic and non-toxic texts")
    fig.update_xaxes(title_text="phi [nats/token]", row=len(sources))
    return fig


def ecdf_figure(table: pd.DataFrame) -> go.Figure:
    """Empirical CDFs of phi per label (colour) and model (base dotted), one panel per source."""
    sources = list(dict.fromkeys(table.source))
    fig = make_subplots(rows=1, cols=len(sources), subplot_titles=sources, shared_yaxes=True)
    for c, source in enumerate(sources, start=1):
        for (model, label), part in table[table.source == source].groupby(["model", "label"], sort=False):
            x = np.sort(part.phi.to_numpy())
            fig.add_trace(go.Scatter(x=x, y=np.arange(1, len(x) + 1) / len(x), mode="lines", line_shape="hv",
                                     name=f"{label} · {model}", legendgroup=f"{label} · {model}", showlegend=c == 1,
                                     line=dict(color=LABEL_COLOURS[label], dash=MODEL_DASHES.get(model, "solid"))),
                          row=1, col=c)
        fig.update_xaxes(title_text="phi [nats/token]", row=1, col=c)
    fig.update_yaxes(title_text="share of texts with phi <= x", row=1, col=1)
    fig.update_layout(title="ECDF of phi: a toxic curve right of the non-toxic one means toxic texts are less likely",
                      height=420)
    return fig


def group_violin_figure(table: pd.DataFrame, facet: str = "group") -> go.Figure:
    """Split violins of phi per `facet` value (toxic right, non-toxic left), one row per model."""
    models = list(dict.fromkeys(table.model))
    fig = make_subplots(rows=len(models), cols=1, shared_xaxes=True, subplot_titles=models)
    shown: set = set()
    for r, model in enumerate(models, start=1):
        part = table[table.model == model]
        _label_traces(fig, part, lambda v, label, **kw: go.Violin(
            x=v[facet], y=v.phi, side="positive" if label == TOXIC else "negative", box_visible=True,
            meanline_visible=True, points=False, scalegroup=model, **kw), r, 1, shown)
        fig.update_yaxes(title_text="phi [nats/token]", row=r, col=1)
    fig.update_layout(violinmode="overlay", violingap=0.1, height=330 * len(models) + 80,
                      title=f"phi per {facet}: non-toxic (left half) vs toxic (right half)")
    return fig


# ------------------------------------------------------------------------------------------------ token view


def example_texts(table: pd.DataFrame, n: int, source: str | None = None) -> list[str]:
    """Toxic texts worth a token-level look: with two models, those whose phi the second moved up the most; with
    one, the most likely (lowest phi)."""
    part = table[(table.label == TOXIC) & ((table.source == source) if source else True)]
    phi = part.pivot_table(index="text", columns="model", values="phi", aggfunc="first", sort=False)
    models = list(dict.fromkeys(part.model))
    order = (phi[models[1]] - phi[models[0]]).sort_values(ascending=False) if len(models) > 1 \
        else phi[models[0]].sort_values()
    return order.index[:n].tolist()


def token_nll_html(sides: Sequence[Side], tokenizer, texts: Sequence[str], toxicity: Sequence[float]) -> str:
    """Each text under each side, side by side, its tokens coloured by their NLL (the compare widget's view)."""
    rows = []
    for text, score in zip(texts, toxicity):
        cells = []
        pieces = token_pieces(tokenizer, text)
        for side in sides:
            with side.context():
                stats = texts_nll(side.model, tokenizer, [text], return_token_nll=True)
            token_nll = tuple(float(v) for v in stats.token_nll[0])
            view = Continuation(side.label, text, tuple(pieces[:len(token_nll)]), token_nll, float(score),
                                float(stats.phi[0]))
            cells.append(f'<div style="flex:1">{continuation_html(view)}</div>')
        rows.append(f'<div style="display:flex;gap:8px;margin:6px 0">{"".join(cells)}</div>')
    title = f"<b>{html.escape(' vs '.join(s.label for s in sides))}</b>"
    return f"<div>{title}{NLL_LEGEND}{''.join(rows)}</div>"
