"""A Vertex AI tuning job's loss and token-accuracy curves, read from the TensorBoard behind its experiment.

The service logs a tuning job's metrics into a Vertex AI TensorBoard, and
:func:`read_metrics` finds them the way aiplatform's ``ExperimentRun`` does
(google-cloud-aiplatform, ``metadata/experiment_run_resource.py``): the job's
``experiment`` is a metadata context; its runs are the contexts of schema
``system.ExperimentRun`` whose parent it is (``ExperimentRun.list``'s filter);
each run ``R`` has a metadata artifact ``R-tb-run`` (``_tensorboard_run_id``) of
schema ``google.VertexTensorboardRun`` whose ``metadata.resourceName`` is the
TensorBoard run (``_lookup_tensorboard_run_artifact``). Where no run has such an
artifact, the older guess is tried: the TensorBoard named by the experiment's
``backing_tensorboard_resource``, its experiment of the context's id, and the
runs under it. A run holds the time series ``/train_total_loss``,
``/eval_total_loss``, ``/train_fraction_of_correct_next_step_preds`` and
``/eval_fraction_of_correct_next_step_preds``.

The chain is followed over REST with google-auth's ``AuthorizedSession`` (a
light import, unlike the aiplatform clients); the answer is one dict per step
and, when no curve could be found, a one-line note saying why. Each series is
read whole (``timeSeries/S:read`` with ``maxDataPoints=-1``):
``tensorboards/T:batchRead``, and ``:read`` by default, return at most 1,000
points of a series, chosen at random when it has more, which would thin out the
curve of a long job. Which series an experiment has is found once and kept for
the session (looked up again only while some of the four are still missing, as
the eval series appear at the first epoch's end), so a monitor refreshing a job
reads its series and nothing else. Nothing from google is imported until it is
called.
"""

from __future__ import annotations

import re
import threading
from typing import NamedTuple

#: Time series display name -> the key it fills in each step's dict.
SERIES = {
    "/train_total_loss": "train_loss",
    "/eval_total_loss": "eval_loss",
    "/train_fraction_of_correct_next_step_preds": "token_accuracy",
    "/eval_fraction_of_correct_next_step_preds": "eval_token_accuracy",
}
_ALWAYS = ("train_loss", "eval_loss", "token_accuracy")
#: ``maxDataPoints`` for "every point" (the service's default is 1,000, sampled at random).
_ALL_POINTS = -1
_TIMEOUT = 60
#: (API base, experiment context) -> what is known of its series: {"runs": [...], "series": {name: key}}.
_FOUND: dict[tuple[str, str], dict] = {}
_FOUND_LOCK = threading.Lock()
_FOUND_MAX = 256
_CONTEXT = re.compile(r"projects/[^/]+/locations/([^/]+)/metadataStores/[^/]+/contexts/([^/]+)")
# aiplatform's metadata/constants.py: an experiment run's schema, its TensorBoard run artifact's id suffix and schema.
_EXPERIMENT_RUN = "system.ExperimentRun"
_TB_RUN_SUFFIX = "-tb-run"
_TB_RUN_SCHEMA = "google.VertexTensorboardRun"


class Metrics(NamedTuple):
    """What :func:`read_metrics` found: one dict per step, and why there is no curve when ``rows`` is empty."""

    rows: list[dict]
    note: str | None = None


def read_metrics(experiment: str, *, project: str, location: str, credentials, api_endpoint: str | None = None,
                 ) -> Metrics:  # fmt: skip
    """The metrics of a tuning job's experiment: ``rows`` in step order, and a ``note`` when none were found.

    Each row has ``step``, ``train_loss``, ``eval_loss`` and ``token_accuracy`` (None
    where a step lacks one); ``eval_token_accuracy`` is added to every row when the job
    logs it. ``experiment`` is a tuning job's ``experiment`` (a metadata context's
    resource name, or just its id in ``project``/``location``). An experiment that does
    not exist (yet), without a TensorBoard run or without the loss series gives no rows
    and a one-line note; a run whose series have no points yet gives neither. Other API
    errors are raised as google-api-core exceptions.
    """
    from google.auth.transport.requests import AuthorizedSession

    match = _CONTEXT.fullmatch(experiment)
    if match:
        context, location = experiment, match.group(1)
    else:
        context = f"projects/{project}/locations/{location}/metadataStores/default/contexts/{experiment}"
    base = (api_endpoint or f"https://{location}-aiplatform.googleapis.com").rstrip("/")
    if "://" not in base:
        base = f"https://{base}"
    session = AuthorizedSession(credentials)
    try:
        return _read(session, f"{base}/v1", context)
    finally:
        session.close()


def _get(session, url: str, params=None) -> dict | None:
    """The JSON answer, or None for 404; any other error as a google-api-core exception."""
    response = session.get(url, params=params, timeout=_TIMEOUT)
    if response.status_code == 404:
        return None
    if response.status_code >= 400:
        from google.api_core import exceptions

        raise exceptions.from_http_response(response)
    return response.json() if response.content else {}


def _pages(session, url: str, key: str, params: dict | None = None):
    token = None
    while True:
        page = _get(session, url, {**(params or {}), "pageSize": 100, **({"pageToken": token} if token else {})})
        if page is None:
            return
        yield from page.get(key, [])
        token = page.get("nextPageToken")
        if not token:
            return


def _read(session, base: str, context: str) -> Metrics:
    key = (base, context)
    name = context.rsplit("/", 1)[1]
    with _FOUND_LOCK:
        found = dict(_FOUND.get(key) or {})
    if set((found.get("series") or {}).values()) >= set(SERIES.values()):  # all four known: read them
        rows = _read_series(session, base, found["series"])
        if rows is not None:
            return Metrics(_table(rows, found["series"]))
        found = {}  # a series known before is gone: find them all again
    runs = found.get("runs") or _runs(session, base, context)
    if runs is None:
        return Metrics([], f"no loss curve yet: the job's experiment {name} does not exist yet")
    if not runs:
        return Metrics([], f"no loss curve: experiment {name} has no TensorBoard run (yet)")
    wanted: dict[str, str] = {}  # time series resource name -> the key it fills
    for run in runs:
        for series in _pages(session, f"{base}/{run}/timeSeries", "tensorboardTimeSeries"):
            filled = SERIES.get(series.get("displayName", ""))
            if filled:
                wanted[series["name"]] = filled
    with _FOUND_LOCK:
        _FOUND.pop(key, None)
        if wanted:  # (a run without series yet, or gone, is looked up in full next time)
            while len(_FOUND) >= _FOUND_MAX:
                del _FOUND[next(iter(_FOUND))]
            _FOUND[key] = {"runs": runs, "series": wanted}
    if not wanted:
        return Metrics([], f"no loss curve (yet): the TensorBoard run of experiment {name} has no "
                           f"{' or '.join(list(SERIES)[:2])} series")
    return Metrics(_table(_read_series(session, base, wanted) or {}, wanted))


def _runs(session, base: str, context: str) -> list[str] | None:
    """The TensorBoard runs of an experiment context ([] without any), or None when the context does not exist.

    First as aiplatform finds an experiment run's TensorBoard run: the context's runs
    (``schema_title="system.ExperimentRun" AND parent_contexts:"<context>"``, the filter of
    ``ExperimentRun.list``), each run's ``<run id>-tb-run`` artifact, its ``resourceName``.
    Then, where no run has one, the TensorBoard experiment named after the context.
    """
    found = _get(session, f"{base}/{context}")
    if found is None:
        return None
    context = found.get("name") or context  # as the service names it (with the project's number)
    store = context.rsplit("/contexts/", 1)[0]
    runs = []
    criteria = {"filter": f'schema_title="{_EXPERIMENT_RUN}" AND parent_contexts:"{context}"'}
    for run in _pages(session, f"{base}/{store}/contexts", "contexts", criteria):
        artifact = _get(session, f"{base}/{store}/artifacts/{run['name'].rsplit('/', 1)[1]}{_TB_RUN_SUFFIX}")
        meta = (artifact or {}).get("metadata") or {}
        if (artifact or {}).get("schemaTitle") == _TB_RUN_SCHEMA and meta.get("resourceName"):
            runs.append(meta["resourceName"])
    if runs:
        return runs
    tensorboard = (found.get("metadata") or {}).get("backing_tensorboard_resource")
    if not tensorboard:
        return []
    tb_experiment = f"{tensorboard}/experiments/{context.rsplit('/', 1)[1]}"
    return [run["name"] for run in _pages(session, f"{base}/{tb_experiment}/runs", "tensorboardRuns")]


def _read_series(session, base: str, wanted: dict[str, str]) -> dict[int, dict] | None:
    """step -> {key: value} from every point of the ``wanted`` series; None when one of them is not found."""
    rows: dict[int, dict] = {}
    for name in sorted(wanted):
        data = _get(session, f"{base}/{name}:read", {"maxDataPoints": _ALL_POINTS})
        if data is None:
            return None
        for point in (data.get("timeSeriesData") or {}).get("values", []):
            value = (point.get("scalar") or {}).get("value")
            if value is None or "step" not in point:
                continue
            step = int(point["step"])  # int64: a string in JSON
            rows.setdefault(step, {"step": step})[wanted[name]] = float(value)
    return rows


def _table(rows: dict[int, dict], wanted: dict[str, str]) -> list[dict]:
    keys = _ALWAYS + (("eval_token_accuracy",) if "eval_token_accuracy" in wanted.values() else ())
    return [{"step": step, **{k: rows[step].get(k) for k in keys}} for step in sorted(rows)]


#: The metric each kind of Vertex AI aggregation result scores (tuning_magics asks ROUGE as ROUGE-L only).
_RESULTS = {"exact_match_metric_value": "exact_match", "rouge_metric_value": "rouge_l", "bleu_metric_value": "bleu"}


def evaluation_rows(raw) -> list[dict]:
    """Evaluation during tuning: a metrics row per checkpoint the service has scored, ``{"step", "eval_<metric>"}``
    from each metric's AVERAGE (google-genai's ``TuningJob.evaluate_dataset_runs``). A run still going, or one
    that failed, has no row; a checkpoint is placed at its step once the tuned model lists it."""
    from ...evaluation.during import PREFIX

    tuned = getattr(raw, "tuned_model", None)
    steps = {str(ck.checkpoint_id): int(ck.step) for ck in (getattr(tuned, "checkpoints", None) or [])
             if ck.step is not None}
    rows = []
    for run in getattr(raw, "evaluate_dataset_runs", None) or []:
        output = getattr(run.evaluate_dataset_response, "aggregation_output", None)
        step = steps.get(str(run.checkpoint_id))
        if step is None or run.error is not None or output is None:
            continue
        row = {"step": step}
        for result in output.aggregation_results or []:
            if str(getattr(result.aggregation_metric, "value", result.aggregation_metric)) != "AVERAGE":
                continue
            for attr, name in _RESULTS.items():
                value = getattr(result, attr, None)
                if value is not None and value.score is not None:
                    row[PREFIX + name] = float(value.score)
        if len(row) > 1:
            rows.append(row)
    return rows
