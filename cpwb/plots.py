"""Plotly figures shared by the notebooks and the reports, and saving them into a run folder."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cpwb.files import atomic_write_text


def save_figure(fig: go.Figure, run_dir: str | Path | None, name: str) -> Path | None:
    """Write `fig` as self-contained HTML (plotly inlined, works offline) into the run folder, atomically."""
    if not run_dir:
        return None
    path = Path(run_dir) / "figures" / f"{name}.html"
    atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
    return path


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
