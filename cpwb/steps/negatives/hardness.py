"""Hardness filters for generated paraphrases, the choice of the hardest sets per anchor, and their statistics.

A candidate is a positive (non-toxic paraphrase of the anchor) or a negative (toxic paraphrase). Filters run in a
fixed order and each rejection is recorded under the first filter that fails, so the funnel adds up:

    empty -> copy (of the anchor) -> duplicate (within the anchor's side) -> length (token ratio to the anchor)
    -> toxicity (negatives >= t_neg, positives <= t_pos) -> similarity (>= s_min) -> phi (negatives only)

The phi filter keeps negatives with |phi(negative) - c| <= delta, where c, the prototype, is the mean phi of the
chosen positives under the model that will be trained: negatives that likelihood alone separates teach nothing.
Among the survivors the hardest are chosen (closest to the reference in phi and to the anchor in meaning),
generated texts before human ones, and an anchor that cannot fill both sets is dropped.

A copy is a text within `min_edit` (normalised edit distance) of the anchor. For negatives the threshold is
`min_edit_negative`, by default 0 (exact copies only): the anchor is non-toxic, so a toxic near copy is a minimal
toxic edit of it, the hardest negative there is, while a non-toxic one fails the toxicity filter anyway.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cpwb.data.corpora import normalize_text

SIDES = ("positive", "negative")
# (stage name in the funnel, the rejection that removes texts at that stage)
STAGES = (("non-empty", "empty"), ("not a copy", "copy"), ("unique", "duplicate"), ("length", "length"),
          ("toxicity", "toxicity"), ("similarity", "similarity"), ("phi", "phi"))
# Fixed histogram bins of the card, so cards of different runs compare bin by bin.
HISTOGRAM_EDGES = {"toxicity": np.linspace(0, 1, 21), "similarity": np.linspace(-0.2, 1, 25),
                   "length_ratio": np.linspace(0, 4, 33), "phi_gap": np.linspace(-6, 6, 25)}


@dataclass(frozen=True)
class Thresholds:
    """The filter thresholds (ranges are checked by the config that builds them)."""

    t_neg: float = 0.5  # negatives: toxicity >= t_neg
    t_pos: float = 0.1  # positives: toxicity <= t_pos
    s_min: float = 0.5  # cosine similarity to the anchor >= s_min
    min_edit: float = 0.1  # positives closer than this to the anchor are copies; any side: to each other, duplicates
    min_edit_negative: float = 0.0  # negatives closer than this to the anchor (or equal to it) are copies
    length_ratio_min: float = 0.5  # token-length ratio to the anchor within [min, max]
    length_ratio_max: float = 2.0
    delta: float = 1.0  # negatives: |phi - prototype| <= delta [nats/token]


@dataclass
class Candidate:
    """One positive or negative candidate of an anchor, with its provenance, scores and fate."""

    text: str
    side: str  # positive | negative
    source: str  # generated | human
    generator: str | None = None
    prompt_id: str | None = None
    raw: str = ""  # the text as generated, before cleaning
    rejected_by: str | None = None
    selected: bool = False
    rank: int | None = None  # 0 = hardest of its side, among the selected
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON object of the candidate (one entry of a generation-log record)."""
        return asdict(self)


def edit_ratio(a: str, b: str) -> float:
    """Character Levenshtein distance divided by the longer length: 0 for equal texts, 1 for nothing in common."""
    if a == b:
        return 0.0
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1] / len(a)


def _near(a: str, b: str, min_edit: float) -> bool:
    """True when a and b are equal or closer than `min_edit` (the length difference bounds the distance from below)."""
    longest = max(len(a), len(b), 1)
    return a == b or abs(len(a) - len(b)) / longest < min_edit and edit_ratio(a, b) < min_edit


def clean_generation(raw: str, normalize: bool = True) -> str:
    """The paraphrase in a generation: its first non-empty line without wrapping quotes, normalised like the anchors."""
    line = next((part.strip() for part in raw.splitlines() if part.strip()), "")
    line = line.strip("\"'“”‘’ ").strip()
    return normalize_text(line) if normalize else " ".join(line.split())


def apply_text_filters(anchor: str, candidates: Sequence[Candidate], thresholds: Thresholds) -> None:
    """Reject empty texts, copies of the anchor and near duplicates of an earlier candidate of the same side."""
    kept: dict[str, list[str]] = {side: [] for side in SIDES}
    copy_below = {"positive": thresholds.min_edit, "negative": thresholds.min_edit_negative}
    for candidate in candidates:
        if not candidate.text:
            candidate.rejected_by = "empty"
            continue
        candidate.scores["edit"] = edit_ratio(candidate.text, anchor)
        if candidate.text == anchor or candidate.scores["edit"] < copy_below[candidate.side]:
            candidate.rejected_by = "copy"
        elif any(_near(candidate.text, other, thresholds.min_edit) for other in kept[candidate.side]):
            candidate.rejected_by = "duplicate"
        else:
            kept[candidate.side].append(candidate.text)


def apply_score_filters(candidates: Sequence[Candidate], anchor_tokens: int, thresholds: Thresholds) -> None:
    """Reject by token-length ratio, toxicity and similarity; needs scores tokens, toxicity and similarity."""
    for candidate in candidates:
        scores = candidate.scores
        if candidate.rejected_by is not None or "tokens" not in scores:
            continue
        scores["length_ratio"] = scores["tokens"] / max(anchor_tokens, 1)
        toxicity_ok = (scores["toxicity"] >= thresholds.t_neg if candidate.side == "negative"
                        else scores["toxicity"] <= thresholds.t_pos)
        if not thresholds.length_ratio_min <= scores["length_ratio"] <= thresholds.length_ratio_max:
            candidate.rejected_by = "length"
        elif not toxicity_ok:
            candidate.rejected_by = "toxicity"
        elif scores["similarity"] < thresholds.s_min:
            candidate.rejected_by = "similarity"


def hardness_distance(candidate: Candidate, reference_phi: float, thresholds: Thresholds) -> float:
    """How far a candidate is from being hardest: phi distance in units of delta plus meaning distance to the anchor."""
    phi_part = abs(candidate.scores["phi"] - reference_phi) / thresholds.delta
    meaning_part = (1.0 - candidate.scores["similarity"]) / (1.0 - thresholds.s_min)
    return phi_part + meaning_part


def _hardest(candidates: Iterable[Candidate], reference_phi: float, thresholds: Thresholds, n: int
             ) -> list[Candidate]:
    """The n hardest candidates, generated ones before human ones (humans only fill what generation could not)."""
    def key(candidate: Candidate) -> tuple[bool, float]:
        return candidate.source != "generated", hardness_distance(candidate, reference_phi, thresholds)

    return sorted(candidates, key=key)[:n]


def select_sets(candidates: Sequence[Candidate], anchor_phi: float, n_positives: int, n_negatives: int,
                thresholds: Thresholds) -> tuple[float, str | None]:
    """Choose the hardest positives and negatives, applying the phi filter; returns (prototype, reason dropped).

    Positives are ranked against the anchor's phi, negatives against the prototype c = mean phi of the chosen
    positives (the anchor's phi when there is none). Every scored candidate gets its `phi_gap` = phi - c. The
    reason is None when both sets are full; otherwise no candidate is marked selected.
    """
    def passing(side: str) -> list[Candidate]:
        return [c for c in candidates if c.side == side and c.rejected_by is None and "phi" in c.scores]

    positives = _hardest(passing("positive"), anchor_phi, thresholds, n_positives)
    prototype = float(np.mean([c.scores["phi"] for c in positives])) if positives else float(anchor_phi)
    for candidate in candidates:
        if "phi" in candidate.scores:
            candidate.scores["phi_gap"] = candidate.scores["phi"] - prototype
    for candidate in passing("negative"):
        if abs(candidate.scores["phi_gap"]) > thresholds.delta:
            candidate.rejected_by = "phi"
    negatives = _hardest(passing("negative"), prototype, thresholds, n_negatives)
    missing = [side for side, chosen, n in (("positives", positives, n_positives),
                                            ("negatives", negatives, n_negatives)) if len(chosen) < n]
    if missing:
        return prototype, "too few " + " and ".join(missing)
    for chosen in (positives, negatives):
        for rank, candidate in enumerate(chosen):
            candidate.selected, candidate.rank = True, rank
    return prototype, None


# ------------------------------------------------------------------------------------------ statistics


def candidates_frame(log: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per candidate of every anchor in a generation log: anchor id and status, side, source, fate, scores."""
    rows = []
    for record in log:
        for candidate in record["candidates"]:
            rows.append({"anchor_id": record["id"], "anchor": record["anchor"], "anchor_kept": record["kept"],
                         "text": candidate["text"], "side": candidate["side"], "source": candidate["source"],
                         "prompt_id": candidate["prompt_id"], "rejected_by": candidate["rejected_by"],
                         "selected": candidate["selected"], **candidate["scores"]})
    columns = ["anchor_id", "anchor", "anchor_kept", "text", "side", "source", "prompt_id", "rejected_by",
               "selected", "edit", "tokens", "toxicity", "similarity", "phi", "length_ratio", "phi_gap"]
    frame = pd.DataFrame(rows)
    frame = frame.reindex(columns=[*columns, *[c for c in frame.columns if c not in columns]])
    return frame.astype({"anchor_kept": bool, "selected": bool, **dict.fromkeys(columns[9:], float)})


def funnel(frame: pd.DataFrame) -> pd.DataFrame:
    """Texts remaining after each filter, one column per side and source (`offered` first, `selected` last)."""
    table = {}
    for side in SIDES:
        for source in ("generated", "human"):
            part = frame[(frame.side == side) & (frame.source == source)]
            if part.empty and source == "human":
                continue
            remaining, column = len(part), [len(part)]
            for _, rejection in STAGES:
                remaining -= int((part.rejected_by == rejection).sum())
                column.append(remaining)
            table[f"{side}s ({source})"] = column + [int(part.selected.sum())]
    index = ["offered", *[stage for stage, _ in STAGES], "selected"]
    return pd.DataFrame(table, index=index)


def _quantiles(values: pd.Series) -> dict[str, float | None]:
    """5/25/50/75/95th percentiles of the finite values (None when there are none)."""
    finite = values.dropna().to_numpy(dtype=float)
    keys = ("p5", "p25", "p50", "p75", "p95")
    if not finite.size:
        return dict.fromkeys(keys)
    return dict(zip(keys, (float(v) for v in np.percentile(finite, [5, 25, 50, 75, 95]))))


def card_statistics(log: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts, funnel, quantiles and fixed-bin histograms of a generation log: the numbers of the dataset card."""
    frame = candidates_frame(log)
    kept = [r for r in log if r["kept"]]
    reasons = pd.Series([r["reason"] for r in log if not r["kept"]], dtype=object).value_counts()
    counts = {"anchors": len(log), "anchors_kept": len(kept), "anchors_dropped": len(log) - len(kept),
              "dropped_by_reason": {str(k): int(v) for k, v in reasons.items()}}
    quantities, histograms = {}, {}
    if not frame.empty:
        selected = frame[frame.selected]
        counts["selected_by_source"] = {f"{side}s ({source})": int(n) for (side, source), n in
                                        selected.groupby(["side", "source"]).size().items()}
        scored = frame[frame.phi.notna()]
        for side in SIDES:
            for subset_name, subset in (("scored", scored), ("selected", selected)):
                part = subset[subset.side == side]
                for name, edges in HISTOGRAM_EDGES.items():
                    values = part[name].dropna().to_numpy(dtype=float)
                    quantities[f"{side}s {subset_name} {name}"] = _quantiles(part[name])
                    histograms[f"{side}s {subset_name} {name}"] = np.histogram(
                        np.clip(values, edges[0], edges[-1]), bins=edges)[0].tolist()
    return {"counts": counts, "funnel": funnel(frame).to_dict() if not frame.empty else {},
            "quantiles": quantities, "histogram_edges": {k: v.tolist() for k, v in HISTOGRAM_EDGES.items()},
            "histograms": histograms}


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table, floats to three decimals."""
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def card_markdown(card: Mapping[str, Any]) -> str:
    """The human-readable dataset card of a generation run (config, models, counts, thresholds, funnel, medians)."""
    config, counts, quantiles = card["config"], card["counts"], card["quantiles"]
    dropped = ", ".join(f"{reason}: {n}" for reason, n in counts["dropped_by_reason"].items()) or "none"
    funnel_columns = list(card["funnel"])
    stages = ["offered", *[stage for stage, _ in STAGES], "selected"]
    funnel_rows = [[stage, *[card["funnel"][column][stage] for column in funnel_columns]] for stage in stages]
    subsets = [("negative", "selected"), ("negative", "scored"), ("positive", "selected"), ("positive", "scored")]
    median_rows = [[name, *[(quantiles.get(f"{side}s {subset} {name}") or {}).get("p50") for side, subset in subsets]]
                   for name in HISTOGRAM_EDGES]
    settings = [f.name for f in fields(Thresholds)] + ["n_positives", "n_negatives"]
    return "\n\n".join([
        f"# Hard-negative pairs ({config['anchors']} anchors)",
        f"Generator `{card['models']['generator']}` ({config['backend']}), phi and lengths under "
        f"`{card['models']['target_model']}`, toxicity by `{config['scorer']}`, seed {config['seed']}, "
        f"k = {config['paraphrases_per_anchor']} paraphrases per side, {config['n_examples']} few-shot examples. "
        f"Data hash `{card['data_hash'][:16]}`.",
        f"**Anchors:** {counts['anchors']}, kept {counts['anchors_kept']}, dropped {counts['anchors_dropped']} "
        f"({dropped}). Texts chosen by source: {counts.get('selected_by_source', {})}.",
        "## Thresholds\n\n" + _markdown_table(settings, [[config[name] for name in settings]]),
        "## Filter funnel (texts left after each filter)\n\n" + _markdown_table(["stage", *funnel_columns],
                                                                                  funnel_rows),
        "## Medians\n\n" + _markdown_table(["quantity", *[f"{side}s {subset}" for side, subset in subsets]],
                                            median_rows),
        "Histograms: `pairs_card.json` (fixed bins) and `figures/hard_negatives.html`.",
        "Content warning: the negatives are offensive on purpose (toxicity research material).\n"])


def examples_table(log: Sequence[Mapping[str, Any]], n: int = 10) -> pd.DataFrame:
    """For the first n kept anchors: the anchor, its best positive and hardest negative with their scores."""
    rows = []
    for record in [r for r in log if r["kept"]][:n]:
        best = {side: next(c for c in record["candidates"] if c["side"] == side and c["rank"] == 0) for side in SIDES}
        rows.append({"anchor": record["anchor"], "positive": best["positive"]["text"],
                     "pos_toxicity": best["positive"]["scores"]["toxicity"],
                     "pos_similarity": best["positive"]["scores"]["similarity"],
                     "negative": best["negative"]["text"], "neg_source": best["negative"]["source"],
                     "neg_toxicity": best["negative"]["scores"]["toxicity"],
                     "neg_similarity": best["negative"]["scores"]["similarity"],
                     "neg_phi_gap": best["negative"]["scores"]["phi_gap"]})
    return pd.DataFrame(rows)


def hardness_figure(frame: pd.DataFrame, thresholds: Thresholds) -> go.Figure:
    """Histograms of toxicity, similarity, length ratio and phi gap: all scored candidates vs those selected."""
    panels = (("toxicity", "toxicity (default scorer)", (thresholds.t_pos, thresholds.t_neg)),
              ("similarity", "cosine similarity to the anchor", (thresholds.s_min,)),
              ("length_ratio", "token length / anchor's", (thresholds.length_ratio_min, thresholds.length_ratio_max)),
              ("phi_gap", "phi - prototype [nats/token]", (-thresholds.delta, thresholds.delta)))
    fig = make_subplots(rows=2, cols=2, subplot_titles=[title for _, title, _ in panels])
    colours = {"positive": ("#9ecae1", "#08519c"), "negative": ("#fcbba1", "#a50f15")}
    scored = frame[frame.phi.notna()]
    for index, (column, title, lines) in enumerate(panels):
        row, col = index // 2 + 1, index % 2 + 1
        for side in SIDES:
            for subset, colour, label in ((scored, colours[side][0], "scored"),
                                          (scored[scored.selected], colours[side][1], "selected")):
                fig.add_trace(go.Histogram(x=subset[subset.side == side][column], name=f"{side}s {label}",
                                           marker_color=colour, opacity=0.75, legendgroup=f"{side}{label}",
                                           showlegend=index == 0), row, col)
        for value in lines:
            fig.add_vline(x=value, line_dash="dot", line_color="grey", row=row, col=col)
        fig.update_xaxes(title_text=title, row=row, col=col)
    fig.update_layout(barmode="overlay", height=620, title="Hard-negative candidates: filters (dotted) and choices")
    return fig
