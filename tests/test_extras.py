"""Installed without an optional extra: what needs it says so in one line; the rest keeps working."""

from __future__ import annotations


def test_an_environment_problem_exits_2_with_the_extra_to_install(without_extra, tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    # A model whose tokenizer must be loaded by transformers: without the [local] extra the
    # counts are estimates or the command names the extra; it never exits 1 ("invalid") for it.
    result = without_extra("local", "import sys; from tuning_magics.cli import main; sys.exit(main(sys.argv[1:]))",
                           "validate", str(tmp_path / "train.jsonl"), "--model", "local/tiny-qwen3")
    assert result.returncode in (0, 2), result.stderr
    if result.returncode == 2:
        assert 'pip install "tuning_magics[local]"' in result.stderr and "Traceback" not in result.stderr


def test_gs_uris_without_the_vertex_extra_name_it(without_extra, tmp_path):
    code = ("import tuning_magics as tm\n"
            "try:\n    tm.validate('gs://some-bucket/train.jsonl')\n"
            "except tm.UserError as exc:\n    print(exc)\n")
    result = without_extra("vertex", code)
    assert result.stdout.strip() == ('this needs google.cloud.storage, which is not installed: '
                                     'pip install "tuning_magics[vertex]"'), result.stderr
    # Local files need nothing from the extra.
    (tmp_path / "train.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    result = without_extra("vertex", "import tuning_magics as tm; print(tm.validate('train.jsonl').ok)")
    assert result.stdout.strip() == "True", result.stderr
