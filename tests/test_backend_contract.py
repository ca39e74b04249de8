"""The one contract every backend answers, run against each: local (real training), Vertex AI (the real SDKs
against the fake service) and a toy backend another package registers through the entry-point group.

A new backend is proven by adding a case here; nothing else in the package changes for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd
import pytest

import tuning_magics as tm
from tuning_magics import backends, catalog
from tuning_magics.errors import UserError
from tuning_magics.jobs import METRIC_COLUMNS, DryRun, Job

pytestmark = pytest.mark.slow  # the local case trains a tiny model in a worker process

FRAME = pd.DataFrame({"question": [f"What is the capital of land {i}?" for i in range(8)],
                      "answer": [f"City {i}." for i in range(8)]})  # fmt: skip


@dataclass
class Case:
    backend: backends.Backend
    model: str  # a model it tunes
    refused: str  # a model it cannot tune
    finish: Callable[[Job], Job]  # drive a job to its end
    options: dict  # tune() keywords that make the job small


@pytest.fixture
def toy_registered(tmp_path, monkeypatch):
    """The toy backend installed as a package would be: a dist-info folder with an entry point on sys.path."""
    dist = tmp_path / "site" / "toy_tuning-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-tuning\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{backends.ENTRY_POINT_GROUP}]\ntoy = toy_backend:ToyBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    backends.refresh()
    yield
    monkeypatch.undo()
    backends.refresh()


@pytest.fixture(params=["local", "vertex", "toy"])
def case(request, tmp_path, monkeypatch, toy_registered):
    if request.param == "local":
        home = request.getfixturevalue("home")  # test_local_jobs: a fresh registry, the tiny model shared
        assert home.exists()
        for var in ("GOOGLE_CLOUD_PROJECT", "TUNING_MAGICS_BACKEND"):
            monkeypatch.delenv(var, raising=False)
        return Case(backends.get("local"), "local/tiny-qwen3", "gemini-2.5-flash",
                    lambda job: job.wait(timeout=240), {"epochs": 1, "batch_size": 4})
    if request.param == "vertex":
        fake = request.getfixturevalue("vertex")
        from test_vertex_backend import walk

        def finish(job):
            walk(fake, job, limit=60)
            return job

        return Case(backends.get("vertex"), "qwen3-4b", "local/tiny-qwen3", finish, {"epochs": 1})
    for var in ("GOOGLE_CLOUD_PROJECT", "TUNING_MAGICS_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    return Case(backends.get("toy"), "qwen3-4b", "gemini-2.5-flash", lambda job: job.wait(poll=0), {"epochs": 1})


from test_local_jobs import _shared_models, home  # noqa: E402,F401  (fixtures of the local case)


def test_the_registry_finds_it_by_name_and_it_runs_here(case):
    assert case.backend.name in backends.names()
    assert backends.get(case.backend.name) is case.backend
    assert case.backend.unavailable() is None
    assert isinstance(case.backend.title, str) and case.backend.title


def test_it_says_which_models_it_tunes_and_refuses_the_others_in_one_line(case):
    assert case.backend.can_tune(catalog.get(case.model))
    refused = case.backend.refusal(catalog.get(case.refused))
    assert isinstance(refused, UserError) and "\n" not in str(refused) and refused.field
    with pytest.raises(UserError) as info:
        tm.tune(case.refused, FRAME, backend=case.backend.name, **case.options)
    assert str(info.value) == str(refused)


def test_its_engine_options_have_rules_that_refuse_a_bad_value_in_one_line(case):
    options = case.backend.engine_options()
    assert options and all(isinstance(k, str) and callable(rule) for k, rule in options.items())
    for name, rule in options.items():
        with pytest.raises(UserError) as info:
            rule(name, ["not", "a", "value"])
        assert name in str(info.value) and "\n" not in str(info.value)
    assert set(options) <= set(backends.engine_options())  # the magics' did-you-mean knows them


def test_a_dry_run_checks_and_sends_nothing(case):
    before = [j.name for j in case.backend.find()]
    plan = tm.tune(case.model, FRAME, backend=case.backend.name, dry_run=True, **case.options)
    assert isinstance(plan, DryRun) and plan.backend == case.backend.name and plan.model == catalog.get(case.model).id
    assert [j.name for j in case.backend.find()] == before
    with pytest.raises(UserError) as info:
        tm.tune(case.model, FRAME, backend=case.backend.name, dry_run=True, no_such_option=1, **case.options)
    assert info.value.field == "no_such_option"


def test_a_job_is_submitted_found_listed_filtered_and_finished(case):
    job = tm.tune(case.model, FRAME, backend=case.backend.name, tuned_model_display_name="contract", **case.options)
    assert isinstance(job, Job) and job.backend == case.backend.name
    assert backends.owner(job.name) is case.backend
    assert tm.get_job(job.name).name == job.name
    assert job.name in [j.name for j in tm.list_jobs(backend=case.backend.name)]
    assert job.name in [j.name for j in tm.list_jobs()]  # every backend that lists jobs here is asked
    assert job.name in [j.name for j in case.backend.find(model=catalog.get(case.model).id.upper())]
    assert case.backend.find(model="no-model-is-called-this") == []
    assert job.name not in [j.name for j in case.backend.find(states={"JOB_STATE_EXPIRED"})]
    assert len(case.backend.find(limit=1)) == 1

    case.finish(job)
    assert job.state == "JOB_STATE_SUCCEEDED", job.error
    assert job.name in [j.name for j in tm.list_jobs(state="succeeded", backend=case.backend.name)]
    metrics = job.metrics()
    assert list(metrics.columns[: len(METRIC_COLUMNS)]) == list(METRIC_COLUMNS) and len(metrics)
    assert job.checkpoints and job.checkpoints[-1].name == "final" and job.tuned_model


def test_a_job_is_cancelled_through_its_backend(case):
    job = tm.tune(case.model, FRAME, backend=case.backend.name, **case.options)
    cancelled = case.backend.cancel(job.name)
    assert cancelled.name == job.name
    case.finish(cancelled)
    assert cancelled.state == "JOB_STATE_CANCELLED"
    assert tm.get_job(job.name).state == "JOB_STATE_CANCELLED"


def test_an_unknown_job_name_is_one_line(case):
    name = {"local": "tune-20200101-000000", "vertex": "projects/fake-project/locations/us-central1/tuningJobs/404",
            "toy": "toy-jobs/404"}[case.backend.name]
    assert backends.owner(name) is case.backend
    with pytest.raises(UserError) as info:
        tm.get_job(name)
    assert "\n" not in str(info.value)


def test_a_broken_third_party_backend_is_one_line_and_holds_up_no_other(tmp_path, monkeypatch):
    dist = tmp_path / "site" / "broken_tuning-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-tuning\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{backends.ENTRY_POINT_GROUP}]\nbroken = no_such_module:Backend\n"
                                           "local = no_such_module:TakesABuiltInName\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    backends.refresh()
    try:
        assert "broken" in backends.names()
        assert backends.get("local").name == "local"  # a built-in name cannot be taken
        with pytest.raises(UserError, match="backend 'broken' could not be loaded") as info:
            backends.get("broken")
        assert "\n" not in str(info.value)
        assert "broken" not in [b.name for b in backends.all_backends()]
        assert backends.choose(catalog.get("local/tiny-qwen3")).name == "local"
    finally:
        monkeypatch.undo()
        backends.refresh()


def test_the_readme_example_backend_works_as_written(tmp_path, monkeypatch):
    """The README's "Writing a backend" code, saved as a module and registered by its entry point, tunes a job."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Writing a backend", 1)[1].split("\n## ", 1)[0]
    code, toml = re.findall(r"```(?:python|toml)\n(.*?)```", section, re.S)[:2]
    site = tmp_path / "site"
    (site / "mycloud_tuning-1.0.dist-info").mkdir(parents=True)
    (site / "mycloud_tuning.py").write_text(code)
    (site / "mycloud_tuning-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mycloud-tuning\nVersion: 1.0\n")
    entry = "\n".join(line for line in toml.splitlines() if not line.startswith("#"))
    (site / "mycloud_tuning-1.0.dist-info" / "entry_points.txt").write_text(
        entry.replace('[project.entry-points."tuning_magics.backends"]', f"[{backends.ENTRY_POINT_GROUP}]")
        .replace('"', ""))
    monkeypatch.syspath_prepend(str(site))
    backends.refresh()
    try:
        job = tm.tune("qwen3-4b", FRAME, backend="mycloud", epochs=2)
        assert job.backend == "mycloud" and job.succeeded and job.tuned_model.startswith("mycloud://")
        assert tm.get_job(job.name).name == job.name
        assert job.name in [j.name for j in tm.list_jobs(backend="mycloud")]
        with pytest.raises(UserError, match="My Cloud cannot tune gemini-2.5-flash"):
            tm.tune("gemini-2.5-flash", FRAME, backend="mycloud")
    finally:
        monkeypatch.undo()
        backends.refresh()
