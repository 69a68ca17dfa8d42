"""Parameter-grid sweeps: expansion and ids, validation before anything runs, resume, failures, results.csv."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

import cpwb.app.sweep as sweep_module
from cpwb.app.runner import declared_parameters, ordered_notebooks
from cpwb.app.sweep import POINT_NOTEBOOK, Grid, command, expand, load_grid, run_grid, variant_id
from cpwb.core.errors import ConfigError
from cpwb.steps.experiment import QuickEvalConfig
from cpwb.steps.training.config import TrainConfig
from tests.helpers import write_notebook

# A fake point notebook: writes a result.json like train_and_evaluate's from a few of the injected settings, and
# fails for objective=negatives_only. Each execution appends its folder to executions.log beside the sweeps.
FAKE_POINT = """
import json, pathlib
out = pathlib.Path(output_dir)
with open(out.parent.parent / "executions.log", "a") as log:
    log.write(out.name + "\\n")
if objective == "negatives_only":
    raise ValueError(f"boom in {out.name}")
toxicity = {"cp": 0.2, "dpo": 0.3}.get(objective, 0.25) + 0.01 * seed
(out / "adapter").mkdir()
(out / "result.json").write_text(json.dumps({
    "config": {"objective": objective, "seed": seed, "steps": steps, "output_dir": str(out)},
    "eval": {"heldout_pairs": heldout_pairs},
    "base": {"greedy_toxicity": 0.26, "wikitext2_ppl": 28.0, "phi_gap": -0.2, "examples": [["a", "b"]]},
    "trained": {"greedy_toxicity": toxicity, "wikitext2_ppl": 29.0 + steps, "phi_gap": 0.1},
    "train_seconds": 1.5, "toxicity_change": toxicity / 0.26 - 1, "versions": {"git": "0123abcd"}}))
"""


def _fake_notebook(folder: Path) -> Path:
    parameters = 'objective = "cp"\nseed = 0\nsteps = 200\nheldout_pairs = 200\noutput_dir = ""'
    return write_notebook(folder / "fake_point.ipynb", parameters, FAKE_POINT)


def _write_grid(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _executions(root: Path) -> list[str]:
    log = root / "executions.log"
    return log.read_text().split() if log.is_file() else []


# ----------------------------------------------------------------------------------------------- expansion


def test_points_from_list_grid_and_one_at_a_time_times_seeds_in_seed_major_order():
    grid = Grid(name="g", base={"steps": 3}, points=[{"kl_weight": 0, "objective": "positives_only"}],
                grid={"alpha": [0.5, 1.0], "tau": [0.1]}, one_at_a_time={"objective": ["dpo", "cp"]}, seeds=[0, 1])
    points = expand(grid)
    variants = ["base", "kl_weight=0.0__objective=positives_only", "alpha=0.5__tau=0.1", "tau=0.1", "objective=dpo"]
    assert [p.id for p in points] == [f"{v}__seed={s}" for s in (0, 1) for v in variants]
    # alpha=1.0 and objective=cp equal the base: no variation, so no extra point; the grid cell alpha=1.0 is `tau=0.1`
    dpo = points[4]
    assert dpo.varied == {"objective": "dpo"} and dpo.seed == 0 and dpo.variant == "objective=dpo"
    assert dpo.parameters["steps"] == 3 and dpo.parameters["seed"] == 0 and dpo.parameters["progress"] is False
    every_field = {f.name for cls in (TrainConfig, QuickEvalConfig) for f in dataclasses.fields(cls)}
    assert every_field <= set(dpo.parameters)


def test_point_ids_are_stable_readable_and_safe_folder_names(tmp_path):
    first = _write_grid(tmp_path / "a.yaml", "name: g\none_at_a_time: {tau: [0.1], normalize_text: [false]}\n"
                        "points: [{objective: simpo, alpha: 2}]\n")
    second = _write_grid(tmp_path / "b.yaml", "name: g\npoints: [{alpha: 2, objective: simpo}]\n"
                         "one_at_a_time: {normalize_text: [false], tau: [0.1]}\n")
    ids = {p.id for p in expand(load_grid(first))}
    assert ids == {p.id for p in expand(load_grid(second))}  # key order in the file does not matter
    assert ids == {"base__seed=0", "alpha=2.0__objective=simpo__seed=0", "tau=0.1__seed=0",
                   "normalize_text=false__seed=0"}
    assert variant_id({"target_modules": ["q_proj", "v_proj"], "model": "some org/model"}) == \
        "model=some-org-model__target_modules=q_proj+v_proj"
    assert len(variant_id({f"k{i}": "x" * 20 for i in range(10)})) <= 120


def test_relative_pairs_path_is_passed_as_an_absolute_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text("")
    point = expand(Grid(name="g", base={"pairs": "pairs.jsonl"}))[0]
    assert point.parameters["pairs"] == str(tmp_path / "pairs.jsonl") and point.id == "base__seed=0"


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("section, field, text", [
    ("one_at_a_time: {tua: [0.1]}", "tua", "in point tua=0.1: unknown setting"),
    ("grid: {tau: [0.5, -1]}", "tau", "in point tau=-1: must be > 0, got -1.0"),
    ("points: [{objective: ppo}]", "objective", "must be one of"),
    ("base: {heldout_pairs: 0}", "heldout_pairs", "in base: must be >= 1, got 0"),
    ("base: {seed: 3}", "base.seed", "set by the sweep"),
    ("one_at_a_time: {alpha: []}", "one_at_a_time.alpha", "non-empty list"),
    ("seeds: []", "seeds", "non-empty list"),
    ("colour: blue", "colour", "unknown setting"),
])
def test_bad_grid_fails_naming_file_point_and_field_before_anything_runs(tmp_path, section, field, text):
    path = _write_grid(tmp_path / "bad.yaml", f"name: bad\n{section}\n")
    with pytest.raises(ConfigError) as err:
        load_grid(path)
    assert err.value.field == field and text in str(err.value) and str(path) in str(err.value)


def test_run_grid_validates_every_point_before_running_any(tmp_path):
    grid = Grid(name="g", notebook=str(_fake_notebook(tmp_path)), one_at_a_time={"tau": [0.1, 0.0]})
    with pytest.raises(ConfigError, match="tau: in point tau=0.0: must be > 0"):
        run_grid(grid, tmp_path / "sweeps", progress=False)
    assert not (tmp_path / "sweeps").exists()


def test_dry_run_lists_points_and_count(tmp_path, capsys):
    path = _write_grid(tmp_path / "g.yaml", "name: g\nseeds: [0, 1, 2]\none_at_a_time: {objective: [dpo, simpo]}\n")
    args = argparse.Namespace(grid=str(path), only=["dpo", "simpo__seed=[12]"], dry_run=True, param=[],
                              output_root=str(tmp_path), jobs=1)
    assert command(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"to run   objective={m}__seed={s}" for m, s in
                   (("dpo", 0), ("dpo", 1), ("simpo", 1), ("dpo", 2), ("simpo", 2))] + [
        f"5 point(s) of sweep g, 3 seed(s) each: 5 to run (in {tmp_path / 'g'})"]
    with pytest.raises(ConfigError, match="in base: must be > 0"):
        command(argparse.Namespace(**{**vars(args), "param": ["tau=-1"]}))
    assert [p.name for p in tmp_path.iterdir()] == ["g.yaml"]  # a dry run writes nothing

    points = {p.id: p for p in expand(load_grid(path))}  # one point done, one done with other settings
    for point_id, tau in (("objective=dpo__seed=0", points["objective=dpo__seed=0"].parameters["tau"]),
                          ("objective=dpo__seed=1", 0.3)):
        (tmp_path / "g" / point_id).mkdir(parents=True)
        recorded = {"tau": tau, "run_cache": False, "progress": True}  # what it reused or printed: no change
        (tmp_path / "g" / point_id / "result.json").write_text(json.dumps({"config": recorded}))
    assert command(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["done     objective=dpo__seed=0", "other settings objective=dpo__seed=1"]
    assert out[-1] == f"5 point(s) of sweep g, 3 seed(s) each: 1 done, 3 to run, 1 other settings (in {tmp_path / 'g'})"
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["objective=dpo__seed=0", "objective=dpo__seed=1"]


# ----------------------------------------------------------------------------------------------- running


@pytest.mark.notebook
def test_failing_point_is_recorded_sweep_goes_on_and_rerun_skips_completed_points(tmp_path, monkeypatch):
    notebook = _fake_notebook(tmp_path)
    grid = Grid(name="g", notebook=str(notebook), base={"steps": 3},
                one_at_a_time={"objective": ["negatives_only", "dpo"]}, seeds=[0, 1])
    seen = []  # results.csv as it stood before each point ran: rewritten (and complete) after every point
    real_execute = sweep_module.execute_notebook

    def execute(*args, **kwargs):
        seen.append(list(pd.read_csv(tmp_path / "sweeps" / "g" / "results.csv").status))
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "execute_notebook", execute)
    results = run_grid(grid, tmp_path / "sweeps", progress=False)
    table = pd.read_csv(results)
    assert list(table.point) == [f"{v}__seed={s}" for s in (0, 1) for v in ("base", "objective=negatives_only",
                                                                             "objective=dpo")]
    assert list(table.status) == ["completed", "failed", "completed"] * 2
    assert seen[0] == ["pending"] * 6 and seen[2] == ["completed", "failed"] + ["pending"] * 4
    failed = table[table.status == "failed"].iloc[0]
    assert failed.error.startswith("ValueError: boom in objective=negatives_only__seed=0")
    assert (tmp_path / "sweeps" / "g" / failed.point / "fake_point.ipynb").is_file()  # the partial notebook is kept
    done = table[table.point == "objective=dpo__seed=1"].iloc[0]
    assert done.greedy_toxicity == pytest.approx(0.31) and done.base_greedy_toxicity == 0.26
    assert done.wikitext2_ppl == 32.0 and done.train_seconds == 1.5 and done.objective == "dpo" and done.seed == 1
    assert done.adapter_dir == f"{done.point}/adapter"  # relative to results.csv
    assert done.version_git == "0123abcd"
    assert {"phi_gap", "base_phi_gap", "toxicity_change", "varied", "variant"} <= set(table.columns)
    assert "base_examples" not in table.columns and list(table.columns)[-2:] == ["adapter_dir", "error"]
    assert not list((tmp_path / "sweeps" / "g").glob(".*tmp"))
    assert len(_executions(tmp_path / "sweeps")) == 6

    run_grid(grid, tmp_path / "sweeps", progress=False)  # only the failed points run again
    assert _executions(tmp_path / "sweeps")[6:] == ["objective=negatives_only__seed=0",
                                                    "objective=negatives_only__seed=1"]
    assert list(pd.read_csv(results).status) == ["completed", "failed", "completed"] * 2


@pytest.mark.notebook
def test_parallel_jobs_run_every_point_once_into_the_same_results(tmp_path):
    notebook = str(_fake_notebook(tmp_path))
    grid = Grid(name="g", notebook=notebook, base={"steps": 3}, one_at_a_time={"objective": ["negatives_only", "dpo"]},
                seeds=[0, 1])
    serial = pd.read_csv(run_grid(grid, tmp_path / "serial", progress=False))
    serial = serial.drop(columns=["adapter_dir"])
    table = pd.read_csv(run_grid(grid, tmp_path / "parallel", progress=False, jobs=3))
    assert sorted(_executions(tmp_path / "parallel")) == sorted(table.point)  # each point executed exactly once
    parallel = table.drop(columns=["adapter_dir"]).replace(str(tmp_path / "parallel"), "", regex=True)
    pd.testing.assert_frame_equal(parallel, serial.replace(str(tmp_path / "serial"), "", regex=True))
    with pytest.raises(ConfigError, match="jobs"):
        run_grid(grid, tmp_path / "parallel", progress=False, jobs=0)


@pytest.mark.notebook
def test_points_finished_by_a_sweep_beside_this_one_are_not_written_back_as_pending(tmp_path, monkeypatch):
    notebook = str(_fake_notebook(tmp_path))
    grid = Grid(name="g", notebook=notebook, base={"steps": 3}, one_at_a_time={"objective": ["dpo"]})
    real_execute = sweep_module.execute_notebook

    def execute_after_the_other_sweep(*args, **kwargs):  # the other sweep runs the dpo point while base runs here
        monkeypatch.setattr(sweep_module, "execute_notebook", real_execute)
        run_grid(grid, tmp_path / "sweeps", progress=False, only="dpo")
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "execute_notebook", execute_after_the_other_sweep)
    table = pd.read_csv(run_grid(grid, tmp_path / "sweeps", progress=False, only="base"))
    assert list(table.status) == ["completed", "completed"]
    assert sorted(_executions(tmp_path / "sweeps")) == ["base__seed=0", "objective=dpo__seed=0"]


@pytest.mark.notebook
def test_result_of_other_settings_is_not_reused_and_only_runs_the_chosen_points(tmp_path):
    notebook = str(_fake_notebook(tmp_path))
    run_grid(Grid(name="g", notebook=notebook, base={"steps": 3}), tmp_path / "sweeps", progress=False)
    changed = Grid(name="g", notebook=notebook, base={"steps": 4}, one_at_a_time={"objective": ["dpo"]})
    table = pd.read_csv(run_grid(changed, tmp_path / "sweeps", progress=False, only=["dpo", "nothing*matches"]))
    assert list(table.status) == ["failed", "completed"]
    assert "holds a result of other settings (steps)" in table.error[0]
    assert _executions(tmp_path / "sweeps") == ["base__seed=0", "objective=dpo__seed=0"]


# ----------------------------------------------------------------------------------------------- point notebook


def test_point_notebook_declares_every_config_field_and_is_not_an_ordered_notebook():
    declared = set(declared_parameters(POINT_NOTEBOOK))
    fields = {f.name for cls in (TrainConfig, QuickEvalConfig) for f in dataclasses.fields(cls)}
    assert declared == fields, f"add/remove {sorted(fields ^ declared)} in {POINT_NOTEBOOK.name}'s parameters cell"
    assert POINT_NOTEBOOK not in ordered_notebooks()
    notebook = nbformat.read(POINT_NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert not any(c.get("outputs") or c.get("execution_count") is not None for c in code)


def test_shipped_grids_expand_and_state_their_size():
    root = Path(__file__).resolve().parents[1] / "configs"
    full = expand(load_grid(root / "ablations.yaml"))
    assert len(full) == 78 and len({p.variant for p in full}) == 26
    assert {"objective=dpo", "objective=simpo", "kl_weight=0.0__objective=positives_only",
            "max_negatives=0__random_negatives=1", "max_positives=1__random_negatives=6"} <= {p.variant for p in full}
    ci = expand(load_grid(root / "ablations_ci.yaml"))
    assert len(ci) <= 3 and all(p.parameters["steps"] <= 3 for p in ci)
    assert json.loads(json.dumps([p.parameters for p in ci]))  # papermill-safe values


@pytest.mark.notebook
def test_results_only_rewrites_the_table_from_the_points_and_downstream_skips_points_without_an_artefact(
        tmp_path, capsys, monkeypatch):
    from cpwb.app.cli import main

    monkeypatch.chdir(tmp_path)  # nothing of the repository's outputs/ is touched

    notebook = _fake_notebook(tmp_path)
    grid = _write_grid(tmp_path / "g.yaml", f"name: g\nnotebook: {notebook}\nbase: {{steps: 3}}\nseeds: [0]\n"
                                            "one_at_a_time: {objective: [dpo]}\n")
    args = ["sweep", str(grid), "--output-root", str(tmp_path / "sweeps")]
    assert main(args) == 0
    point = tmp_path / "sweeps" / "g" / "objective=dpo__seed=0" / "result.json"
    result = json.loads(point.read_text())
    point.write_text(json.dumps({**result, "toxicity_change:bilstm-tcc": -0.4}))  # as `cpwb rescore` adds it
    assert main([*args, "--results-only"]) == 0
    table = pd.read_csv(tmp_path / "sweeps" / "g" / "results.csv")
    assert table["toxicity_change:bilstm-tcc"].tolist()[1] == -0.4 and len(_executions(tmp_path / "sweeps")) == 2
    (tmp_path / "sweeps" / "g" / "base__seed=0" / "adapter").rmdir()
    capsys.readouterr()
    assert main([*args, "--downstream", "5"]) == 0
    out = capsys.readouterr().out
    assert "base__seed=0: skipped:" in out and "adapter: no saved artefact" in out
    assert "objective=dpo__seed=0: skipped:" in out and "holds no LoRA adapter" in out  # an empty adapter/
    assert main([*args, "--downstream", "0"]) == 2 and len(_executions(tmp_path / "sweeps")) == 2


@pytest.mark.parametrize("grid", ["ablations", "peers", "peers_data", "peers_trained", "peers_lee2024"])
def test_the_research_grids_base_figures_are_kept_in_git(grid):
    """Each research grid's base figures (outputs/base-eval/<key>.json) are whitelisted in .gitignore, so a fresh
    clone reads them instead of spending the first point on them (70 CPU minutes at the lee2024 sizes)."""
    from cpwb.app.sweep import point_configs
    from cpwb.steps.experiment import _eval_key

    root = Path(__file__).resolve().parents[1]
    kept = set((root / ".gitignore").read_text().splitlines())
    keys = {_eval_key(*point_configs(p.parameters)) for p in expand(load_grid(root / "configs" / f"{grid}.yaml"))}
    assert {f"!outputs/base-eval/{key}.json" for key in keys} <= kept
