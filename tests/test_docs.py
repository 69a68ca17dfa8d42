"""The docs a newcomer reads: a short README whose links exist, result pages generated from (or checked against) the
results they describe, a design page that names every module, and no lab diary."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
DIARY = re.compile(r"\b(this session|sessions?\b.*\b(ago|earlier|last)|lost in a machine reset|batches across sessions"
                   r"|in five batches|session-\d)", re.I)


def test_the_readme_is_short_and_its_links_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= 10_240
    for path in re.findall(r"`((?:docs|benchmarks|data|notebooks)/[\w./-]+)`", readme):
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_no_lab_diary(page):
    found = DIARY.findall(page.read_text(encoding="utf-8"))
    assert not found, f"{page.name}: say what a reader needs to reproduce a number, not when it was run: {found}"


def test_the_ablation_page_is_its_results_csv():
    from cpwb.analysis.ablation_tables import all_tables, fill

    page = (ROOT / "docs" / "ablations.md").read_text(encoding="utf-8")
    expected = fill(page, all_tables(ROOT / "outputs" / "sweeps" / "ablations" / "results.csv"))
    assert page == expected, "docs/ablations.md disagrees with results.csv: run python -m cpwb.analysis.ablation_tables"


def test_the_design_page_names_every_module():
    design = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    grouped = {m.group(1): m.group(0) for m in re.finditer(r"`([\w.]+)\.\*`[^\n]*", design)}
    missing = []
    for path in sorted((ROOT / "cpwb").rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        module = ".".join(path.relative_to(ROOT / "cpwb").with_suffix("").parts).removesuffix(".__init__")
        parent, _, leaf = module.rpartition(".")
        if f"`{module}`" not in design and not (parent in grouped and f"`{leaf}`" in grouped[parent]):
            missing.append(module)
    assert not missing, f"docs/DESIGN.md's module table lacks {missing}"


def _close(cell: str, expected: list[float]) -> bool:
    """The numbers of a table cell equal `expected` to the last digit the cell shows (one unit: the table was
    rounded from the report's 4 significant digits)."""
    shown = re.findall(r"[-+]?\d+(?:\.(\d+))?", cell.replace(",", ""))
    values = [float(m.group(0)) for m in re.finditer(r"[-+]?\d+(?:\.\d+)?", cell.replace(",", ""))]
    return len(values) == len(expected) and all(
        abs(v - e) <= 10 ** -len(decimals) + 1e-9 for v, e, decimals in zip(values, expected, shown))


def test_the_lee2024_table_is_its_committed_evaluations():
    """docs/evaluation.md's lee2024 table is written from `cpwb report`; its cells are the committed folders'."""
    from cpwb.analysis.report import figure_intervals, paired_differences, read_metrics

    folders = {"base": "eval-base", "CP seed 0": "eval-cp-seed0", "CP seed 1": "eval-cp-seed1"}
    folders = {name: ROOT / "outputs" / "lee2024" / folder for name, folder in folders.items()}
    page = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    lines = page[page.index("| 1,196 RTP-challenging prompts"):].split("\n\n")[0].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    differences = paired_differences(folders).set_index(["model", "protocol", "metric"])
    checked = 0
    for label, protocol, metric, what in [("mean continuation toxicity", "greedy", "mean_toxicity", "mean P(toxic)"),
                                          ("share of continuations", "greedy", "toxic_rate", ">= 0.5"),
                                          ("WikiText-2 perplexity", "wikitext2", "perplexity", "perplexity")]:
        at = next(i for i, row in enumerate(rows) if row[0].startswith(label))
        for name, folder in folders.items():
            metrics = read_metrics(folder).set_index(["protocol", "metric"]).value
            interval = figure_intervals(folder).set_index(["protocol", "metric"]).loc[(protocol, metric)]
            cell = rows[at][header.index(name)]
            assert _close(cell, [metrics[(protocol, metric)], interval.low, interval.high]), (label, name, cell)
            if name != "base":
                change = differences.loc[[k for k in differences.index if k[0] == name and k[1] == protocol
                                          and what in k[2]][0]]
                cell = rows[at + 1][header.index(name)]
                assert _close(cell, [change.difference, change.ci_low, change.ci_high, 100 * change.relative]), \
                    (label, name, cell)
            checked += 1
    assert checked == 9
