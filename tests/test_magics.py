"""The magics through a real IPython shell: options, cell bodies, variables, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from tuning_magics.config import settings


@pytest.fixture()
def ip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", "TUNING_MAGICS_API_ENDPOINT", "TUNING_MAGICS_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "tuning_magics")
    shell.push({"df": pd.DataFrame({"q": ["What is 2+2?", "Capital of France?", "Colour of grass?"],
                                    "a": ["4", "Paris", "green"]})})
    settings.reset()
    yield shell
    settings.reset()
    for name in ("ds", "ds2", "job", "j", "j2", "run1", "plan", "queued", "base", "again", "picked", "records",
                 "val", "runs", "slow", "fast", "which", "frame", "lr", "team"):
        shell.user_ns.pop(name, None)


def test_load_ext_imports_no_heavy_package():
    code = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance(); ip.run_line_magic('load_ext', 'tuning_magics')\n"
        "import sys, json\n"
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'vertexai', 'google.genai',"
        " 'google.cloud.storage', 'matplotlib', 'pandas', 'peft') if m in sys.modules)))\n"
        "print(json.dumps(sorted(ip.magics_manager.magics['line'])))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert json.loads(out[0]) == []
    line_magics = set(json.loads(out[1]))
    assert {"dataset", "tuning_config", "tune_models", "tune", "tune_jobs", "tune_attach", "tune_compare",
            "tune_chat", "tune_eval", "tune_arena", "tune_export"} <= line_magics


def test_line_magic_writes_validated_jsonl_and_stores_variable(ip, tmp_path):
    ip.run_line_magic("dataset", "df --prompt q --completion a --out train.jsonl --as ds --system-prompt 'Be brief.'")
    ds = ip.user_ns["ds"]
    assert ds.examples == 3 and ds.report.ok
    lines = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert lines[1] == {"messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Capital of France?"},
                                     {"role": "assistant", "content": "Paris"}]}


def test_cell_magic_yaml_body_and_line_override(ip, tmp_path):
    ip.run_cell_magic("dataset", "--as ds2 --format prompt_completion",
                      "source: df\nprompt: q\ncompletion: a\nout: pc.jsonl\nformat: chat\nvalidation_split: 1\nseed: 3\n")
    ds = ip.user_ns["ds2"]
    assert ds.format == "prompt_completion"  # the line wins over the body
    assert ds.examples == 2 and ds.validation.examples == 1
    assert (tmp_path / "pc_validation.jsonl").exists()
    assert set(json.loads((tmp_path / "pc.jsonl").read_text().splitlines()[0])) == {"prompt", "completion"}


def test_user_mistakes_are_one_line_usage_errors(ip, tmp_path):
    with pytest.raises(UsageError, match=r"column 'qq' is not in the DataFrame; did you mean 'q'\?"):
        ip.run_line_magic("dataset", "df --prompt qq --completion a --out x.jsonl")
    with pytest.raises(UsageError, match="name 'nope' is not defined; run the cell that defines it first"):
        ip.run_line_magic("dataset", "nope --prompt q --completion a")
    with pytest.raises(UsageError, match="unknown option 'colour'"):
        ip.run_cell_magic("dataset", "df", "colour: red\n")
    with pytest.raises(UsageError, match="not valid YAML at line 2"):
        ip.run_cell_magic("dataset", "df", "prompt: q\n  completion: : a\n")
    assert not (tmp_path / "x.jsonl").exists()


def test_invalid_rows_stop_the_write_and_name_the_row(ip, tmp_path, capsys):
    ip.push({"bad": pd.DataFrame({"q": ["ok", "  "], "a": ["fine", "also"]}, index=["r1", "r2"])})
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("dataset", "bad --prompt q --completion a --out bad.jsonl")
    # The report shown above lists the error; the one line names the row and the fix without saying it again.
    assert str(info.value) == ("1 error in bad.jsonl, listed above (the first: row 'r2', column 'q'); nothing was "
                               "written: fix the data, or pass skip_invalid=True (--skip-invalid) to leave those "
                               "rows out")
    assert capsys.readouterr().out.count("row 'r2', column 'q': is blank") == 1
    assert list(tmp_path.iterdir()) == []


def test_an_unset_variable_in_a_dataset_path_is_one_line_and_makes_no_folder(ip, tmp_path):
    # IPython writes {VAR} into the line as the value's text: None becomes the folder name "None".
    ip.push({"BUCKET": None, "SUB": float("nan")})
    try:
        for line, shown in (
            ("df --prompt q --completion a --out {BUCKET}/x.jsonl",
             "out 'None/x.jsonl' starts with 'None': is the variable in {...} unset? set it, or give a path"),
            ("df --prompt q --completion a --out x.jsonl --split 1 --validation-out data/{SUB}/v.jsonl",
             "validation_out 'data/nan/v.jsonl' has a segment 'nan': is the variable in {...} unset? set it, "
             "or give a path"),
        ):
            result = ip.run_cell(f"%dataset {line}")
            assert isinstance(result.error_in_exec, UsageError) and str(result.error_in_exec) == shown
        assert list(tmp_path.iterdir()) == []
    finally:
        ip.user_ns.pop("BUCKET"), ip.user_ns.pop("SUB")


def test_an_invalid_dataset_shows_its_report_once_in_row_order(ip, tmp_path, capsys):
    rows = pd.DataFrame({"q": ["fine", "  ", 5, "ok", None], "a": ["x", "y", "z", "", "w"]})
    ip.push({"rows": rows})
    try:
        with pytest.raises(UsageError, match=r"^4 errors in rows\.jsonl, listed above \(the first: row 1, "):
            ip.run_line_magic("dataset", "rows --prompt q --completion a --out rows.jsonl")
    finally:
        ip.user_ns.pop("rows")
    shown = capsys.readouterr().out
    where = ["row 1, column 'q': ", "row 2, column 'q': ", "row 3, column 'a': ", "row 4, column 'q': "]
    assert [shown.count(w) for w in where] == [1, 1, 1, 1]
    assert [shown.index(w) for w in where] == sorted(shown.index(w) for w in where)
    assert "tokens (estimated) over the 1 valid row: total" in shown and "total 0," not in shown
    assert list(tmp_path.iterdir()) == []


def test_verbose_shows_the_real_exception(ip):
    from tuning_magics.errors import UserError

    with pytest.raises(UserError):
        ip.run_line_magic("dataset", "df --prompt qq --completion a --verbose")


def test_existing_file_is_kept(ip, tmp_path):
    (tmp_path / "keep.jsonl").write_text("precious\n")
    with pytest.raises(UsageError, match="keep.jsonl already exists; pass overwrite=True"):
        ip.run_line_magic("dataset", "df --prompt q --completion a --out keep.jsonl")
    assert (tmp_path / "keep.jsonl").read_text() == "precious\n"
    ip.run_line_magic("dataset", "df --prompt q --completion a --out keep.jsonl --overwrite")
    assert (tmp_path / "keep.jsonl").read_text().count("\n") == 3


def test_tuning_config_line_and_traitlets(ip, capsys):
    ip.run_line_magic("tuning_config", "location=europe-west4 staging_bucket=gs://my-bucket/tuning")
    assert settings.location == "europe-west4" and settings.staging_bucket == "gs://my-bucket/tuning"
    assert settings.backend == "auto"
    ip.run_cell("%config TuningMagics.project = 'my-proj'")
    assert settings.project == "my-proj" and settings.backend == "auto"
    capsys.readouterr()
    ip.run_line_magic("tuning_config", "")
    out = capsys.readouterr().out
    assert "my-proj" in out and "session" in out
    with pytest.raises(UsageError, match="backend must be one of auto, local, vertex"):
        ip.run_line_magic("tuning_config", "backend=cloud")
    with pytest.raises(UsageError, match="unknown setting 'zone'"):
        ip.run_line_magic("tuning_config", "zone=a")


def test_tune_models_filters(ip):
    table = ip.run_line_magic("tune_models", "--mode PEFT_ADAPTER --provider open")
    assert "qwen/qwen3@qwen3-32b" in set(table["model"])
    assert "qwen/qwen3@qwen3-4b" not in set(table["model"])  # FULL only
    assert (table["provider"] == "open").all()
    with pytest.raises(UsageError, match="--mode must be FULL or PEFT_ADAPTER"):
        ip.run_line_magic("tune_models", "--mode foo")
    with pytest.raises(UsageError, match="--provider must be one of gemini, local, open"):
        ip.run_line_magic("tune_models", "--provider aws")


def test_report_html_escapes_data(ip):
    ip.push({"evil": pd.DataFrame({"q": ["<script>alert(1)</script>"], "a": ["<b>bold</b>"]})})
    ip.run_line_magic("dataset", "evil --prompt q --completion a --out e.jsonl --as ds --model local/tiny-qwen3")
    html = ip.user_ns["ds"]._repr_html_()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "data:image/png;base64," in html  # the token histogram


@pytest.mark.parametrize(("magic", "line"), [
    ("dataset", "df --prompt 'q --completion a"),
    ("tuning_config", "project='x"),
    ("tune_models", "'x"),
    ("tune", "--model 'x"),
    ("tune_jobs", "--model 'x"),
    ("tune_attach", "'x"),
    ("tune_compare", "a 'x"),
    ("tune_chat", "'x"),
])
def test_an_unclosed_quote_is_one_line(ip, magic, line):
    with pytest.raises(UsageError) as info:
        ip.run_line_magic(magic, line)
    message = str(info.value)
    assert f"%{magic}: no closing quotation" in message and "close the quote" in message
    assert "\n" not in message


@pytest.mark.parametrize("split", ["inf", "1e400", "-0.5", "nan"])
def test_an_impossible_split_is_one_line_naming_the_option(ip, tmp_path, split):
    with pytest.raises(UsageError, match="validation_split must be a fraction") as info:
        ip.run_line_magic("dataset", f"df --prompt q --completion a --out s.jsonl --split {split}")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "s.jsonl").exists()


def test_a_split_that_is_not_a_number_is_one_line(ip):
    with pytest.raises(UsageError, match="'half' is not a number"):
        ip.run_line_magic("dataset", "df --prompt q --completion a --split half")


@pytest.mark.parametrize("name", ["1bad", "class", "my-ds", "a b"])
def test_as_needs_a_python_name(ip, tmp_path, name):
    with pytest.raises(UsageError, match="--as needs a Python variable name"):
        ip.run_cell_magic("dataset", f"df --as '{name}'", "prompt: q\ncompletion: a\nout: n.jsonl\n")
    assert name not in ip.user_ns
    assert not (tmp_path / "n.jsonl").exists()


def test_verbose_in_a_cell_body_takes_a_boolean(ip):
    with pytest.raises(UsageError, match="verbose must be true or false, not 'yes please'"):
        ip.run_cell_magic("dataset", "df", "prompt: q\ncompletion: a\nverbose: yes please\n")


def test_settings_object_survives_load_ext_and_imports():
    code = (
        "import tuning_magics as tm\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "InteractiveShell.instance().run_line_magic('load_ext', 'tuning_magics')\n"
        "import tuning_magics.config, tuning_magics.api\n"
        "tm.settings.update(location='europe-west4')\n"
        "print(tm.settings.location, tm.settings is tuning_magics.config.settings)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["europe-west4", "True"], out.stderr


def test_a_broken_pyproject_is_one_line_from_tuning_config(ip, tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.tuning_magics\nproject = \n")
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("tuning_config", "")
    message = str(info.value)
    assert str(tmp_path / "pyproject.toml") in message and "not valid TOML" in message
    assert "\n" not in message


def test_the_line_wins_over_the_bodys_source_and_as(ip, tmp_path):
    ip.push({"other": pd.DataFrame({"q": ["x"], "a": ["y"]})})
    ip.run_cell_magic("dataset", "df --as ds",
                      "source: other\nas: ignored\nprompt: q\ncompletion: a\nout: both.jsonl\n")
    assert ip.user_ns["ds"].examples == 3 and "ignored" not in ip.user_ns


# -- %%tune, %tune, %tune_jobs, %tune_attach, %tune_compare, %tune_chat ----------------------------

import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import tuning_magics as tm  # noqa: E402
from tuning_magics.jobs import JOB_STATE_CANCELLED, JOB_STATE_QUEUED, JOB_STATE_SUCCEEDED, DryRun, Job  # noqa: E402
from tuning_magics.magics import TuningMagics  # noqa: E402

MODEL = "local/tiny-qwen3"
RECORDS = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(8)]


@pytest.fixture()
def shown(monkeypatch):
    """What the magics display, in order (the objects themselves, not their rendering)."""
    out = []
    monkeypatch.setattr(TuningMagics, "_show", lambda self, obj: out.append(obj))
    return out


@pytest.fixture()
def jobs_home(tmp_path, monkeypatch):
    """A fresh local registry with one slot, taken by a live job of this process: submissions stay QUEUED."""
    from tuning_magics.backends.local import registry, scheduler

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("TUNING_MAGICS_HOME", str(home))
    monkeypatch.setenv(scheduler.CONCURRENCY_ENV, "1")
    import psutil

    (tmp_path / "busy").mkdir()
    registry.insert(registry.JobRecord(id="tune-busy", config={"base_model": MODEL}, state="JOB_STATE_RUNNING",
                                       output_dir=str(tmp_path / "busy"), created=time.time() - 3600,
                                       pid=os.getpid(), pid_started=psutil.Process().create_time(),
                                       started=time.time() - 3600))
    yield home
    for job in tm.list_jobs(state="QUEUED"):
        job.cancel()


def finished_job(job_id: str, folder: Path, *, lr: float, train: list[float], evals: dict, name=None,
                 model: str = MODEL, state: str = JOB_STATE_SUCCEEDED, age: float = 100.0) -> str:
    """A job of the local registry that ran and recorded these losses (no training needed to read it)."""
    from tuning_magics.backends.local import registry

    out = folder / job_id
    out.mkdir(parents=True)
    rows = [{"step": i + 1, "epoch": (i + 1) / len(train), "train_loss": loss} for i, loss in enumerate(train)]
    rows += [{"step": step, "epoch": step / len(train), "eval_loss": loss} for step, loss in evals.items()]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    now = time.time()
    config = {"base_model": model, "tuning_mode": "FULL", "method": "sft", "epochs": 1, "learning_rate": lr,
              "engine_options": {"batch_size": 2, "seed": 7}}
    registry.insert(registry.JobRecord(id=job_id, config=config, state=state, output_dir=str(out),
                                       created=now - age, started=now - age + 5, ended=now - age + 65,
                                       display_name=name))
    return job_id


def test_cell_tune_resolves_variables_and_submits_a_real_job(ip, jobs_home, shown):
    ip.push({"records": RECORDS, "val": RECORDS[:2], "lr": 0.001, "team": "search"})
    ip.run_cell_magic("tune", "run1 --backend local", (
        "model: local/tiny-qwen3\n"
        "data: $records\n"
        "validation_dataset: $val\n"
        "epochs: 2\n"
        "learning_rate: 1e-3\n"
        "tuned_model_display_name: lr-$lr\n"
        "description: costs $$0\n"
        "labels: {team: $team}\n"
        "batch_size: 2\n"
        "seed: 7\n"
    ))
    job = ip.user_ns["run1"]
    assert isinstance(job, Job) and shown == [job]
    assert job.state == JOB_STATE_QUEUED  # behind the busy slot: nothing trains
    cfg = job.config
    assert cfg["base_model"] == MODEL and cfg["epochs"] == 2 and cfg["learning_rate"] == 0.001
    assert cfg["engine_options"] == {"batch_size": 2, "seed": 7}
    assert cfg["train_dataset"] == "list of 8 records" and cfg["validation_dataset"] == "list of 2 records"
    assert cfg["labels"] == {"team": "search"} and cfg["description"] == "costs $0"
    assert job.display_name == "lr-0.001"
    assert tm.get_job("lr-0.001").id == job.id


def test_cell_tune_takes_dataset_and_dataframe_variables(ip, jobs_home, shown, tmp_path):
    ip.run_line_magic("dataset", "df --prompt q --completion a --out train.jsonl --as ds")
    ip.run_cell_magic("tune", "", "model: local/tiny-qwen3\ndata: $ds\ndescription: $ds.format rows\n")
    job = ip.user_ns["job"]  # the default variable
    assert shown[-1] is job and job.config["train_dataset"].endswith("train.jsonl")
    assert job.config["description"] == "chat rows"
    with pytest.raises(UsageError, match=r"key 'description': \$ds.colour: Dataset has no attribute 'colour'"):
        ip.run_cell_magic("tune", "", "model: local/tiny-qwen3\ndata: $ds\ndescription: $ds.colour\n")
    ip.push({"frame": pd.DataFrame({"prompt": ["a", "b"], "completion": ["c", "d"]})})
    ip.run_cell_magic("tune", "--as j2", "base_model: local/tiny-qwen3\ntrain_dataset: $frame\n")
    assert ip.user_ns["j2"].config["train_dataset"].startswith("DataFrame")


def test_dry_run_shows_what_would_be_submitted_and_submits_nothing(ip, jobs_home, shown, tmp_path):
    before = len(tm.list_jobs())
    ip.push({"records": RECORDS})
    ip.user_ns.pop("job", None)
    ip.run_cell_magic("tune", "--dry-run", "model: local/tiny-qwen3\ndata: $records\nepochs: 3\n")
    plan = shown[-1]
    assert isinstance(plan, DryRun) and plan.request["epochs"] == 3 and plan.billed_tokens > 0
    assert "job" not in ip.user_ns  # a dry run goes into a variable only when one is named
    assert "dry run on local: nothing was uploaded or submitted" in str(plan)
    ip.run_cell_magic("tune", "plan", "model: local/tiny-qwen3\ndata: $records\ndry_run: true\n")
    assert isinstance(ip.user_ns["plan"], DryRun)
    # Evaluation during tuning is a mapping in the body, its data a variable like any other.
    ip.run_cell_magic("tune", "--dry-run", "model: local/tiny-qwen3\ndata: $records\nevaluation:\n  data: $records\n"
                      "  metrics: exact_match, rouge_l\n  max_new_tokens: 32\n")
    assert shown[-1].request["evaluation"] == {"metrics": ["exact_match", "rouge_l"], "max_new_tokens": 32,
                                               "limit": 200, "data": f"list of {len(RECORDS)} records"}
    with pytest.raises(UsageError, match="evaluation: unknown key 'every'"):
        ip.run_cell_magic("tune", "--dry-run", "model: local/tiny-qwen3\ndata: $records\nevaluation:\n  every: 2\n")
    ip.run_line_magic("tune", "--model local/tiny-qwen3 --data $records --epochs 2 --dry-run")
    assert shown[-1].request["epochs"] == 2
    # Everything that takes effect is shown: what was given, and the engine's defaults for the rest.
    ip.run_cell_magic("tune", "--dry-run", "model: local/tiny-qwen3\ndata: $records\nlearning_rate_multiplier: 50\n"
                      f"output_uri: {tmp_path / 'out'}\ndisplay_name: fifty\ndescription: why\nlabels: {{team: a}}\n")
    plan = shown[-1]
    assert plan.request["learning_rate_multiplier"] == 50 and plan.request["output_uri"] == str(tmp_path / "out")
    assert plan.request["tuned_model_display_name"] == "fifty" and plan.request["description"] == "why"
    assert plan.request["labels"] == {"team": "a"}
    assert "epochs=3" in str(plan) and "learning_rate=0.15" in str(plan) and "batch_size=8" in str(plan)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="already holds files"):  # as submitting would say
        ip.run_line_magic("tune", f"--model local/tiny-qwen3 --data $records --output-uri {tmp_path / 'full'} "
                                  "--dry-run")
    assert len(tm.list_jobs()) == before


@pytest.mark.parametrize(("body", "message"), [
    ("model: local/tiny-qwen3\ndata: $nope\n",
     "%%tune: key 'train_dataset': $nope is not a notebook variable; run the cell that defines nope first"),
    ("model: local/tiny-qwen3\ndata: [$records, $missing]\n",
     "%%tune: key 'train_dataset[1]': $missing is not a notebook variable"),
    ("model: local/tiny-qwen3\ndata: $records\nlabels: {team: $who}\n",
     "%%tune: key 'labels.team': $who is not a notebook variable"),
    ("model: local/tiny-qwen3\ndata: $records\ndisplay_name: run-$records\n",
     "%%tune: key 'tuned_model_display_name': $records is a list; only text and numbers"),
    ("model: local/tiny-qwen3\ndata: $records\ncolour: red\n",
     "%%tune: unknown key 'colour'; keys are the tune() parameters (base_model, train_dataset"),
    ("model: local/tiny-qwen3\ndata: $records\nepoch: 3\n", "unknown key 'epoch' (did you mean 'epochs'?)"),
    ("model: local/tiny-qwen3\n  data: : x\n", "%%tune: the cell body is not valid YAML at line 2"),
    ("model: local/tiny-qwen3\ndata: $records\nepochs: 2\nepochs: 3\n",
     "key 'epochs' is given twice (lines 3 and 4)"),
    ("model: local/tiny-qwen3\nbase_model: local/tiny-qwen3\n",
     "'model' and 'base_model' are the same parameter (base_model)"),
    ("model: local/tiny-qwen3\ndata: $records\nepochs: three\n", "epochs must be a whole number of at least 1"),
    ("model: local/tiny-qwen3\ndata: $records\nlearning_rate: -1e-3\n", "learning_rate must be a finite number"),
    ("model: no-such-model\ndata: $records\n", "no-such-model"),
    ("data: $records\n", "%%tune: base_model is required"),
    ("- model\n- data\n", "must be YAML mapping option names to values"),
    ("model: local/tiny-qwen3\ndata: $records\nwait: soon\n", "%%tune: wait must be true or false"),
])
def test_every_configuration_mistake_is_one_line_and_nothing_is_submitted(ip, jobs_home, shown, body, message):
    ip.push({"records": RECORDS})
    before = len(tm.list_jobs())
    with pytest.raises(UsageError) as info:
        ip.run_cell_magic("tune", "failed_run", body)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert "failed_run" not in ip.user_ns and not shown
    assert len(tm.list_jobs()) == before


def test_cell_line_mistakes_are_one_line(ip, jobs_home):
    body = "model: local/tiny-qwen3\n"
    for line, message in (("'x", "%%tune: no closing quotation"),
                          ("x --as y", "%%tune: give the variable once"),
                          ("class", "%%tune VAR needs a Python variable name"),
                          ("x --epochs 3", "%%tune: unrecognized arguments: --epochs")):
        with pytest.raises(UsageError, match=message) as info:
            ip.run_cell_magic("tune", line, body)
        assert "\n" not in str(info.value)


def test_line_form_submits_and_stores_the_job(ip, jobs_home, shown):
    ip.run_line_magic("dataset", "df --prompt q --completion a --out train.jsonl --as ds")
    ip.run_line_magic("tune", "--model local/tiny-qwen3 --data $ds --epochs 3 --as j --mode FULL --method sft "
                              "--backend local --batch-size 2 --learning-rate=2e-4 --display-name 'line form'")
    job = ip.user_ns["j"]
    assert shown[-1] is job and job.state == JOB_STATE_QUEUED
    assert job.config["epochs"] == 3 and job.config["learning_rate"] == 2e-4
    assert job.config["engine_options"] == {"batch_size": 2} and job.display_name == "line form"


class _Broken:
    @property
    def boom(self):
        raise RuntimeError("the property raised")


class _Unfinished:
    tuned_model = None  # a job still running


@pytest.mark.parametrize(("line", "message"), [
    ("", "%tune needs options"),
    ("model x", "%tune: unexpected 'model'"),
    ("--model local/tiny-qwen3 --data", "%tune: --data needs a value"),
    ("--model local/tiny-qwen3 --epochs 2 --epochs 3", "%tune: --epochs is given twice"),
    ("--model local/tiny-qwen3 --data $ds2", "%tune: key 'train_dataset': $ds2 is not a notebook variable"),
    ("--model local/tiny-qwen3 --data $records --colour red", "%tune: unknown key 'colour'"),
    ("--model local/tiny-qwen3 --data $records --as 1x", "--as needs a Python variable name"),
    ("--model local/tiny-qwen3 --data $records --backend cloud", "backend must be one of auto, local, vertex, not 'cloud'"),
    # The adversarial pass: each of these was silent, a traceback or the wrong hint.
    ("--model local/tiny-qwen3 --data $records --as a --as b", "%tune: --as is given twice"),
    ("--model local/tiny-qwen3 --data $records --backend local --backend vertex", "%tune: --backend is given twice"),
    ("--model local/tiny-qwen3 --data $records --batch-size -1", "batch_size must be a whole number of at least 1"),
    ("--model local/tiny-qwen3 --data $records --output-uri [a]", "output_uri must be a folder"),
    ("--model local/tiny-qwen3 --data $records --custom-base-model $unfinished.tuned_model",
     "%tune: key 'custom_base_model': $unfinished.tuned_model is None"),
    ("--model local/tiny-qwen3 --data $records --description $broken.boom",
     "%tune: key 'description': reading $broken.boom failed: RuntimeError: the property raised"),
])
def test_line_form_mistakes_are_one_line(ip, jobs_home, shown, line, message):
    ip.push({"records": RECORDS, "broken": _Broken(), "unfinished": _Unfinished()})
    before = len(tm.list_jobs())
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("tune", line)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "did you mean 'adapter_size'" not in str(info.value)  # batch_size: -1 once suggested it
    assert len(tm.list_jobs()) == before and not shown


@pytest.mark.parametrize(("line", "body", "message"), [
    # An unknown key is named, whatever its letters, before "base_model is required" is said.
    ("", "mödel: local/tiny-qwen3\ndata: $records\n", "unknown key 'mödel' (did you mean 'model'?)"),
    ("", "data: $records\népochs: 2\n", "unknown key 'épochs' (did you mean 'epochs'?)"),
    ("a --as b", "model: local/tiny-qwen3\n", "give the variable once"),
    ("--as a --as b", "model: local/tiny-qwen3\n", "--as is given twice"),
    ("--backend local --backend=vertex", "model: local/tiny-qwen3\n", "--backend is given twice"),
    # Nine nested aliases would expand to gigabytes before any key is checked.
    ("", 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
     "the YAML alias *a (line 2) is not taken"),
])
def test_cell_form_mistakes_are_one_line(ip, jobs_home, shown, line, body, message):
    ip.push({"records": RECORDS})
    before = len(tm.list_jobs())
    with pytest.raises(UsageError) as info:
        ip.run_cell_magic("tune", line, body)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert len(tm.list_jobs()) == before and not shown


def test_config_refuses_a_bad_setting_and_keeps_the_one_in_effect(ip):
    ip.run_cell("%config TuningMagics.backend = 'nope'")
    magics = ip.magics_manager.registry["TuningMagics"]
    assert magics.backend != "nope" and settings.backend == "auto"
    ip.run_cell("%config TuningMagics.location = 'us central1'")
    assert magics.location != "us central1" and settings.location == "us-central1"
    ip.run_cell("%config TuningMagics.backend = 'local'")
    assert magics.backend == "local" and settings.backend == "local"


def test_tune_jobs_filters_and_renders_escaped_html(ip, jobs_home, tmp_path):
    finished_job("tune-a", tmp_path, lr=1e-4, train=[2.0, 1.5, 1.2], evals={3: 1.4}, name="<b>first</b>", age=300)
    finished_job("tune-b", tmp_path, lr=3e-4, train=[2.0, 1.0, 0.8], evals={2: 1.1, 3: 0.9}, age=200,
                 model="qwen/qwen3@qwen3-4b", state="JOB_STATE_FAILED")
    ip.push({"records": RECORDS})
    ip.run_line_magic("tune", "--model local/tiny-qwen3 --data $records --as queued")

    table = ip.run_line_magic("tune_jobs", "")
    assert [j.id for j in table.jobs] == [ip.user_ns["queued"].id, "tune-b", "tune-a", "tune-busy"]
    frame = table.frame.set_index("id")
    assert frame.loc["tune-a", "best_eval_loss"] == 1.4 and frame.loc["tune-b", "best_eval_loss"] == 0.9
    assert frame.loc["tune-a", "duration_s"] == pytest.approx(60, abs=1)
    assert pd.isna(frame.loc[ip.user_ns["queued"].id, "best_eval_loss"])  # never started: no metrics read

    assert [j.id for j in ip.run_line_magic("tune_jobs", "--state succeeded").jobs] == ["tune-a"]
    assert [j.id for j in ip.run_line_magic("tune_jobs", "--state FAILED,JOB_STATE_SUCCEEDED").jobs] == \
        ["tune-b", "tune-a"]
    assert [j.id for j in ip.run_line_magic("tune_jobs", "--model QWEN3-4b").jobs] == ["tune-b"]
    assert len(ip.run_line_magic("tune_jobs", "--limit 2 --backend local")) == 2
    assert [j.id for j in ip.run_line_magic("tune_jobs", "--state succeeded --limit 1").jobs] == ["tune-a"]
    assert [j.id for j in tm.list_jobs(state=["failed"], model="qwen")] == ["tune-b"]

    html = table._repr_html_()
    assert "&lt;b&gt;first&lt;/b&gt;" in html and "<b>first</b>" not in html
    assert ">0.9<" in html and "0.9000" not in html and "1 min 00 s" in html and "SUCCEEDED" in html
    bundle = table._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"}  # no kernel here: no widget view
    text = bundle["text/plain"]
    assert text.splitlines()[0].split() == ["job", "state", "model", "method", "created", "duration", "best",
                                            "eval", "loss"]
    assert "tune-a (<b>first</b>)" in text

    empty = ip.run_line_magic("tune_jobs", "--model nothing-like-this")
    assert len(empty) == 0 and str(empty) == "no tuning jobs match"
    for line, message in (("--state bogus", "state must be one of QUEUED, PENDING"),
                          ("--limit 0", "limit must be a whole number of at least 1"),
                          ("--limit x", "%tune_jobs: argument --limit: invalid int value"),
                          ("--backend cloud", "backend must be one of auto, local, vertex, not 'cloud'")):
        with pytest.raises(UsageError, match=message) as info:
            ip.run_line_magic("tune_jobs", line)
        assert "\n" not in str(info.value)


def test_jobs_table_rows_are_clickable_where_widgets_render(ip, jobs_home, tmp_path, monkeypatch):
    from tuning_magics.display import jobs_table

    finished_job("tune-a", tmp_path, lr=1e-4, train=[2.0, 1.5], evals={2: 1.4})
    table = ip.run_line_magic("tune_jobs", "--state succeeded")
    monkeypatch.setattr(jobs_table, "_widgets_render", lambda: True)
    bundle = table._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "text/html" in bundle
    shown_jobs = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown_jobs.append(obj))
    table.buttons[0].click()
    assert table.selected is table.jobs[0] and shown_jobs == [table.jobs[0]]
    assert table.buttons[0].description == "tune-a"


def test_tune_attach_finds_a_job_by_id_or_name(ip, jobs_home, tmp_path, shown):
    finished_job("tune-a", tmp_path, lr=1e-4, train=[2.0], evals={}, name="baseline")
    ip.user_ns.pop("job", None)
    ip.run_line_magic("tune_attach", "tune-a")
    assert ip.user_ns["job"].id == "tune-a" and shown[-1] is ip.user_ns["job"]
    ip.run_line_magic("tune_attach", "baseline --as base")
    assert ip.user_ns["base"].id == "tune-a"
    ip.push({"which": "tune-a"})
    ip.run_line_magic("tune_attach", "$which --as again")
    assert ip.user_ns["again"].id == "tune-a"
    with pytest.raises(UsageError, match="there is no local tuning job 'tune-zzz'") as info:
        ip.run_line_magic("tune_attach", "tune-zzz --as nothing")
    assert "\n" not in str(info.value) and "nothing" not in ip.user_ns
    with pytest.raises(UsageError, match="%tune_attach: the following arguments are required: name"):
        ip.run_line_magic("tune_attach", "")


def test_compare_overlays_curves_and_puts_differing_rows_first(ip, jobs_home, tmp_path):
    import sys

    pyplot_before = "matplotlib.pyplot" in sys.modules
    finished_job("tune-a", tmp_path, lr=1e-4, train=[2.0, 1.5, 1.2], evals={3: 1.4}, name="slow <lr>")
    finished_job("tune-b", tmp_path, lr=3e-4, train=[2.0, 1.0, 0.8], evals={2: 1.1, 3: 0.9})
    result = tm.compare(["tune-a", tm.get_job("tune-b")])
    table = result.table
    assert list(table.columns) == ["slow <lr>", "tune-b"]
    assert set(result.differs) == {"learning_rate", "best eval loss", "final train loss"}
    assert list(table.index[:3]) == result.differs  # the rows that differ come first
    assert table.loc["learning_rate"].tolist() == [1e-4, 3e-4]
    assert table.loc["best eval loss"].tolist() == [1.4, 0.9]
    assert table.loc["final train loss"].tolist() == [1.2, 0.8]
    assert table.loc["batch_size"].tolist() == [2, 2] and table.loc["seed"].tolist() == [7, 7]
    assert table.loc["duration (s)"].tolist() == [pytest.approx(60, abs=1)] * 2
    assert "learning_rate_multiplier" not in table.index  # empty for every job
    assert result.figure_png.startswith(b"\x89PNG\r\n\x1a\n")
    html = result._repr_html_()
    assert "data:image/png;base64," in html and "slow &lt;lr&gt;" in html and "slow <lr>" not in html
    assert "comparison of 2 jobs" in str(result)
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before  # drawn on a bare Figure

    via_magic = ip.run_line_magic("tune_compare", "tune-a tune-b")
    assert via_magic.table.equals(table)
    ip.push({"runs": ["tune-a", tm.get_job("tune-b")]})
    assert list(ip.run_line_magic("tune_compare", "$runs").table.columns) == ["slow <lr>", "tune-b"]
    with pytest.raises(UsageError, match="there is no local tuning job 'tune-q'"):
        ip.run_line_magic("tune_compare", "tune-a tune-q")
    with pytest.raises(UsageError, match=r"%tune_compare: \$nothing is not a notebook variable"):
        ip.run_line_magic("tune_compare", "$nothing")
    with pytest.raises(tm.UserError, match="compare needs at least one job"):
        tm.compare([])


def test_compare_of_jobs_without_metrics_still_draws(jobs_home, tmp_path):
    job = tm.tune(MODEL, RECORDS)  # queued behind the busy slot
    result = tm.compare([job])
    assert result.table.loc["state"].tolist() == ["QUEUED"]
    assert result.figure_png.startswith(b"\x89PNG")


def test_tune_chat_opens_the_jobs_chat_panel(ip, jobs_home, tmp_path, monkeypatch):
    calls = []

    def chat_panel(self, checkpoint=None):
        calls.append((self.id, checkpoint))
        return f"panel of {self.id}"

    monkeypatch.setattr(Job, "chat_panel", chat_panel, raising=False)
    finished_job("tune-a", tmp_path, lr=1e-4, train=[2.0], evals={}, age=300)
    finished_job("tune-b", tmp_path, lr=1e-4, train=[2.0], evals={}, age=200)
    ip.user_ns.pop("job", None)
    ip.run_line_magic("tune_attach", "tune-a --as picked")
    assert ip.run_line_magic("tune_chat", "") == "panel of tune-a"  # the job attached last
    ip.push({"job": tm.get_job("tune-b")})
    assert ip.run_line_magic("tune_chat", "--checkpoint checkpoint-8") == "panel of tune-b"  # the variable `job`
    assert ip.run_line_magic("tune_chat", "picked") == "panel of tune-a"
    assert ip.run_line_magic("tune_chat", "$picked") == "panel of tune-a"
    assert ip.run_line_magic("tune_chat", "tune-b --checkpoint final") == "panel of tune-b"
    assert calls == [("tune-a", None), ("tune-b", "checkpoint-8"), ("tune-a", None), ("tune-a", None),
                     ("tune-b", "final")]
    with pytest.raises(UsageError, match="there is no local tuning job 'tune-none'"):
        ip.run_line_magic("tune_chat", "tune-none")
    monkeypatch.setattr(Job, "chat_panel", None, raising=False)
    with pytest.raises(UsageError, match="no chat panel for LocalJob tune-b") as info:
        ip.run_line_magic("tune_chat", "")
    assert "\n" not in str(info.value)


def test_tune_eval_passes_its_options_to_job_evaluate(ip, jobs_home, tmp_path, monkeypatch):
    calls = []

    def evaluate(self, data=None, metrics=None, **options):
        calls.append((self.id, data, metrics, options))
        return f"evaluation of {self.id}"

    monkeypatch.setattr(Job, "evaluate", evaluate)
    finished_job("tune-a", tmp_path, lr=1e-4, train=[2.0], evals={}, age=300)
    judge = tm.Judge("http://127.0.0.1:9/v1", model_name="grader")
    ip.push({"job": tm.get_job("tune-a"), "frame": pd.DataFrame({"prompt": ["q"], "completion": ["a"]}),
             "judge": judge})
    assert ip.run_line_magic("tune_eval", "--data $frame --metrics exact_match,rouge_l --checkpoints "
                                          "checkpoint-8,final --judge $judge --max-new-tokens 16 --as scores") == \
        "evaluation of tune-a"
    job_id, data, metrics, options = calls[-1]
    assert job_id == "tune-a" and list(data.columns) == ["prompt", "completion"] and metrics == "exact_match,rouge_l"
    assert options == {"checkpoints": ["checkpoint-8", "final"], "baseline": True, "max_new_tokens": 16,
                       "judge": judge}
    assert ip.user_ns["scores"] == "evaluation of tune-a"
    ip.run_line_magic("tune_eval", "tune-a --data train --checkpoints final --no-baseline --judge "
                                   "http://127.0.0.1:8000/v1")
    assert calls[-1][1] == "train" and calls[-1][3]["checkpoints"] is None and calls[-1][3]["baseline"] is False
    assert calls[-1][3]["judge"] == "http://127.0.0.1:8000/v1"
    with pytest.raises(UsageError, match=r"%tune_eval: \$nothing is not a notebook variable"):
        ip.run_line_magic("tune_eval", "--judge $nothing")
    ip.user_ns.pop("scores", None)
    ip.user_ns.pop("judge", None)


def test_tune_arena_passes_its_options_to_job_arena(ip, jobs_home, tmp_path, monkeypatch):
    calls = []

    def arena(self, prompts, **options):
        calls.append((self.id, prompts, options))
        return f"arena of {self.id}"

    monkeypatch.setattr(Job, "arena", arena)
    finished_job("tune-a", tmp_path, lr=1e-4, train=[2.0], evals={}, age=300)
    other = object()
    ip.push({"job": tm.get_job("tune-a"), "questions": ["q1", "q2"], "other": other})
    assert ip.run_line_magic("tune_arena", "--prompts $questions --against checkpoint-8 --as duel") == "arena of tune-a"
    assert calls[-1] == ("tune-a", ["q1", "q2"], {"against": "checkpoint-8", "checkpoint": "final", "name": None})
    assert ip.user_ns["duel"] == "arena of tune-a"
    ip.run_line_magic("tune_arena", "tune-a --prompts $questions --against $other --checkpoint checkpoint-8 --name n")
    assert calls[-1][2] == {"against": other, "checkpoint": "checkpoint-8", "name": "n"}
    with pytest.raises(UsageError, match="--prompts takes a \\$variable"):
        ip.run_line_magic("tune_arena", "--prompts q1")
    for name in ("duel", "questions", "other"):
        ip.user_ns.pop(name, None)


def test_tune_export_passes_its_options_to_job_export(ip, jobs_home, tmp_path, monkeypatch):
    calls = []

    def export(self, format="hf", path=None, **options):
        calls.append((self.id, format, path, options))
        return f"{format} export of {self.id}"

    monkeypatch.setattr(Job, "export", export)
    finished_job("tune-a", tmp_path, lr=1e-4, train=[2.0], evals={}, age=300)
    ip.push({"job": tm.get_job("tune-a")})
    assert ip.run_line_magic("tune_export", "--as exported") == "hf export of tune-a"
    assert calls[-1] == ("tune-a", "hf", None, {"checkpoint": "final", "quantization": "f16", "verify": True,
                                                 "overwrite": False})
    assert ip.user_ns["exported"] == "hf export of tune-a"
    ip.run_line_magic("tune_export", "ollama")  # the format alone: the default job
    assert calls[-1][:2] == ("tune-a", "ollama")
    ip.run_line_magic("tune_export", f"tune-a gguf --quantization q8_0 --path {tmp_path / 'out'} --checkpoint "
                                     "checkpoint-8 --overwrite --no-verify")
    assert calls[-1] == ("tune-a", "gguf", str(tmp_path / "out"), {"checkpoint": "checkpoint-8", "quantization": "q8_0",
                                                                    "verify": False, "overwrite": True})
    ip.user_ns.pop("exported", None)


def test_config_and_tuning_config_share_one_store_last_one_wins(ip):
    # %config first, then %tuning_config, then %config again with the same value as before.
    ip.run_cell("%config TuningMagics.project = 'proj-a'")
    assert settings.project == "proj-a"
    ip.run_line_magic("tuning_config", "project=proj-b")
    assert settings.project == "proj-b"
    ip.run_cell("%config TuningMagics.project = 'proj-a'")
    assert settings.project == "proj-a"
    # %tuning_config first, then %config, then %tuning_config again.
    ip.run_line_magic("tuning_config", "location=europe-west4")
    ip.run_cell("%config TuningMagics.location = 'asia-east1'")
    assert settings.location == "asia-east1"
    ip.run_line_magic("tuning_config", "location=europe-west4")
    assert settings.location == "europe-west4"
    # Configuring another class does not bring an older TuningMagics value back.
    ip.run_cell("%config PlainTextFormatter.max_seq_length = 1000")
    assert settings.location == "europe-west4" and settings.project == "proj-a"
    # settings.update from plain Python is the same store.
    tm.settings.update(project="proj-c")
    ip.run_cell("%config TuningMagics.project = 'proj-a'")
    assert settings.project == "proj-a"
    ip.run_line_magic("tuning_config", "project=")
    assert settings.project is None


@pytest.mark.slow
def test_two_real_tiny_trainings_compared(ip, tmp_path, monkeypatch, shown, capsys):
    from tuning_magics.backends.local import scheduler

    monkeypatch.setenv("TUNING_MAGICS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(scheduler.CONCURRENCY_ENV, "1")
    ip.push({"records": RECORDS, "val": RECORDS[:2]})
    try:
        for var, lr in (("slow", "1e-5"), ("fast", "1e-3")):
            ip.run_cell_magic("tune", f"{var} --wait", f"model: local/tiny-qwen3\ndata: $records\n"
                              f"validation: $val\nepochs: 1\nlearning_rate: {lr}\nbatch_size: 4\n")
            assert ip.user_ns[var].state == JOB_STATE_SUCCEEDED, ip.user_ns[var].error
        assert f"job {ip.user_ns['fast'].id}: JOB_STATE_SUCCEEDED" in capsys.readouterr().out
        result = ip.run_line_magic("tune_compare", "slow fast")
        assert result.differs[0] == "learning_rate" or "learning_rate" in result.differs
        assert result.table.loc["best eval loss"].notna().all()
        assert result.figure_png.startswith(b"\x89PNG")
        table = ip.run_line_magic("tune_jobs", "--state succeeded")
        assert {j.id for j in table.jobs} == {ip.user_ns["slow"].id, ip.user_ns["fast"].id}
        assert table.frame["best_eval_loss"].notna().all()
    finally:
        for job in tm.list_jobs():
            if not job.done:
                job.cancel()


def test_config_sets_the_mlflow_setting_too(ip):
    import tuning_magics as tm

    try:
        ip.run_cell("%config TuningMagics.mlflow = 'true'")
        assert tm.settings.mlflow == "true"
    finally:
        tm.settings.update(mlflow=None)


def test_a_finished_local_job_as_base_model_continues_from_its_final_model(ip, jobs_home, shown, tmp_path):
    from tuning_magics.backends.local.checkpoints import final_dir

    finished_job("tune-first", tmp_path, lr=1e-3, train=[2.0, 1.0], evals={})
    first = tm.get_job("tune-first")
    with pytest.raises(tm.UserError, match="has no final model to continue from") as info:
        tm.tune(first, RECORDS, epochs=1, dry_run=True)  # it ran, but its final model is not there
    assert info.value.field == "base_model"
    final = final_dir(first.output_uri)
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    plan = tm.tune(first, RECORDS, epochs=1, dry_run=True)
    assert plan.backend == "local" and plan.request["base_model"] == MODEL
    assert plan.request["custom_base_model"] == str(final)
    ip.push({"first": first, "records": RECORDS})
    ip.run_cell_magic("tune", "--dry-run", "model: $first\ndata: $records\n")  # the same from %%tune
    assert shown[-1].request["custom_base_model"] == str(final)
