"""Embedding spaces drawn and measured: UMAP projections (one seeded fit, base and CP in one map), the separation of
toxic and non-toxic texts per layer (silhouette, cross-validated probe), their figures, and the adapter to compare."""
from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from cpwb.analysis.plots import LABEL_COLOURS
from cpwb.core.errors import InputError
from cpwb.data.pairs import NON_TOXIC, TOXIC, PairRecord
from cpwb.engine.adapters import find_adapter

ROLE_SYMBOLS = {"anchor": "circle", "positive": "square", "negative": "diamond"}


MIN_PAIRS = 10  # fewest pairs for a UMAP map and a 5-fold probe with whole pairs held out


def too_few_pairs(texts: pd.DataFrame, folds: int = 5) -> str | None:
    """One line saying why these texts (from `pair_texts`) are too few to map and probe, or None when enough."""
    pairs = texts.pair_id.nunique() if len(texts) else 0
    per_class = texts.label.value_counts() if len(texts) else pd.Series(dtype=int)
    if pairs >= MIN_PAIRS and len(per_class) == 2 and per_class.min() >= folds:
        return None
    counts = ", ".join(f"{n} {label}" for label, n in per_class.items()) or "no texts"
    return (f"only {pairs} pairs ({counts}): too few for a UMAP map and a {folds}-fold probe "
            f"(at least {MIN_PAIRS} pairs are needed)")


def project(spaces: Mapping[str, np.ndarray], fit_on: str = "joint", n_components: int = 2, seed: int = 0,
            n_neighbors: int = 15, min_dist: float = 0.1) -> dict[str, np.ndarray]:
    """UMAP coordinates of each embedding matrix, all in one map: fitted on `fit_on` (a space's name) or jointly.

    One UMAP fit per call (numba compiles once per process). The data are standardised with the statistics of
    the fitted set and compared by cosine; spaces not fitted on are placed with `transform`, so base and CP points
    share coordinates either way (`transform` moves a point by more than a joint fit does: prefer joint to compare).
    """
    import umap

    if not spaces:
        raise InputError("no embeddings to project", field="spaces")
    if fit_on != "joint" and fit_on not in spaces:
        raise InputError(f"must be 'joint' or one of {list(spaces)}, got {fit_on!r}", field="fit_on")
    if n_components not in (2, 3):
        raise InputError(f"must be 2 or 3, got {n_components}", field="n_components")
    if len({a.shape[1] for a in spaces.values()}) != 1:
        raise InputError("spaces of different widths cannot share one map; project them separately", field="spaces")
    fitted = np.vstack(list(spaces.values())) if fit_on == "joint" else spaces[fit_on]
    if len(fitted) < 4:
        raise InputError(f"UMAP needs at least 4 points, got {len(fitted)}", field="spaces")
    mean, std = fitted.mean(0), fitted.std(0) + 1e-6
    reducer = umap.UMAP(n_components=n_components, n_neighbors=min(n_neighbors, len(fitted) - 1), min_dist=min_dist,
                        metric="cosine", random_state=seed, n_jobs=1)
    coords = reducer.fit_transform((fitted - mean) / std)
    if fit_on == "joint":
        bounds = np.cumsum([0] + [len(a) for a in spaces.values()])
        return {name: coords[lo:hi] for name, lo, hi in zip(spaces, bounds[:-1], bounds[1:])}
    return {name: coords if name == fit_on else reducer.transform((array - mean) / std)
            for name, array in spaces.items()}


def _binary_labels(labels: Sequence[str]) -> np.ndarray:
    """1 for toxic, 0 for non-toxic; both classes must be present."""
    labels = np.asarray(labels)
    unknown = sorted(set(labels.tolist()) - {TOXIC, NON_TOXIC})
    if unknown:
        raise InputError(f"unknown label(s) {unknown}; expected {TOXIC!r} or {NON_TOXIC!r}", field="labels")
    y = (labels == TOXIC).astype(int)
    if y.min() == y.max():
        raise InputError("needs both toxic and non-toxic texts", field="labels")
    return y


def silhouette(embeddings: np.ndarray, labels: Sequence[str]) -> float:
    """Silhouette of toxic vs non-toxic (cosine on standardised features): 1 apart, 0 mixed, < 0 interleaved."""
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    return float(silhouette_score(StandardScaler().fit_transform(embeddings), _binary_labels(labels),
                                  metric="cosine"))


def probe_scores(embeddings: np.ndarray, labels: Sequence[str], groups: Sequence[str] | None = None,
                 folds: int = 5, seed: int = 0) -> np.ndarray:
    """Per-fold balanced accuracy of a logistic-regression probe, cross-validated with whole pairs (`groups`) held out.

    Balanced accuracy keeps chance at 0.5 whatever the share of toxic texts.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = _binary_labels(labels)
    smallest = int(min(y.sum(), len(y) - y.sum()))
    if folds < 2 or smallest < folds:
        raise InputError(f"{folds} folds need 2 or more and at least that many texts of each class "
                         f"(smallest class: {smallest})", field="folds")
    splitter = (StratifiedKFold(folds, shuffle=True, random_state=seed) if groups is None
                else StratifiedGroupKFold(folds, shuffle=True, random_state=seed))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return cross_val_score(probe, embeddings, y, groups=None if groups is None else np.asarray(groups),
                           cv=splitter, scoring="balanced_accuracy")


def space_separation(embeddings: np.ndarray, labels: Sequence[str], groups: Sequence[str] | None = None,
                     folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Silhouette, and the probe's mean accuracy with its spread over folds (std), of one embedding space."""
    scores = probe_scores(embeddings, labels, groups, folds, seed)
    return {"silhouette": silhouette(embeddings, labels), "probe_accuracy": float(scores.mean()),
            "probe_std": float(scores.std())}


def layer_sweep(spaces: Mapping[str, Mapping[int, np.ndarray]], labels: Sequence[str],
                groups: Sequence[str] | None = None, folds: int = 5, seed: int = 0,
                progress: bool = False) -> pd.DataFrame:
    """Separation of every layer of every model: columns model, layer, silhouette, probe_accuracy, probe_std."""
    jobs = [(name, layer, array) for name, by_layer in spaces.items() for layer, array in sorted(by_layer.items())]
    return pd.DataFrame([{"model": name, "layer": layer, **space_separation(array, labels, groups, folds, seed)}
                         for name, layer, array in tqdm(jobs, desc="layer sweep", disable=not progress)])


def _hover(frame: pd.DataFrame) -> list[str]:
    """Hover text of each row: the wrapped text, its label, role, group and toxicity score when known."""
    tox = frame["toxicity"] if "toxicity" in frame else [None] * len(frame)
    return [f"{'<br>'.join(textwrap.wrap(text, 70))}<br><b>{label}</b> {role}"
            + (f" · group {group}" if group else "") + ("" if score is None else f" · toxicity {score:.2f}")
            for text, label, role, group, score in zip(frame.text, frame.label, frame.role, frame.group, tox)]


def _points(coords: np.ndarray, **kwargs: Any) -> go.Scatter | go.Scatter3d:
    """A 2-D or 3-D scatter trace of `coords`."""
    if coords.shape[1] == 3:
        return go.Scatter3d(x=coords[:, 0], y=coords[:, 1], z=coords[:, 2], **kwargs)
    return go.Scatter(x=coords[:, 0], y=coords[:, 1], **kwargs)


def _anchor_lines(frame: pd.DataFrame, coords: np.ndarray) -> np.ndarray:
    """Segments from each pair's anchor to its negatives, as points with NaN breaks between segments."""
    anchor_row = {pair: i for i, (pair, role) in enumerate(zip(frame.pair_id, frame.role)) if role == "anchor"}
    gap = np.full(coords.shape[1], np.nan)
    segments = [np.vstack([coords[anchor_row[pair]], coords[i], gap])
                for i, (pair, role) in enumerate(zip(frame.pair_id, frame.role))
                if role == "negative" and pair in anchor_row]
    return np.vstack(segments) if segments else np.zeros((0, coords.shape[1]))


def projection_figure(frame: pd.DataFrame, coords: Mapping[str, np.ndarray], title: str,
                      lines: bool = False) -> go.Figure:
    """Side-by-side UMAP scatters, one panel per space: colour by label, symbol by role, hover with the text.

    `frame` has columns text, label, role, group, pair_id (and optionally toxicity), one row per point, in the
    order of each coordinate array. `lines` joins each anchor to its negatives.
    """
    frame = frame.reset_index(drop=True)
    three_d = next(iter(coords.values())).shape[1] == 3
    fig = make_subplots(rows=1, cols=len(coords), subplot_titles=list(coords),
                        specs=[[{"type": "scene" if three_d else "xy"}] * len(coords)],
                        horizontal_spacing=0.04)
    hover = np.array(_hover(frame), dtype=object)
    for col, xy in enumerate(coords.values(), start=1):
        if len(xy) != len(frame):
            raise InputError(f"{len(xy)} points for {len(frame)} texts", field="coords")
        if lines:
            fig.add_trace(_points(_anchor_lines(frame, xy), mode="lines", line=dict(color="lightgrey", width=1),
                                  name="anchor → negative", legendgroup="lines", showlegend=col == 1,
                                  hoverinfo="skip"), 1, col)
        for (label, role), rows in frame.groupby(["label", "role"], sort=False).groups.items():
            rows = np.asarray(rows)
            fig.add_trace(_points(xy[rows], mode="markers", name=f"{label} · {role}", legendgroup=f"{label}{role}",
                                  showlegend=col == 1, text=hover[rows], hoverinfo="text",
                                  marker=dict(color=LABEL_COLOURS[label], symbol=ROLE_SYMBOLS[role],
                                              size=4 if three_d else 7, opacity=0.8,
                                              line=dict(width=0.5, color="white"))), 1, col)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(title=title, height=520, width=max(600, 480 * len(coords)), legend=dict(orientation="h"))
    return fig


def layer_sweep_figure(sweep: pd.DataFrame, reference: Mapping[str, float] | None = None,
                       reference_name: str = "MiniLM") -> go.Figure:
    """Silhouette and probe accuracy (bars: std over folds) per layer, one line per model, the reference dashed."""
    metrics = (("silhouette", "silhouette (toxic vs non-toxic)"), ("probe_accuracy", "probe balanced accuracy"))
    fig = make_subplots(rows=1, cols=2, subplot_titles=[title for _, title in metrics])
    for col, (column, _) in enumerate(metrics, start=1):
        for name, part in sweep.groupby("model", sort=False):
            spread = dict(array=part.probe_std, thickness=1) if column == "probe_accuracy" else None
            fig.add_trace(go.Scatter(x=part.layer, y=part[column], error_y=spread, mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=col == 1), 1, col)
        if reference is not None:
            fig.add_hline(y=reference[column], line_dash="dash", line_color="grey", row=1, col=col,
                          annotation_text=reference_name, annotation_position="bottom right")
        fig.update_xaxes(title_text="layer (0 = token embeddings)", row=1, col=col)
    fig.add_hline(y=0.5, line_dash="dot", line_color="lightgrey", row=1, col=2)
    fig.update_layout(title="Separation of toxic and non-toxic texts per layer", height=420)
    return fig


@dataclass
class AdapterRun:
    """A CP adapter with the base model it was trained on and the held-out pairs it never saw."""

    adapter_dir: Path
    model: str
    heldout: list[PairRecord]


def adapter_run(adapter: str, run_dir: str | Path, model: str = "default", steps: int = 30, lr: float = 2e-4,
                seed: int = 0) -> AdapterRun:
    """The adapter to compare with its base: `adapter` if given, else notebook 02's in `run_dir`, else train one.

    The short fallback run (`steps`, `lr`, `seed`, ParaDetox pairs) goes to `run_dir/train-04` and resumes there.
    The base model comes from the adapter's run config (config.yaml beside it) when there is one, else `model`.
    The held-out pairs are always the canonical held-out ParaDetox pairs, which no cpwb adapter trains on, so
    the picture does not depend on how many pairs notebook 01 happened to keep.
    """
    import yaml

    from cpwb.data.paradetox import paradetox_heldout
    from cpwb.steps.training.config import TrainConfig
    from cpwb.steps.training.trainer import train

    adapter_dir = find_adapter(adapter, run_dir)
    if adapter_dir is None:
        config = TrainConfig(model=model, steps=steps, lr=lr, seed=seed, output_dir=str(Path(run_dir) / "train-04"))
        adapter_dir = train(config, resume=True).adapter_dir
    saved = adapter_dir.parent / "config.yaml"
    base_model = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("model", model) if saved.is_file() \
        else model
    return AdapterRun(adapter_dir, base_model, paradetox_heldout())
