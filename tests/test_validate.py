"""tuning_magics.validate: every rule, with the right 1-based line and field, for files, DataFrames and records."""

from __future__ import annotations

import base64
import gzip
import json

import pandas as pd
import pytest

import tuning_magics
from tuning_magics.datasets import validate as V
from tuning_magics.errors import UserError

TEXT_MODEL = "qwen/qwen3@qwen3-4b"
IMAGE_MODEL = "meta/llama4@llama-4-scout-17b-16e-instruct"
PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()


def pc(prompt="What is 2+2?", completion="4"):
    return {"prompt": prompt, "completion": completion}


def chat(*contents, system=None):
    roles = ["user", "assistant"]
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]
    return {"messages": messages}


def image_chat(url="gs://bucket/cat.png", answer="a cat"):
    return chat([{"type": "image_url", "image_url": {"url": url, "detail": "low"}}, {"type": "text", "text": "what is it?"}], answer)


def gc(*parts_per_turn, system=None, roles=("user", "model")):
    record = {"systemInstruction": {"parts": [{"text": system}]}} if system else {}
    record["contents"] = [{"role": roles[i % 2], "parts": parts} for i, parts in enumerate(parts_per_turn)]
    return record


def write(tmp_path, lines, name="data.jsonl") -> str:
    """Write lines (dicts are JSON-encoded, str/bytes written as they are) and return the path."""
    path = tmp_path / name
    out = []
    for line in lines:
        if isinstance(line, bytes):
            out.append(line)
        elif isinstance(line, str):
            out.append(line.encode("utf-8"))
        else:
            out.append(json.dumps(line, ensure_ascii=False).encode("utf-8"))
    path.write_bytes(b"\n".join(out) + b"\n")
    return str(path)


def issues(report, kind="errors"):
    return [(i["line"], i["field"]) for i in report.to_dict()[kind]]


def only_error(report):
    d = report.to_dict()
    assert not d["ok"]
    assert len(d["errors"]) == 1, d["errors"]
    return d["errors"][0]


# -- valid data in every format ------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        pc(),
        chat("hi", "hello", system="be kind"),
        {"messages": [{"role": "user", "content": "hi"}, {"role": "model", "content": "hello"}]},
        gc([{"text": "hi"}], [{"text": "hello"}], system="be kind"),
        gc([{"text": "hi"}], [{"text": "hello"}], roles=("user", "assistant")),
        {"system_instruction": {"parts": [{"text": "s"}]}, "contents": [{"role": "user", "parts": [{"text": "q"}]}, {"role": "model", "parts": [{"text": "a"}]}]},
        image_chat(),
        image_chat(url=f"data:image/png;base64,{PNG_B64}"),
        image_chat(url="https://example.com/x.webp?sig=1"),
        gc([{"fileData": {"mimeType": "image/png", "fileUri": "gs://b/x.png"}}, {"text": "q"}], [{"text": "a"}]),
        gc([{"file_data": {"mime_type": "image/jpeg", "file_uri": "gs://b/x"}}, {"text": "q"}], [{"text": "a"}]),
        gc([{"inlineData": {"mimeType": "image/webp", "data": PNG_B64}}, {"text": "q"}], [{"text": "a"}]),
        gc([{"inline_data": {"mime_type": "image/png", "data": PNG_B64}}, {"text": "q"}], [{"text": "a"}]),
        gc([{"text": "long question, part one"}, {"text": "part two"}], [{"text": "a"}]),
    ],
)
def test_valid_records_of_every_format_pass(tmp_path, record):
    report = tuning_magics.validate(write(tmp_path, [record, record]))
    d = report.to_dict()
    assert d["ok"], d["errors"]
    assert d["examples"] == 2
    assert d["format"] == tuning_magics.datasets.formats.detect(record)
    assert d["errors"] == []


def test_report_to_dict_shape(tmp_path):
    report = tuning_magics.validate(write(tmp_path, [pc(), pc("x" * 40, "y")]))
    d = report.to_dict()
    for key in ("ok", "format", "examples", "errors", "warnings", "tokens", "dropped"):
        assert key in d
    assert d["ok"] is True and d["format"] == "prompt_completion" and d["examples"] == 2 and d["dropped"] == 0
    assert set(d["tokens"]) >= {"total", "max", "mean", "estimated"}
    json.dumps(d)  # JSON-ready
    assert report.ok is True


def test_token_stats_are_estimated_without_a_tokenizer(tmp_path):
    # 40 bytes of text = 10 tokens, plus 4 tokens of template per message.
    report = tuning_magics.validate(write(tmp_path, [pc("a" * 40, "b" * 4), pc("c" * 80, "d" * 4)]))
    tokens = report.tokens
    assert tokens["estimated"] is True
    assert tokens["max"] == 20 + 1 + 8
    assert tokens["total"] == (10 + 1 + 8) + (20 + 1 + 8)
    assert tokens["mean"] == pytest.approx(tokens["total"] / 2)
    assert "estimate" in report.tokenizer_note
    assert "estimated" in report.summary()


@pytest.mark.parametrize("as_", ["file", "records", "frame"])
def test_token_stats_of_an_invalid_dataset_are_over_its_valid_examples(tmp_path, as_):
    good = [pc("a" * 40, "b" * 4), pc("c" * 80, "d" * 4), pc("e" * 8, "f")]
    records = [good[0], pc("q", "  "), good[1], {"prompt": 5, "completion": "x"}, good[2], pc("", None)]
    source = {"file": lambda: write(tmp_path, records), "records": lambda: records,
              "frame": lambda: pd.DataFrame(records)}[as_]()
    report = tuning_magics.validate(source, model="local/tiny-qwen3")
    assert [e.line for e in report.errors] == [2, 4, 6, 6]  # in line order
    alone = tuning_magics.validate(good, model="local/tiny-qwen3")
    # Not a total of zeros, nor a mean that counts the invalid examples as empty ones.
    assert report.tokens == alone.tokens and report.tokens["total"] > 0
    assert (report.examples, report.valid_examples) == (6, 3)
    assert "tokens over the 3 valid rows: total" in report.summary()
    assert "tokens over the 3 valid rows" in report._repr_html_()


def test_an_image_example_for_a_text_only_model_has_no_token_count(tmp_path):
    report = tuning_magics.validate([image_chat(), chat("q", "a")], model=TEXT_MODEL)
    assert [e.line for e in report.errors] == [1]
    assert report.valid_examples == 1 and report.tokens == tuning_magics.validate([chat("q", "a")],
                                                                                  model=TEXT_MODEL).tokens


def test_error_entries_carry_line_field_and_message(tmp_path):
    report = tuning_magics.validate(write(tmp_path, [pc(), {"prompt": "p"}]))
    err = only_error(report)
    assert set(err) >= {"line", "field", "message"}
    assert (err["line"], err["field"]) == (2, "completion")
    assert "line 2, completion" in str(report.errors[0])
    assert "INVALID" in report.summary()


# -- lines that are not JSON objects --------------------------------------------------------


def test_invalid_json_line_is_reported_with_its_line(tmp_path):
    report = tuning_magics.validate(write(tmp_path, [pc(), '{"prompt": "unterminated', pc()]))
    err = only_error(report)
    assert err["line"] == 2 and "not valid JSON" in err["message"]
    assert report.examples == 3


def test_invalid_utf8_line_is_reported(tmp_path):
    report = tuning_magics.validate(write(tmp_path, [pc(), b'{"prompt": "caf\xe9", "completion": "x"}']))
    err = only_error(report)
    assert err["line"] == 2 and "UTF-8" in err["message"]


def test_line_numbers_count_blank_lines(tmp_path):
    report = tuning_magics.validate(write(tmp_path, [pc(), "", "   ", {"prompt": None, "completion": "x"}]))
    err = only_error(report)
    assert (err["line"], err["field"]) == (4, "prompt")
    assert report.examples == 2  # blank lines are not examples


@pytest.mark.parametrize(
    ("line", "kind"),
    [("[1, 2]", "an array"), ('"text"', "a string"), ("42", "a number"), ("null", "null"), ("true", "a boolean")],
)
def test_a_line_that_is_not_an_object(tmp_path, line, kind):
    report = tuning_magics.validate(write(tmp_path, [pc(), line]))
    err = only_error(report)
    assert err["line"] == 2
    assert err["message"] == f"each line must be a JSON object, not {kind}"


def test_several_formats_in_one_file(tmp_path):
    report = tuning_magics.validate(write(tmp_path, [pc(), pc(), chat("q", "a"), gc([{"text": "q"}], [{"text": "a"}])]))
    assert report.format == "prompt_completion"
    assert issues(report) == [(3, None), (4, None)]
    assert "one file holds one format" in report.errors[0].message
    assert "line 1" in report.errors[0].message


def test_an_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    report = tuning_magics.validate(str(path))
    err = only_error(report)
    assert err["line"] is None and "no examples" in err["message"]
    assert report.examples == 0 and report.format is None


def test_a_file_of_blank_lines_is_empty(tmp_path):
    report = tuning_magics.validate(write(tmp_path, ["", "  ", "\t"]))
    assert "no examples" in only_error(report)["message"]


def test_crlf_line_endings_are_fine(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"prompt":"a","completion":"b"}\r\n{"prompt":"c","completion":"d"}\r\n')
    report = tuning_magics.validate(path)
    assert report.ok and report.examples == 2


# -- keys, roles, content ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"prompt": "p", "completion": "c", "answer": "x"}, "answer"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": 1}, "id"),
        ({"messages": [{"role": "user", "content": "q", "name": "bob"}, {"role": "assistant", "content": "a"}]}, "messages[0].name"),
        ({"contents": [{"role": "user", "parts": [{"text": "q"}], "extra": 1}, {"role": "model", "parts": [{"text": "a"}]}]}, "contents[0].extra"),
        ({"contents": [{"role": "user", "parts": [{"text": "q", "thought": True}]}, {"role": "model", "parts": [{"text": "a"}]}]}, "contents[0].parts[0].thought"),
        (chat([{"type": "text", "text": "q", "lang": "en"}], "a"), "messages[0].content[0].lang"),
        (chat([{"type": "image_url", "image_url": {"url": "gs://b/x.png", "size": 3}}, {"type": "text", "text": "q"}], "a"), "messages[0].content[0].image_url.size"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(tmp_path, record, field):
    report = tuning_magics.validate(write(tmp_path, [record]))
    assert (1, field) in issues(report)
    assert not report.ok


def test_a_record_with_no_known_keys(tmp_path):
    report = tuning_magics.validate(write(tmp_path, [{"question": "q", "answer": "a"}]))
    err = only_error(report)
    assert err["line"] == 1 and "answer, question" in err["message"]


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages[0].role"),
        ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}, "messages[0].role"),
        ({"contents": [{"role": "system", "parts": [{"text": "q"}]}, {"role": "model", "parts": [{"text": "a"}]}]}, "contents[0].role"),
        ({"contents": [{"parts": [{"text": "q"}]}, {"role": "model", "parts": [{"text": "a"}]}]}, "contents[0].role"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "late"}, {"role": "assistant", "content": "a"}]}, "messages[1].role"),
    ],
)
def test_unknown_missing_or_misplaced_roles(tmp_path, record, field):
    report = tuning_magics.validate(write(tmp_path, [record]))
    assert (1, field) in issues(report)


@pytest.mark.parametrize(
    ("record", "field", "words"),
    [
        ({"prompt": "p"}, "completion", "missing"),
        ({"completion": "c"}, "prompt", "missing"),
        ({"prompt": None, "completion": "c"}, "prompt", "null"),
        ({"prompt": "p", "completion": ""}, "completion", "empty"),
        ({"prompt": "p", "completion": " \n\t "}, "completion", "empty"),
        ({"prompt": 7, "completion": "c"}, "prompt", "must be a string, not a number"),
        ({"prompt": ["p"], "completion": "c"}, "prompt", "must be a string, not an array"),
        ({"prompt": "p", "completion": True}, "completion", "not a boolean"),
        (chat("q", None), "messages[1].content", "null"),
        (chat("q", ""), "messages[1].content", "empty"),
        (chat("q", {"text": "a"}), "messages[1].content", "not an object"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "messages[0].content", "missing"),
        (chat([], "a"), "messages[0].content", "empty list"),
        (chat([{"type": "text", "text": ""}], "a"), "messages[0].content[0].text", "empty"),
        (chat([{"type": "text"}], "a"), "messages[0].content[0].text", "missing"),
        (gc([{"text": ""}], [{"text": "a"}]), "contents[0].parts[0].text", "empty"),
        (gc([{"text": None}], [{"text": "a"}]), "contents[0].parts[0].text", "null"),
        (gc([{"text": 3}], [{"text": "a"}]), "contents[0].parts[0].text", "not a number"),
        (gc([{"text": "q"}], [{"text": "a"}], system=" "), "systemInstruction.parts[0].text", "empty"),
    ],
)
def test_missing_null_empty_or_mistyped_content(tmp_path, record, field, words):
    report = tuning_magics.validate(write(tmp_path, [pc() if "prompt" in record or "completion" in record else record, record]))
    errors = report.to_dict()["errors"]
    hits = [e for e in errors if e["line"] == 2 and e["field"] == field]
    assert hits, errors
    assert words in hits[0]["message"]


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hello", {"role": "assistant", "content": "a"}]}, "messages[0]"),
        ({"contents": "hello"}, "contents"),
        ({"contents": [{"role": "user", "parts": []}, {"role": "model", "parts": [{"text": "a"}]}]}, "contents[0].parts"),
        ({"contents": [{"role": "user", "parts": "q"}, {"role": "model", "parts": [{"text": "a"}]}]}, "contents[0].parts"),
        ({"contents": [{"role": "user", "parts": ["q"]}, {"role": "model", "parts": [{"text": "a"}]}]}, "contents[0].parts[0]"),
        ({"contents": [{"role": "user", "parts": [{"text": "q", "fileData": {"mimeType": "image/png", "fileUri": "gs://b/x.png"}}]}, {"role": "model", "parts": [{"text": "a"}]}]}, "contents[0].parts[0]"),
        ({"contents": [{"role": "user", "parts": [{}]}, {"role": "model", "parts": [{"text": "a"}]}]}, "contents[0].parts[0]"),
        ({"contents": [{"role": "user", "parts": [{"fileData": "gs://b/x.png"}, {"text": "q"}]}, {"role": "model", "parts": [{"text": "a"}]}]}, "contents[0].parts[0].fileData"),
        ({"contents": [{"role": "user", "parts": [{"fileData": {"fileUri": "gs://b/x.png"}}, {"text": "q"}]}, {"role": "model", "parts": [{"text": "a"}]}]}, "contents[0].parts[0].fileData.mimeType"),
        ({"contents": [{"role": "user", "parts": [{"fileData": {"mimeType": "image/png"}}, {"text": "q"}]}, {"role": "model", "parts": [{"text": "a"}]}]}, "contents[0].parts[0].fileData.fileUri"),
        ({"contents": [{"role": "user", "parts": [{"file_data": {"mime_type": "image/png", "file_uri": "/local/x.png"}}, {"text": "q"}]}, {"role": "model", "parts": [{"text": "a"}]}]}, "contents[0].parts[0].file_data.file_uri"),
        ({"systemInstruction": "be kind", "contents": [{"role": "user", "parts": [{"text": "q"}]}, {"role": "model", "parts": [{"text": "a"}]}]}, "systemInstruction"),
        ({"system_instruction": {"parts": []}, "contents": [{"role": "user", "parts": [{"text": "q"}]}, {"role": "model", "parts": [{"text": "a"}]}]}, "system_instruction"),
        ({"systemInstruction": {"parts": [{"fileData": {"mimeType": "image/png", "fileUri": "gs://b/x.png"}}]}, "contents": [{"role": "user", "parts": [{"text": "q"}]}, {"role": "model", "parts": [{"text": "a"}]}]}, "systemInstruction.parts[0]"),
        ({"systemInstruction": {"parts": [{"text": "s"}]}}, "contents"),
        (chat([{"type": "audio", "data": "x"}, {"type": "text", "text": "q"}], "a"), "messages[0].content[0].type"),
        (chat(["q"], "a"), "messages[0].content[0]"),
        (chat([{"type": "image_url"}, {"type": "text", "text": "q"}], "a"), "messages[0].content[0].image_url"),
        (chat([{"type": "image_url", "image_url": {"detail": "low"}}, {"type": "text", "text": "q"}], "a"), "messages[0].content[0].image_url.url"),
        (chat([{"type": "image_url", "image_url": {"url": "gs://b/x.png", "detail": "tiny"}}, {"type": "text", "text": "q"}], "a"), "messages[0].content[0].image_url.detail"),
        (chat([{"type": "image_url", "image_url": {"url": "/home/me/x.png"}}, {"type": "text", "text": "q"}], "a"), "messages[0].content[0].image_url.url"),
    ],
)
def test_wrong_types_and_malformed_parts(tmp_path, record, field):
    report = tuning_magics.validate(write(tmp_path, [record]))
    assert not report.ok
    assert (1, field) in issues(report), report.to_dict()["errors"]


def test_lone_surrogates_in_records_are_errors_not_crashes():
    report = tuning_magics.validate([pc(), pc("cut emoji \ud83d", "x")])
    err = only_error(report)
    assert (err["line"], err["field"]) == (2, "prompt")
    assert "Unicode" in err["message"]


# -- the assistant turn and the method -------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
        {"contents": [{"role": "user", "parts": [{"text": "q"}]}]},
        {"prompt": "q"},
    ],
)
def test_no_assistant_turn_is_an_error_for_sft_and_fine_for_distillation(tmp_path, record):
    path = write(tmp_path, [record])
    sft = tuning_magics.validate(path)
    assert not sft.ok
    assert sft.errors[0].line == 1
    distillation = tuning_magics.validate(path, method="distillation")
    assert distillation.ok, distillation.to_dict()["errors"]
    assert distillation.method == "distillation"


def test_conversation_must_start_with_a_user_turn(tmp_path):
    record = {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    report = tuning_magics.validate(write(tmp_path, [record]))
    assert (1, "messages") in issues(report)
    assert "start with a user turn" in report.errors[0].message


@pytest.mark.parametrize(
    "record",
    [chat("q", "a", "another question"),
     gc([{"text": "q"}], [{"text": "a"}], [{"text": "another question"}])],
)
def test_a_conversation_ending_with_a_user_turn_is_an_error_for_sft_but_the_prompt_for_distillation(
        tmp_path, record):
    good = chat("q", "a") if "messages" in record else gc([{"text": "q"}], [{"text": "a"}])
    path = write(tmp_path, [good, record])
    err = only_error(tuning_magics.validate(path))
    assert (err["line"], err["field"]) == (2, "messages" if "messages" in record else "contents")
    assert "ends with a user turn" in err["message"] and "truncated" in err["message"]
    assert tuning_magics.validate(path, method="distillation").ok


def test_only_a_system_message_is_an_error(tmp_path):
    report = tuning_magics.validate(write(tmp_path, [{"messages": [{"role": "system", "content": "s"}]}]), method="distillation")
    assert (1, "messages") in issues(report)


def test_unknown_method_is_a_user_error():
    with pytest.raises(UserError) as info:
        tuning_magics.validate([pc()], method="rlhf")
    assert info.value.field == "method" and "rlhf" in str(info.value)


# -- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (image_chat(url="gs://b/anim.gif"), "messages[0].content[0].image_url.url"),
        (image_chat(url="https://x.org/scan.BMP"), "messages[0].content[0].image_url.url"),
        (image_chat(url=f"data:image/gif;base64,{PNG_B64}"), "messages[0].content[0].image_url.url"),
        (image_chat(url=f"data:image/bmp;base64,{PNG_B64}"), "messages[0].content[0].image_url.url"),
        (gc([{"fileData": {"mimeType": "image/gif", "fileUri": "gs://b/x"}}, {"text": "q"}], [{"text": "a"}]), "contents[0].parts[0].fileData.mimeType"),
        (gc([{"file_data": {"mime_type": "image/bmp", "file_uri": "gs://b/x"}}, {"text": "q"}], [{"text": "a"}]), "contents[0].parts[0].file_data.mime_type"),
        (gc([{"inlineData": {"mimeType": "image/gif", "data": PNG_B64}}, {"text": "q"}], [{"text": "a"}]), "contents[0].parts[0].inlineData.mimeType"),
    ],
)
def test_unsupported_image_types(tmp_path, record, field):
    report = tuning_magics.validate(write(tmp_path, [record]))
    err = only_error(report)
    assert (err["line"], err["field"]) == (1, field)
    assert "not supported" in err["message"]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("data:image/png;base64,not*base64!", "not valid base64"),
        ("data:image/png;base64,", "not valid base64"),
        ("data:image/png;base64,AAA", "not valid base64"),
        (f"data:image/png,{PNG_B64}", "data:image/jpeg;base64"),
        ("data:image/png;base64", "data:image/jpeg;base64"),
    ],
)
def test_bad_data_uris(tmp_path, url, words):
    report = tuning_magics.validate(write(tmp_path, [image_chat(url=url)]))
    err = only_error(report)
    assert (err["line"], err["field"]) == (1, "messages[0].content[0].image_url.url")
    assert words in err["message"]


def test_bad_base64_in_inline_data(tmp_path):
    record = gc([{"inlineData": {"mimeType": "image/png", "data": "%%%"}}, {"text": "q"}], [{"text": "a"}])
    err = only_error(tuning_magics.validate(write(tmp_path, [record])))
    assert (err["line"], err["field"]) == (1, "contents[0].parts[0].inlineData.data")


def test_images_for_a_text_only_model_are_errors(tmp_path):
    path = write(tmp_path, [image_chat(), image_chat()])
    report = tuning_magics.validate(path, model=TEXT_MODEL)
    assert issues(report) == [(1, None), (2, None)]
    assert TEXT_MODEL in report.errors[0].message and "text-only" in report.errors[0].message
    assert report.model == TEXT_MODEL


def test_images_for_an_image_model_are_fine(tmp_path):
    report = tuning_magics.validate(write(tmp_path, [image_chat(), image_chat()]), model=IMAGE_MODEL)
    assert report.ok, report.to_dict()["errors"]
    assert report.images == 2 and report.dropped == 0


def test_images_without_a_model_are_fine(tmp_path):
    assert tuning_magics.validate(write(tmp_path, [image_chat()])).ok


def test_text_only_rows_in_an_image_dataset_are_a_warning_and_counted_as_dropped(tmp_path):
    path = write(tmp_path, [image_chat(), chat("q", "a"), image_chat(), chat("q2", "a2")])
    report = tuning_magics.validate(path, model=IMAGE_MODEL)
    d = report.to_dict()
    assert d["ok"] and d["errors"] == []
    assert d["dropped"] == 2
    assert (2, None) in issues(report, "warnings") and (4, None) in issues(report, "warnings")
    assert any("dropped" in w["message"] and w["line"] is None for w in d["warnings"])


def test_a_text_only_dataset_drops_nothing(tmp_path):
    report = tuning_magics.validate(write(tmp_path, [chat("q", "a")]), model=IMAGE_MODEL)
    assert report.ok and report.dropped == 0 and report.warnings == []


# -- models and sequence length ---------------------------------------------------------------


def test_examples_longer_than_the_max_sequence_length_are_warnings(tmp_path):
    long = pc("word " * 2000, "ok")  # ~2,500 estimated tokens: over 2,048, under 8,192
    path = write(tmp_path, [pc(), long])
    scout = tuning_magics.validate(path, model=IMAGE_MODEL)
    assert scout.ok
    assert issues(scout, "warnings") == [(2, None)]
    assert "2,048" in scout.warnings[0].message and "truncated" in scout.warnings[0].message
    qwen = tuning_magics.validate(path, model=TEXT_MODEL)
    assert qwen.ok and qwen.warnings == []


def test_model_short_names_are_accepted():
    report = tuning_magics.validate([pc()], model="qwen3-4b")
    assert report.model == TEXT_MODEL


def test_unknown_model_is_a_user_error_with_suggestions():
    with pytest.raises(UserError) as info:
        tuning_magics.validate([pc()], model="qwen3-5b")
    assert info.value.field == "model"
    assert "qwen3-4b" in str(info.value) or "qwen3-8b" in str(info.value)


# -- DataFrames and record lists ------------------------------------------------------------------


def test_validate_a_dataframe_reports_rows_as_lines():
    df = pd.DataFrame({"prompt": ["a", "b", None, "d"], "completion": ["w", "", "y", "z"]})
    report = tuning_magics.validate(df)
    assert report.examples == 4
    assert issues(report) == [(2, "completion"), (3, "prompt")]
    assert report.source.startswith("<DataFrame")


def test_validate_a_dataframe_of_messages():
    df = pd.DataFrame({"messages": [chat("q", "a")["messages"], chat("q", None)["messages"]]})
    report = tuning_magics.validate(df)
    assert report.format == "chat"
    assert issues(report) == [(2, "messages[1].content")]


def test_validate_a_list_of_records():
    report = tuning_magics.validate([pc(), "oops", {"prompt": "p", "completion": 1}])
    assert issues(report) == [(2, None), (3, "completion")]
    assert report.examples == 3


def test_validate_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as info:
        tuning_magics.validate(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in str(info.value)


def test_validate_accepts_a_path_object(tmp_path):
    from pathlib import Path

    assert tuning_magics.validate(Path(write(tmp_path, [pc()]))).ok


def test_errors_are_counted_beyond_the_listed_ones(tmp_path):
    n = V.MAX_LISTED + 25
    report = tuning_magics.validate(write(tmp_path, [{"prompt": "p"}] * n))
    assert report.error_count == n
    assert len(report.errors) == V.MAX_LISTED
    assert f"{n} errors" in report.summary()


# -- validation sets ------------------------------------------------------------------------------


def test_a_validation_set_over_5000_examples_is_an_error(tmp_path):
    train = write(tmp_path, [pc("t", "t")], name="train.jsonl")
    val = write(tmp_path, [pc(f"q{i}", "a") for i in range(5001)], name="val.jsonl")
    report = tuning_magics.validate(val, training=train)
    err = only_error(report)
    assert "5,001" in err["message"] and "5,000" in err["message"]
    ok = tuning_magics.validate(write(tmp_path, [pc(f"q{i}", "a") for i in range(5000)], name="v2.jsonl"), training=train)
    assert ok.ok


def test_an_open_models_validation_set_is_at_most_a_quarter_of_the_training_bytes(tmp_path):
    train_records = [pc(f"question {i}", "answer") for i in range(80)]
    train = write(tmp_path, train_records, name="train.jsonl")
    size = (tmp_path / "train.jsonl").stat().st_size
    quarter = [pc(f"question {i}", "answer") for i in range(80, 99)]  # 19 lines of 50 bytes: 23.8% of 3,990
    assert tuning_magics.validate(write(tmp_path, quarter, name="ok.jsonl"), model="qwen3-4b", training=train).ok
    over = quarter + [pc("question 99", "answer"), pc("q", "a")]  # 25.3%
    err = only_error(tuning_magics.validate(write(tmp_path, over, name="over.jsonl"), model="qwen3-4b",
                                            training=train))
    assert f"of the training set's {size:,}" in err["message"] and "at most 25%" in err["message"]
    # The same rule for records and DataFrames, sized as the JSONL lines they make.
    assert not tuning_magics.validate(over, model="qwen3-4b", training=train_records).ok
    assert tuning_magics.validate(quarter, model="qwen3-4b", training=pd.DataFrame(train_records)).ok
    # Gemini and the local models have no such rule.
    assert tuning_magics.validate(over, model="gemini-2.5-flash", training=train_records).ok
    assert tuning_magics.validate(over, model="local/tiny-qwen3", training=train_records).ok


def test_a_validation_set_identical_to_the_training_set_is_an_error(tmp_path):
    records = [pc("a", "b"), pc("c", "d")]
    train = write(tmp_path, records, name="train.jsonl")
    val = write(tmp_path, records, name="val.jsonl")
    err = only_error(tuning_magics.validate(val, training=train))
    assert "identical" in err["message"]
    assert tuning_magics.validate(records, training=list(records)).ok is False
    assert tuning_magics.validate(write(tmp_path, [pc("e", "f")], name="v2.jsonl"), training=train).ok


def test_identical_content_is_found_across_spellings(tmp_path):
    df = pd.DataFrame({"prompt": ["a", "c"], "completion": ["b", "d"]})
    path = tmp_path / "val.jsonl"
    # Other key order and spacing, a blank line: the same examples.
    path.write_text('{"completion": "b", "prompt": "a"}\n\n{"prompt":"c",  "completion":"d"}\n', encoding="utf-8")
    assert not tuning_magics.validate(str(path), training=df).ok
    assert not tuning_magics.validate(str(path), training=[pc("a", "b"), pc("c", "d")]).ok
    assert tuning_magics.validate(str(path), training=df.iloc[:1]).ok


# -- Cloud Storage ------------------------------------------------------------------------------------


def test_dataset_written_to_gcs_validates_back(gcs_emulator):
    df = pd.DataFrame({"question": ["What is 2+2?", "Capital of France?"], "answer": ["4", "Paris"]})
    uri = gcs_emulator.uri("train.jsonl")
    ds = tuning_magics.dataset(df, out=uri, prompt="question", completion="answer")
    assert ds.uri == uri
    report = tuning_magics.validate(uri)
    assert report.ok and report.examples == 2 and report.format == "chat"
    assert report.source == uri
    bad = gcs_emulator.uri("bad.jsonl")
    from tuning_magics import storage

    with storage.atomic_writer(bad) as fh:
        fh.write(b'{"prompt": "p"}\n')
    assert issues(tuning_magics.validate(bad)) == [(1, "completion")]


# -- cells, invisible text, duplicate keys, files that are not JSONL, bounded reading -----------------


def test_a_number_in_a_dataframe_cell_is_a_number_not_null():
    df = pd.DataFrame({"prompt": [5, "q", None], "completion": ["a", 2.5, "b"]})
    report = tuning_magics.validate(df)
    assert [(e.line, e.field, e.message) for e in report.errors] == [
        (1, "prompt", "must be text (it must be a string, not a number)"),
        (2, "completion", "must be text (it must be a string, not a number)"),
        (3, "prompt", V.TEXT_RULES["null"]),
    ]
    messages = pd.DataFrame({"messages": [[{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]]})
    err = only_error(tuning_magics.validate(messages))
    assert (err["field"], err["message"]) == ("messages[0].content", "must be text (it must be a string, not a number)")


@pytest.mark.parametrize("text", ["\u200b", "\x00", "\u200d\u2060\ufeff", " \u3164\u2800 ", "\x1b", "\u2028"])
def test_text_of_invisible_characters_only_is_blank(tmp_path, text):
    for record in (pc(text, "a"), chat("q", text), gc([{"text": "q"}], [{"text": text}])):
        err = only_error(tuning_magics.validate(write(tmp_path, [record])))
        assert err["message"].startswith("is blank")
    assert tuning_magics.validate(write(tmp_path, [pc("a\u200bb", "\x00x")])).ok


@pytest.mark.parametrize(
    "line, key",
    [
        ('{"prompt": "a", "prompt": "b", "completion": "c"}', "prompt"),
        ('{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "c"}]}',
         "content"),
        ('{"prompt":"a","completion":"c","completion":"d"}', "completion"),
    ],
)
def test_duplicate_keys_are_errors_naming_the_key_and_line(tmp_path, line, key):
    err = only_error(tuning_magics.validate(write(tmp_path, [pc(), line])))
    assert (err["line"], err["field"]) == (2, key)
    assert f"key {key!r} appears twice" in err["message"]


@pytest.mark.parametrize("space", [" ", "\t", "  \r "])
def test_duplicate_keys_with_white_space_before_the_colon(tmp_path, space):
    line = '{"prompt"%s: "a", "prompt"%s: "b", "completion"%s: "c"}' % (space, space, space)
    err = only_error(tuning_magics.validate(write(tmp_path, [pc(), line])))
    assert (err["line"], err["field"]) == (2, "prompt") and "appears twice" in err["message"]


def _nested(depth: int) -> str:
    return '{"prompt": "a", "completion": "b", "x": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("depth", [260, 1000, 1100])
def test_a_line_nested_too_deeply_is_one_error_naming_it(tmp_path, depth):
    path = write(tmp_path, [pc(), _nested(depth), pc()])
    err = only_error(tuning_magics.validate(path))
    assert (err["line"], err["message"]) == (2, V.TOO_DEEP)
    # As a validation set too (the identity check reads every line again).
    report = tuning_magics.validate(path, training=write(tmp_path, [pc("other")], name="train.jsonl"))
    assert [(e.line, e.message) for e in report.errors] == [(2, V.TOO_DEEP)]


def test_the_deepest_line_json_writers_take_is_fine(tmp_path):
    assert tuning_magics.validate(write(tmp_path, [_nested(V.MAX_DEPTH - 1)])).errors[0].field == "x"  # unknown key


def test_the_cli_reports_a_line_nested_too_deeply_without_a_traceback(tmp_path):
    import subprocess
    import sys

    path = write(tmp_path, [pc(), _nested(300)])
    done = subprocess.run([sys.executable, "-m", "tuning_magics", "validate", path, "--validation", path],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr == ""
    assert f"line 2: {V.TOO_DEEP}" in done.stdout


def test_cells_nested_too_deeply_are_one_error_naming_the_row(tmp_path):
    nested: list = []
    for _ in range(2000):  # deeper than Python's own recursion limit
        nested = [nested]
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    deep_content = [{"role": "user", "content": nested}, {"role": "assistant", "content": "a"}]
    for cell in (nested, deep_content):
        df = pd.DataFrame({"messages": [good, cell]}, index=["first", "second"])
        assert [(e.line, e.message) for e in tuning_magics.validate(df).errors] == [(2, V.TOO_DEEP)]
        with pytest.raises(UserError) as info:
            tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"), messages="messages")
        assert str(info.value).startswith(f"row 'second', column 'messages': {V.TOO_DEEP}; nothing was written")
        assert not list(tmp_path.glob("t.jsonl*"))


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"messages": [{"role": ["user"], "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages[0].role"),
        ({"contents": [{"role": {"r": 1}, "parts": [{"text": "q"}]}, {"role": "model", "parts": [{"text": "a"}]}]},
         "contents[0].role"),
        (chat([{"type": "image_url", "image_url": {"url": "gs://b/x.png", "detail": ["low"]}}, {"type": "text", "text": "q"}],
              "a"), "messages[0].content[0].image_url.detail"),
    ],
)
def test_a_list_or_object_where_a_name_belongs_is_an_error_not_a_crash(tmp_path, record, field):
    for source in (write(tmp_path, [record]), [record]):
        assert (1, field) in issues(tuning_magics.validate(source))


def test_quotes_and_colons_inside_text_are_not_duplicate_keys(tmp_path):
    assert tuning_magics.validate(write(tmp_path, [pc('he said "a": "b"', '"prompt": "x"')])).ok
    assert tuning_magics.validate(write(tmp_path, [chat('{"role": "user"}', 'ok \\": "x"')])).ok
    spaced = '{"prompt" : "a", "completion" : "b"}'
    assert tuning_magics.validate(write(tmp_path, [spaced])).ok


@pytest.mark.parametrize(
    "content, words",
    [
        (gzip.compress(b'{"prompt": "a", "completion": "b"}\n'), ["gzip-compressed", "decompress"]),
        (b"PK\x03\x04" + b"\x00" * 40, ["zip archive", "extract"]),
        (b"PAR1\x15\x04" + b"\x00" * 40 + b"PAR1", ["Parquet", "read_parquet"]),
        ('{"prompt": "a", "completion": "b"}\n'.encode("utf-16"), ["UTF-16", "UTF-8"]),
        (b"\x00\x01\x02binary\n", ["NUL bytes", "not JSONL"]),
    ],
)
def test_compressed_and_binary_files_are_named_for_what_they_are(tmp_path, content, words):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    report = tuning_magics.validate(str(path))
    err = only_error(report)
    assert all(w in err["message"] for w in words), err
    assert "UTF-8 (byte" not in err["message"]


def test_a_line_over_the_limit_is_one_error_and_the_next_lines_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(V, "MAX_LINE_BYTES", 1000)
    long = json.dumps(pc("x" * 5000, "y"))
    path = write(tmp_path, [pc(), long, pc("q", "")])
    report = tuning_magics.validate(path, model="local/tiny-qwen3")
    assert issues(report) == [(2, None), (3, "completion")]
    assert "1,000 bytes" in report.errors[0].message
    assert report.examples == 3


def test_a_huge_line_is_skipped_with_bounded_memory(tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(V, "MAX_LINE_BYTES", 4 * 2**20)
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as fh:
        fh.write(b'{"prompt": "' + b"x" * (40 * 2**20) + b'", "completion": "a"}\n')
        fh.write(json.dumps(pc()).encode() + b"\n")
    tracemalloc.start()
    try:
        report = tuning_magics.validate(str(path), model="local/tiny-qwen3")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert issues(report) == [(1, None)] and report.examples == 2
    assert peak < 4 * V.MAX_LINE_BYTES  # the line (40 MiB) is never held whole


@pytest.mark.timeout(60)
def test_dev_zero_ends_at_once_with_one_error():
    report = tuning_magics.validate("/dev/zero")
    err = only_error(report)
    assert "NUL bytes" in err["message"]


# -- what the report shows --------------------------------------------------------------------------


def test_the_histogram_has_integer_bins_that_do_not_repeat():
    from tuning_magics.display.dataset_report import histogram_text

    report = V.ValidationReport(source="x", token_lengths=[9, 9, 10, 10, 10, 12])
    text = histogram_text(report)
    spans = [line.split()[0] for line in text.splitlines()]
    assert spans == ["9", "10", "11", "12"]
    assert [int(line.split()[-1]) for line in text.splitlines()] == [2, 3, 0, 1]
    wide = V.ValidationReport(source="x", token_lengths=list(range(1, 101)))
    bins = wide.length_histogram(8)
    assert all(b[0] == a[1] + 1 for a, b in zip(bins, bins[1:])) and sum(c for _, _, c in bins) == 100


def test_the_report_leaves_matplotlib_backend_alone():
    import subprocess
    import sys

    code = (
        "import matplotlib; matplotlib.use('svg')\n"
        "import tuning_magics as tm\n"
        "r = tm.validate([{'prompt': 'a', 'completion': 'b'}], model='local/tiny-qwen3')\n"
        "html = r._repr_html_()\n"
        "assert 'data:image/png;base64' in html\n"
        "print(matplotlib.get_backend())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg"


def test_the_report_carries_the_example_in_the_models_template():
    report = tuning_magics.validate([pc("Hi", "Yo")], model="local/tiny-qwen3")
    # As the engine trains on it: the loss covers the answer and its end-of-turn marker, not the newline after.
    assert report.example_segments == [("<bos><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
                                       ("Yo<|im_end|>", True), ("\n", False)]


def test_gemini_takes_a_validation_set_above_1000_examples_only_up_to_30_percent_of_the_training_set():
    def rows(n, tag):
        return [{"prompt": f"{tag} question {i}", "completion": f"answer {i}"} for i in range(n)]

    train, validation = rows(2000, "train"), rows(1200, "held out")
    validate = tuning_magics.validate
    report = validate(validation, model="gemini-2.5-flash", training=train)
    assert not report.ok
    assert "at most 1,000 for gemini-2.5-flash with 2,000 training examples" in str(report.errors[0])
    open_model = validate(validation, model="qwen/qwen3@qwen3-4b", training=train)  # open models: 5000 examples,
    assert [e.message for e in open_model.errors] == [open_model.errors[0].message]  # one error: the bytes,
    assert "at most 25%" in open_model.errors[0].message  # not the example count
    assert validate(validation, model="gemini-2.5-flash", training=rows(4000, "train")).ok  # 30% is 1,200
