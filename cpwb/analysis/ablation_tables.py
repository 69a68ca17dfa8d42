"""The ablation grid's tables as markdown, from its results.csv: methods, set sizes, one setting at a time.

docs/ablations.md holds their output between `<!-- table: NAME -->` marks; `python -m cpwb.analysis.ablation_tables`
rewrites them from the committed results.csv, and a test fails when the page and the results disagree.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cpwb.analysis.ablations import SECOND_SCORER, SET_SIZE_SETTINGS, aggregate, read_results, varying_only
from cpwb.core.files import atomic_write_text

# variant id -> how the methods table names it
METHOD_NAMES = {
    "base": "CP (default: directional, KL on general text)",
    "negatives=symmetric": "CP, symmetric negatives (paper form)",
    "objective=reference": "released code's loss (`reference`)",
    "objective=dpo": "DPO",
    "objective=simpo": "SimPO",
    "objective=positives_only": "positives only (+ KL)",
    "kl_weight=0.0__objective=positives_only": "plain fine-tune on positives (no KL)",
    "objective=negatives_only": "negatives only (token unlikelihood + KL)",
    "max_negatives=0__random_negatives=1": "CP, one random toxic negative instead of the hard one",
    "normalize_text=false": "CP on raw ParaDetox text (its phi gap on raw pairs)",
}
ONE_AT_A_TIME = ("base", "alpha=0.5", "alpha=2.0", "tau=0.1", "tau=2.0", "prototype=first_positive")


def _mean_std(frame: pd.DataFrame, column: str, fmt: str) -> str:
    values = frame[column].astype(float)
    std = f" ± {values.std(ddof=1):{fmt.lstrip('+')}}" if len(values) > 1 else ""
    return f"{values.mean():{fmt}}{std}"


def _change(frame: pd.DataFrame, column: str, digits: int = 0) -> str:
    values = 100 * frame[column].astype(float)
    std = f" ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else ""
    return f"{values.mean():+.{digits}f}{std}%"


def _per_seed(frame: pd.DataFrame, column: str) -> str:
    return " / ".join(f"{100 * v:+.0f}" for v in frame.sort_values("seed")[column].astype(float))


def pooled_interval(part: pd.DataFrame) -> str:
    """The paired 95% interval, over the prompts, of the seed-averaged model's toxicity change: each prompt's
    trained score averaged over the seeds against the base's score on the same prompt. It measures the prompt
    sample's uncertainty; the ± of the change column is the seeds' spread. Reads each point's result.json beside
    results.csv (`point_dir`); "—" when a point has no per-prompt scores (`cpwb rescore POINT --scorer default`)."""
    from cpwb.core.stats import paired_relative_change

    results = [json.loads((Path(d) / "result.json").read_text(encoding="utf-8")) for d in part.point_dir]
    if not results or any("greedy_scores" not in r["trained"] for r in results):
        return "—"
    trained = np.mean([r["trained"]["greedy_scores"] for r in results], axis=0)
    change = paired_relative_change(results[0]["base"]["greedy_scores"], trained)
    return f"[{100 * change.low:+.0f}, {100 * change.high:+.0f}]"


def base_row(frame: pd.DataFrame) -> str:
    """The base model's line: its greedy toxicity, perplexity, phi gap and similarity (the same for every point)."""
    row = frame.iloc[0]
    return (f"| base model | — | {row.base_greedy_toxicity:.3f} | | | | | {row.base_wikitext2_ppl:.2f} | | "
            f"{row.base_phi_gap:+.2f} | {row.base_phi_gap_share_positive:.2f} | {row.base_similarity:.3f} | — |")


def _rows(frame: pd.DataFrame, variants: dict[str, str], cells) -> list[str]:
    """One table row per variant present among the completed points: its name, seed count, then `cells(part)`."""
    done = frame[frame.status == "completed"]
    parts = ((name, done[done.variant == variant]) for variant, name in variants.items())
    return [f"| {name} | {len(part)} | " + " | ".join(cells(part)) + " |" for name, part in parts if len(part)]


def methods_table(frame: pd.DataFrame) -> str:
    """Each method's mean ± std over its seeds, the prompts' 95% interval, the change on every seed, the change by
    the second BiLSTM scorer (when the points were rescored with it), and its median step time."""
    lines = ["| method | seeds | greedy toxicity | change | 95% CI (prompts) | per seed | change, TCC scorer | "
             "WikiText-2 ppl | change | phi gap | share > 0 | similarity | step s |", "|" + "---|" * 13,
             base_row(frame[frame.status == "completed"])]
    second = f"toxicity_change:{SECOND_SCORER}"
    return "\n".join(lines + _rows(frame, METHOD_NAMES, lambda part: [
        _mean_std(part, "greedy_toxicity", ".3f"), _change(part, "toxicity_change"), pooled_interval(part),
        _per_seed(part, "toxicity_change"), _change(part, second) if second in part else "—",
        _mean_std(part, "wikitext2_ppl", ".2f"), _change(part, "ppl_change", 1),
        _mean_std(part, "phi_gap", "+.2f"), f"{part.phi_gap_share_positive.mean():.2f}",
        _mean_std(part, "similarity", ".3f"), f"{part.step_seconds_median.median():.1f}"]))


def set_size_table(frame: pd.DataFrame, hard_negatives: int = 1) -> str:
    """Change in toxicity (± std over seeds) / change in perplexity per |P| cap (rows) and |N| (columns)."""
    summary = varying_only(aggregate(frame), SET_SIZE_SETTINGS)
    done = frame[frame.status == "completed"]
    cells: dict[tuple[int, int], str] = {}
    for variant in summary.variant:
        part = done[done.variant == variant]
        first = part.iloc[0]
        n = min(int(first.max_negatives), hard_negatives) + int(first.random_negatives)
        std = 100 * part.toxicity_change.std(ddof=1) if len(part) > 1 else np.nan
        cells[(int(first.max_positives), n)] = (f"{100 * part.toxicity_change.mean():+.0f}%"
                                                + (f" ± {std:.0f}" if np.isfinite(std) else "")
                                                + f" / {100 * part.ppl_change.mean():+.1f}%")
    ps, ns = sorted({p for p, _ in cells}), sorted({n for _, n in cells})
    lines = ["| positives per anchor, at most | " + " | ".join(f"{n} negative{'s' if n > 1 else ''}" for n in ns)
             + " |", "|" + "---|" * (len(ns) + 1)]
    lines += [f"| {p} | " + " | ".join(cells.get((p, n), "—") for n in ns) + " |" for p in ps]
    return "\n".join(lines)


def one_at_a_time_table(frame: pd.DataFrame) -> str:
    """alpha, tau and the prototype around the base: toxicity, perplexity, phi gap, similarity, step time."""
    lines = ["| variant | seeds | greedy toxicity (change) | WikiText-2 ppl (change) | phi gap (share > 0) | "
             "similarity | step s |", "|" + "---|" * 7]
    return "\n".join(lines + _rows(frame, {v: v for v in ONE_AT_A_TIME}, lambda part: [
        f"{_mean_std(part, 'greedy_toxicity', '.3f')} ({100 * part.toxicity_change.mean():+.0f}%)",
        f"{_mean_std(part, 'wikitext2_ppl', '.2f')} ({100 * part.ppl_change.mean():+.1f}%)",
        f"{part.phi_gap.mean():+.2f} ({part.phi_gap_share_positive.mean():.2f})", f"{part.similarity.mean():.3f}",
        f"{part.step_seconds_median.median():.1f}"]))


def commits(frame: pd.DataFrame) -> str:
    """The code versions the points ran with (results.csv's version_git), most points first."""
    counts = frame.version_git.fillna("").value_counts()
    return ", ".join((f"`{commit[:7]}{'+dirty' if commit.endswith('+dirty') else ''}`" if commit else "not recorded")
                     + f" ({n})" for commit, n in counts.items())


TABLES = {"methods": methods_table, "set sizes": set_size_table, "one at a time": one_at_a_time_table,
          "commits": lambda frame: f"Points ran at commits {commits(frame)} (results.csv, column version_git)."}


def all_tables(path: str | Path) -> dict[str, str]:
    """Every generated block of docs/ablations.md by name (what sits between its `<!-- table: NAME -->` marks)."""
    frame = read_results(path)
    frame["point_dir"] = [str(Path(path).parent / point) for point in frame.point]
    return {name: make(frame) for name, make in TABLES.items()}


def fill(page: str, tables: dict[str, str]) -> str:
    """`page` with every block between `<!-- table: NAME -->` and `<!-- end -->` replaced by tables[NAME]."""
    for name, text in tables.items():
        start, end = f"<!-- table: {name} -->", "<!-- end -->"
        head, found, rest = page.partition(start)
        if not found:
            raise ValueError(f"the page has no {start} mark")
        page = head + start + "\n" + text + "\n" + end + rest.partition(end)[2]
    return page


if __name__ == "__main__":  # python -m cpwb.analysis.ablation_tables [RESULTS.csv [PAGE.md]]: rewrite the page's tables
    results = sys.argv[1] if len(sys.argv) > 1 else "outputs/sweeps/ablations/results.csv"
    page = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/ablations.md")
    atomic_write_text(page, fill(page.read_text(encoding="utf-8"), all_tables(results)))
    print(f"{page}: tables regenerated from {results}")
