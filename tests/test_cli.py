"""The `tuning-magics validate` command, run as a real subprocess: exit codes, --json, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tuning_magics import cli

IMAGE_MODEL = "meta/llama4@llama-4-scout-17b-16e-instruct"


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST",)}
    return subprocess.run(
        [sys.executable, "-m", "tuning_magics", *map(str, args)],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=env,
    )  # fmt: skip


def write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def pc(p="q", c="a"):
    return {"prompt": p, "completion": c}


def image_chat():
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "gs://b/x.png"}}, {"type": "text", "text": "what?"}]},
            {"role": "assistant", "content": "a cat"},
        ]
    }


def assert_one_line_error(proc):
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tuning-magics")
    return lines[0]


@pytest.fixture
def good(tmp_path):
    return write(tmp_path / "good.jsonl", [pc("q1", "a1"), pc("q2", "a2")])


@pytest.fixture
def bad(tmp_path):
    return write(tmp_path / "bad.jsonl", [pc(), {"prompt": "q"}])


# -- exit codes -------------------------------------------------------------------------------


def test_valid_dataset_exits_0_with_a_summary(good):
    proc = run("validate", good)
    assert proc.returncode == 0, proc.stderr
    assert "valid: 2 examples (prompt_completion)" in proc.stdout
    assert "estimate" in proc.stdout
    assert proc.stderr == ""


def test_warnings_still_exit_0(tmp_path):
    path = write(tmp_path / "mixed.jsonl", [image_chat(), {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    proc = run("validate", path, "--model", IMAGE_MODEL, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is True and out["dropped"] == 1 and out["warnings"]


def test_invalid_dataset_exits_1_and_names_line_and_field(bad):
    proc = run("validate", bad)
    assert proc.returncode == 1
    assert "INVALID" in proc.stdout
    assert "line 2, completion" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_invalid_json_exits_1(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b'{"prompt": "q", "completion": "a"}\n{not json\n')
    proc = run("validate", path, "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["errors"][0]["line"] == 2 and "not valid JSON" in out["errors"][0]["message"]


def test_text_only_model_with_images_exits_1(tmp_path):
    path = write(tmp_path / "img.jsonl", [image_chat()])
    assert run("validate", path, "--model", "qwen/qwen3@qwen3-4b").returncode == 1
    assert run("validate", path, "--model", IMAGE_MODEL).returncode == 0


def test_method_distillation_accepts_prompts_alone(tmp_path):
    path = write(tmp_path / "prompts.jsonl", [{"prompt": "q1"}, {"prompt": "q2"}])
    assert run("validate", path, "--method", "sft").returncode == 1
    proc = run("validate", path, "--method", "distillation", "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["method"] == "distillation"


# -- --json ----------------------------------------------------------------------------------


def test_json_prints_exactly_one_object_with_the_report_fields(bad):
    proc = run("validate", bad, "--json")
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    for key in ("ok", "format", "examples", "errors", "warnings", "tokens", "dropped"):
        assert key in out
    assert out["ok"] is False and out["examples"] == 2 and out["format"] == "prompt_completion"
    assert out["errors"] == [{"line": 2, "field": "completion", "message": "missing; add it"}]
    assert out["tokens"]["estimated"] is True and set(out["tokens"]) >= {"total", "max", "mean"}


def test_json_with_a_model(good):
    proc = run("validate", good, "--model", "qwen3-4b", "--json")
    out = json.loads(proc.stdout)
    assert proc.returncode == 0 and out["model"] == "qwen/qwen3@qwen3-4b"


def test_json_keeps_non_ascii_text(tmp_path):
    path = write(tmp_path / "ko.jsonl", [{"prompt": "질문"}])
    proc = run("validate", path, "--json")
    assert proc.returncode == 1
    json.loads(proc.stdout)


# -- validation sets ---------------------------------------------------------------------------


def test_validation_set_is_checked_against_the_training_set(tmp_path, good):
    val = write(tmp_path / "val.jsonl", [pc("v1", "w1")])
    proc = run("validate", good, "--validation", val, "--json")
    assert proc.returncode == 0, proc.stdout
    out = json.loads(proc.stdout)
    assert out["ok"] is True and out["validation"]["ok"] is True and out["validation"]["examples"] == 1


def test_validation_identical_to_training_exits_1(tmp_path, good):
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(open(good, "rb").read())
    proc = run("validate", good, "--validation", copy, "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["ok"] is False
    assert "identical" in out["validation"]["errors"][0]["message"]


def test_invalid_validation_set_exits_1(good, bad):
    assert run("validate", good, "--validation", bad).returncode == 1


# -- usage errors: exit 2, one line, no traceback ------------------------------------------------


def test_missing_file_exits_2(tmp_path):
    proc = run("validate", tmp_path / "nope.jsonl")
    assert proc.returncode == 2
    line = assert_one_line_error(proc)
    assert "nope.jsonl" in line
    assert proc.stdout == ""


def test_missing_validation_file_exits_2(tmp_path, good):
    proc = run("validate", good, "--validation", tmp_path / "nope.jsonl")
    assert proc.returncode == 2
    assert "nope.jsonl" in assert_one_line_error(proc)


def test_a_folder_exits_2(tmp_path):
    proc = run("validate", tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc)


def test_unknown_model_exits_2_with_suggestions(good):
    proc = run("validate", good, "--model", "qwen3-5b", "--json")
    assert proc.returncode == 2
    line = assert_one_line_error(proc)
    assert "qwen3-5b" in line and "did you mean" in line
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "{good}", "--bogus"],
        ["validate", "{good}", "--method", "rlhf"],
        ["validate"],
    ],
)
def test_bad_options_exit_2(good, args):
    proc = run(*[a.format(good=good) for a in args])
    assert proc.returncode == 2
    line = assert_one_line_error(proc)
    assert "error:" in line
    assert proc.stdout == ""


def test_an_empty_file_is_invalid_not_a_usage_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    proc = run("validate", path, "--json")
    assert proc.returncode == 1
    assert "no examples" in json.loads(proc.stdout)["errors"][0]["message"]


# -- in-process entry point (fast paths of main) ------------------------------------------------------


def test_main_returns_the_exit_status(good, bad, capsys):
    assert cli.main(["validate", good]) == 0
    assert cli.main(["validate", bad]) == 1
    assert cli.main(["validate", good, "--model", "nope"]) == 2
    assert "not in the catalog" in capsys.readouterr().err
    for argv in (["validate", good, "--method", "x"], [], ["frobnicate"], ["validate", good, "--json", "--json=1"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_models_command_lists_the_catalog(capsys):
    assert cli.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert IMAGE_MODEL in {r["model"] for r in rows}


# -- files that are not JSONL, bounded reading, installs without extras --------------------------------


@pytest.mark.timeout(120)
def test_dev_zero_exits_1_at_once_saying_it_is_binary():
    proc = run("validate", "/dev/zero", "--model", "local/tiny-qwen3")
    assert proc.returncode == 1, proc.stderr
    assert "NUL bytes" in proc.stdout and "Traceback" not in proc.stderr


def test_a_gzip_file_exits_1_saying_to_decompress_it(tmp_path):
    import gzip

    path = tmp_path / "train.jsonl"
    path.write_bytes(gzip.compress(json.dumps(pc()).encode() + b"\n"))
    proc = run("validate", path, "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert "gzip-compressed" in out["errors"][0]["message"] and "decompress" in out["errors"][0]["message"]


def test_exact_tiny_model_counts_from_the_shell_without_the_local_extra(without_extra, good):
    code = "import sys; from tuning_magics.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = without_extra("local", code, "validate", good, "--model", "local/tiny-qwen3", "--json")
    assert proc.returncode == 0, proc.stderr
    tokens = json.loads(proc.stdout)["tokens"]
    # <bos>, then per turn <|im_start|> role \n text <|im_end|> \n: (1 + 5 + 2 + 2) + (1 + 10 + 2 + 2) each.
    assert tokens == {"total": 2 * (1 + 10 + 15), "max": 26, "mean": 26.0, "estimated": False}


def test_a_missing_optional_package_exits_2_naming_the_extra(without_extra):
    code = "import sys; from tuning_magics.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = without_extra("vertex", code, "validate", "gs://bucket/train.jsonl")
    assert proc.returncode == 2, proc.stderr
    assert 'pip install "tuning_magics[vertex]"' in proc.stderr and "Traceback" not in proc.stderr
