"""The loss playground: sliders for alpha, tau, lambda, |P|, |N| and a toy anchor's phi values; the CP loss, J and
the push -dloss/dphi on each text, live."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch

from cpwb.app.widgets.base import Explorer
from cpwb.core.errors import InputError
from cpwb.engine.loss import CPLossConfig, CPLossOutput, cp_loss

MAX_SLOTS = 4  # positives and negatives the loss playground offers sliders for


PHI_RANGE = (0.0, 10.0)  # slider range of the toy anchor's phi values, nats/token


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
