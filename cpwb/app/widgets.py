"""Interactive explorers for JupyterLab and teaching: compare base and CP generations, play with the CP loss, browse
a pairs file.

Each explorer keeps its ipywidgets tree in `.widget` and displays through a mime bundle that carries both the live
widget view and a static HTML snapshot of its current state: JupyterLab's widget manager shows the live widget,
anything without one (a papermill output notebook, nbconvert, a notebook viewer) shows the snapshot, so nothing
fails and the executed notebook still shows results.
"""
from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from cpwb.core.errors import InputError
from cpwb.data.pairs import PairRecord, PairText, read_pairs
from cpwb.engine.adapters import Side
from cpwb.engine.generate import generate
from cpwb.engine.loss import CPLossConfig, CPLossOutput, cp_loss
from cpwb.engine.nll import texts_nll
from cpwb.engine.scoring import SentenceEmbedder, ToxicityScorer

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# Token NLL (nats) at which a token's background reaches full red in the compare view.
NLL_COLOUR_MAX = 8.0
MAX_SLOTS = 4  # positives and negatives the loss playground offers sliders for
PHI_RANGE = (0.0, 10.0)  # slider range of the toy anchor's phi values, nats/token
TOXICITY_RANGE = (0.0, 1.0)
SIMILARITY_RANGE = (-1.0, 1.0)
NO_GROUP = "(no group)"  # how the pairs browser lists records whose group is null


class Explorer:
    """Base of the explorers: the live widget where a front end renders widgets, a static HTML snapshot elsewhere."""

    widget: widgets.Widget

    def static_html(self) -> str:
        """HTML of the explorer's current state, for front ends without a widget manager."""
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """Both renderings in one bundle; the front end picks the richest it can show."""
        live = getattr(self.widget, "_repr_mimebundle_", None)  # None once the widget is closed
        bundle = dict(live(**kwargs) or {}) if callable(live) else {}
        bundle["text/html"] = self.static_html()
        bundle.setdefault("text/plain", f"<{type(self).__name__}>")
        return bundle


def _esc(text: str) -> str:
    """HTML-escaped text."""
    return html.escape(text, quote=True)


def _number(value: float, digits: int = 3) -> str:
    """A float for display; NaN as a dash."""
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------- compare


@dataclass(frozen=True)
class Continuation:
    """One side's continuation of a prompt with its toxicity and per-token NLL under the model that wrote it."""

    label: str
    text: str
    tokens: tuple[str, ...]  # pieces of `text`, in order; they join to `text`
    token_nll: tuple[float, ...]  # NLL of each token given the prompt and the tokens before it, nats
    toxicity: float
    phi: float  # mean token NLL of the continuation (NaN when it is empty)


def token_pieces(tokenizer, text: str) -> list[str]:
    """`text` cut at the token boundaries of its tokenisation without special tokens (the one the NLL engine scores).

    Each piece runs from the previous token's end to this token's end, so the pieces join to `text` exactly even
    where a tokenizer's offsets leave out a leading space.
    """
    if not text:
        return []
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ends = [end for _, end in offsets]
    ends[-1] = len(text)
    starts = [0, *ends[:-1]]
    return [text[start:end] for start, end in zip(starts, ends)]


def continue_and_score(model, tokenizer, scorer: ToxicityScorer, prompt: str, label: str, *, max_new_tokens: int = 30,
                       temperature: float = 0.0, top_p: float = 0.9, seed: int = 0) -> Continuation:
    """Continue `prompt` (greedy when temperature is 0, else seeded top-p sampling) and score the continuation."""
    sampling = {"do_sample": temperature > 0, "temperature": temperature if temperature > 0 else 1.0}
    text = generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, top_p=top_p, seed=seed,
                    **sampling)[0][0]
    pieces = token_pieces(tokenizer, text)
    stats = texts_nll(model, tokenizer, [text], contexts=[prompt], return_token_nll=True)
    token_nll = tuple(float(v) for v in stats.token_nll[0])
    return Continuation(label, text, tuple(pieces[:len(token_nll)]), token_nll, float(scorer.score([text])[0]),
                        float(stats.phi[0]))


def _nll_colour(nll: float) -> str:
    """Background colour of a token: faint at 0 nats, deepening to red at NLL_COLOUR_MAX and above."""
    strength = min(max(nll, 0.0) / NLL_COLOUR_MAX, 1.0)
    return f"rgba(220, 40, 40, {0.08 + 0.72 * strength:.2f})"


def continuation_html(result: Continuation) -> str:
    """One side of the compare view: label, toxicity, phi and the tokens coloured by their NLL."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in result.label.lower())
    tokens = "".join(f'<span class="cpwb-token" title="NLL {nll:.2f} nats" style="background:{_nll_colour(nll)};'
                     f'white-space:pre-wrap;border-radius:2px">{_esc(piece)}</span>'
                     for piece, nll in zip(result.tokens, result.token_nll))
    tox_colour = "#b00020" if result.toxicity >= 0.5 else "#1b5e20"
    return (f'<div class="cpwb-side cpwb-side-{slug}" style="padding:6px;border:1px solid #ccc;border-radius:4px">'
            f'<b class="cpwb-label">{_esc(result.label)}</b> · '
            f'<span class="cpwb-tox" style="color:{tox_colour}">toxicity {result.toxicity:.3f}</span> · '
            f'<span class="cpwb-phi">phi {_number(result.phi, 2)} nats/token</span>'
            f'<div class="cpwb-text" style="margin-top:6px;font-family:monospace;line-height:1.7">'
            f'{tokens or "<i>(empty continuation)</i>"}</div></div>')


NLL_LEGEND = (f'<div style="font-size:smaller">token background: NLL under the model that wrote it, from '
              f'<span style="background:{_nll_colour(0)}">&nbsp;0&nbsp;</span> to '
              f'<span style="background:{_nll_colour(NLL_COLOUR_MAX)}">&nbsp;{NLL_COLOUR_MAX:g}+ nats&nbsp;</span>'
              f'; hover a token for its value</div>')


class CompareExplorer(Explorer):
    """A prompt box and a Generate button; base and CP continuations side by side with toxicity and token NLL."""

    def __init__(self, tokenizer, scorer: ToxicityScorer, sides: Sequence[Side], prompt: str = "",
                 max_new_tokens: int = 30, temperature: float = 0.0, top_p: float = 0.9, seed: int = 0) -> None:
        self.tokenizer, self.scorer, self.sides = tokenizer, scorer, tuple(sides)
        self.results: list[Continuation] = []
        self.runs = 0
        style = {"description_width": "initial"}
        # synced once when the box loses focus (pressing Generate does that) rather than per keystroke: throttled
        # keystroke updates could reach the kernel after the click and generate from a stale prompt
        self.prompt = widgets.Textarea(value=prompt, placeholder="a prompt to continue", description="prompt",
                                       continuous_update=False, layout=widgets.Layout(width="98%", height="4em"))
        self.temperature = widgets.FloatSlider(value=temperature, min=0.0, max=1.5, step=0.05, style=style,
                                               description="temperature")
        self.top_p = widgets.FloatSlider(value=top_p, min=0.05, max=1.0, step=0.05, description="top-p", style=style)
        self.max_new_tokens = widgets.IntSlider(value=max_new_tokens, min=1, max=100, description="max tokens",
                                                style=style)
        self.seed = widgets.IntText(value=seed, description="seed", style=style, layout=widgets.Layout(width="9em"))
        self.button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.button.add_class("cpwb-generate")
        self.status = widgets.HTML("<i>press Generate</i>")
        self.status.add_class("cpwb-status")
        self.outputs = [widgets.HTML(layout=widgets.Layout(width=f"{100 / max(len(self.sides), 1) - 1:.0f}%"))
                        for _ in self.sides]
        self.button.on_click(self._on_click)
        controls = widgets.HBox([self.temperature, self.top_p, self.max_new_tokens, self.seed])
        self.widget = widgets.VBox([self.prompt, controls, widgets.HBox([self.button, self.status]),
                                    widgets.HBox(self.outputs), widgets.HTML(NLL_LEGEND)])
        self.widget.add_class("cpwb-compare")

    def settings(self) -> dict[str, Any]:
        """The sampling settings currently set in the controls."""
        return {"max_new_tokens": self.max_new_tokens.value, "temperature": self.temperature.value,
                "top_p": self.top_p.value, "seed": self.seed.value}

    def generate(self) -> list[Continuation]:
        """Continue the prompt with every side under the current settings and show the results."""
        prompt, settings = self.prompt.value, self.settings()
        started = time.perf_counter()
        results = []
        for side, output in zip(self.sides, self.outputs):
            with side.context():
                results.append(continue_and_score(side.model, self.tokenizer, self.scorer, prompt, side.label,
                                                  **settings))
            output.value = continuation_html(results[-1])
        self.results, self.runs = results, self.runs + 1
        self.status.value = (f'<span class="cpwb-done">run {self.runs}: {self._decoding()}, '
                             f'{time.perf_counter() - started:.1f} s</span> · prompt: '
                             f'<span class="cpwb-prompt">{_esc(prompt)}</span>')
        return results

    def _decoding(self) -> str:
        """The current sampling settings in words."""
        s = self.settings()
        mode = "greedy" if s["temperature"] == 0 else \
            f"temperature {s['temperature']:g}, top-p {s['top_p']:g}, seed {s['seed']}"
        return f"{mode}, {s['max_new_tokens']} tokens at most"

    def _on_click(self, _button: widgets.Button) -> None:
        """Generate, showing progress and any error in the status line instead of the kernel log."""
        self.button.disabled = True
        self.status.value = "<i>generating…</i>"
        try:
            self.generate()
        except Exception as error:  # a widget callback has nowhere else to report to the user
            self.status.value = f'<span style="color:#b00020">{_esc(type(error).__name__)}: {_esc(str(error))}</span>'
        finally:
            self.button.disabled = False

    def static_html(self) -> str:
        """The prompt, the settings and the latest results."""
        sides = "".join(f'<div style="flex:1">{continuation_html(r)}</div>' for r in self.results) or \
            "<i>not generated yet: call .generate()</i>"
        return (f'<div class="cpwb-compare-static"><div><b>prompt:</b> {_esc(self.prompt.value)}</div>'
                f'<div style="font-size:smaller">{self._decoding()} · static view: the controls need '
                f'JupyterLab with a running kernel</div><div style="display:flex;gap:8px">{sides}</div>'
                f'{NLL_LEGEND}</div>')


# ---------------------------------------------------------------------------------------------- loss


@dataclass(frozen=True)
class LossState:
    """The CP loss of one toy anchor and the push -d loss / d phi it puts on each of its texts."""

    loss: float
    contrastive: float  # -log J
    anchor: float  # mean phi of the positives (the likelihood anchor, before its weight)
    j: float  # share of the positives in J's denominator, in (0, 1]
    prototype: float  # c, in the units of cfg.phi_form
    push_pos: np.ndarray  # -d loss / d phi per positive: > 0 makes the text less likely
    push_neg: np.ndarray


def _loss_and_push(phi_pos: torch.Tensor, phi_neg: torch.Tensor, cfg: CPLossConfig
                   ) -> tuple[CPLossOutput, np.ndarray, np.ndarray]:
    """cp_loss over anchors [A, P] / [A, N] and -d loss / d phi per slot, each anchor as if it were alone."""
    phi_pos, phi_neg = phi_pos.double().requires_grad_(), phi_neg.double().requires_grad_()
    out = cp_loss(phi_pos, torch.ones_like(phi_pos, dtype=torch.bool), phi_neg,
                  torch.ones_like(phi_neg, dtype=torch.bool), cfg)
    out.loss.backward()
    anchors = phi_pos.shape[0]  # the loss is a mean over anchors: undo the 1/A
    return out, -phi_pos.grad.numpy() * anchors, -phi_neg.grad.numpy() * anchors


def _check_toy_anchor(phi_pos: Sequence[float], phi_neg: Sequence[float]) -> None:
    """Refuse a toy anchor without positives or negatives."""
    if not phi_pos:
        raise InputError("a toy anchor needs at least one positive", field="phi_pos")
    if not phi_neg:
        raise InputError("a toy anchor needs at least one negative", field="phi_neg")


def loss_state(phi_pos: Sequence[float], phi_neg: Sequence[float], cfg: CPLossConfig = CPLossConfig()) -> LossState:
    """cpwb.engine.loss.cp_loss of one anchor with the given phi values, and the gradient on each phi."""
    _check_toy_anchor(phi_pos, phi_neg)
    out, push_pos, push_neg = _loss_and_push(torch.tensor([list(phi_pos)]), torch.tensor([list(phi_neg)]), cfg)
    return LossState(out.loss.item(), out.contrastive.item(), out.anchor.item(), math.exp(out.log_j[0].item()),
                     out.prototype[0].item(), push_pos[0], push_neg[0])


def first_negative_push(phi_pos: Sequence[float], phi_neg: Sequence[float], grid: Sequence[float],
                        cfg: CPLossConfig = CPLossConfig()) -> np.ndarray:
    """The push on the first negative if its phi were each value of `grid`, the other texts fixed."""
    _check_toy_anchor(phi_pos, phi_neg)
    grid_t = torch.tensor(list(grid), dtype=torch.float64)
    pos = torch.tensor(list(phi_pos), dtype=torch.float64).expand(len(grid_t), -1).clone()
    neg = torch.tensor(list(phi_neg), dtype=torch.float64).expand(len(grid_t), -1).clone()
    neg[:, 0] = grid_t
    return _loss_and_push(pos, neg, cfg)[2][:, 0]


def _slider_column(prefix: str, values: Sequence[float]) -> list[widgets.FloatSlider]:
    """MAX_SLOTS phi sliders named prefix 1..MAX_SLOTS, set to `values` then to the last value given."""
    padded = [*values, *[values[-1]] * (MAX_SLOTS - len(values))]
    return [widgets.FloatSlider(value=v, min=PHI_RANGE[0], max=PHI_RANGE[1], step=0.05, description=f"{prefix}{i + 1}",
                                readout_format=".2f") for i, v in enumerate(padded)]


class LossPlayground(Explorer):
    """Sliders for alpha, tau, |P|, |N| and a toy anchor's phi values; the CP loss, J and each phi's push, live."""

    def __init__(self, phi_pos: Sequence[float] = (3.0, 3.3, 3.6), phi_neg: Sequence[float] = (2.8, 4.0, 6.5),
                 cfg: CPLossConfig = CPLossConfig(), grid_points: int = 161) -> None:
        _check_toy_anchor(phi_pos, phi_neg)
        if max(len(phi_pos), len(phi_neg)) > MAX_SLOTS:
            raise InputError(f"at most {MAX_SLOTS} positives and negatives", field="phi_pos/phi_neg")
        self.grid = np.linspace(*PHI_RANGE, grid_points)
        style = {"description_width": "initial"}
        self.alpha = widgets.FloatSlider(value=cfg.alpha, min=0.0, max=5.0, step=0.1, description="alpha", style=style)
        self.tau = widgets.FloatSlider(value=cfg.tau, min=0.05, max=2.0, step=0.05, description="tau", style=style)
        self.anchor_weight = widgets.FloatSlider(value=cfg.anchor_weight, min=0.0, max=2.0, step=0.1,
                                                 description="anchor weight λ", style=style)
        self.negatives = widgets.ToggleButtons(options=["directional", "symmetric"], value=cfg.negatives,
                                               description="negatives")
        self.n_pos = widgets.IntSlider(value=len(phi_pos), min=1, max=MAX_SLOTS, description="|P|")
        self.n_neg = widgets.IntSlider(value=len(phi_neg), min=1, max=MAX_SLOTS, description="|N|")
        self.pos_sliders = _slider_column("phi P", list(phi_pos))
        self.neg_sliders = _slider_column("phi N", list(phi_neg))
        self._cfg = cfg
        self.figure = go.FigureWidget()
        self._build_figure()
        self.readout = widgets.HTML()
        self.readout.add_class("cpwb-loss-readout")
        for control in (self.alpha, self.tau, self.anchor_weight, self.negatives, self.n_pos, self.n_neg,
                        *self.pos_sliders, *self.neg_sliders):
            control.observe(self._on_change, names="value")
        knobs = widgets.VBox([self.negatives, self.alpha, self.tau, self.anchor_weight, self.n_pos, self.n_neg])
        phis = widgets.HBox([widgets.VBox(self.pos_sliders), widgets.VBox(self.neg_sliders)])
        self.widget = widgets.VBox([widgets.HBox([knobs, phis]), self.figure, self.readout])
        self.widget.add_class("cpwb-loss-playground")
        self.update()

    def config(self) -> CPLossConfig:
        """The loss settings currently set in the controls."""
        return replace(self._cfg, alpha=self.alpha.value, tau=self.tau.value, anchor_weight=self.anchor_weight.value,
                       negatives=self.negatives.value)

    def phis(self) -> tuple[list[float], list[float]]:
        """phi of the |P| positives and |N| negatives currently set."""
        return ([s.value for s in self.pos_sliders[:self.n_pos.value]],
                [s.value for s in self.neg_sliders[:self.n_neg.value]])

    def _build_figure(self) -> None:
        """The traces `update` refreshes: the push curve of negative 1, the positives, the negatives."""
        self.figure.add_scatter(name="negative 1 moved along phi", mode="lines", line=dict(color="#d62728", dash="dot"))
        self.figure.add_scatter(name="positives", mode="markers+text", textposition="top center",
                                marker=dict(color="#2ca02c", size=12, symbol="circle"))
        self.figure.add_scatter(name="negatives", mode="markers+text", textposition="top center",
                                marker=dict(color="#d62728", size=12, symbol="x"))
        self.figure.update_layout(height=380, margin=dict(t=60, b=40), modebar=dict(orientation="v"),
                                  xaxis_title="phi [nats/token]",
                                  yaxis_title="push −∂loss/∂phi (> 0: less likely)",
                                  legend=dict(orientation="h", y=-0.2))

    def state(self) -> LossState:
        """The loss and pushes of the current settings."""
        return loss_state(*self.phis(), self.config())

    def update(self) -> LossState:
        """Recompute the loss and redraw the figure and the readout."""
        for sliders, count in ((self.pos_sliders, self.n_pos.value), (self.neg_sliders, self.n_neg.value)):
            for i, slider in enumerate(sliders):
                slider.layout.display = None if i < count else "none"
        pos, neg = self.phis()
        cfg, state = self.config(), self.state()
        curve = first_negative_push(pos, neg, self.grid, cfg)
        with self.figure.batch_update():
            self.figure.data[0].update(x=self.grid, y=curve)
            self.figure.data[1].update(x=pos, y=state.push_pos, text=[f"P{i + 1}" for i in range(len(pos))])
            self.figure.data[2].update(x=neg, y=state.push_neg, text=[f"N{i + 1}" for i in range(len(neg))])
            c = math.log(state.prototype) if cfg.phi_form == "ppl" else state.prototype
            self.figure.layout.shapes = [
                dict(type="line", xref="paper", x0=0, x1=1, y0=0, y1=0, line=dict(color="grey", dash="dot")),
                dict(type="line", yref="paper", x0=c, x1=c, y0=0, y1=1, line=dict(color="#2ca02c", dash="dash"))]
            self.figure.layout.annotations = [dict(x=c, y=1, yref="paper", yanchor="bottom", showarrow=False,
                                                   text="prototype c", font=dict(color="#2ca02c"))]
            self.figure.layout.title = (f"loss {state.loss:.3f} = −log J {state.contrastive:.3f} + "
                                        f"λ·{state.anchor:.3f}   ·   J = {state.j:.3f}")
        self.readout.value = self._readout_html(pos, neg, state)
        return state

    def _on_change(self, _change: dict) -> None:
        """Any control moved: recompute."""
        self.update()

    @staticmethod
    def _readout_html(pos: list[float], neg: list[float], state: LossState) -> str:
        """The numbers behind the figure: loss parts and each text's phi and push."""
        rows = [(f"P{i + 1}", p, g) for i, (p, g) in enumerate(zip(pos, state.push_pos))]
        rows += [(f"N{i + 1}", p, g) for i, (p, g) in enumerate(zip(neg, state.push_neg))]
        body = "".join(f"<tr><td>{name}</td><td>{p:.2f}</td><td>{g:+.3f}</td></tr>" for name, p, g in rows)
        return (f'<div><b>loss</b> {state.loss:.4f} · <b>J</b> {state.j:.4f} · <b>−log J</b> {state.contrastive:.4f}'
                f' · <b>anchor</b> {state.anchor:.3f} · <b>c</b> {state.prototype:.3f}</div>'
                f'<table><tr><th>text</th><th>phi</th><th>push</th></tr>{body}</table>'
                f'<div style="font-size:smaller">push = −∂loss/∂phi, the direction one gradient step moves phi: '
                f'a negative already far above c gets almost none, a hard negative (at or below c) gets the most.'
                f'</div>')

    def static_html(self) -> str:
        """The current numbers, with the settings."""
        cfg = self.config()
        return (f'<div class="cpwb-loss-static"><div>negatives {cfg.negatives}, alpha {cfg.alpha:g}, tau '
                f'{cfg.tau:.3g}, λ {cfg.anchor_weight:g} · static view: the sliders need JupyterLab with a running '
                f'kernel</div>{self._readout_html(*self.phis(), self.state())}</div>')


# ---------------------------------------------------------------------------------------------- pairs


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
