"""`cpwb sweep GRID --storage URL`: a grid's points spread over workers through an Optuna storage (SQLite and a real
PostgreSQL server), each point run exactly once, a SIGKILLed worker's point retried in its folder, the same
results.csv as the one-machine sweep. Points run a fake notebook (no model) that logs each execution and can sleep."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from cpwb.app.cli import main
from cpwb.app.grid_study import GridStorage, run, study_name
from cpwb.app.sweep import load_grid, run_grid
from tests.helpers import kill_worker_mid_execution, write_notebook
from tests.postgres import postgres_server

FAKE_POINT = """
import json, os, pathlib, time
out = pathlib.Path(output_dir)
with open(out.parent.parent / "executions.log", "a") as log:
    log.write(f"start {out.name} {os.getpid()} {os.getppid()}\\n")
time.sleep(sleep_seconds)
toxicity = {"cp": 0.2, "dpo": 0.3}.get(objective, 0.25) + 0.01 * seed
(out / "result.json").write_text(json.dumps({
    "config": {"objective": objective, "seed": seed, "steps": steps, "output_dir": str(out)},
    "eval": {"heldout_pairs": heldout_pairs},
    "base": {"greedy_toxicity": 0.26, "wikitext2_ppl": 28.0},
    "trained": {"greedy_toxicity": toxicity, "wikitext2_ppl": 29.0 + steps},
    "toxicity_change": toxicity / 0.26 - 1}))
with open(out.parent.parent / "executions.log", "a") as log:
    log.write(f"done {out.name} {os.getpid()}\\n")
"""


def _grid(folder: Path, sleep: float = 0.0, name: str = "g", **changes) -> Path:
    parameters = ('objective = "cp"\nseed = 0\nsteps = 200\nheldout_pairs = 200\noutput_dir = ""\n'
                  "sleep_seconds = 0.0")
    notebook = write_notebook(folder / "fake_point.ipynb", parameters, FAKE_POINT)
    settings = {"name": name, "notebook": str(notebook), "base": {"steps": 3, "sleep_seconds": sleep},
                "one_at_a_time": {"objective": ["dpo", "simpo"]}, "seeds": [0, 1], **changes}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _executions(root: Path) -> list[list[str]]:
    log = root / "executions.log"
    return [line.split() for line in log.read_text().splitlines()] if log.is_file() else []


def _sweep(grid: Path, root: Path, url: str, heartbeat: int = 1) -> subprocess.Popen:
    """A sweep worker process. Tests that kill no worker beat every 10 s: with 1 s a loaded CPU can starve a live
    worker's heartbeat thread past the 2 s grace, and its point is failed and run again (by design)."""
    return subprocess.Popen([sys.executable, "-m", "cpwb", "sweep", str(grid), "--output-root", str(root),
                             "--storage", url, "--heartbeat-seconds", str(heartbeat)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _same_table(results: Path, serial: Path, root: Path, serial_root: Path) -> None:
    table = pd.read_csv(results).drop(columns=["adapter_dir"]).replace(str(root), "", regex=True)
    expected = pd.read_csv(serial).drop(columns=["adapter_dir"]).replace(str(serial_root), "", regex=True)
    pd.testing.assert_frame_equal(table, expected)


def _every_point_done_once(root: Path, points: int) -> list[list[str]]:
    done = [line[1] for line in _executions(root) if line[0] == "done"]
    assert len(done) == points and len(set(done)) == points, done
    return _executions(root)


@pytest.mark.notebook
def test_two_worker_processes_share_a_sqlite_storage_run_every_point_once_and_write_the_sweeps_table(tmp_path):
    grid = _grid(tmp_path, sleep=0.5)
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    workers = [_sweep(grid, tmp_path / "out", url, heartbeat=10) for _ in range(2)]
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output
    lines = _every_point_done_once(tmp_path / "out", 6)
    assert len({line[3] for line in lines if line[0] == "start"}) == 2  # both workers' kernels ran points
    serial = run_grid(load_grid(grid), tmp_path / "serial", progress=False)
    _same_table(tmp_path / "out" / "g" / "results.csv", serial, tmp_path / "out", tmp_path / "serial")
    trials = optuna.load_study(study_name="sweep-g", storage=url).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["point"] for t in complete) == sorted(pd.read_csv(serial).point)
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == optuna.trial.TrialState.PRUNED)
    again = _sweep(grid, tmp_path / "out", url, heartbeat=10)  # a finished sweep: nothing runs again
    assert again.wait(timeout=120) == 0 and len(_executions(tmp_path / "out")) == len(lines)


@pytest.mark.notebook
@pytest.mark.fault(1)
def test_a_worker_killed_mid_point_leaves_it_failed_and_retried_in_its_folder_and_the_sweep_completes(tmp_path):
    grid = _grid(tmp_path, sleep=3.0, seeds=[0])
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    first = _sweep(grid, tmp_path / "out", url)
    killed = kill_worker_mid_execution(first, lambda: _executions(tmp_path / "out"), 2)  # the notebook sleeps 3 s
    second = _sweep(grid, tmp_path / "out", url)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    _every_point_done_once(tmp_path / "out", 3)
    trials = optuna.load_study(study_name="sweep-g", storage=url).get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.params["point"] for t in failed] == [killed[1]]  # failed by the heartbeat
    retry = next(t for t in trials if t.system_attrs.get("retry_history") == [failed[0].number])
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == failed[0].params
    assert (pd.read_csv(tmp_path / "out" / "g" / "results.csv").status == "completed").all()


@pytest.mark.notebook
def test_two_workers_share_a_grid_through_a_real_postgresql_server(tmp_path):
    grid = load_grid(_grid(tmp_path, sleep=0.2))
    with postgres_server() as url:
        results = run(grid, GridStorage(storage=url, heartbeat_seconds=10), tmp_path / "out", jobs=2)
        trials = optuna.load_study(study_name=study_name(grid), storage=url).get_trials(deepcopy=False)
    _every_point_done_once(tmp_path / "out", 6)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 6
    serial = run_grid(grid, tmp_path / "serial", progress=False)
    _same_table(results, serial, tmp_path / "out", tmp_path / "serial")


@pytest.mark.notebook
def test_only_queues_the_chosen_points_and_a_later_run_adds_the_rest(tmp_path):
    grid = _grid(tmp_path)
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    args = ["sweep", str(grid), "--output-root", str(tmp_path / "out"), "--storage", url]
    assert main([*args, "--only", "seed=1"]) == 0
    table = pd.read_csv(tmp_path / "out" / "g" / "results.csv")
    assert list(table.status) == ["pending"] * 3 + ["completed"] * 3
    assert main(args) == 0
    assert (pd.read_csv(tmp_path / "out" / "g" / "results.csv").status == "completed").all()
    _every_point_done_once(tmp_path / "out", 6)


@pytest.mark.bad_input(3)
def test_bad_storage_settings_fail_in_one_line_before_anything_runs(tmp_path, capsys):
    grid = _grid(tmp_path)
    base = ["sweep", str(grid), "--output-root", str(tmp_path / "out")]
    for extra, field in ((["--storage", "postgresql+psycopg://nobody@127.0.0.1:1/none"], "storage"),
                         (["--storage", "not-a-url"], "storage"),
                         (["--storage", f"sqlite:///{tmp_path / 'a.db'}", "--heartbeat-seconds", "0"],
                          "heartbeat_seconds")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{field}:" in err, err
        assert not (tmp_path / "out").exists() and not _executions(tmp_path / "out")


@pytest.mark.notebook
@pytest.mark.bad_input(1)
def test_a_storage_holding_the_grid_with_other_settings_is_refused(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    assert main(["sweep", str(_grid(tmp_path)), "--output-root", str(tmp_path / "out"), "--storage", url]) == 0
    other = _grid(tmp_path, seeds=[5])
    assert main(["sweep", str(other), "--output-root", str(tmp_path / "out"), "--storage", url]) == 2
    assert "holds a sweep 'g' with other settings" in capsys.readouterr().err
