"""Checkpoint folders in the managed service's layout, written whole or not at all.

::

    <output_dir>/postprocess/node-0/checkpoints/checkpoint-<global step>/   one per epoch (at most 10)
    <output_dir>/postprocess/node-0/checkpoints/final/                        the tuned model

Every folder is written under a ``.tmp-`` name in the same parent, flushed to
disk and renamed into place, so a reader (or a resumed job) never sees half a
checkpoint; readers ignore ``.tmp-`` folders and a resumed job deletes them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ...storage import fsync_dir, fsync_tree
from .models import _TMP_PREFIX

MAX_CHECKPOINTS = 10
TRAINER_STATE = "trainer_state.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_dir(output_dir) -> Path:
    """``<output_dir>/postprocess/node-0/checkpoints``."""
    return Path(output_dir) / "postprocess" / "node-0" / "checkpoints"


def final_dir(output_dir) -> Path:
    """``<output_dir>/postprocess/node-0/checkpoints/final``."""
    return checkpoints_dir(output_dir) / "final"


def checkpoint_epochs(epochs: int, limit: int = MAX_CHECKPOINTS) -> list[int]:
    """The epochs (1-based) after which a checkpoint is written: every one up to ``limit``, else a spread ending at the last."""
    if epochs <= limit:
        return list(range(1, epochs + 1))
    return sorted({max(1, round(k * epochs / limit)) for k in range(1, limit + 1)})


def list_checkpoints(output_dir) -> list[Path]:
    """Complete ``checkpoint-N`` folders, ordered by N (temp folders and incomplete ones are ignored)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _CKPT_RE.match(child.name)
        if m and child.is_dir() and (child / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict:
    """The trainer state stored in a checkpoint."""
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))


def remove_stale_temp(output_dir) -> int:
    """Delete leftover ``.tmp-`` folders of an interrupted writer; returns how many were removed."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return 0
    n = 0
    for child in root.iterdir():
        if child.name.startswith(_TMP_PREFIX):
            shutil.rmtree(child, ignore_errors=True)
            n += 1
    return n


@contextmanager
def atomic_folder(target: Path):
    """Yield a temp folder beside ``target``; on success it replaces ``target`` in one rename, on error it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            # Move the old copy aside first: rename cannot replace a non-empty folder.
            old = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-{target.name}-", dir=target.parent))
            os.rename(target, old / "x")
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
