"""`cpwb tune`: study files checked before any trial, exact trial counts over workers, SIGKILL recovery through
heartbeats, a real PostgreSQL storage, results.csv and the fronts. Trials run a fake point notebook (no model):
its metrics are functions of the sampled settings, each execution is logged, and it can sleep to be killed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from cpwb.analysis.tuning import best_under_budget, confirmation_table, fronts_figure, read_studies, target_table
from cpwb.app.cli import main
from cpwb.app.storage import open_storage
from cpwb.app.study import load_study_spec
from cpwb.app.tune import confirm, constraint_values, study_folder, work
from cpwb.core.errors import ConfigError, CpwbError
from tests.helpers import kill_worker_mid_execution, write_notebook
from tests.postgres import postgres_server

FAKE_TRIAL = """
import json, os, pathlib, time
out = pathlib.Path(output_dir)
with open(out.parent / "executions.log", "a") as log:
    log.write(f"start {out.name} {os.getppid()} {os.getpid()}\\n")
time.sleep(sleep_seconds)
toxicity = 0.3 - 0.2 * kl_weight / 4 - lr * 50
ppl = 28.0 * (1 + lr * 20 + 0.01 * kl_weight)
(out / "result.json").write_text(json.dumps({
    "config": {"objective": objective, "seed": seed, "lr": lr, "kl_weight": kl_weight, "output_dir": str(out)},
    "eval": {"heldout_pairs": heldout_pairs},
    "base": {"greedy_toxicity": 0.3, "wikitext2_ppl": 28.0, "similarity": 0.3},
    "trained": {"greedy_toxicity": toxicity, "wikitext2_ppl": ppl, "similarity": 0.3 - lr * 100},
    "toxicity_change": toxicity / 0.3 - 1, "ppl_change": ppl / 28.0 - 1, "train_seconds": 1.0}))
with open(out.parent / "executions.log", "a") as log:
    log.write(f"done {out.name}\\n")
"""


def _fake_notebook(folder: Path) -> Path:
    parameters = ('objective = "cp"\nseed = 0\nlr = 4e-4\nkl_weight = 2.0\nheldout_pairs = 200\noutput_dir = ""\n'
                  "sleep_seconds = 0.0")
    return write_notebook(folder / "fake_trial.ipynb", parameters, FAKE_TRIAL)


def _study(folder: Path, trials: int = 3, sleep: float = 0.0, **changes) -> Path:
    settings = {"name": "s", "method": "cp", "notebook": str(_fake_notebook(folder)),
                "base": {"sleep_seconds": sleep},
                "space": {"lr": {"low": 1.0e-4, "high": 1.0e-3, "log": True}, "kl_weight": {"low": 0.5, "high": 4.0}},
                "constraints": {"similarity": {"min": 0.22}}, "trials": trials, "startup_trials": 2,
                "heartbeat_seconds": 1, **changes}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _executions(folder: Path) -> list[list[str]]:
    log = folder / "s" / "executions.log"
    return [line.split() for line in log.read_text().splitlines()] if log.is_file() else []


def _trials(url: str) -> list:
    return optuna.load_study(study_name="s", storage=open_storage(url, 60, 0)).get_trials(deepcopy=False)


def _tune(study: Path, root: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cpwb", "tune", str(study), "--output-root", str(root), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.bad_input  # one per case
@pytest.mark.parametrize("change, field", [
    ({"space": {"lrr": {"low": 0.1, "high": 1.0}}}, "space.lrr"),  # not a setting
    ({"space": {"lr": {"low": 1.0e-3, "high": 1.0e-4}}}, "space.lr"),  # empty range
    ({"space": {"lr": {"choices": []}}}, "space.lr"),  # no choices
    ({"space": {"lr": {"low": -1.0, "high": 1.0}}}, "space.lr"),  # outside the setting's range
    ({"method": "ppo"}, "method"),
    ({"objectives": {"perplexity": "minimize"}}, "objectives.perplexity"),
    ({"constraints": {"similarity": {"floor": 0.2}}}, "constraints.similarity"),
    ({"storage": "postgresql+psycopg://nobody@127.0.0.1:1/none"}, "storage"),  # nothing listens on port 1
    ({"storage": "journal:///"}, "storage"),  # a journal without its file
    ({"storage": "journal:////proc/cpwb-study.log"}, "storage"),  # a file that cannot be created
])
def test_bad_study_fails_in_one_line_naming_the_field_and_writes_nothing(tmp_path, capsys, change, field):
    study = _study(tmp_path, **change)
    assert main(["tune", str(study), "--output-root", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{field}:" in err, err
    assert not (tmp_path / "out").exists()


def test_constraints_are_optunas_sign_convention():
    spec_like = type("S", (), {"constraints": {"similarity": {"min": 0.2, "max": 0.5}}})
    assert constraint_values(spec_like, {"similarity": 0.3}) == pytest.approx(
        {"similarity.max": -0.2, "similarity.min": -0.1})
    assert constraint_values(spec_like, {})["similarity.min"] > 0  # unmeasured: infeasible


def test_a_storage_holding_the_same_study_with_other_settings_is_refused(tmp_path):
    study = _study(tmp_path, trials=1)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    work(load_study_spec(study), url, tmp_path / "out", say=lambda _: None)
    with pytest.raises(ConfigError, match="other settings"):
        work(load_study_spec(study, {"seed": 7}), url, tmp_path / "out", say=lambda _: None)
    # where it is stored, the retry policy and the confirmation seeds do not change the trials: it joins
    work(load_study_spec(study, {"confirm_seeds": [5, 6, 7], "max_retries": 0, "heartbeat_seconds": 30}), url,
         tmp_path / "out", say=lambda _: None)


# ----------------------------------------------------------------------------------------------- running


@pytest.mark.notebook
def test_one_worker_runs_the_budget_writes_results_and_a_rerun_adds_nothing(tmp_path, capsys):
    study = _study(tmp_path, trials=4)
    spec = load_study_spec(study)
    url = f"sqlite:///{tmp_path / 'out' / 's' / 'study.db'}"
    results = pd.read_csv(work(spec, url, tmp_path / "out", say=lambda _: None))
    assert list(results.state) == ["complete"] * 4
    assert sorted(line[1] for line in _executions(tmp_path / "out") if line[0] == "done") == list(results.folder)
    for row in results.itertuples():  # metrics are the notebook's functions of the sampled settings
        assert row.toxicity_change == pytest.approx((0.3 - 0.2 * row.param_kl_weight / 4 - row.param_lr * 50) / 0.3
                                                     - 1)
        assert row.feasible == (0.3 - row.param_lr * 100 >= 0.22)
    assert not results[~results.feasible].pareto.any()  # infeasible trials never on the front
    assert results.pareto.any()
    work(spec, url, tmp_path / "out", say=lambda _: None)  # resumed: the budget is spent, nothing runs
    assert len(_executions(tmp_path / "out")) == 8
    assert main(["tune", str(study), "--output-root", str(tmp_path / "out"), "--dry-run"]) == 0
    progress = capsys.readouterr().out.splitlines()[-1]
    assert progress == "  progress: 4 of 4 trials complete; seed re-runs: not yet (--confirm)"
    again = load_study_spec(study)  # same seed, fresh storage: the same trials
    repeat = pd.read_csv(work(again, f"sqlite:///{tmp_path / 'b.db'}", tmp_path / "other", say=lambda _: None))
    pd.testing.assert_series_equal(repeat.param_lr, results.param_lr)


@pytest.mark.notebook
@pytest.mark.fault  # one per storage kind
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_worker_killed_mid_trial_leaves_it_failed_and_retried_and_the_study_completes(tmp_path, kind):
    study = _study(tmp_path, trials=3, sleep=2.0)
    url = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else f"journal:///{tmp_path / 'study.log'}"
    first = _tune(study, tmp_path / "out", "--storage", url)
    kill_worker_mid_execution(first, lambda: _executions(tmp_path / "out"), 3)  # mid-trial: the notebook sleeps 2 s
    second = _tune(study, tmp_path / "out", "--storage", url)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    trials = _trials(url)
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3
    assert states[0] == optuna.trial.TrialState.FAIL  # the killed one, failed by the heartbeat
    retry = next(t for t in trials if t.system_attrs.get("retry_history") == [0])
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == trials[0].params
    assert retry.user_attrs["folder"] == "trial-000"  # resumed where the killed trial ran
    done = [line[1] for line in _executions(tmp_path / "out") if line[0] == "done"]
    assert sorted(done) == sorted(set(done)) and len(done) == 3  # each trial completed once
    table = pd.read_csv(tmp_path / "out" / "s" / "results.csv")
    assert (table.state == "complete").sum() == 3 and (table.state == "fail").sum() == 1


def _two_workers_complete_the_budget_once(tmp_path: Path, url: str) -> None:
    study = _study(tmp_path, trials=4, sleep=0.2, heartbeat_seconds=10)  # no kill: a busy CPU must not fail it
    assert main(["tune", str(study), "--output-root", str(tmp_path / "out"), "--storage", url, "--jobs", "2"]) == 0
    trials = _trials(url)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == optuna.trial.TrialState.PRUNED)
    starts = [line for line in _executions(tmp_path / "out") if line[0] == "start"]
    assert sorted(line[1] for line in starts) == sorted(t.user_attrs["folder"] for t in complete)  # each once
    assert len({line[2] for line in starts}) == 2  # both workers ran trials
    logs = sorted((tmp_path / "out" / "s").glob("worker-*.log"))
    assert [p.name for p in logs] == ["worker-0.log", "worker-1.log"]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4  # the workers drew different trials


@pytest.mark.notebook
def test_two_local_workers_share_the_default_sqlite_storage_and_run_every_trial_once(tmp_path):
    _two_workers_complete_the_budget_once(tmp_path, f"sqlite:///{tmp_path / 'study.db'}")


@pytest.mark.notebook
def test_two_workers_share_a_journal_file_and_run_every_trial_once(tmp_path):
    _two_workers_complete_the_budget_once(tmp_path, f"journal:///{tmp_path / 'shared' / 'study.log'}")


@pytest.mark.notebook
def test_two_workers_share_a_study_through_a_real_postgresql_server_and_run_every_trial_once(tmp_path):
    with postgres_server() as url:
        _two_workers_complete_the_budget_once(tmp_path, url)
        assert json.loads(json.dumps(optuna.load_study(study_name="s", storage=url).user_attrs))["method"] == "cp"


def test_study_folder_is_taken_from_the_repository_root_when_relative(tmp_path):
    spec = load_study_spec(_study(tmp_path))
    assert study_folder(spec, tmp_path).parent == tmp_path
    assert study_folder(spec, "outputs/tuning").is_absolute()


def test_shipped_studies_load_with_the_same_budget_and_objectives():
    specs = [load_study_spec(p) for p in sorted(Path("configs/tuning").glob("*.yaml"))]
    assert {s.method for s in specs} >= {"cp", "dpo", "simpo"}
    assert len({(s.trials, s.seed, json.dumps(s.objectives), json.dumps(s.constraints)) for s in specs}) == 1
    assert len({json.dumps({k: v for k, v in s.base.items()}, sort_keys=True) for s in specs}) == 1


def test_every_shipped_study_parameter_is_suggested_by_a_real_trial_within_its_range():
    from cpwb.app.study import distributions
    from cpwb.app.tune import _suggest

    for path in sorted(Path("configs/tuning").glob("*.yaml")):  # log-uniform integers (ProFS's rank) included
        space = distributions(load_study_spec(path))
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(3):
            trial = study.ask()
            for name, distribution in space.items():
                value = _suggest(trial, name, distribution)
                assert distribution._contains(distribution.to_internal_repr(value)), (path.name, name, value)
            study.tell(trial, 0.0)


# ----------------------------------------------------------------------------------------------- comparison


def _frame(rows: list[tuple]) -> pd.DataFrame:
    columns = ["trial", "method", "state", "feasible", "pareto", "param_lr", "toxicity_change", "ppl_change"]
    return pd.DataFrame(rows, columns=columns)


def test_best_under_budget_takes_the_largest_feasible_cut_within_each_budget():
    frame = _frame([(0, "cp", "complete", True, True, 1e-4, -0.30, 0.010),
                    (1, "cp", "complete", True, True, 2e-4, -0.50, 0.040),
                    (2, "cp", "complete", False, False, 3e-4, -0.90, 0.015),  # infeasible: never chosen
                    (3, "cp", "complete", True, False, 4e-4, -0.80, 0.080),   # beyond 5%
                    (4, "cp", "fail", False, False, 5e-4, np.nan, np.nan),
                    (0, "dpo", "complete", True, True, 1e-4, -0.40, 0.030)])
    table = best_under_budget(frame).set_index(["method", "budget"])
    assert table.loc[("cp", 0.02), "trial"] == 0 and table.loc[("cp", 0.05), "trial"] == 1
    assert table.loc[("cp", 0.05), "settings"] == "lr=0.0002"
    assert np.isnan(table.loc[("dpo", 0.02), "toxicity_change"])
    assert "least costly: trial 0 at +3.0%" in table.loc[("dpo", 0.02), "settings"]
    assert table.loc[("dpo", 0.05), "trial"] == 0


def test_target_table_says_whether_a_method_reaches_the_bar_on_its_re_runs_and_how_close_it_comes():
    frame = _frame([(0, "cp", "complete", True, True, 1e-4, -0.85, 0.045),
                    (1, "cp", "complete", False, False, 2e-4, -0.95, 0.010),  # infeasible: never the answer
                    (0, "dpo", "complete", True, True, 1e-4, -0.60, 0.030),
                    (1, "dpo", "complete", True, True, 2e-4, -0.90, 0.200),   # beyond the budget
                    (0, "profs", "complete", True, True, 1e-4, -0.10, 0.120)])
    table = target_table(frame).set_index("method")
    assert table.loc["cp", "reached"] and table.loc["cp", "re-run"] == "not yet: the search seed only"
    assert not table.loc["dpo", "reached"] and table.loc["dpo", "closest"] == "-60.0% at +3.0%"
    assert table.loc["dpo", "gap"] == "+20.0 points of toxicity, 0.0 of perplexity over"
    assert table.loc["profs", "trial"] == 0 and "least costly" in table.loc["profs", "closest"]
    assert table.loc["profs", "gap"].endswith("7.0 of perplexity over")
    reruns = pd.DataFrame({"status": "completed", "method": "cp", "budget": 0.05, "trial": 0, "seed": [1, 2],
                           "toxicity_change": [-0.82, -0.70], "ppl_change": [0.04, 0.05]})
    again = target_table(frame, reruns).set_index("method")
    assert not again.loc["cp", "reached"] and again.loc["cp", "re-run"] == "-76.0% at +4.5% (2 seeds)"


def test_fronts_figure_joins_each_methods_feasible_front():
    frame = _frame([(0, "cp", "complete", True, True, 1e-4, -0.3, 0.01), (1, "cp", "complete", True, False,
                    2e-4, -0.2, 0.02), (2, "cp", "complete", True, True, 3e-4, -0.5, 0.04),
                    (0, "dpo", "complete", True, True, 1e-4, -0.4, 0.03)])
    fig = fronts_figure(frame)
    fronts = {t.name: list(t.x) for t in fig.data if t.name.endswith("front")}
    assert fronts == {"cp front": [1.0, 4.0], "dpo front": [3.0]}


@pytest.mark.notebook
def test_confirm_reruns_each_budgets_best_trial_on_fresh_seeds(tmp_path):
    study = _study(tmp_path, trials=3, confirm_seeds=[1, 2])
    spec = load_study_spec(study)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(CpwbError, match="results file not found"):  # before the study ran
        confirm(spec, tmp_path / "out", progress=False)
    work(spec, url, tmp_path / "out", say=lambda _: None)
    rows = pd.read_csv(confirm(spec, tmp_path / "out", progress=False))
    chosen = best_under_budget(read_studies([tmp_path / "out" / "s" / "results.csv"])).dropna(subset=["trial"])
    assert sorted(rows.seed.unique()) == [1, 2]
    assert set(zip(rows.method, rows.budget, rows.trial)) == set(zip(chosen.method, chosen.budget, chosen.trial))
    assert (rows.status == "completed").all()
    table = confirmation_table(rows)
    assert (table.seeds == 2).all() and len(table) == len(chosen)
