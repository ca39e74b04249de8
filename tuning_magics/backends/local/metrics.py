"""A job's ``metrics.jsonl``: one JSON object per line, written by the trainer, read by anyone.

Each row also goes to the job's TensorBoard event files (``<job folder>/tensorboard/``,
see :mod:`tuning_magics.tracking`), so ``tensorboard --logdir <job folder>`` follows training.

Readers skip a last line still being written, and hand on only numbers: a row
whose step is not a whole number is skipped, a value that is not a number is left
out (a number written as text is read as the number), with one warning per file,
so a file someone edited by hand never breaks a view of the job. The writer
notices when its file was deleted or replaced under it (the job folder removed
while the job runs), instead of writing on into a file no one can see.
"""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
import warnings
from pathlib import Path

from ...storage import atomic_writer
from ...tracking import TensorBoardLog

METRICS_FILE = "metrics.jsonl"
#: The job's latest progress (step of total steps, epoch of epochs), rewritten by the worker as it trains.
PROGRESS_FILE = "progress.json"


#: The metrics files this process has already warned about (one warning per file).
_WARNED: set[str] = set()


def number(value) -> int | float | None:
    """A number read from a job's files: ints and floats as they are, a number written as text read as one,
    anything else (a word, a list, true/false) None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def whole(value) -> int | None:
    """A whole number read from a job's files (``12``, ``12.0``, ``"12"``), else None."""
    value = number(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    return value


def read_metrics(output_dir) -> list[dict]:
    """Every complete record of ``<output_dir>/metrics.jsonl``, with numbers only; a line still being written
    is skipped, and so is a row whose step is not a whole number."""
    path = Path(output_dir) / METRICS_FILE
    try:
        data = path.read_bytes()
    except OSError:
        return []
    rows, bad = [], []
    lines = data.splitlines()
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            if n < len(lines) and line.strip():
                bad.append(f"line {n} is not JSON")
            continue  # the last one: the writer's line, caught half-way
        if not isinstance(row, dict):
            bad.append(f"line {n} is not an object")
            continue
        clean = {}
        for key, value in row.items():
            kept = whole(value) if key == "step" else number(value)
            if kept is None and value is not None:
                bad.append(f"line {n}: {key} = {json.dumps(value)[:40]}")
                if key == "step":
                    break
            else:
                clean[key] = kept
        else:
            rows.append(clean)
    if bad and str(path) not in _WARNED:
        _WARNED.add(str(path))
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        warnings.warn(f"{path} holds values that are not numbers ({bad[0]}{more}); they are left out of the "
                      "job's metrics", stacklevel=2)
    return rows


def last_metric(output_dir) -> dict:
    """The last training record (one with an epoch) of the metrics file, or {}."""
    for row in reversed(read_metrics(output_dir)):
        if row.get("epoch") is not None:
            return row
    return {}


class MetricsWriter:
    """Appends rows to ``<output_dir>/metrics.jsonl``, flushed as written.

    ``keep_until_step=None`` starts the file afresh; a step number (a resumed
    run) keeps the rows up to that step, so the curve has no duplicate steps.
    The TensorBoard event files follow the same rule.
    """

    def __init__(self, output_dir, *, keep_until_step: int | None = None):
        self.path = Path(output_dir) / METRICS_FILE
        if keep_until_step is not None and self.path.exists():
            kept = [row for row in read_metrics(output_dir) if (row.get("step") or 0) <= keep_until_step]
            with atomic_writer(self.path, overwrite=True) as fh:
                fh.write(b"".join(json.dumps(row).encode() + b"\n" for row in kept))
        self.fh = open(self.path, "w" if keep_until_step is None else "a", encoding="utf-8")
        self._opened = os.fstat(self.fh.fileno())
        self.tensorboard = TensorBoardLog(output_dir, keep_until_step=keep_until_step)

    def check(self) -> None:
        """Raise FileNotFoundError when the file is no longer where it was opened (its folder was removed)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            now = None
        if now is None or not os.path.samestat(now, self._opened):
            raise FileNotFoundError(errno.ENOENT, "removed while the job was running", str(self.path))

    def write(self, row: dict) -> None:
        self.check()
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        self.tensorboard.write(row)

    def close(self) -> None:
        self.fh.close()
        self.tensorboard.close()
