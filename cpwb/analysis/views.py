"""HTML views of texts token by token: each token coloured by its NLL under a model, with toxicity and phi.

Shared by the compare explorer (cpwb.app.widgets) and notebook 03's token view (cpwb.analysis.distributions).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

# Token NLL (nats) at which a token's background reaches full red in the compare view.
NLL_COLOUR_MAX = 8.0


def _esc(text: str) -> str:
    """HTML-escaped text."""
    return html.escape(text, quote=True)


def _number(value: float, digits: int = 3) -> str:
    """A float for display; NaN as a dash."""
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


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
