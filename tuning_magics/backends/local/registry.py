"""The local engine's job registry: one SQLite file that every process shares.

The notebook kernel, the worker processes and any other Python process read
and write the same file, ``<home>/jobs.sqlite3``, where ``<home>`` is
``$TUNING_MAGICS_HOME`` or the user's data folder (``~/.local/share/tuning_magics``
on Linux; see ``tuning_magics.paths``). WAL mode lets
readers go on while a worker writes; a busy timeout makes writers queue
instead of failing, for a few seconds only where a person waits (``%tune``, the
monitor's Cancel): then :class:`RegistryBusy` says so in one line. The worker,
which no one waits on, waits longer (:data:`WORKER_BUSY_WAIT`). State changes are compare-and-set (``transition``) so
that a cancel and a worker finishing at the same moment cannot overwrite
each other.

The file is made whole (schema included) and linked into place, so an empty
or unreadable registry is damage, never a new one: it is reported in one line
(:class:`RegistryDamaged`) and never written over. :func:`rebuild` keeps it
aside and lists the jobs again from the ``job.json`` every job folder holds
(``tuning-magics rebuild-registry`` on the command line does the same); on a
readable registry it adds the jobs of folders it does not list. A registry
that went missing is made again from the folders under ``<home>/jobs``, with a
warning, never silently empty.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

from ...errors import UserError, require_extra
from ...jobs import JOB_STATE_FAILED, JOB_STATE_SUCCEEDED, STATES
from ...paths import data_home as home
from ...storage import link_into_place

SCHEMA_VERSION = 2
#: Columns each schema version added, for upgrading an older registry in place.
_ADDED_COLUMNS = {2: (("note", "TEXT"), ("stop_early", "INTEGER NOT NULL DEFAULT 0"))}
#: The setting that moves the data folder (see ``tuning_magics.paths``).
HOME_ENV = "TUNING_MAGICS_HOME"
#: Each job folder's own record of the job: what :func:`rebuild` reads.
JOB_FILE = "job.json"
#: Seconds a change waits for another process's write (or the scheduler's lock) before
#: :class:`RegistryBusy`: short, because the notebook is frozen meanwhile. The worker sets
#: ``busy_wait = WORKER_BUSY_WAIT``.
busy_wait = 3.0
WORKER_BUSY_WAIT = 120.0

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
    resume        INTEGER NOT NULL DEFAULT 0, -- 1: the next worker continues from a checkpoint
    note          TEXT,                      -- a word on how the job ended (e.g. stopped early)
    stop_early    INTEGER NOT NULL DEFAULT 0 -- 1: the user asked training to end now and keep the best model
);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created);
"""


def db_path() -> Path:
    """The registry file, ``<home>/jobs.sqlite3``."""
    return home() / "jobs.sqlite3"


def jobs_root() -> Path:
    """Where job folders go unless ``output_uri`` names one: ``<home>/jobs``."""
    return home() / "jobs"


def ensure_home() -> Path:
    """The data folder, made if missing; a one-line UserError naming TUNING_MAGICS_HOME when it cannot be."""
    folder = home()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise home_error(exc) from None
    return folder


def home_error(exc: BaseException) -> UserError:
    """The one-line error for a data folder that cannot hold the jobs (a file in the way, no permission, ...)."""
    folder = home()
    name = f"{HOME_ENV} {folder}" if os.environ.get(HOME_ENV) else f"the tuning_magics data folder {folder}"
    return UserError(f"{name} cannot be used ({unwritable_reason(folder, exc)}); set {HOME_ENV} to a folder "
                     "you can write to", field=HOME_ENV)


def unwritable_reason(folder: Path, exc: BaseException) -> str:
    """Why ``folder`` cannot be made or written, in a few words: a file in the way, else the system's reason."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            break
    return (getattr(exc, "strerror", None) or str(exc)).lower()


class RegistryDamaged(UserError):
    """The registry file cannot be read; the message names it and says how to rebuild it."""


class RegistryBusy(UserError):
    """Another process held the registry's write lock longer than :data:`busy_wait`."""


def _busy() -> RegistryBusy:
    return RegistryBusy(f"the job registry {db_path()} is busy (another process is writing it); "
                        "try again in a moment", field="registry")


def _is_busy(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in str(exc).lower()


def _damaged(reason: str) -> RegistryDamaged:
    return RegistryDamaged(
        f"the local job registry {db_path()} is damaged ({reason}); "
        "run `tuning-magics rebuild-registry` (or tuning_magics.rebuild_registry()): it keeps the file aside "
        f"and lists the jobs again from their {JOB_FILE} files",
        field="registry",
    )


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    if isinstance(exc, sqlite3.IntegrityError):
        return False
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc).lower()
    return (name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
            or any(s in text for s in ("malformed", "not a database", "no such table", "no such column")))


@contextmanager
def lock():
    """An exclusive lock, across processes, for changes that span jobs (scheduling, rebuilding)."""
    try:
        from filelock import FileLock
    except ImportError:
        require_extra("local", "filelock")
        raise
    from filelock import Timeout

    held = FileLock(ensure_home() / "scheduler.lock")
    try:
        held.acquire(timeout=busy_wait)
    except Timeout:
        raise _busy() from None
    except OSError as exc:  # a data folder we may not write to
        raise home_error(exc) from None
    try:
        yield
    finally:
        held.release()


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
    note: str | None = None
    stop_early: bool = False


_COLUMNS = tuple(f.name for f in fields(JobRecord))


def _create(path: Path, records=()) -> bool:
    """Make a registry with ``records`` in a temp file and link it into place; False when ``path`` already existed.

    An existing file (another process made the registry meanwhile) is never replaced.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: set once, when the file is made
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            for rec in records:
                _insert(conn, rec)
        finally:
            conn.close()  # the last connection folds the WAL into the file and removes it
        return link_into_place(tmp, path)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)


def _make(path: Path) -> None:
    """Make the missing registry: empty on first use; from the folders under ``<home>/jobs`` if it went missing."""
    folder = ensure_home()
    records = _folder_records()
    try:
        tempfile.TemporaryFile(dir=folder).close()  # a failure here names why (sqlite's would not)
        made = _create(path, records)
    except (OSError, sqlite3.Error) as exc:
        raise home_error(exc) from None
    if made and records:
        warnings.warn(
            f"the local job registry {path} was missing; {_jobs(len(records))} listed again from {JOB_FILE} in "
            f"{jobs_root()} (unfinished ones as FAILED: job.resume() continues them); jobs with their own "
            "output_uri come back with tuning_magics.rebuild_registry(folder)", stacklevel=4)


def connect() -> sqlite3.Connection:
    """A new connection to the registry (made on first use); autocommit, WAL, :data:`busy_wait` busy timeout.

    Raises :class:`RegistryDamaged` when the file is not a readable registry.
    """
    path = db_path()
    if not path.exists():
        _make(path)
    # mode=rw: a registry that vanished is not silently made anew here.
    conn = sqlite3.connect(path.as_uri() + "?mode=rw", uri=True, timeout=busy_wait, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        if path.stat().st_size == 0:
            raise _damaged("it is empty")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UserError(f"the local job registry {path} was written by a newer tuning_magics; upgrade it "
                            "(pip install -U tuning_magics)", field="registry")
        if version < 1:
            raise _damaged("it has no jobs table")
        if version < SCHEMA_VERSION:
            _upgrade(conn)
        conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; a crash loses at most the last commit
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _is_damage(exc):
            raise _damaged(str(exc)) from None
        if _is_busy(exc):
            raise _busy() from None
        raise
    except BaseException:
        conn.close()
        raise
    return conn


def _upgrade(conn: sqlite3.Connection) -> None:
    """Add the columns newer versions keep to a registry an older version made; its rows stay as they are."""
    conn.execute("BEGIN IMMEDIATE")  # one process upgrades; the others find it done
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for name, kind in _ADDED_COLUMNS.get(v, ()):
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


@contextmanager
def _db():
    conn = connect()
    try:
        yield conn
    except sqlite3.DatabaseError as exc:
        if _is_damage(exc):
            raise _damaged(str(exc)) from None
        if _is_busy(exc):
            raise _busy() from None
        raise
    finally:
        conn.close()


def _encode(name: str, value):
    if name == "config":
        return json.dumps(value if value is not None else {}, default=str)
    if name in ("resume", "stop_early"):
        return int(bool(value))
    return value


def _decode(row) -> JobRecord:
    """A row as a JobRecord; a config that is not JSON is read from the job's ``job.json`` instead."""
    present = set(row.keys())  # a row salvaged from an older registry lacks the newer columns
    values = {name: row[name] for name in _COLUMNS if name in present}
    values.setdefault("note", None)
    values.setdefault("stop_early", False)
    try:
        values["config"] = json.loads(values["config"]) if values["config"] else {}
    except (ValueError, TypeError) as exc:
        values["config"] = _config_from_folder(values["output_dir"])
        if values["config"] is None:
            raise ValueError(f"its config is not JSON ({exc})") from None
    if not isinstance(values["config"], dict) or values["state"] not in STATES:
        raise ValueError("its config or state is not valid")
    values["resume"] = bool(values["resume"])
    values["stop_early"] = bool(values["stop_early"])
    return JobRecord(**values)


def _config_from_folder(output_dir) -> dict | None:
    try:
        data = json.loads((Path(output_dir) / JOB_FILE).read_text(encoding="utf-8"))
        return data["config"] if isinstance(data.get("config"), dict) else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _decode_or_warn(row) -> JobRecord | None:
    try:
        return _decode(row)
    except (ValueError, TypeError, KeyError) as exc:
        warnings.warn(f"job {row['id']} in the registry {db_path()} cannot be read ({exc}); it is left out",
                      stacklevel=3)
        return None


def new_id(prefix: str = "tune") -> str:
    """A short, readable, unique-enough job id: ``tune-20261123-a1b2c3``."""
    return f"{prefix}-{time.strftime('%Y%m%d')}-{secrets.token_hex(3)}"


def insert(record: JobRecord) -> JobRecord:
    """Add a job; raises sqlite3.IntegrityError when the id is taken."""
    with _db() as conn:
        _insert(conn, record)
    return record


def _insert(conn: sqlite3.Connection, record: JobRecord) -> None:
    names = ", ".join(_COLUMNS)
    marks = ", ".join("?" for _ in _COLUMNS)
    conn.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", [_encode(n, getattr(record, n)) for n in _COLUMNS])


def get(job_id: str) -> JobRecord | None:
    """The job with this id, or None; a UserError when its row cannot be read."""
    with _db() as conn:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    try:
        return _decode(row)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"job {job_id} in the registry {db_path()} cannot be read ({exc}) and its folder has no "
                        f"readable {JOB_FILE}; submit the job again", field="name") from None


def state_of(job_id: str) -> str | None:
    """Just the state: the cheap read a worker polls for cancellation."""
    return requests_of(job_id)[0]


def requests_of(job_id: str) -> tuple[str | None, bool]:
    """The state and whether stopping early was asked for: the one cheap read a worker polls."""
    with _db() as conn:
        row = conn.execute("SELECT state, stop_early FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return (row[0], bool(row[1])) if row else (None, False)


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
    with _db() as conn:
        rows = conn.execute(sql, args).fetchall()
    return [rec for rec in map(_decode_or_warn, rows) if rec is not None]


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
    with _db() as conn:
        return conn.execute(sql, args).rowcount == 1



# -- recovery ----------------------------------------------------------------------------


@dataclass
class Rebuilt:
    """What :func:`rebuild` did; ``str()`` says it in one line."""

    path: Path
    added: list[str] = field(default_factory=list)  # jobs written to the registry (all of them for a new file)
    aside: Path | None = None  # where the damaged file is kept (None: it was readable, or missing)

    def __str__(self) -> str:
        if self.aside is not None:
            return f"rebuilt {self.path} with {_jobs(len(self.added))}; the damaged file is kept as {self.aside}"
        if self.added:
            return f"added {_jobs(len(self.added))} from their folders to {self.path}"
        return f"{self.path} already lists every job folder found; nothing to add"


def _jobs(n: int) -> str:
    return f"{n} job{'' if n == 1 else 's'}"


def rebuild(*folders) -> Rebuilt:
    """List again the jobs of every job folder the registry lacks; a damaged registry is kept aside and made anew.

    Jobs come from the rows still readable in a damaged file and from the
    ``job.json`` of every folder under ``<home>/jobs`` (and of ``folders``: job
    folders given as ``output_uri``). A job known only from its folder is
    SUCCEEDED when it has a final model, else FAILED, so ``job.resume()``
    continues it from its last checkpoint. A readable registry keeps its rows;
    only jobs it does not know are added.
    """
    path = db_path()
    with lock():
        if path.exists() and _readable():
            return _add(path, _folder_records(folders))
        records = {rec.id: rec for rec in _salvage(path)} if path.exists() else {}
        for rec in _folder_records(folders):
            records.setdefault(rec.id, rec)
        tmp = path.with_name(f".{path.name}.rebuilt-{secrets.token_hex(4)}")
        try:
            _create(tmp, sorted(records.values(), key=lambda r: r.created))
            aside = _keep_aside(path) if path.exists() else None
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return Rebuilt(path, list(records), aside)


def _add(path: Path, found: list[JobRecord]) -> Rebuilt:
    with _db() as conn:
        known = {row[0] for row in conn.execute("SELECT id FROM jobs")}
        added = []
        for rec in found:
            if rec.id not in known:
                _insert(conn, rec)
                known.add(rec.id)
                added.append(rec.id)
    return Rebuilt(path, added)


def _keep_aside(path: Path) -> Path:
    """Keep the damaged registry (and its WAL) under a new name while ``path`` stays in place: a crash never
    leaves no registry."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        aside = path.with_name(f"{path.name}.damaged-{stamp}" + (f"-{n}" if n > 1 else ""))
        if not any(os.path.lexists(f"{aside}{suffix}") for suffix in ("", "-wal", "-shm")):
            break
    try:
        os.link(path, aside)
    except FileExistsError:
        raise  # made by someone else since we looked: never replace it
    except OSError:  # no hard links on this filesystem
        shutil.copyfile(path, aside)
    for suffix in ("-wal", "-shm"):  # they belong to the old file: the new one must not read them
        if os.path.lexists(f"{path}{suffix}"):
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
    return aside


def _folder_records(folders=()) -> list[JobRecord]:
    """The jobs the folders under ``<home>/jobs``, then ``folders``, describe in their ``job.json``."""
    root = jobs_root()
    candidates = [*sorted(root.iterdir()), *map(Path, folders)] if root.is_dir() else list(map(Path, folders))
    found: dict[str, JobRecord] = {}
    for folder in candidates:
        rec = _from_folder(folder)
        if rec is not None:
            found.setdefault(rec.id, rec)
    return list(found.values())


def _readable() -> bool:
    try:
        with _db() as conn:
            rows = conn.execute("SELECT * FROM jobs").fetchall()
        for row in rows:
            _decode(row)
    except (RegistryDamaged, ValueError, TypeError, KeyError):
        return False
    return True


def _salvage(path: Path) -> list[JobRecord]:
    """The rows that can still be read from a damaged registry."""
    out = []
    try:
        conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error:
        return out
    try:
        conn.row_factory = sqlite3.Row
        for row in conn.execute("SELECT * FROM jobs"):
            try:
                out.append(_decode(row))
            except (ValueError, TypeError, KeyError, IndexError):
                continue  # its folder's job.json may still tell
    except sqlite3.Error:
        pass  # the rest of the file is unreadable
    finally:
        conn.close()
    return out


def _from_folder(folder: Path) -> JobRecord | None:
    """A job as its folder's ``job.json`` and outputs tell it, or None when there is no readable ``job.json``."""
    try:
        data = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
        job_id, config = str(data["id"]), data["config"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(config, dict):
        return None
    from .checkpoints import find_final

    done = find_final(folder) is not None
    created = data.get("created")
    if not isinstance(created, (int, float)):
        created = (folder / JOB_FILE).stat().st_mtime
    return JobRecord(
        id=job_id, config=config, output_dir=str(folder.resolve()), created=float(created),
        display_name=data.get("display_name"), state=JOB_STATE_SUCCEEDED if done else JOB_STATE_FAILED,
        error=None if done else "the job registry was rebuilt and this job's last state was lost; "
                                "job.resume() continues it from its last checkpoint",
    )
