"""tuning_magics.backends.vertex.metrics.read_metrics against the fake Vertex AI's experiments and TensorBoard."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("google.genai")
pytestmark = pytest.mark.filterwarnings("ignore:The SDK's tuning implementation is experimental")

from tuning_magics.backends.vertex.metrics import read_metrics  # noqa: E402

CHAT = [{"messages": [{"role": "user", "content": f"Name {i}."}, {"role": "assistant", "content": f"N{i}"}]}
        for i in range(16)]  # fmt: skip


def tune(fake, *, validation=True, base="gemini-2.5-flash", epochs=2):
    from google.genai import types

    train = fake.put(fake.uri("train.jsonl"), CHAT)
    config = types.CreateTuningJobConfig(epoch_count=epochs)
    if validation:
        config.validation_dataset = types.TuningValidationDataset(gcs_uri=fake.put(fake.uri("val.jsonl"), CHAT[:4]))
    if not base.startswith("gemini-"):
        config.output_uri = f"gs://{fake.bucket}/out"
    client = fake.genai_client()  # held: google-genai closes its connections when the client is collected
    return client.tunings.tune(base_model=base, training_dataset=types.TuningDataset(gcs_uri=train), config=config)


@pytest.fixture
def fake_vertex(fake_vertex):
    """Minute-long lifecycle steps: jobs move only when a test moves the fake's clock."""
    fake_vertex.step_seconds = 60
    return fake_vertex


def get(fake, name):
    client = fake.genai_client()
    return client.tunings.get(name=name)


def read(fake, experiment):
    """The rows read_metrics finds."""
    return read_with_note(fake, experiment).rows


def read_with_note(fake, experiment):
    return read_metrics(experiment, project="fake-project", location="us-central1", credentials=fake.credentials(),
                        api_endpoint=fake.url)  # fmt: skip


def test_a_finished_job_gives_one_row_per_step_with_eval_at_each_epoch(fake_vertex):
    job = tune(fake_vertex)  # 16 examples, batch 8: 2 steps an epoch
    fake_vertex.advance(10 * fake_vertex.step_seconds)
    job = get(fake_vertex, job.name)
    assert job.state.value == "JOB_STATE_SUCCEEDED"
    rows = read(fake_vertex, job.experiment)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"step", "train_loss", "eval_loss", "token_accuracy", "eval_token_accuracy"}
    assert [r["eval_loss"] is not None for r in rows] == [False, True, False, True]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and 0 < rows[0]["token_accuracy"] < rows[-1]["token_accuracy"]
    assert all(isinstance(r["train_loss"], float) for r in rows)
    # the same numbers as the service's own time series, read by aiplatform elsewhere
    series = fake_vertex.job(job.name).metrics(fake_vertex.now())
    assert [r["train_loss"] for r in rows] == [v for _, _, v in series["/train_total_loss"]]
    reads = [r for r in fake_vertex.requests if r.path.endswith(":read")]
    assert len(reads) == 5 - 1  # each series whole; num_predictions is not asked for
    assert all(r.query == {"maxDataPoints": ["-1"]} for r in reads)
    # read again (as a monitor refreshing the job does): the series are known, only they are read
    before = len(fake_vertex.requests)
    assert read(fake_vertex, job.experiment) == rows
    assert [r.path.endswith(":read") for r in fake_vertex.requests[before:]] == [True] * 4


def test_the_experiment_id_alone_and_an_open_model_without_validation(fake_vertex):
    job = tune(fake_vertex, validation=False, base="qwen/qwen3@qwen3-4b", epochs=1)
    fake_vertex.advance(10 * fake_vertex.step_seconds)
    job = get(fake_vertex, job.name)
    rows = read(fake_vertex, job.experiment.rsplit("/", 1)[1])
    assert [(r["step"], r["eval_loss"]) for r in rows] == [(1, None), (2, None)]
    assert "eval_token_accuracy" not in rows[0]


def test_a_running_job_has_the_steps_logged_so_far(fake_vertex):
    fake_vertex.next_outcome("running")
    job = tune(fake_vertex, epochs=4)  # 8 steps
    fake_vertex.advance(3 * fake_vertex.step_seconds)  # tuning has just begun
    client = fake_vertex.genai_client()
    experiment = client.tunings.get(name=job.name).experiment
    assert read(fake_vertex, experiment) == []
    fake_vertex.advance(0.15 * fake_vertex.step_seconds)  # the first step: no eval series yet
    assert [(r["step"], r["eval_loss"]) for r in read(fake_vertex, experiment)] == [(1, None)]
    fake_vertex.advance(10 * fake_vertex.step_seconds)  # a held job stops at half its steps
    rows = read(fake_vertex, experiment)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["eval_loss"] is not None for r in rows] == [False, True, False, True]  # found once they appear


def test_a_job_of_more_than_a_thousand_steps_gives_every_step_in_order(fake_vertex):
    fake_vertex.metrics_every = 1  # a point at every step
    job = tune(fake_vertex, epochs=600)  # 16 examples, batch 8: 1,200 steps
    fake_vertex.advance(10 * fake_vertex.step_seconds)
    job = get(fake_vertex, job.name)
    assert job.state.value == "JOB_STATE_SUCCEEDED"
    rows = read(fake_vertex, job.experiment)
    assert [r["step"] for r in rows] == list(range(1, 1201))
    series = fake_vertex.job(job.name).metrics(fake_vertex.now(), every=1)
    assert [r["train_loss"] for r in rows] == [v for _, _, v in series["/train_total_loss"]]
    accuracy = series["/train_fraction_of_correct_next_step_preds"]
    assert [r["token_accuracy"] for r in rows] == [v for _, _, v in accuracy]
    assert [r["step"] for r in rows if r["eval_loss"] is not None] == list(range(2, 1201, 2))  # each epoch's end


def test_the_fake_returns_at_most_a_thousand_points_of_a_series_unless_all_are_asked_for(fake_vertex):
    from google.auth.transport.requests import AuthorizedSession

    fake_vertex.metrics_every = 1
    fake_vertex.tensorboard_names = "experiment"  # the TensorBoard experiment is named after the context
    job = tune(fake_vertex, epochs=600, validation=False)
    fake_vertex.advance(10 * fake_vertex.step_seconds)
    experiment = get(fake_vertex, job.name).experiment
    session = AuthorizedSession(fake_vertex.credentials())
    base = f"{fake_vertex.url}/v1"
    tensorboard = session.get(f"{base}/{experiment}").json()["metadata"]["backing_tensorboard_resource"]
    run = session.get(f"{base}/{tensorboard}/experiments/{experiment.rsplit('/', 1)[1]}/runs").json()
    listed = session.get(f"{base}/{run['tensorboardRuns'][0]['name']}/timeSeries").json()["tensorboardTimeSeries"]
    loss = next(s["name"] for s in listed if s["displayName"] == "/train_total_loss")

    def steps(answer):
        assert answer.status_code == 200, answer.text
        data = answer.json()["timeSeriesData"]
        return [int(p["step"]) for p in (data[0] if isinstance(data, list) else data)["values"]]

    sampled = steps(session.get(f"{base}/{tensorboard}:batchRead", params={"timeSeries": [loss]}))
    assert len(sampled) == 1000 and sampled == sorted(sampled) and set(sampled) < set(range(1, 1201))
    assert len(steps(session.get(f"{base}/{loss}:read"))) == 1000  # the default is the same
    assert len(steps(session.get(f"{base}/{loss}:read", params={"maxDataPoints": 50}))) == 50
    assert steps(session.get(f"{base}/{loss}:read", params={"maxDataPoints": -1})) == list(range(1, 1201))
    assert session.get(f"{base}/{loss}:read", params={"maxDataPoints": 20000}).status_code == 400
    session.close()


def test_no_experiment_yet_or_an_unknown_one_gives_nothing(fake_vertex):
    job = tune(fake_vertex)
    assert get(fake_vertex, job.name).experiment is None
    missing = "projects/123456789012/locations/us-central1/metadataStores/default/contexts/tuning-experiment-1"
    assert read(fake_vertex, missing) == []
    assert read(fake_vertex, "tuning-experiment-" + job.name.rsplit("/", 1)[1]) == []  # not started yet


def test_api_errors_are_raised_as_google_api_core_exceptions(fake_vertex):
    from google.api_core import exceptions

    job = tune(fake_vertex)
    fake_vertex.advance(10 * fake_vertex.step_seconds)
    experiment = get(fake_vertex, job.name).experiment
    fake_vertex.deny("aiplatform.tensorboardTimeSeries.read")
    with pytest.raises(exceptions.Forbidden, match="aiplatform.tensorboardTimeSeries.read") as info:
        read(fake_vertex, experiment)
    assert info.value.code == 403
    assert [r.path.split("/")[-1] for r in fake_vertex.requests[-2:]] == [
        experiment.rsplit("/")[-1] + "-" + experiment.rsplit("/")[-1].replace("experiment", "experiment-run")
        + "-tb-run", "timeSeries"]  # fmt: skip


def test_the_tensorboard_run_is_found_through_the_experiment_runs_artifact_as_aiplatform_finds_it(fake_vertex):
    job = tune(fake_vertex)
    fake_vertex.advance(10 * fake_vertex.step_seconds)
    experiment = get(fake_vertex, job.name).experiment
    rows = read(fake_vertex, experiment)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    paths = [r.path.split("/v1/", 1)[1] for r in fake_vertex.requests if "/metadataStores/" in r.path]
    run_context = f"{experiment}-{experiment.rsplit('/', 1)[1].replace('experiment', 'experiment-run')}"
    assert paths == [experiment, experiment.rsplit("/", 1)[0], run_context.replace("/contexts/", "/artifacts/")
                     + "-tb-run"]  # fmt: skip
    listed = next(r for r in fake_vertex.requests if r.path.endswith("/contexts"))
    assert listed.query["filter"] == [f'schema_title="system.ExperimentRun" AND parent_contexts:"{experiment}"']
    tensorboard_run = next(r.path for r in fake_vertex.requests if r.path.endswith("/timeSeries"))
    assert "/experiments/tuning-experiment-" not in tensorboard_run  # not where the experiment's id would lead


def test_a_job_without_the_artifact_is_read_where_the_experiments_name_leads(fake_vertex):
    fake_vertex.tensorboard_names = "experiment"  # TensorBoard named after the experiment; no -tb-run artifact
    job = tune(fake_vertex)
    fake_vertex.advance(10 * fake_vertex.step_seconds)
    experiment = get(fake_vertex, job.name).experiment
    assert [r["step"] for r in read(fake_vertex, experiment)] == [1, 2, 3, 4]
    assert any(r.path.endswith(f"/experiments/{experiment.rsplit('/', 1)[1]}/runs") for r in fake_vertex.requests)


def test_no_curve_found_is_said_in_one_line(fake_vertex):
    missing = "projects/123456789012/locations/us-central1/metadataStores/default/contexts/tuning-experiment-1"
    found = read_with_note(fake_vertex, missing)
    assert found.rows == [] and found.note == "no loss curve yet: the job's experiment tuning-experiment-1 does not " \
                                              "exist yet"
    fake_vertex.next_outcome("running")
    job = tune(fake_vertex, epochs=4)  # 8 steps
    fake_vertex.advance(3 * fake_vertex.step_seconds)  # tuning has just begun: a run, no series yet
    found = read_with_note(fake_vertex, get(fake_vertex, job.name).experiment)
    assert found.rows == [] and found.note.startswith("no loss curve (yet): the TensorBoard run of experiment ")
    fake_vertex.advance(0.15 * fake_vertex.step_seconds)
    found = read_with_note(fake_vertex, get(fake_vertex, job.name).experiment)
    assert [r["step"] for r in found.rows] == [1] and found.note is None


def test_importing_the_module_imports_nothing_from_google():
    # 'google' and 'google.cloud' may already be there: namespace packages set up by .pth files at startup
    code = ("import sys; before = set(sys.modules); import tuning_magics.backends.vertex.metrics; "
            "print(sorted(n for n in set(sys.modules) - before if n.split('.')[0] == 'google'))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
