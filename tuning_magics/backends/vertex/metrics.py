"""A Vertex AI tuning job's loss and token-accuracy curves, read from the TensorBoard behind its experiment.

The service logs a tuning job's metrics into a Vertex AI TensorBoard: the job's
``experiment`` is a metadata context whose ``backing_tensorboard_resource`` names
the TensorBoard; the TensorBoard experiment has the context's id, and its run(s)
hold the time series ``/train_total_loss``, ``/eval_total_loss``,
``/train_fraction_of_correct_next_step_preds`` and
``/eval_fraction_of_correct_next_step_preds``.

:func:`read_metrics` follows that chain over REST with google-auth's
``AuthorizedSession`` (a light import, unlike the aiplatform clients) and
returns one dict per step. Nothing from google is imported until it is called.
"""

from __future__ import annotations

import re

#: Time series display name -> the key it fills in each step's dict.
SERIES = {
    "/train_total_loss": "train_loss",
    "/eval_total_loss": "eval_loss",
    "/train_fraction_of_correct_next_step_preds": "token_accuracy",
    "/eval_fraction_of_correct_next_step_preds": "eval_token_accuracy",
}
_ALWAYS = ("train_loss", "eval_loss", "token_accuracy")
#: The most time series the service reads in one batchRead call.
_BATCH = 20
_TIMEOUT = 60
_CONTEXT = re.compile(r"projects/[^/]+/locations/([^/]+)/metadataStores/[^/]+/contexts/([^/]+)")


def read_metrics(experiment: str, *, project: str, location: str, credentials, api_endpoint: str | None = None,
                 ) -> list[dict]:  # fmt: skip
    """One dict per logged step, in step order: ``step``, ``train_loss``, ``eval_loss``, ``token_accuracy``.

    ``experiment`` is a tuning job's ``experiment`` (a metadata context's resource
    name, or just its id in ``project``/``location``). Values a step lacks are None;
    ``eval_token_accuracy`` is added to every row when the job logs it. An experiment
    that does not exist (yet), or has no TensorBoard or no points yet, gives ``[]``.
    Other API errors are raised as google-api-core exceptions.
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


def _pages(session, url: str, key: str):
    token = None
    while True:
        page = _get(session, url, {"pageSize": 100, **({"pageToken": token} if token else {})})
        if page is None:
            return
        yield from page.get(key, [])
        token = page.get("nextPageToken")
        if not token:
            return


def _read(session, base: str, context: str) -> list[dict]:
    found = _get(session, f"{base}/{context}")
    tensorboard = ((found or {}).get("metadata") or {}).get("backing_tensorboard_resource")
    if not tensorboard:
        return []
    tb_experiment = f"{tensorboard}/experiments/{context.rsplit('/', 1)[1]}"
    wanted: dict[str, str] = {}  # time series resource name -> the key it fills
    for run in _pages(session, f"{base}/{tb_experiment}/runs", "tensorboardRuns"):
        for series in _pages(session, f"{base}/{run['name']}/timeSeries", "tensorboardTimeSeries"):
            key = SERIES.get(series.get("displayName", ""))
            if key:
                wanted[series["name"]] = key
    by_id = {name.rsplit("/", 1)[1]: key for name, key in wanted.items()}
    rows: dict[int, dict] = {}
    names = sorted(wanted)
    for start in range(0, len(names), _BATCH):
        batch = [("timeSeries", name) for name in names[start:start + _BATCH]]
        data = _get(session, f"{base}/{tensorboard}:batchRead", batch)
        for series in (data or {}).get("timeSeriesData", []):
            key = by_id.get(series.get("tensorboardTimeSeriesId", ""))
            for point in series.get("values", []) if key else []:
                value = (point.get("scalar") or {}).get("value")
                if value is None or "step" not in point:
                    continue
                step = int(point["step"])  # int64: a string in JSON
                rows.setdefault(step, {"step": step})[key] = float(value)
    keys = _ALWAYS + (("eval_token_accuracy",) if "eval_token_accuracy" in wanted.values() else ())
    return [{"step": step, **{k: rows[step].get(k) for k in keys}} for step in sorted(rows)]
