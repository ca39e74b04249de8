"""A job's ``metrics.jsonl``: one JSON object per line, written by the trainer, read by anyone.

Each row also goes to the job's TensorBoard event files (``<job folder>/tensorboard/``,
see :mod:`tuning_magics.tracking`), so ``tensorboard --logdir <job folder>`` follows training.

Readers skip a last line still being written. The writer notices when its file
was deleted or replaced under it (the job folder removed while the job runs),
instead of writing on into a file no one can see.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from ...storage import atomic_writer
from ...tracking import TensorBoardLog

METRICS_FILE = "metrics.jsonl"


def read_metrics(output_dir) -> list[dict]:
    """Every complete record of ``<output_dir>/metrics.jsonl``; a line still being written is skipped."""
    path = Path(output_dir) / METRICS_FILE
    try:
        data = path.read_bytes()
    except OSError:
        return []
    rows = []
    for line in data.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # the writer's last line, caught half-way
        if isinstance(row, dict):
            rows.append(row)
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
            kept = [row for row in read_metrics(output_dir) if row.get("step", 0) <= keep_until_step]
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
