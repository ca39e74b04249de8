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
    for name in ("ds", "ds2"):
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
    assert {"dataset", "tuning_config", "tune_models"} <= line_magics


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


def test_invalid_rows_stop_the_write_and_name_the_row(ip, tmp_path):
    ip.push({"bad": pd.DataFrame({"q": ["ok", "  "], "a": ["fine", "also"]}, index=["r1", "r2"])})
    with pytest.raises(UsageError, match=r"row 'r2', column 'q': is blank"):
        ip.run_line_magic("dataset", "bad --prompt q --completion a --out bad.jsonl")
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
    ip.run_line_magic("tuning_config", "location=europe-west4 staging_bucket=gs://b/tuning")
    assert settings.location == "europe-west4" and settings.staging_bucket == "gs://b/tuning"
    assert settings.backend == "local"
    ip.run_cell("%config TuningMagics.project = 'my-proj'")
    assert settings.project == "my-proj" and settings.backend == "vertex"
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
