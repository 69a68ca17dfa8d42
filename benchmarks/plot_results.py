"""Plot benchmarks/results.csv into benchmarks/results.html (one chart per benchmark metric).

    python benchmarks/plot_results.py
"""
import pandas as pd

from cpwb.app.bench_results import RESULTS, results_figure
from cpwb.core.files import atomic_write_text

if __name__ == "__main__":
    table = pd.read_csv(RESULTS)
    pairs = table[["benchmark", "metric"]].drop_duplicates().itertuples(index=False)
    parts = [results_figure(RESULTS, b, m).to_html(full_html=False, include_plotlyjs=i == 0)
             for i, (b, m) in enumerate(pairs)]
    out = RESULTS.with_suffix(".html")
    atomic_write_text(out, "<html><body>" + "".join(parts) + "</body></html>")
    print(out)
