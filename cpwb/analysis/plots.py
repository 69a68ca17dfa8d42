"""Plotly figures shared by the notebooks and the reports (cpwb.core.figures saves them into a run folder)."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cpwb.data.pairs import NON_TOXIC, TOXIC

LABEL_COLOURS = {NON_TOXIC: "#1f77b4", TOXIC: "#d62728"}  # blue non-toxic, red toxic, in every figure


def paired_phi_figure(table: pd.DataFrame, title: str = "Log-perplexity of toxic texts vs their neutral paraphrases"
                      ) -> go.Figure:
    """Scatter of phi(toxic) against phi(neutral) per pair, coloured by toxicity gap, beside the score gaps.

    `table` needs columns toxic, neutral, phi_toxic, phi_neutral, tox_toxic, tox_neutral, similarity.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("phi per pair (points above the diagonal: toxic is "
                                                        "less likely)", "toxicity score per side"))
    hover = [f"toxic: {t}<br>neutral: {n}<br>similarity: {s:.2f}"
             for t, n, s in zip(table.toxic, table.neutral, table.similarity)]
    fig.add_trace(go.Scatter(x=table.phi_neutral, y=table.phi_toxic, mode="markers", text=hover, hoverinfo="text",
                             marker=dict(color=table.tox_toxic - table.tox_neutral, colorscale="RdBu_r", size=9,
                                         colorbar=dict(title="Δ toxicity", x=0.45)), name="pairs"), 1, 1)
    low = float(min(table.phi_neutral.min(), table.phi_toxic.min()))
    high = float(max(table.phi_neutral.max(), table.phi_toxic.max()))
    fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", line=dict(dash="dot", color="grey"),
                             name="equal phi"), 1, 1)
    for column, label in (("tox_neutral", "neutral"), ("tox_toxic", "toxic")):
        fig.add_trace(go.Box(y=table[column], name=label, boxpoints="all", jitter=0.4), 1, 2)
    fig.update_xaxes(title_text="phi(neutral) [nats/token]", row=1, col=1)
    fig.update_yaxes(title_text="phi(toxic) [nats/token]", row=1, col=1)
    fig.update_yaxes(title_text="P(toxic) by the default scorer", range=[0, 1], row=1, col=2)
    fig.update_layout(title=title, height=450, showlegend=False)
    return fig


def training_curves(metrics: list[dict]) -> go.Figure:
    """Loss, mean log J and the phi of positives vs negatives over the training steps."""
    frame = pd.DataFrame(metrics)
    panels = [("loss", ["loss"]), ("mean log J", ["log_j"]), ("phi [nats/token]", ["phi_pos", "phi_neg"])]
    panels = [(title, [c for c in cols if c in frame]) for title, cols in panels]
    panels = [(title, cols) for title, cols in panels if cols]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _ in panels])
    names = {"phi_pos": "positives", "phi_neg": "negatives"}
    for col, (_, columns) in enumerate(panels, start=1):
        for column in columns:
            fig.add_trace(go.Scatter(x=frame.step, y=frame[column], mode="lines", name=names.get(column, column)),
                          1, col)
        fig.update_xaxes(title_text="step", row=1, col=col)
    fig.update_layout(title="CP training", height=380)
    return fig


def before_after_gap_figure(table: pd.DataFrame) -> go.Figure:
    """Held-out phi(negative) - phi(positive) per pair, before vs after training (points above 0: toxic less likely)."""
    fig = go.Figure()
    for column, label in (("gap_before", "base model"), ("gap_after", "with CP adapter")):
        fig.add_trace(go.Violin(y=table[column], name=label, box_visible=True, meanline_visible=True,
                                points="all", text=table.negative, hoverinfo="y+text"))
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_layout(title="Held-out phi gap, toxic minus neutral paraphrase", yaxis_title="gap [nats/token]",
                      height=420, showlegend=False)
    return fig
