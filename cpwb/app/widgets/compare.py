"""Compare: type a prompt, press Generate, see base and CP continuations side by side with toxicity and token NLL."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets

from cpwb.analysis.views import NLL_LEGEND, Continuation, _esc, continuation_html, token_pieces
from cpwb.app.widgets.base import Explorer
from cpwb.engine.adapters import Side
from cpwb.engine.generate import generate
from cpwb.engine.nll import texts_nll
from cpwb.engine.scoring import ToxicityScorer


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
