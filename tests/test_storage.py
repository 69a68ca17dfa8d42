"""Where workers meet (cpwb.app.storage): a storage hands each queued trial to exactly one worker, on SQLite,
a journal file and a real PostgreSQL server, and the journal file has heartbeats like a database."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from cpwb.app.journal import BEAT
from cpwb.app.storage import open_storage
from tests.postgres import postgres_server

POP = textwrap.dedent("""
    import sys, time, warnings
    from pathlib import Path
    import optuna
    from cpwb.app.storage import open_storage
    warnings.simplefilter("ignore")
    study = optuna.load_study(study_name="q", storage=open_storage(sys.argv[1], 60, 0))
    Path(sys.argv[2], sys.argv[3]).touch()  # ready; start together, or the first to import takes every trial
    while not Path(sys.argv[2], "go").exists():
        time.sleep(0.01)
    popped = []
    while (trial_id := study._pop_waiting_trial_id()) is not None:  # what study.ask() does for a queued trial
        popped.append(trial_id)
        time.sleep(0.005)  # a worker runs its trial before it asks again
    print(*popped)
""")


def _each_queued_trial_popped_once(url: str, trials: int = 60, workers: int = 4) -> None:
    study = optuna.create_study(study_name="q", storage=open_storage(url, 60, 0))
    for i in range(trials):
        study.enqueue_trial({"x": i})
    with tempfile.TemporaryDirectory() as gate:
        procs = [subprocess.Popen([sys.executable, "-c", POP, url, gate, str(i)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
                 for i in range(workers)]
        deadline = time.time() + 120
        while len(list(Path(gate).iterdir())) < workers and time.time() < deadline \
                and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        Path(gate, "go").touch()
        outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    popped = [int(x) for out, _ in outputs for x in out.split()]
    assert len(popped) == trials and len(set(popped)) == trials  # before the fix, SQLite gave 69-78 pops of 60
    assert sum(1 for out, _ in outputs if out.split()) >= 2  # the workers did compete


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_four_processes_take_each_queued_trial_exactly_once(tmp_path, kind):
    url = f"sqlite:///{tmp_path / 'q.db'}" if kind == "sqlite" else f"journal:///{tmp_path / 'q.log'}"
    _each_queued_trial_popped_once(url)


@pytest.mark.slow
def test_four_processes_take_each_queued_trial_exactly_once_from_a_real_postgresql_server():
    with postgres_server() as url:
        _each_queued_trial_popped_once(url)


def test_journal_heartbeats_fail_a_silent_trial_and_queue_its_retry(tmp_path):
    """Optuna gives heartbeats to RDB storages only; cpwb.app.journal adds them to the journal file storage."""
    from optuna.trial import TrialState

    url = f"journal:///{tmp_path / 'shared' / 'study.log'}"
    storage = open_storage(url, heartbeat_seconds=5, max_retries=1)
    study = optuna.create_study(study_name="j", storage=storage)
    silent, beating, starting = (study.ask() for _ in range(3))
    for trial in (silent, beating, starting):
        trial.suggest_float("x", 0.0, 1.0)
    storage.set_trial_system_attr(silent._trial_id, BEAT, time.time() - 11)  # last beat over two periods ago
    storage.record_heartbeat(beating._trial_id)  # `starting` has not beaten yet: its start counts
    other = open_storage(url, heartbeat_seconds=5, max_retries=1)  # another worker, the same file
    assert other._get_stale_trial_ids(study._study_id) == [silent._trial_id]
    optuna.storages.fail_stale_trials(optuna.load_study(study_name="j", storage=other))
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING, TrialState.WAITING]
    assert trials[3].params == trials[0].params and trials[3].system_attrs["retry_history"] == [0]
    storage.record_heartbeat(silent._trial_id)  # the failed trial's worker still beating: ignored, not an error
    assert study.get_trials(deepcopy=False)[0].state == TrialState.FAIL


def test_optunas_heartbeat_thread_beats_into_a_journal_while_a_trial_runs(tmp_path):
    study = optuna.create_study(study_name="j", storage=open_storage(f"journal:///{tmp_path / 's.log'}", 1, 0))
    study.optimize(lambda trial: time.sleep(1.5) or trial.suggest_float("x", 0.0, 1.0), n_trials=1)
    trial = study.get_trials(deepcopy=False)[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.datetime_start.timestamp() <= trial.system_attrs[BEAT] <= trial.datetime_complete.timestamp()
