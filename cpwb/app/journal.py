"""Heartbeats for Optuna's journal file storage, which Optuna gives to RDB storages only.

Optuna's heartbeat interface (`optuna.storages._heartbeat.BaseHeartbeat`: record a beat, list the stale trials,
the interval, the callback for a stale trial) is implemented by `RDBStorage` alone, so with a journal file
(`JournalStorage(JournalFileBackend(...))`) a worker killed mid-trial leaves its trial running forever and a study
with a fixed trial count never completes it. No maintained library adds it, so this module does, and nothing more:
`JournalHeartbeatStorage` is Optuna's `JournalStorage` with those four methods. A beat is a trial system attribute
written to the journal (one short line per running trial and period); Optuna's own heartbeat thread,
`fail_stale_trials` and `RetryHeartbeatStaleTrialCallback` then work on it unchanged, as on a database.

The beats are the workers' wall-clock times (a database uses its server's clock), so machines that share a journal
file need synchronised clocks (NTP), as for any lease kept in a shared file.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

BEAT = "cpwb_heartbeat"  # the system attribute holding a running trial's last beat (seconds since the epoch)


class JournalHeartbeatStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """A journal storage whose running trials beat every `heartbeat_seconds`; one silent for `grace_seconds` is
    stale, and `fail_stale_trials` fails it and hands it to `callback` (a retry)."""

    def __init__(self, backend, heartbeat_seconds: int, grace_seconds: int,
                 callback: Callable[[optuna.Study, FrozenTrial], None] | None) -> None:
        super().__init__(backend)
        self._beat_every, self._grace, self._callback = heartbeat_seconds, grace_seconds, callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, BEAT, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale by another worker meanwhile
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running if now - last_beat(t) > self._grace]

    def get_heartbeat_interval(self) -> int | None:
        return self._beat_every

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._callback


def last_beat(trial: Any) -> float:
    """A running trial's last beat, or its start before its first beat (seconds since the epoch)."""
    beat = trial.system_attrs.get(BEAT)
    return float(beat) if beat is not None else trial.datetime_start.timestamp()
