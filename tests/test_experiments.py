"""Picking between runs: ``%tune_jobs``' table and ``compare`` read alike, say "—" for what is missing,
never count a measured value (the duration) as a differing setting, and follow the notebook's theme.

The jobs are real records of the local registry, with the metrics files a run writes.
"""

from __future__ import annotations

import json
import time
from io import BytesIO
from pathlib import Path

import pytest

import tuning_magics as tm
from tuning_magics.display.compare import cell_text
from tuning_magics.display.jobs_table import JobsTable
from tuning_magics.experiments import jobs_frame

from test_monitor import fixed_colours

MODEL = "local/tiny-qwen3"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("TUNING_MAGICS_HOME", str(h))
    return h


def ended_job(job_id: str, folder: Path, *, train: list[float], evals: dict, seconds: float, lr: float = 1e-4,
              name: str | None = None, model: str | None = MODEL, state: str = "JOB_STATE_SUCCEEDED"):
    """A job of the local registry that ran ``seconds`` and recorded these losses."""
    from tuning_magics.backends.local import registry

    out = folder / job_id
    out.mkdir(parents=True)
    rows = [{"step": i + 1, "train_loss": loss} for i, loss in enumerate(train)]
    rows += [{"step": step, "eval_loss": loss} for step, loss in evals.items()]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    started = time.time() - 600
    config = {"base_model": model, "tuning_mode": "FULL", "method": "sft", "epochs": 1, "learning_rate": lr}
    registry.insert(registry.JobRecord(id=job_id, config=config, state=state, output_dir=str(out),
                                       created=started - 5, started=started, ended=started + seconds,
                                       display_name=name))
    return tm.get_job(job_id)


def test_compare_does_not_count_the_duration_as_a_differing_setting(home, tmp_path):
    a = ended_job("tune-a", tmp_path, train=[2.0, 1.5], evals={2: 1.4}, seconds=60)
    b = ended_job("tune-b", tmp_path, train=[2.0, 1.5], evals={2: 1.4}, seconds=47)
    result = tm.compare([a, b])
    assert result.table.loc["duration (s)"].tolist() == [60.0, 47.0]
    assert result.differs == [] and "0 of" in result._repr_html_()
    c = ended_job("tune-c", tmp_path, train=[2.0, 1.2], evals={2: 1.1}, seconds=51, lr=3e-4)
    result = tm.compare([a, b, c])
    assert result.differs == ["learning_rate", "best eval loss", "final train loss"]
    assert list(result.table.index[:3]) == result.differs  # the differences first, the duration with the rest


def test_the_jobs_table_says_a_dash_where_a_value_is_missing(home, tmp_path):
    # One job named, one not: pandas holds the missing name as NaN, which read "tune-a (nan)".
    jobs = [ended_job("tune-a", tmp_path, train=[2.0], evals={}, seconds=30, model=None),
            ended_job("tune-b", tmp_path, train=[2.0], evals={1: 1.5}, seconds=30, name="second")]
    table = JobsTable(jobs, jobs_frame(jobs))
    text = str(table)
    assert "nan" not in text and "None" not in text
    first, second = text.splitlines()[1:]
    assert first.split()[0] == "tune-a" and first.split()[2] == "—" and first.rstrip().endswith("—")
    assert second.startswith("tune-b (second)") and second.rstrip().endswith("1.5")
    html = table._repr_html_()
    assert "(nan)" not in html and "<td style='text-align:left'>—</td>" in html


def test_the_jobs_table_and_compare_write_numbers_alike(home, tmp_path):
    jobs = [ended_job("tune-a", tmp_path, train=[2.0, 1.23456], evals={2: 2.520719}, seconds=61, lr=3e-5)]
    table = JobsTable(jobs, jobs_frame(jobs))
    result = tm.compare(jobs)
    assert cell_text(result.table.loc["best eval loss"].iloc[0]) == "2.521"
    assert " 2.521" in str(table) and ">2.521<" in table._repr_html_()
    assert "2.521" in str(result) and "3e-05" in str(result) and "1.235" in str(result)
    assert [cell_text(v) for v in (None, float("nan"), 12345.6, 2048, 0.0003)] == ["—", "—", "12,346", "2048",
                                                                                   "0.0003"]


def test_the_jobs_table_and_compare_follow_the_theme(home, tmp_path):
    from PIL import Image

    jobs = [ended_job("tune-a", tmp_path, train=[2.0, 1.5], evals={2: 1.4}, seconds=60),
            ended_job("tune-b", tmp_path, train=[2.0], evals={}, seconds=5, state="JOB_STATE_FAILED"),
            ended_job("tune-c", tmp_path, train=[2.0], evals={}, seconds=5, state="JOB_STATE_CANCELLED")]
    html = JobsTable(jobs, jobs_frame(jobs))._repr_html_()
    assert fixed_colours(html) == []
    assert "tm-state tm-state-failed" in html and "tm-state tm-state-cancelled" in html
    result = tm.compare(jobs)
    assert fixed_colours(result._repr_html_()) == [] and "tm-compare" in result._repr_html_()
    picture = Image.open(BytesIO(result.figure_png))
    assert picture.mode == "RGBA" and picture.getpixel((1, 1))[3] == 0  # transparent: the page shows through
