"""Metrics beyond ``job.metrics()``: TensorBoard event files in the job folder, and MLflow runs.

The event files are read back with TensorBoard's own reader, and the MLflow runs
from a local file store, and both must hold exactly what ``job.metrics()`` holds.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pytest

import tuning_magics as tm
from tuning_magics import tracking
from tuning_magics.backends.local.metrics import METRICS_FILE, MetricsWriter, read_metrics
from tuning_magics.config import Settings, settings
from tuning_magics.errors import UserError
from tuning_magics.jobs import (
    JOB_STATE_FAILED,
    JOB_STATE_RUNNING,
    JOB_STATE_SUCCEEDED,
    Job,
    JobInfo,
    metrics_frame,
)
from test_local_jobs import _shared_models, home  # noqa: F401  (a fresh registry, the tiny model shared)

MODEL = "local/tiny-qwen3"


# -- helpers ---------------------------------------------------------------------------------


def tensorboard_scalars(logdir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{run: {tag: [(step, value), ...]}} as TensorBoard itself reads the job's tensorboard/ folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for run in sorted(p for p in Path(logdir).iterdir() if p.is_dir()):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        out[run.name] = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return out


def expected_from_frame(frame) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """The same shape, built from ``job.metrics()`` with the tracking module's naming."""
    out: dict[str, dict[str, list]] = {}
    for _, row in frame.iterrows():
        values = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
        for run, scalars in tracking.tensorboard_scalars(values).items():
            for tag, value in scalars.items():
                out.setdefault(run, {}).setdefault(tag, []).append((int(row["step"]), value))
    return out


def assert_same(got, expected) -> None:
    assert got.keys() == expected.keys()
    for run in expected:
        assert got[run].keys() == expected[run].keys(), run
        for tag, points in expected[run].items():
            assert [s for s, _ in got[run][tag]] == [s for s, _ in points], (run, tag)
            # simple_value is a float32
            assert [v for _, v in got[run][tag]] == pytest.approx([v for _, v in points], rel=1e-6), (run, tag)


def train_row(step: int) -> dict:
    return {"step": step, "epoch": step / 4, "train_loss": 2.0 / step, "learning_rate": 1e-4 * (1 - step / 10),
            "token_accuracy": 0.1 * step, "tokens_per_second": 1000.0 + step, "padding_share": 0.25,
            "grad_norm": 1.5}


def eval_row(step: int) -> dict:
    return {"step": step, "epoch": step / 4, "eval_loss": 3.0 / step, "eval_token_accuracy": 0.05 * step}


def write_rows(folder: Path, steps, *, keep_until_step=None, evals=(2, 4, 6, 8)) -> None:
    writer = MetricsWriter(folder, keep_until_step=keep_until_step)
    for step in steps:
        writer.write(train_row(step))
        if step in evals:
            writer.write(eval_row(step))
    writer.close()


class MemoryJob(Job):
    """A job that lives in memory: only the Job interface, as any backend provides it."""

    backend = "memory"

    def __init__(self, rows, state=JOB_STATE_SUCCEEDED, name="projects/p/locations/l/tuningJobs/123"):
        self.rows = rows
        self.fetches = 0
        self._state = state
        self._name = name
        super().__init__(None)

    def _fetch(self) -> JobInfo:
        self.fetches += 1
        return JobInfo(
            name=self._name, state=self._state, display_name="my-run",
            config={"base_model": "gemini-2.5-flash", "epochs": 3, "learning_rate_multiplier": 1.0,
                    "options": {"batch_size": 4, "note": None}, "labels": {"team": "nlp"},
                    "predicted_stats": {"examples": 10, "billable_tokens": 1234}},
            output_uri="gs://bucket/out", created=datetime(2025, 1, 1, tzinfo=timezone.utc),
            ended=datetime(2025, 1, 1, 1, tzinfo=timezone.utc), data_stats={"examples": 10, "billable_tokens": 1200},
        )

    def cancel(self):
        return self

    def resume(self):
        return self

    def metrics(self):
        return metrics_frame(self.rows)

    @property
    def checkpoints(self):
        return []


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A local MLflow file store for this test only."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database unless told
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    tracking._LOGGED.clear()
    yield mlflow
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)
    tracking._LOGGED.clear()


@pytest.fixture
def mlflow_on():
    settings.update(mlflow="true")
    yield
    settings.update(mlflow=None)


def all_runs(mlflow):
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def metric_history(mlflow, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in run.data.metrics}


def expected_history(frame) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for column in frame.columns:
        if column == "step":
            continue
        for step, value in zip(frame["step"], frame[column]):
            if value == value:
                out.setdefault(column, []).append((int(step), float(value)))
    return out


# -- TensorBoard: the format -------------------------------------------------------------------


def test_crc32c_matches_the_standard_check_value():
    assert tracking._crc32c_python(b"123456789") == 0xE3069283
    assert tracking.crc32c(b"123456789") == 0xE3069283
    assert tracking._crc32c_python(b"") == 0


def test_metric_rows_become_train_and_eval_runs_sharing_tags():
    scalars = tracking.tensorboard_scalars({**train_row(2), "event": "metrics", "note": "text", "flag": True})
    assert scalars == {"train": {"loss": 1.0, "learning_rate": pytest.approx(8e-5), "token_accuracy": 0.2,
                                 "tokens_per_second": 1002.0, "padding_share": 0.25, "grad_norm": 1.5}}
    assert tracking.tensorboard_scalars(eval_row(2)) == {"eval": {"loss": 1.5, "token_accuracy": 0.1}}


def test_tensorboard_reads_back_what_the_metrics_writer_wrote(tmp_path):
    write_rows(tmp_path, range(1, 9))
    files = sorted((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert [f.parent.name for f in files] == ["eval", "train"]
    assert_same(tensorboard_scalars(tmp_path / "tensorboard"), expected_from_frame(metrics_frame(read_metrics(tmp_path))))
    # The first event of each file is its version, as TensorBoard expects.
    from tensorboard.backend.event_processing import event_file_loader

    for f in files:
        events = list(event_file_loader.EventFileLoader(str(f)).Load())
        assert events[0].file_version == "brain.Event:2"
        assert all(e.wall_time > 1e9 for e in events)


def test_event_files_are_flushed_as_each_row_is_written(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(train_row(1))
    writer.write(eval_row(1))
    got = tensorboard_scalars(tmp_path / "tensorboard")  # while the writer is still open
    assert got["train"]["loss"] == [(1, 2.0)] and got["eval"]["loss"] == [(1, 3.0)]
    writer.close()


def test_a_resumed_job_keeps_its_steps_once(tmp_path):
    write_rows(tmp_path, range(1, 7))  # the first attempt reached step 6; its last checkpoint is step 4
    write_rows(tmp_path, range(5, 9), keep_until_step=4)  # the second attempt goes on from step 4
    got = tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in got["train"]["loss"]] == list(range(1, 9))
    assert [s for s, _ in got["eval"]["loss"]] == [2, 4, 6, 8]
    assert_same(got, expected_from_frame(metrics_frame(read_metrics(tmp_path))))
    # One event file per run: the earlier attempt's events were carried into the new one.
    assert len(list((tmp_path / "tensorboard" / "train").iterdir())) == 1


def test_a_file_cut_short_by_a_killed_worker_is_carried_up_to_its_last_whole_record(tmp_path):
    write_rows(tmp_path, range(1, 5))
    train_file = next((tmp_path / "tensorboard" / "train").iterdir())
    data = train_file.read_bytes()
    train_file.write_bytes(data[:-7])  # the last record, half written
    write_rows(tmp_path, range(4, 7), keep_until_step=3)
    got = tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in got["train"]["loss"]] == [1, 2, 3, 4, 5, 6]


def test_a_fresh_start_clears_the_old_event_files(tmp_path):
    write_rows(tmp_path, range(1, 7))
    write_rows(tmp_path, range(1, 3), evals=())
    got = tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in got["train"]["loss"]] == [1, 2]
    assert got.get("eval", {}) == {}


def test_a_removed_job_folder_is_not_made_again(tmp_path):
    import shutil

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    writer = MetricsWriter(job_dir)
    writer.write(train_row(1))
    shutil.rmtree(job_dir)
    with pytest.raises(FileNotFoundError):
        writer.write(train_row(2))
    with pytest.raises(FileNotFoundError):
        writer.tensorboard.write(eval_row(2))  # the eval run's folder would need the vanished job folder
    assert not job_dir.exists()
    writer.close()


# -- MLflow ---------------------------------------------------------------------------------------


def rows_for_memory_job():
    rows = []
    for step in range(1, 9):
        rows.append(train_row(step))
        if step % 4 == 0:
            rows.append(eval_row(step))
    return rows


def test_log_to_mlflow_copies_params_metrics_data_stats_and_tags(mlflow_store):
    mlflow = mlflow_store
    job = MemoryJob(rows_for_memory_job())
    run_id = tm.log_to_mlflow(job, experiment="tuning", run_name="lr-1")
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "lr-1"
    assert mlflow.MlflowClient().get_experiment(run.info.experiment_id).name == "tuning"
    params = run.data.params
    assert params["base_model"] == "gemini-2.5-flash" and params["epochs"] == "3"
    assert params["options.batch_size"] == "4" and params["labels.team"] == "nlp"
    assert "options.note" not in params and not any(k.startswith("predicted_stats") for k in params)
    tags = run.data.tags
    assert tags["tuning_magics.backend"] == "memory"
    assert tags["tuning_magics.base_model"] == "gemini-2.5-flash"
    assert tags["tuning_magics.job_name"] == job.name and tags["tuning_magics.job_id"] == "123"
    assert tags["tuning_magics.state"] == JOB_STATE_SUCCEEDED

    history = metric_history(mlflow, run_id)
    data = {k: history.pop(k) for k in list(history) if k.startswith("data.")}
    assert history == expected_history(job.metrics())
    assert data == {"data.examples.predicted": [(0, 10.0)], "data.examples.service": [(0, 10.0)],
                    "data.billable_tokens.predicted": [(0, 1234.0)], "data.billable_tokens.service": [(0, 1200.0)]}


def test_a_failed_job_ends_its_run_failed_and_a_users_run_becomes_the_parent(mlflow_store):
    mlflow = mlflow_store
    with mlflow.start_run() as parent:
        run_id = tm.log_to_mlflow(MemoryJob([], state=JOB_STATE_FAILED))
        assert mlflow.active_run().info.run_id == parent.info.run_id  # the user's run is active again
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.metrics.keys() <= {k for k in run.data.metrics if k.startswith("data.")}


def test_without_mlflow_the_error_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(UserError) as info:
        tm.log_to_mlflow(MemoryJob([]))
    assert "pip install mlflow" in str(info.value) and "\n" not in str(info.value)


def test_importing_tuning_magics_does_not_import_mlflow_or_tensorboard():
    code = ("import sys, tuning_magics; tuning_magics.log_to_mlflow; "
            "import tuning_magics.backends.local.metrics; "
            "print([m for m in ('mlflow', 'tensorboard') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
def tracking_server_down(mlflow_store, monkeypatch):
    """MLflow pointed at 127.0.0.1 ports where no tracking server answers: (mlflow, closed uri, silent uri).

    The closed port refuses connections; the silent one takes them and never answers.
    MLflow's own retry settings are left unset, as a user's would be.
    """
    import socket

    for name in tracking._HTTP_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections queue in the backlog; nothing ever reads them
    yield mlflow_store, f"http://127.0.0.1:{closed_port}", f"http://127.0.0.1:{silent.getsockname()[1]}"
    silent.close()


def test_a_tracking_server_that_is_down_costs_wait_seconds_and_one_warning(tracking_server_down, mlflow_on):
    mlflow, closed, _ = tracking_server_down
    mlflow.set_tracking_uri(closed)
    job = MemoryJob(rows_for_memory_job())
    start = time.monotonic()
    with pytest.warns(UserWarning) as caught:
        assert job.wait() is job
    assert time.monotonic() - start < 30  # MLflow's own retries took about 250 s
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"job 123 was not logged to MLflow at {closed} (connection refused")
    assert "\n" not in message and "MLFLOW_TRACKING_URI" in message and "start the tracking server" in message
    assert caught[0].filename == __file__
    assert not any(name in os.environ for name in tracking._HTTP_BOUNDS)  # set for our calls only


@pytest.mark.parametrize("server", ["closed", "silent"])
def test_log_to_mlflow_with_the_server_down_is_one_line_naming_the_uri(tracking_server_down, server):
    mlflow, closed, silent = tracking_server_down
    uri = closed if server == "closed" else silent
    mlflow.set_tracking_uri(uri)
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        tm.log_to_mlflow(MemoryJob(rows_for_memory_job()))
    assert time.monotonic() - start < 30
    message = str(info.value)
    why = "connection refused" if server == "closed" else "it did not answer in time"
    assert message.startswith(f"job 123 was not logged to MLflow at {uri} ({why}")
    assert "\n" not in message and "MLFLOW_TRACKING_URI" in message and info.value.field == "mlflow"
    assert mlflow.active_run() is None


def test_retry_settings_the_user_chose_are_kept(tracking_server_down, monkeypatch):
    mlflow, closed, _ = tracking_server_down
    mlflow.set_tracking_uri(closed)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    seen = {}
    real = tracking._tracking_error

    def spy(mlflow, job, exc):
        seen.update({name: os.environ.get(name) for name in tracking._HTTP_BOUNDS})
        return real(mlflow, job, exc)

    monkeypatch.setattr(tracking, "_tracking_error", spy)
    with pytest.raises(UserError):
        tm.log_to_mlflow(MemoryJob([]))
    assert seen == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


# -- the mlflow setting ---------------------------------------------------------------------------


def test_the_mlflow_setting_is_true_or_false_text(tmp_path, monkeypatch):
    s = Settings(_start=tmp_path)
    assert s.mlflow == "false"
    s.update(mlflow="TRUE")
    assert s.mlflow == "true"
    for bad in ("yes", 1):
        with pytest.raises(UserError) as info:
            s.update(mlflow=bad)
        assert info.value.field == "mlflow" and '"true" or "false"' in str(info.value)
    s.update(mlflow=False)  # a boolean is taken as what it says, as pyproject.toml's `mlflow = false` is
    assert s.mlflow == "false"
    (tmp_path / "pyproject.toml").write_text('[tool.tuning_magics]\nmlflow = "true"\n', encoding="utf-8")
    assert Settings(_start=tmp_path).mlflow == "true"
    assert "mlflow" in Settings(_start=tmp_path).describe()


def test_wait_logs_an_ended_job_once_with_the_setting(mlflow_store, mlflow_on):
    mlflow = mlflow_store
    job = MemoryJob(rows_for_memory_job())
    job.wait()
    job.wait()
    runs = all_runs(mlflow)
    assert len(runs) == 1
    assert metric_history(mlflow, runs[0].info.run_id)["train_loss"] == expected_history(job.metrics())["train_loss"]
    tracking._LOGGED.clear()  # as after a kernel restart: the run in MLflow is found instead
    MemoryJob(rows_for_memory_job()).wait()
    assert len(all_runs(mlflow)) == 1
    other = MemoryJob(rows_for_memory_job(), name="projects/p/locations/l/tuningJobs/456")
    other.wait()
    assert len(all_runs(mlflow)) == 2


def test_wait_logs_nothing_without_the_setting(mlflow_store):
    MemoryJob(rows_for_memory_job()).wait()
    assert all_runs(mlflow_store) == []


def test_a_logging_failure_is_a_one_line_warning_and_wait_still_returns(mlflow_store, mlflow_on, monkeypatch):
    def broken(job, **kwargs):
        raise RuntimeError("tracking server said no\nwith details")

    monkeypatch.setattr(tracking, "log_to_mlflow", broken)
    job = MemoryJob([], state=JOB_STATE_FAILED)
    with pytest.warns(UserWarning) as caught:
        assert job.wait() is job
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message == "job 123 was not logged to MLflow: tracking server said no"
    assert caught[0].filename == __file__  # pointed at the caller of wait()


def test_wait_on_a_job_that_has_not_ended_logs_nothing(mlflow_store, mlflow_on):
    job = MemoryJob([], state=JOB_STATE_RUNNING)
    with pytest.raises(TimeoutError):
        job.wait(timeout=0.01, poll=0.01)
    assert all_runs(mlflow_store) == []


def test_without_mlflow_the_setting_warns_once_per_job(monkeypatch, mlflow_on):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    tracking._LOGGED.clear()
    job = MemoryJob([])
    with pytest.warns(UserWarning, match="pip install mlflow"):
        job.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        job.wait()
    tracking._LOGGED.clear()


# -- a real local job ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_local_job_writes_tensorboard_files_and_is_logged_to_mlflow(home, mlflow_store, mlflow_on):
    # home: a registry of its own, so no job an earlier test left behind holds the one slot.
    mlflow = mlflow_store
    train = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(8)]
    validation = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(20, 24)]
    job = tm.tune(MODEL, train, validation_dataset=validation, epochs=2, batch_size=2,
                  tuned_model_display_name="tracked")
    try:
        job.wait(timeout=240)
    finally:
        job.cancel()  # never leave a worker holding the slot the later tests and notebooks queue for
    assert job.state == JOB_STATE_SUCCEEDED, job.error
    frame = job.metrics()
    assert len(frame) == 8 and frame["eval_loss"].notna().any()

    job_dir = Path(job.output_uri)
    assert (job_dir / METRICS_FILE).is_file()
    files = sorted((job_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert {f.parent.name for f in files} == {"train", "eval"}
    got = tensorboard_scalars(job_dir / "tensorboard")
    assert_same(got, expected_from_frame(frame))
    for tag in ("loss", "token_accuracy", "learning_rate", "tokens_per_second"):
        assert [s for s, _ in got["train"][tag]] == list(range(1, 9)), tag
    assert {"loss", "token_accuracy"} <= got["eval"].keys()

    # The setting logged the job when wait() saw it end; the run's history is job.metrics().
    (run,) = all_runs(mlflow)
    assert run.data.tags["tuning_magics.backend"] == "local"
    assert run.data.tags["tuning_magics.base_model"] == job.config["base_model"]
    assert run.data.params["epochs"] == "2"
    history = metric_history(mlflow, run.info.run_id)
    assert {k: v for k, v in history.items() if not k.startswith("data.")} == expected_history(frame)

    run_id = tm.log_to_mlflow(job, experiment="by-hand")
    assert metric_history(mlflow, run_id) == history
