"""One more process of a data-parallel job (``gpus=N``): ``python -m tuning_magics.backends.local.rank SPEC``.

The job's first process (rank 0, the worker) starts ranks 1..N-1 with the
environment torch.distributed reads (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) and ``SPEC``, the job's JSON: its
:class:`.trainer.TrainConfig`, ``method``, ``resume`` and ``beta`` (a preference job's). This
process trains its share of every batch and writes nothing: rank 0 writes, and
decides cancel and Stop early for all (see :func:`.trainer._run`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def _end_with(parent: int) -> None:
    """Leave as soon as rank 0's process is gone (killed with its worker): nothing of this one is kept."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def main(argv: list[str]) -> int:
    from ...errors import UserError
    from .trainer import TrainConfig, TrainingCancelled, train

    threading.Thread(target=_end_with, args=(os.getppid(),), daemon=True).start()
    spec = json.loads(argv[0])
    config = TrainConfig(**spec["config"])
    try:
        if spec["method"] == "preference":
            from .preference import train_preference

            train_preference(config, beta=spec.get("beta"), resume=spec["resume"])
        else:
            train(config, resume=spec["resume"])
    except TrainingCancelled:
        pass  # rank 0 cancelled the job, and says so
    except UserError as exc:  # (this process's own: its GPU short of memory...) one line, the last of its log
        print(exc, file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
