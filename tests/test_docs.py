"""The docs a newcomer reads: a short README whose links exist, result pages generated from the results they
describe, a design page that names every module, and no lab diary."""
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
