"""A third-party backend, as another package would write one: registered through the entry-point group.

It tunes in memory: a job is QUEUED when submitted and moves one state each
time it is read (RUNNING with two training steps, then SUCCEEDED with a
``final`` checkpoint). It is the README's "Writing a backend" example grown
to everything the contract suite asks of a backend.
"""

from __future__ import annotations

import itertools
import time

from tuning_magics.backends import Backend, keep
from tuning_magics.errors import UserError
from tuning_magics.jobs import Checkpoint, DryRun, Job, JobInfo, metrics_frame, timestamp

_JOBS: dict[str, dict] = {}
_IDS = itertools.count(1)
_ORDER = ("JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED")


class ToyJob(Job):
    backend = "toy"

    def __init__(self, name: str):
        self._name = name
        super().__init__()

    @property
    def name(self) -> str:
        return self._name

    def _fetch(self) -> JobInfo:
        record = _JOBS[self._name]
        state = record["state"]
        if state in _ORDER[:-1]:  # each look moves the job on
            record["state"] = _ORDER[_ORDER.index(state) + 1]
        return JobInfo(name=self._name, state=state, config=record["config"], created=timestamp(record["created"]),
                       display_name=record["config"].get("display_name"))

    def cancel(self) -> ToyJob:
        if _JOBS[self._name]["state"] not in ("JOB_STATE_SUCCEEDED", "JOB_STATE_CANCELLED"):
            _JOBS[self._name]["state"] = "JOB_STATE_CANCELLED"
        return self.refresh()

    def resume(self) -> ToyJob:
        raise UserError("the toy backend does not resume jobs; submit it again")

    def metrics(self):
        ran = self.info.state != "JOB_STATE_QUEUED"
        return metrics_frame([{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.0}] if ran else [])

    @property
    def checkpoints(self) -> list[Checkpoint]:
        if self.info.state != "JOB_STATE_SUCCEEDED":
            return []
        return [Checkpoint("final", None, f"toy://{self._name}/final")]


class ToyBackend(Backend):
    title = "the toy backend"

    def refusal(self, model):
        if model.provider == "gemini":
            return UserError(f"base_model {model.id}: the toy backend tunes open models only", field="base_model")
        return None

    def engine_options(self) -> dict:
        def speed(name, value):
            if value not in ("fast", "slow"):
                raise UserError(f"{name} must be 'fast' or 'slow', not {value!r}", field=name)
            return value

        return {"toy_speed": speed}

    def _check(self, request) -> dict:
        options = dict(request.options)
        for name, value in options.items():
            rule = self.engine_options().get(name)
            if rule is None:
                raise UserError(f"{name} is not an option of the toy backend, which takes toy_speed", field=name)
            rule(name, value)
        return {"base_model": request.model.id, "epochs": request.epochs, "method": request.method,
                "display_name": request.tuned_model_display_name, **options}

    def dry_run(self, request):
        return DryRun(self.name, request.model.id, self._check(request), billed_tokens=0, cost_usd=0.0)

    def submit(self, request):
        config = self._check(request)
        name = f"toy-jobs/{next(_IDS)}"
        _JOBS[name] = {"state": "JOB_STATE_QUEUED", "config": config, "created": time.time()}
        return ToyJob(name)

    def owns(self, name: str) -> bool:
        return name.startswith("toy-jobs/")

    def get(self, name: str):
        if name not in _JOBS:
            raise UserError(f"there is no toy job {name!r}; list_jobs(backend='toy') shows them", field="name")
        return ToyJob(name)

    def find(self, limit=None, *, states=None, model=None) -> list:
        newest = sorted(_JOBS, key=lambda n: _JOBS[n]["created"], reverse=True)
        return keep([ToyJob(n) for n in newest], limit, states=states, model=model)
