"""Notebooks: committed clean, one parameters cell each, and every one executes headlessly with papermill."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from cpwb.app.runner import NOTEBOOK_DIR, RunConfig, ordered_notebooks, raise_on_failure, run_notebooks
from cpwb.core.errors import ConfigError, CpwbError

NOTEBOOKS = ordered_notebooks()
# Small parameters so that every notebook runs on the CI's CPU in a few minutes; each notebook takes those it declares.
CI_PARAMETERS = {"n_pairs": 6, "steps": 3, "heldout_pairs": 8, "paraphrases_per_anchor": 4, "rtp_prompts": 2,
                 "samples_per_prompt": 2, "greedy_prompts": 4, "toxigen_per_group": 1, "wikitext_windows": 1,
                 "mc_items": 4, "blackbox_texts": 2, "grid": "../configs/ablations_ci.yaml"}


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:1] == ["00_tour.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(notebook.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_one_parameters_cell_first_among_code(path):
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    tagged = [i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [0]


@pytest.mark.notebook
def test_every_notebook_executes_with_papermill_as_a_chain(tmp_path):
    """00-02 and 05-06 at CI sizes; 01 keeps only a few anchors; 03 and 04 then measure 40 canonical held-out
    ParaDetox pairs (their defaults: 150) on that run folder, so they do not depend on how many pairs 01 kept, and 04
    says in one line that 01's pairs file is too small for a view of its own. `make run` runs the chain at its
    defaults."""
    folder = dict(output_root=str(tmp_path), run_id="ci")
    heldout = {"heldout_pairs": 40, "n_pairs": 40, "toxigen_per_group": 3}
    phases = ((["00", "01", "02"], CI_PARAMETERS), (["03", "04"], heldout), (["05", "06"], CI_PARAMETERS))
    results = []
    for notebooks, parameters in phases:
        run_dir, done = run_notebooks(RunConfig(notebooks=notebooks, parameters=parameters, **folder))
        raise_on_failure(done)
        results += done
    assert [r.status for r in results] == ["completed"] * len(NOTEBOOKS)
    kept = [line for line in (run_dir / "pairs.jsonl").read_text().splitlines() if line.strip()]
    data = json.loads((run_dir / "train" / "data.json").read_text())
    assert len(kept) < 10 and data["with_paradetox"] and data["n_file"] == len(kept) and data["n_train"] > 3000
    embedded = nbformat.read(run_dir / "04_embedding_umap.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in embedded.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "too few for a UMAP map" in printed and "this view is left out" in printed
    record = json.loads((run_dir / "run.json").read_text())
    assert set(record["notebooks"]) == {p.name for p in NOTEBOOKS}
    for figure in ("tour_paired_phi", "training_curves", "heldout_phi_gap", "phi_histograms", "phi_ecdf",
                   "phi_by_group", "embedding_umap", "embedding_layer_sweep", "ablations_pareto",
                   "ablations_set_sizes", "ablations_training_time", "evaluation_tradeoff",
                   "evaluation_toxigen_groups"):
        page = (run_dir / "figures" / f"{figure}.html").read_text(encoding="utf-8")
        assert 'src="plotly.min.js"' in page and len(page) < 1_000_000  # plotly.js referenced, not inlined
    assert (run_dir / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "ablations" / "results.csv").is_file()
    assert [p.name for p in run_dir.rglob("plotly*.js")] == ["plotly.min.js"]  # one copy of plotly.js per run
    assert (run_dir / "figures" / "plotly.min.js").stat().st_size > 1_000_000
    assert 'src="figures/plotly.min.js"' in (run_dir / "report.html").read_text(encoding="utf-8")


def _tiny_notebook(folder: Path, name: str, source: str, parameters: str = "x = 1") -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
                      nbformat.v4.new_code_cell(source)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, folder / name)


@pytest.mark.notebook
def test_run_stops_at_the_failing_notebook_keeps_its_output_and_resumes(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    _tiny_notebook(books, "01_ok.ipynb", "y = x + 1")
    _tiny_notebook(books, "02_broken.ipynb", "raise ValueError('boom at x=%d' % x)")
    _tiny_notebook(books, "03_never.ipynb", "z = 3")
    config = RunConfig(notebook_dir=str(books), output_root=str(tmp_path / "out"), run_id="r", parameters={"x": 5})
    run_dir, results = run_notebooks(config)
    assert [r.status for r in results] == ["completed", "failed"]
    assert "boom at x=5" in results[1].error
    assert (run_dir / "02_broken.ipynb").is_file()  # the partial output notebook is kept
    with pytest.raises(CpwbError, match="02_broken.ipynb failed"):
        raise_on_failure(results)
    _tiny_notebook(books, "02_broken.ipynb", "w = x")  # fixed: the re-run skips the finished notebook
    _, again = run_notebooks(config)
    assert [r.status for r in again] == ["skipped", "completed", "completed"]


def test_wrong_parameter_type_is_refused_before_anything_runs(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    _tiny_notebook(books, "01_ok.ipynb", "y = x + 1", parameters="x = 1\nname = 'a'")
    config = RunConfig(notebook_dir=str(books), output_root=str(tmp_path / "out"), parameters={"x": "five"})
    with pytest.raises(ConfigError, match="x: expected int"):
        run_notebooks(config)
    assert not (tmp_path / "out").exists()


def test_unknown_notebook_name_lists_the_available_ones():
    with pytest.raises(ConfigError, match="00_tour"):
        ordered_notebooks(["99_nope"], NOTEBOOK_DIR)

