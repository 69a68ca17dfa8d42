"""Do two toxicity scorers agree? Per text (Spearman's rank correlation over every scored continuation) and per
method (do they rank the evaluated models the same way?), from the columns `cpwb rescore` adds."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

PREFIX = "toxicity:"
PROTOCOLS = ("greedy", "rtp", "toxigen", "blackbox")


def _ranking(means: Mapping[str, float]) -> str:
    """`CP < base`: the models from least to most toxic by their mean score."""
    return " < ".join(sorted(means, key=means.get))


def scorer_agreement(folders: Mapping[str, str | Path]) -> pd.DataFrame:
    """One row per (protocol, second scorer): texts, Spearman rho with the evaluation's own scorer over the pooled
    texts of every model, each scorer's ranking of the models, and whether the rankings agree."""
    rows = []
    for protocol in PROTOCOLS:
        tables = {name: pd.read_json(Path(folder) / "continuations" / f"{protocol}.jsonl", lines=True)
                  for name, folder in folders.items()
                  if (Path(folder) / "continuations" / f"{protocol}.jsonl").is_file()}
        columns = sorted({c for table in tables.values() for c in table.columns if c.startswith(PREFIX)})
        for column in columns:
            scored = {name: table for name, table in tables.items() if column in table}
            pooled = pd.concat([t[["toxicity", column]] for t in scored.values()], ignore_index=True).dropna()
            own = {name: float(t.toxicity.mean()) for name, t in scored.items()}
            other = {name: float(t[column].mean()) for name, t in scored.items()}
            rows.append({"protocol": protocol, "scorer": column.removeprefix(PREFIX), "n_texts": len(pooled),
                         "spearman": float(spearmanr(pooled.toxicity, pooled[column]).statistic),
                         "ranking (own scorer)": _ranking(own), "ranking (this scorer)": _ranking(other),
                         "same ranking": _ranking(own) == _ranking(other),
                         **{f"mean {name}": value for name, value in other.items()}})
    return pd.DataFrame(rows)
