"""Where a job's metrics go besides ``job.metrics()``: TensorBoard event files and MLflow.

TensorBoard
    :class:`TensorBoardLog` writes a job's metric rows, as they come, into
    ``<job folder>/tensorboard/train/`` and ``<job folder>/tensorboard/eval/``
    (two runs, so the training and validation loss share one chart), so
    ``tensorboard --logdir <job folder>`` shows loss, token accuracy, learning
    rate and tokens/s per step. The format is written here, with no TensorFlow
    or PyTorch: TFRecord frames (little-endian uint64 length, masked CRC32C of
    the length, the bytes, masked CRC32C of the bytes) of ``Event`` protocol
    buffers, hand-encoded; the first event of a file is its
    ``file_version "brain.Event:2"``.

MLflow
    :func:`log_to_mlflow` copies any job (it reads only the ``Job`` interface)
    into an MLflow run: its config as params, its metrics per step, its data
    stats, and tags naming the backend, base model and job. With the setting
    ``mlflow = "true"`` every job is logged once when ``job.wait()`` sees it end.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from contextlib import contextmanager
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"
#: The two TensorBoard runs of a job: training rows, and evaluation (validation) rows.
TRAIN_RUN, EVAL_RUN = "train", "eval"
_FILE_VERSION = b"brain.Event:2"
_EVENTS_MARK = "tfevents"

# -- CRC32C (Castagnoli) -------------------------------------------------------------


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def _crc32c_python(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _pick_crc32c():
    try:
        import google_crc32c
    except ImportError:
        return _crc32c_python
    if getattr(google_crc32c, "implementation", None) != "c":
        return _crc32c_python  # its pure-Python fallback is no faster than ours
    return google_crc32c.value


crc32c = _pick_crc32c()


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _frame(record: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the record, its masked CRC."""
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", _masked_crc(length)) + record + struct.pack("<I", _masked_crc(record))


def _records(data: bytes):
    """The records of a TFRecord file; stops at a record cut short or damaged (a writer killed mid-write)."""
    pos = 0
    while pos + 12 <= len(data):
        length_bytes = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        end = pos + 12 + length + 4
        if length_crc != _masked_crc(length_bytes) or end > len(data):
            return
        record = data[pos + 12:pos + 12 + length]
        (record_crc,) = struct.unpack("<I", data[end - 4:end])
        if record_crc != _masked_crc(record):
            return
        yield record
        pos = end


# -- Event protocol buffers ----------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: bytes | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
    """An ``Event``: wall_time (1, double), step (2, int64), file_version (3) or summary (5)."""
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version)
    if scalars:
        # Summary.value (1): Summary.Value with tag (1, string) and simple_value (2, float).
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode("utf-8")) + _key(2, 5) + struct.pack("<f", value))
            for tag, value in scalars.items()
        )
        out += _length_delimited(5, values)
    return out


def _event_step(record: bytes) -> tuple[int, bool]:
    """The step of an encoded ``Event``, and whether it is the file-version header."""
    pos, step, header = 0, 0, False
    while pos < len(record):
        key, pos = _read_varint(record, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(record, pos)
            if field == 2:
                step = value - (1 << 64) if value >= 1 << 63 else value
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _read_varint(record, pos)
            header = header or field == 3
            pos += size
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return step, header


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


# -- writers ----------------------------------------------------------------------------------


def _event_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if _EVENTS_MARK in p.name and p.is_file())
    except FileNotFoundError:
        return []


class EventFileWriter:
    """Scalars for one TensorBoard run (one folder), appended to an event file and flushed as written.

    ``keep_until_step=None`` starts the run afresh (its old event files are
    removed); a step number (a resumed job) keeps the events up to that step,
    carried into the new file, and drops the rest, so no step shows twice. The
    folder is made at the first write, inside a parent that must exist.
    """

    def __init__(self, folder, *, keep_until_step: int | None = None):
        self.folder = Path(folder)
        self.path: Path | None = None
        self._fh = None
        old = _event_files(self.folder)
        if keep_until_step is None:
            for path in old:
                path.unlink(missing_ok=True)
            return
        carried = []
        for path in old:
            for record in _records(path.read_bytes()):
                try:
                    step, header = _event_step(record)
                except (ValueError, IndexError):
                    continue  # not an event this module wrote
                if not header and step <= keep_until_step:
                    carried.append(record)
        if old:
            self._open()
            self._fh.write(b"".join(_frame(r) for r in carried))
            self._fh.flush()
            for path in old:
                if path != self.path:
                    path.unlink(missing_ok=True)

    def _open(self) -> None:
        self.folder.mkdir(exist_ok=True)  # never its parents: a removed job folder is not made again
        now = time.time()
        name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.folder / name
        n = 0
        while self.path.exists():  # a file this process wrote earlier in the same second
            n += 1
            self.path = self.folder / f"{name}.{n}"
        self._fh = open(self.path, "ab")
        self._fh.write(_frame(_event(now, 0, file_version=_FILE_VERSION)))

    def add_scalars(self, step: int, scalars: dict[str, float], wall_time: float | None = None) -> None:
        """Write one event holding ``scalars`` (tag -> number) at ``step``."""
        if not scalars:
            return
        if self._fh is None:
            self._open()
        self._fh.write(_frame(_event(time.time() if wall_time is None else wall_time, int(step),
                                     scalars=scalars)))
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def tensorboard_scalars(row: dict) -> dict[str, dict[str, float]]:
    """A metric row split into TensorBoard runs and tags: ``{"train": {"loss": ...}, "eval": {"loss": ...}}``.

    ``train_loss`` and ``eval_loss`` both become the tag ``loss`` (in the train
    and eval runs), so TensorBoard draws them on one chart; ``eval_X`` is ``X``
    in the eval run; every other number but the step and epoch is a tag of the
    train run under its own name.
    """
    out: dict[str, dict[str, float]] = {}
    for key, value in row.items():
        if key in ("step", "epoch", "event") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.startswith("eval_"):
            run, tag = EVAL_RUN, key[len("eval_"):]
        elif key.startswith("train_"):
            run, tag = TRAIN_RUN, key[len("train_"):]
        else:
            run, tag = TRAIN_RUN, key
        out.setdefault(run, {})[tag] = float(value)
    return out


class TensorBoardLog:
    """A job's ``tensorboard/`` folder: each metric row is written to the train and eval runs as it comes."""

    def __init__(self, job_dir, *, keep_until_step: int | None = None):
        self.folder = Path(job_dir) / TENSORBOARD_DIR
        self._keep = keep_until_step
        self._writers: dict[str, EventFileWriter] = {}
        if self.folder.is_dir():
            for run in (TRAIN_RUN, EVAL_RUN):
                if (self.folder / run).is_dir():
                    self._writer(run)  # trims (or clears) what an earlier attempt wrote

    def _writer(self, run: str) -> EventFileWriter:
        writer = self._writers.get(run)
        if writer is None:
            writer = self._writers[run] = EventFileWriter(self.folder / run, keep_until_step=self._keep)
        return writer

    def write(self, row: dict, wall_time: float | None = None) -> None:
        step = row.get("step")
        if step is None:
            return
        wall_time = time.time() if wall_time is None else wall_time
        for run, scalars in tensorboard_scalars(row).items():
            if not self.folder.is_dir():
                self.folder.mkdir()  # the job folder itself must exist
            self._writer(run).add_scalars(int(step), scalars, wall_time)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


# -- MLflow -----------------------------------------------------------------------------------

_RUN_STATUS = {"JOB_STATE_SUCCEEDED": "FINISHED", "JOB_STATE_FAILED": "FAILED", "JOB_STATE_EXPIRED": "FAILED",
               "JOB_STATE_CANCELLED": "KILLED"}
_BATCH = 1000  # MLflow's limit of metrics in one log_batch call
_PARAM_BATCH = 100  # ... of params or tags in one call


#: MLflow's HTTP settings while tuning_magics talks to it: one retry and 5 s a request, instead of
#: MLflow's 7 retries with backoff (about 4 minutes for a tracking server that is down, all spent
#: inside ``job.wait()``). A value the user set in the environment wins. The environment is the
#: process's: another thread's MLflow calls in those seconds are bounded the same way.
_HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@contextmanager
def _talking_to(mlflow, job):
    """Bounded HTTP to MLflow (see ``_HTTP_BOUNDS``); an MLflow failure becomes a one-line UserError."""
    from mlflow.exceptions import MlflowException

    added = [name for name in _HTTP_BOUNDS if name not in os.environ]
    os.environ.update({name: _HTTP_BOUNDS[name] for name in added})
    try:
        yield
    except (MlflowException, OSError) as exc:
        raise _tracking_error(mlflow, job, exc) from None
    finally:
        for name in added:
            os.environ.pop(name, None)


def _tracking_error(mlflow, job, exc: BaseException):
    from .errors import UserError

    uri = mlflow.get_tracking_uri()
    text = str(exc)
    if "Connection refused" in text:
        why = "connection refused: no tracking server answers there"
    elif "timed out" in text.lower():
        why = "it did not answer in time"
    elif "Max retries exceeded" in text or "NewConnectionError" in text:
        why = "it cannot be reached"
    else:
        lines = text.strip().splitlines()
        why = (lines[0] if lines else type(exc).__name__)[:300]
    return UserError(f"{_not_logged(job)} at {uri} ({why}); start the tracking server, or point "
                     "MLFLOW_TRACKING_URI (mlflow.set_tracking_uri) at one that runs, then "
                     "tuning_magics.log_to_mlflow(job)", field="mlflow")


def _not_logged(job) -> str:
    return f"job {job.id} was not logged to MLflow"


def _mlflow():
    try:
        import mlflow
    except ImportError:
        from .errors import UserError

        raise UserError("MLflow is not installed: pip install mlflow (or mlflow-skinny) to log jobs to it") \
            from None
    return mlflow


def _flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config flattened to ``a.b`` keys with text values (lists and odd values as JSON)."""
    out = {}
    for key, value in config.items():
        name = _clean_key(f"{prefix}{key}")
        if value is None:
            continue
        if isinstance(value, dict):
            out.update(_flat_params(value, f"{name}."))
        elif isinstance(value, str):
            out[name] = value
        elif isinstance(value, (bool, int, float)):
            out[name] = str(value)
        else:
            out[name] = json.dumps(value, default=str)
    return out


def _clean_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / `` and spaces; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def _param_limit(mlflow) -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        return int(MAX_PARAM_VAL_LENGTH)
    except Exception:  # noqa: BLE001 - an older or newer MLflow without the constant
        return 500


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _job_tags(job) -> dict[str, str]:
    config = job.config or {}
    tags = {
        "tuning_magics.backend": job.backend or type(job).__name__,
        "tuning_magics.base_model": config.get("custom_base_model") or config.get("base_model"),
        "tuning_magics.job_name": job.name,
        "tuning_magics.job_id": job.id,
        "tuning_magics.state": job.state,
        "tuning_magics.display_name": job.display_name,
        "tuning_magics.output_uri": job.output_uri,
        "tuning_magics.ended": job.ended.isoformat() if job.ended else None,
    }
    return {k: str(v) for k, v in tags.items() if v not in (None, "")}


def log_to_mlflow(job, *, experiment: str | None = None, run_name: str | None = None) -> str:
    """Copy a tuning job into a new MLflow run; returns the run's id.

    The run gets the job's config as params (nested keys as ``options.batch_size``),
    every metric of ``job.metrics()`` per step (``train_loss``, ``eval_loss``,
    ``token_accuracy``, ...), the data stats as ``data.<stat>.predicted`` and
    ``data.<stat>.service`` metrics, and ``tuning_magics.*`` tags (backend, base
    model, job name, state). It ends FINISHED, FAILED or KILLED as the job did.
    ``experiment`` is an experiment name (made when missing); by default the
    active one. Inside an active MLflow run the job's run is nested under it.
    Works for a job on any backend.

    A tracking server that is down or does not answer costs seconds, not MLflow's
    minutes of retries (unless ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` /
    ``MLFLOW_HTTP_REQUEST_TIMEOUT`` are set), and is a one-line UserError naming the
    tracking URI.
    """
    mlflow = _mlflow()
    from mlflow.entities import Metric, Param, RunTag

    limit = _param_limit(mlflow)
    config = dict(job.config or {})
    config.pop("predicted_stats", None)  # logged as data stats below
    params = [Param(k, v[:limit]) for k, v in _flat_params(config).items()]
    tags = [RunTag(k, v) for k, v in _job_tags(job).items()]

    stamp = int(time.time() * 1000)
    metrics = []
    frame = job.metrics()
    if len(frame):
        for column in frame.columns:
            if column == "step":
                continue
            for step, value in zip(frame["step"], frame[column]):
                number = _number(value)
                if number is not None:
                    metrics.append(Metric(_clean_key(str(column)), number, stamp, int(step)))
    import pandas as pd

    stats = job.data_stats()
    for stat, row in stats.iterrows():
        for source in ("predicted", "service"):
            number = None if pd.isna(row[source]) else _number(row[source])
            if number is not None:
                metrics.append(Metric(f"data.{stat}.{source}", number, stamp, 0))

    with _talking_to(mlflow, job):
        client = mlflow.MlflowClient()
        experiment_id = None
        if experiment:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        nested = mlflow.active_run() is not None  # the user's own run: the job's run goes under it
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name or job.display_name or job.id,
                               nested=nested)
        run_id = run.info.run_id
        try:
            for i in range(0, max(len(params), len(tags)), _PARAM_BATCH):
                client.log_batch(run_id, params=params[i:i + _PARAM_BATCH], tags=tags[i:i + _PARAM_BATCH])
            for i in range(0, len(metrics), _BATCH):
                client.log_batch(run_id, metrics=metrics[i:i + _BATCH])
        except BaseException:
            try:
                mlflow.end_run("FAILED")
            except Exception:  # noqa: BLE001 - the server that failed the run may fail this too; the first error tells
                pass
            raise
        mlflow.end_run(_RUN_STATUS.get(job.state, "FINISHED"))
    return run_id


#: (job name, end time) of the jobs this process has already logged when they ended.
_LOGGED: set[tuple[str, str]] = set()


def log_when_ended(job) -> None:
    """With the setting ``mlflow = "true"``, log a job that has ended to MLflow, once.

    Called by ``job.wait()``. A job already logged (by this process, or a run in
    MLflow tagged with the same job and end time) is not logged again. Any
    failure is a one-line warning (a tracking server that is down takes a few
    seconds to tell, see ``_HTTP_BOUNDS``): waiting for a job never fails because of it.
    """
    import warnings

    from .config import settings
    from .errors import UserError

    try:
        if settings.mlflow != "true":
            return
    except UserError:
        return  # a broken settings file is reported where a setting is really needed
    try:
        key = (job.name, job.ended.isoformat() if job.ended else "")
        if key in _LOGGED:
            return
        _LOGGED.add(key)
        if _already_in_mlflow(job):
            return
        log_to_mlflow(job)
    except Exception as exc:  # noqa: BLE001 - logging must never break wait()
        lines = str(exc).strip().splitlines()
        text = lines[0] if lines else type(exc).__name__
        warnings.warn(text if text.startswith(_not_logged(job)) else f"{_not_logged(job)}: {text}",
                      UserWarning, stacklevel=3)


def _already_in_mlflow(job) -> bool:
    mlflow = _mlflow()
    tags = _job_tags(job)
    query = " and ".join(f"tags.`{k}` = '{tags[k]}'" for k in ("tuning_magics.job_name", "tuning_magics.ended")
                         if k in tags and "'" not in tags[k])
    with _talking_to(mlflow, job):
        runs = mlflow.search_runs(filter_string=query, max_results=1, output_format="list")
    return bool(runs)
