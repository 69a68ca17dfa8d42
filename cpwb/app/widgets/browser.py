"""The pairs browser: pages through a pairs file, filtered by group, negative toxicity and similarity."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import ipywidgets as widgets
import pandas as pd

from cpwb.analysis.views import _esc
from cpwb.app.widgets.base import Explorer
from cpwb.core.errors import InputError
from cpwb.data.pairs import PairRecord, PairText, read_pairs
from cpwb.engine.scoring import SentenceEmbedder, ToxicityScorer

TOXICITY_RANGE = (0.0, 1.0)


SIMILARITY_RANGE = (-1.0, 1.0)


NO_GROUP = "(no group)"  # how the pairs browser lists records whose group is null


def score_records(records: Sequence[PairRecord], scorer: ToxicityScorer, embedder: SentenceEmbedder
                  ) -> list[PairRecord]:
    """The records with every positive and negative scored: toxicity, and similarity to the record's anchor."""
    texts = [(i, t) for i, r in enumerate(records) for t in (*r.positives, *r.negatives)]
    toxicity = scorer.score([t.text for _, t in texts])
    similarity = embedder.similarity([records[i].anchor for i, _ in texts], [t.text for _, t in texts])
    scored = iter(replace(t, scores={**t.scores, "toxicity": float(x), "similarity": float(s)})
                  for (_, t), x, s in zip(texts, toxicity, similarity))
    return [replace(r, positives=tuple(next(scored) for _ in r.positives),
                    negatives=tuple(next(scored) for _ in r.negatives)) for r in records]


def _score(texts: Iterable[PairText], key: str, reduce: Callable[[list[float]], float]) -> float:
    """`reduce` over the texts' `key` scores; NaN when none has one."""
    values = [float(t.scores[key]) for t in texts if key in t.scores]
    return reduce(values) if values else math.nan


def pairs_table(records: Iterable[PairRecord]) -> pd.DataFrame:
    """One row per record: id, group, counts, the max toxicity of its negatives and positives, the mean similarity
    of its negatives (NaN where the file has no such score), and the record itself."""
    rows = [{"id": r.id, "group": r.group, "anchor": r.anchor, "n_pos": len(r.positives), "n_neg": len(r.negatives),
             "toxicity": _score(r.negatives, "toxicity", max), "pos_toxicity": _score(r.positives, "toxicity", max),
             "similarity": _score(r.negatives, "similarity", lambda v: sum(v) / len(v)), "record": r}
            for r in records]
    columns = ["id", "group", "anchor", "n_pos", "n_neg", "toxicity", "pos_toxicity", "similarity", "record"]
    return pd.DataFrame(rows, columns=columns)


def _in_range(values: pd.Series, bounds: tuple[float, float], full: tuple[float, float]) -> pd.Series:
    """Rows whose value lies in `bounds`; a full range keeps every row, NaN included."""
    if bounds[0] <= full[0] and bounds[1] >= full[1]:
        return pd.Series(True, index=values.index)
    return values.between(*bounds)


def filter_pairs(table: pd.DataFrame, group: str | None = None, toxicity: tuple[float, float] = TOXICITY_RANGE,
                 similarity: tuple[float, float] = SIMILARITY_RANGE) -> pd.DataFrame:
    """Rows of `pairs_table` in `group` (None: any) with negative toxicity and similarity in the ranges.

    A range narrower than the full one drops the records without that score.
    """
    keep = _in_range(table.toxicity, toxicity, TOXICITY_RANGE) & _in_range(table.similarity, similarity,
                                                                             SIMILARITY_RANGE)
    if group is not None:
        keep &= table.group.fillna(NO_GROUP) == group
    return table[keep]


def _texts_html(texts: Sequence[PairText]) -> str:
    """A list of texts with their scores."""
    items = "".join(f'<li>{_esc(t.text)} <span style="color:#666;font-size:smaller">'
                    f'{_esc(" · ".join(f"{k} {v:.2f}" for k, v in sorted(t.scores.items())))}</span></li>'
                    for t in texts)
    return f'<ul style="margin:0;padding-left:1.2em">{items}</ul>'


def pairs_page_html(rows: pd.DataFrame) -> str:
    """An HTML table of records: id, group, anchor, positives and negatives with their scores."""
    cell = 'style="vertical-align:top;text-align:left;padding:4px;border-bottom:1px solid #ddd"'
    body = "".join(f"<tr><td {cell}>{_esc(r.id)}</td><td {cell}>{_esc(r.record.group or '')}</td>"
                   f"<td {cell}>{_esc(r.anchor)}</td><td {cell}>{_texts_html(r.record.positives)}</td>"
                   f"<td {cell}>{_texts_html(r.record.negatives)}</td></tr>" for r in rows.itertuples())
    head = "".join(f"<th {cell}>{name}</th>" for name in ("id", "group", "anchor", "positives", "negatives"))
    return f'<table class="cpwb-pairs-table" style="border-collapse:collapse"><tr>{head}</tr>{body}</table>'


class PairsBrowser(Explorer):
    """Page through a pairs file (or records) filtered by group, negative toxicity and similarity, scores shown."""

    def __init__(self, source: str | Path | Sequence[PairRecord], page_size: int = 5) -> None:
        if page_size < 1:
            raise InputError(f"must be >= 1, got {page_size}", field="page_size")
        records = list(read_pairs(source)) if isinstance(source, (str, Path)) else list(source)
        self.table, self.page_size, self.page = pairs_table(records), page_size, 0
        groups = sorted({g for g in self.table.group.fillna(NO_GROUP)})
        self.group = widgets.Dropdown(options=["all", *groups], value="all", description="group")
        self.toxicity = widgets.FloatRangeSlider(value=TOXICITY_RANGE, min=TOXICITY_RANGE[0], max=TOXICITY_RANGE[1],
                                                 step=0.01, description="toxicity", tooltip="max over negatives")
        self.similarity = widgets.FloatRangeSlider(value=SIMILARITY_RANGE, min=SIMILARITY_RANGE[0],
                                                   max=SIMILARITY_RANGE[1], step=0.01, description="similarity")
        self.previous = widgets.Button(description="◀ previous")
        self.next = widgets.Button(description="next ▶")
        self.position = widgets.HTML()
        self.view = widgets.HTML()
        for control in (self.group, self.toxicity, self.similarity):
            control.observe(self._on_filter, names="value")
        self.previous.on_click(lambda _: self.turn(-1))
        self.next.on_click(lambda _: self.turn(+1))
        self.widget = widgets.VBox([widgets.HBox([self.group, self.toxicity, self.similarity]),
                                    widgets.HBox([self.previous, self.next, self.position]), self.view])
        self.widget.add_class("cpwb-pairs-browser")
        self.update()

    def selected(self) -> pd.DataFrame:
        """The rows that pass the current filters."""
        group = None if self.group.value == "all" else self.group.value
        return filter_pairs(self.table, group, tuple(self.toxicity.value), tuple(self.similarity.value))

    def pages(self) -> int:
        """Number of pages of the current selection (at least 1)."""
        return max(1, math.ceil(len(self.selected()) / self.page_size))

    def turn(self, by: int) -> None:
        """Move `by` pages, staying within the selection."""
        self.page = min(max(self.page + by, 0), self.pages() - 1)
        self.update()

    def _on_filter(self, _change: dict) -> None:
        """A filter changed: back to the first page."""
        self.page = 0
        self.update()

    def _page_rows(self) -> tuple[pd.DataFrame, int]:
        """The rows of the current page and the size of the selection."""
        selection = self.selected()
        start = self.page * self.page_size
        return selection.iloc[start:start + self.page_size], len(selection)

    def update(self) -> None:
        """Redraw the page and the position line."""
        rows, total = self._page_rows()
        self.previous.disabled, self.next.disabled = self.page == 0, self.page >= self.pages() - 1
        self.position.value = (f"page {self.page + 1} / {self.pages()} · {total} of {len(self.table)} pairs "
                               f"match")
        self.view.value = pairs_page_html(rows) if total else "<i>no pair matches the filters</i>"

    def static_html(self) -> str:
        """The current page with its position."""
        rows, total = self._page_rows()
        return (f'<div class="cpwb-pairs-static"><div>{self.position.value} · static view: paging needs JupyterLab '
                f'with a running kernel</div>{pairs_page_html(rows)}</div>')
