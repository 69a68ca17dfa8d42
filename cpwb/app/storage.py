"""Where a study's workers meet: an Optuna storage opened from a URL, with heartbeats, or one clear error.

Three kinds, one URL setting (`storage` of a study file, `cpwb tune --storage`, `cpwb sweep --storage`):

- `sqlite:///FILE`, the embedded default: one file, workers on one machine.
- any SQLAlchemy URL (`postgresql+psycopg://user@host/db`, `mysql+pymysql://...`): workers on many machines.
- `journal:///FILE`: Optuna's journal file (`JournalFileBackend`, append-only, a symlink lock that works on NFS):
  workers on many machines that share a file system and no database server.

Every kind gets heartbeats: a running trial beats every `heartbeat_seconds`; one silent for two periods is marked
failed by any worker and queued again with the same parameters (`RetryHeartbeatStaleTrialCallback`). Optuna
implements its heartbeat interface for RDB storages only; cpwb.app.journal adds it to the journal storage.
"""
from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

from cpwb.core.errors import ConfigError

JOURNAL_SCHEME = "journal:///"


def storage_url(spec, folder: Path, override: str | None = None) -> str:
    """The storage URL: --storage, else the study file's (`spec.storage`), else a SQLite file in the study's
    folder."""
    url = override or spec.storage
    if url:
        return url
    return f"sqlite:///{(folder / 'study.db').resolve()}"


def open_storage(url: str, heartbeat_seconds: int, max_retries: int):
    """The storage of `url` with heartbeats (a trial silent for two periods is failed and retried up to
    `max_retries` times), or one clear error naming the setting. Tuning studies and storage-backed sweeps
    (cpwb.app.grid_study) share it."""
    import optuna

    if not re.match(r"^[a-z][a-z0-9+]*://", url):
        raise ConfigError(f"not a storage URL: {url!r}; use sqlite:///FILE, journal:///FILE or an SQLAlchemy URL "
                          "such as postgresql://user@host/db", field="storage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retries)
    if url.startswith("journal:"):
        return _journal(url, heartbeat_seconds, retry)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine,
                                                     heartbeat_interval=heartbeat_seconds,
                                                     grace_period=2 * heartbeat_seconds,
                                                     heartbeat_stale_trial_callback=retry)
            return _serialised(storage) if url.startswith("sqlite") else storage
        except Exception as err:  # sqlalchemy: no driver, bad URL, server unreachable, refused login
            if _creation_race(err) and attempt < 2:  # another worker created the new storage's tables meanwhile
                time.sleep(1.0)
                continue
            reason = " ".join(str(err).split("\n")[0].split())[:300]
            raise ConfigError(f"cannot open storage {_redacted(url)}: {type(err).__name__}: {reason}",
                              field="storage") from None


def _serialised(storage):
    """A SQLite storage whose every transaction takes the write lock at its start (BEGIN IMMEDIATE).

    Optuna hands a waiting trial to one worker by a read-check-write of its state (`SELECT ... FOR UPDATE`, then
    WAITING -> RUNNING). SQLite ignores FOR UPDATE, and Python's sqlite3 driver opens a transaction only at the
    first write, so two processes both read WAITING and both run the trial: 4 processes popping 60 queued trials
    popped 69-78 (tests/test_tune.py; optuna/optuna#4621). It hits an enqueued grid point and a dead worker's
    retry. SQLAlchemy's documented pysqlite recipe fixes it: the driver's own transaction handling off, and
    SQLAlchemy emitting `BEGIN IMMEDIATE` when a transaction begins, so a read-check-write runs under the write
    lock. PostgreSQL and MySQL honour FOR UPDATE and need nothing."""
    from sqlalchemy import event

    @event.listens_for(storage.engine, "connect")
    def _driver_autocommit(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(storage.engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    storage.engine.dispose()  # connections opened before the listeners reconnect with them
    return storage


def _journal(url: str, heartbeat_seconds: int, retry):
    """A journal file storage with heartbeats, its folder made; a URL without a file, or a file that cannot be
    appended to, is refused in one line."""
    from optuna.storages.journal import JournalFileBackend

    from cpwb.app.journal import JournalHeartbeatStorage

    if not url.startswith(JOURNAL_SCHEME) or not url.removeprefix(JOURNAL_SCHEME).strip():
        raise ConfigError(f"not a journal URL: {url!r}; use journal:///FILE (journal:////abs/path for an absolute "
                          "path, as with sqlite)", field="storage")
    path = Path(url.removeprefix(JOURNAL_SCHEME))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = JournalFileBackend(str(path))
        return JournalHeartbeatStorage(backend, heartbeat_seconds, 2 * heartbeat_seconds, retry)
    except OSError as err:
        raise ConfigError(f"cannot open storage {url}: {err.strerror or err}", field="storage") from None


def _creation_race(err: Exception) -> bool:
    """Whether opening a new storage failed because another worker was creating its schema at the same moment
    (SQLite: a unique constraint on alembic_version; PostgreSQL: a table or type that already exists)."""
    text = str(err)
    return type(err).__name__ in ("IntegrityError", "ProgrammingError", "OperationalError") and (
        "alembic_version" in text or "already exists" in text)


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
