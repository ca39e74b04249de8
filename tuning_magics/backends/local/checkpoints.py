"""A job folder's checkpoints, in the managed service's layout, written whole or not at all.

::

    <output_dir>/postprocess/node-0/checkpoints/checkpoint-<global step>/   one per epoch (at most 10)
    <output_dir>/postprocess/node-0/checkpoints/final/                        the tuned model

Every folder is written by :func:`tuning_magics.storage.atomic_folder`, so a
reader (or a resumed job) never sees half a checkpoint: readers skip its
``.tmp-`` folders, settle a replacement a crash cut short, and a resumed job
deletes the leftovers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ...jobs import Checkpoint
from ...storage import recover_folder, remove_stale_temp as _remove_stale_temp

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


def find_final(output_dir) -> Path | None:
    """The ``final`` folder when it exists (after settling a replacement a crash cut short), else None."""
    final = final_dir(output_dir)
    return final if recover_folder(final) and final.is_dir() else None


def job_checkpoints(output_dir) -> list[Checkpoint]:
    """Complete ``checkpoint-N`` folders in step order, then ``final`` when it exists."""
    out = [Checkpoint(p.name, int(p.name.split("-")[1]), str(p)) for p in list_checkpoints(output_dir)]
    final = find_final(output_dir)
    if final is not None:
        out.append(Checkpoint("final", None, str(final)))
    return out


def latest_checkpoint(output_dir) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict:
    """The trainer state stored in a checkpoint (transformers' ``TrainerState``: ``global_step``, ``epoch``,
    ``log_history``...), with ``train_loss`` and ``eval_loss`` as last logged before it."""
    state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))
    for row in state.get("log_history") or []:
        for theirs, ours in (("loss", "train_loss"), ("eval_loss", "eval_loss")):
            if isinstance(row.get(theirs), (int, float)):
                state[ours] = row[theirs]
    return state


def remove_stale_temp(output_dir) -> int:
    """Settle an interrupted replacement and delete an interrupted writer's temp folders; how many were removed."""
    return _remove_stale_temp(checkpoints_dir(output_dir))
