"""Analysis of the steps' outputs: phi distributions, embeddings, ablation tables, report, figures."""
