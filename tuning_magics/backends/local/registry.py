"""The local engine's job registry: one SQLite file that every process shares.

The notebook kernel, the worker processes and any other Python process read
and write the same file, ``<home>/jobs.sqlite3``, where ``<home>`` is
``$TUNING_MAGICS_HOME`` or the user's data folder (``~/.local/share/tuning_magics``
on Linux; see ``tuning_magics.paths``). WAL mode lets
readers go on while a worker writes; a busy timeout makes writers queue
instead of failing. State changes are compare-and-set (``transition``) so
that a cancel and a worker finishing at the same moment cannot overwrite
each other.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass, fields
from pathlib import Path

from ...paths import data_home as home

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id            TEXT PRIMARY KEY,          -- tune-20261123-a1b2c3
    display_name  TEXT,
    config        TEXT NOT NULL,             -- JSON: the submitted parameters
    state         TEXT NOT NULL,             -- JOB_STATE_*
    substate      TEXT,                      -- PROCESSING_DATASET, TUNING, ...
    pid           INTEGER,                   -- worker process id while active
    pid_started   REAL,                      -- its start time, to tell a reused pid apart
    error         TEXT,
    output_dir    TEXT NOT NULL,
    created       REAL NOT NULL,             -- seconds since the epoch
    started       REAL,
    ended         REAL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    resume        INTEGER NOT NULL DEFAULT 0 -- 1: the next worker continues from a checkpoint
);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created);
"""


def db_path() -> Path:
    """The registry file, ``<home>/jobs.sqlite3``."""
    return home() / "jobs.sqlite3"


@dataclass
class JobRecord:
    """One row of the ``jobs`` table."""

    id: str
    config: dict
    state: str
    output_dir: str
    created: float
    display_name: str | None = None
    substate: str | None = None
    pid: int | None = None
    pid_started: float | None = None
    error: str | None = None
    started: float | None = None
    ended: float | None = None
    attempts: int = 0
    resume: bool = False


_COLUMNS = tuple(f.name for f in fields(JobRecord))
_JSON_COLUMNS = ("config",)


def connect() -> sqlite3.Connection:
    """A new connection to the registry (created on first use); autocommit, WAL, 30 s busy timeout."""
    path = db_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
        conn.execute("PRAGMA journal_mode = WAL")  # persistent: set once, when the file is made
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; a crash loses at most the last commit
    return conn


def _encode(name: str, value):
    if name in _JSON_COLUMNS:
        return json.dumps(value if value is not None else {})
    if name == "resume":
        return int(bool(value))
    return value


def _decode(row: sqlite3.Row) -> JobRecord:
    values = {name: row[name] for name in _COLUMNS}
    for name in _JSON_COLUMNS:
        values[name] = json.loads(values[name]) if values[name] else {}
    values["resume"] = bool(values["resume"])
    return JobRecord(**values)


def new_id(prefix: str = "tune") -> str:
    """A short, readable, unique-enough job id: ``tune-20261123-a1b2c3``."""
    return f"{prefix}-{time.strftime('%Y%m%d')}-{secrets.token_hex(3)}"


def insert(record: JobRecord) -> JobRecord:
    """Add a job; raises sqlite3.IntegrityError when the id is taken."""
    names = ", ".join(_COLUMNS)
    marks = ", ".join("?" for _ in _COLUMNS)
    with closing(connect()) as conn:
        conn.execute(
            f"INSERT INTO jobs ({names}) VALUES ({marks})",
            [_encode(n, getattr(record, n)) for n in _COLUMNS],
        )
    return record


def get(job_id: str) -> JobRecord | None:
    """The job with this id, or None."""
    with closing(connect()) as conn:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return _decode(row) if row else None


def state_of(job_id: str) -> str | None:
    """Just the state: the cheap read a worker polls for cancellation."""
    with closing(connect()) as conn:
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row[0] if row else None


def find(*, states=None, display_name: str | None = None, limit: int | None = None,
         oldest_first: bool = False) -> list[JobRecord]:
    """Jobs, newest first (or oldest first), optionally only those in ``states`` or with a display name."""
    sql, args = "SELECT * FROM jobs", []
    where = []
    if states is not None:
        states = list(states)
        where.append(f"state IN ({', '.join('?' for _ in states)})")
        args += states
    if display_name is not None:
        where.append("display_name = ?")
        args.append(display_name)
    if where:
        sql += " WHERE " + " AND ".join(where)
    # rowid breaks ties between jobs created in the same clock tick.
    sql += " ORDER BY created {0}, rowid {0}".format("ASC" if oldest_first else "DESC")
    if limit is not None:
        sql += " LIMIT ?"
        args.append(int(limit))
    with closing(connect()) as conn:
        return [_decode(r) for r in conn.execute(sql, args).fetchall()]


def update(job_id: str, **values) -> None:
    """Set columns of one job unconditionally (use ``transition`` for state changes)."""
    transition(job_id, None, **values)


def transition(job_id: str, from_states, **values) -> bool:
    """Set columns only if the job is in one of ``from_states`` (None: any); True when it was."""
    unknown = set(values) - set(_COLUMNS)
    if unknown:
        raise KeyError(f"unknown registry columns: {sorted(unknown)}")
    sets = ", ".join(f"{n} = ?" for n in values)
    args = [_encode(n, v) for n, v in values.items()]
    sql = f"UPDATE jobs SET {sets} WHERE id = ?"
    args.append(job_id)
    if from_states is not None:
        from_states = [from_states] if isinstance(from_states, str) else list(from_states)
        sql += f" AND state IN ({', '.join('?' for _ in from_states)})"
        args += from_states
    with closing(connect()) as conn:
        return conn.execute(sql, args).rowcount == 1

