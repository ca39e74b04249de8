"""tuning_magics.dataset: DataFrame -> validated JSONL, all or nothing."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import hypothesis
import pandas as pd
import pytest
from hypothesis import strategies as st

import tuning_magics
from tuning_magics.datasets import build as B
from tuning_magics.datasets import validate as V
from tuning_magics.datasets.build import DatasetInvalid
from tuning_magics.errors import UserError

TEXT_MODEL = "qwen/qwen3@qwen3-4b"
IMAGE_MODEL = "meta/llama4@llama-4-scout-17b-16e-instruct"

# Real (tiny) image files: a 1x1 PNG and the start of a JFIF JPEG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"


def read(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def qa(n=3, **extra) -> pd.DataFrame:
    return pd.DataFrame({"question": [f"q{i}" for i in range(n)], "answer": [f"a{i}" for i in range(n)], **extra})


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- column mappings and formats -----------------------------------------------------------


def test_prompt_completion_columns_default_to_chat(tmp_path):
    out = tmp_path / "train.jsonl"
    ds = tuning_magics.dataset(qa(), out=str(out), prompt="question", completion="answer")
    assert read(out) == [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(3)
    ]
    assert ds.uri == str(out) and ds.path == str(out)
    assert ds.examples == 3 and ds.format == "chat"
    assert ds.report.ok and ds.validation is None
    assert tuning_magics.validate(str(out)).ok


def test_format_prompt_completion(tmp_path):
    out = tmp_path / "pc.jsonl"
    ds = tuning_magics.dataset(qa(), out=str(out), prompt="question", completion="answer", format="prompt_completion")
    assert read(out) == [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    assert ds.format == "prompt_completion"


def test_format_generate_content(tmp_path):
    out = tmp_path / "gc.jsonl"
    tuning_magics.dataset(qa(), out=str(out), user="question", assistant="answer", format="generate_content")
    assert read(out)[1] == {
        "contents": [{"role": "user", "parts": [{"text": "q1"}]}, {"role": "model", "parts": [{"text": "a1"}]}]
    }
    assert tuning_magics.validate(str(out)).format == "generate_content"


def test_gemini_models_default_to_generate_content(tmp_path):
    out = tmp_path / "g.jsonl"
    ds = tuning_magics.dataset(qa(), out=str(out), prompt="question", completion="answer", model="gemini-2.5-flash")
    assert ds.format == "generate_content" and "contents" in read(out)[0]


def test_unknown_format_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(), out=str(tmp_path / "x.jsonl"), prompt="question", completion="answer", format="csv")
    assert info.value.field == "format"
    assert not list(tmp_path.iterdir())


def test_common_column_names_are_recognised(tmp_path):
    for df, expected in [
        (pd.DataFrame({"prompt": ["p"], "completion": ["c"]}), ("p", "c")),
        (pd.DataFrame({"user": ["u"], "assistant": ["a"], "other": [1]}), ("u", "a")),
        (pd.DataFrame({"input": ["i"], "output": ["o"]}), ("i", "o")),
        (qa(1), ("q0", "a0")),
        (pd.DataFrame({"instruction": ["i"], "response": ["r"]}), ("i", "r")),
    ]:
        out = tmp_path / f"{'-'.join(df.columns)}.jsonl"
        tuning_magics.dataset(df, out=str(out))
        assert [m["content"] for m in read(out)[0]["messages"]] == list(expected)


def test_no_recognisable_columns_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="name the columns"):
        tuning_magics.dataset(pd.DataFrame({"x": ["1"], "y": ["2"]}), out=str(tmp_path / "x.jsonl"))


def test_user_assistant_and_system_columns(tmp_path):
    df = pd.DataFrame({"u": ["hi", "yo"], "a": ["hello", "hey"], "s": ["be formal", "be casual"]})
    out = tmp_path / "chat.jsonl"
    tuning_magics.dataset(df, out=str(out), user="u", assistant="a", system="s")
    assert read(out) == [
        {"messages": [{"role": "system", "content": "be formal"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "system", "content": "be casual"}, {"role": "user", "content": "yo"}, {"role": "assistant", "content": "hey"}]},
    ]
    gc = tmp_path / "gc.jsonl"
    tuning_magics.dataset(df, out=str(gc), user="u", assistant="a", system="s", format="generate_content")
    assert read(gc)[1]["systemInstruction"] == {"parts": [{"text": "be casual"}]}
    assert tuning_magics.validate(str(gc)).ok


def test_fixed_system_prompt(tmp_path):
    out = tmp_path / "chat.jsonl"
    tuning_magics.dataset(qa(2), out=str(out), prompt="question", completion="answer", system_prompt='Say "hi" \\ politely')
    for record in read(out):
        assert record["messages"][0] == {"role": "system", "content": 'Say "hi" \\ politely'}
        assert len(record["messages"]) == 3
    gc = tmp_path / "gc.jsonl"
    tuning_magics.dataset(qa(2), out=str(gc), prompt="question", completion="answer", system_prompt="Be brief.", format="generate_content")
    assert all(r["systemInstruction"] == {"parts": [{"text": "Be brief."}]} for r in read(gc))


@pytest.mark.parametrize("bad", ["   ", 5, ["x"], "cut \ud83d"])
def test_a_bad_system_prompt_is_a_user_error(tmp_path, bad):
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(), out=str(tmp_path / "x.jsonl"), prompt="question", completion="answer", system_prompt=bad)
    assert info.value.field == "system_prompt"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": "question", "completion": "answer", "user": "question"}, "prompt"),
        ({"prompt": "question", "completion": "answer", "system": "answer", "system_prompt": "x"}, "system_prompt"),
        ({"prompt": "question", "completion": "answer", "format": "prompt_completion", "system_prompt": "x"}, "format"),
        ({"completion": "answer"}, "prompt"),
    ],
)
def test_conflicting_or_incomplete_mappings_are_user_errors(tmp_path, kwargs, field):
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(), out=str(tmp_path / "x.jsonl"), **kwargs)
    assert info.value.field == field
    assert "\n" not in str(info.value)


def test_sft_needs_an_answer_column_but_distillation_does_not(tmp_path):
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(), out=str(tmp_path / "x.jsonl"), prompt="question")
    assert "distillation" in str(info.value)
    out = tmp_path / "prompts.jsonl"
    ds = tuning_magics.dataset(qa(), out=str(out), prompt="question", method="distillation")
    assert read(out)[0] == {"messages": [{"role": "user", "content": "q0"}]}
    assert ds.report.method == "distillation"
    assert tuning_magics.validate(str(out), method="distillation").ok
    pc = tmp_path / "prompts_pc.jsonl"
    tuning_magics.dataset(qa(), out=str(pc), prompt="question", method="distillation", format="prompt_completion")
    assert read(pc)[2] == {"prompt": "q2"}


def test_messages_column_of_lists(tmp_path):
    convo = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    df = pd.DataFrame({"messages": [convo, convo[1:3]]})
    out = tmp_path / "m.jsonl"
    ds = tuning_magics.dataset(df, out=str(out))
    assert read(out) == [{"messages": convo}, {"messages": convo[1:3]}]
    assert ds.examples == 2
    gc = tmp_path / "m_gc.jsonl"
    tuning_magics.dataset(df, out=str(gc), messages="messages", format="generate_content")
    first = read(gc)[0]
    assert first["systemInstruction"] == {"parts": [{"text": "be kind"}]}
    assert [t["role"] for t in first["contents"]] == ["user", "model", "user", "model"]


def test_invalid_messages_rows_name_the_row_label(tmp_path):
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    df = pd.DataFrame(
        {"messages": [good, "not a list", [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]]},
        index=["r1", "r2", "r3"],
    )
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(tmp_path / "m.jsonl"))
    fields = sorted(e.field for e in info.value.report.errors)
    assert fields == ["row 'r2', column 'messages'", "row 'r3', messages[1].content"]
    assert not list(tmp_path.iterdir())


# -- images -------------------------------------------------------------------------------------


@pytest.fixture
def image_df(tmp_path):
    (tmp_path / "img").mkdir()
    png_path = tmp_path / "img" / "dot.png"
    jpg_path = tmp_path / "img" / "dot.jpg"
    png_path.write_bytes(PNG)
    jpg_path.write_bytes(JPEG)
    return pd.DataFrame(
        {
            "q": ["gs image?", "https image?", "png file?", "jpeg file?", "raw bytes?"],
            "a": ["gs", "https", "png", "jpeg", "bytes"],
            "image": ["gs://bucket/cats/1.png", "https://example.com/x.jpg", str(png_path), str(jpg_path), PNG],
        }
    )


def _data_uri(mime, data):
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_image_columns_make_multimodal_chat(tmp_path, image_df):
    out = tmp_path / "mm.jsonl"
    ds = tuning_magics.dataset(image_df, out=str(out), prompt="q", completion="a", images="image", model=IMAGE_MODEL)
    records = read(out)
    urls = [r["messages"][0]["content"][0]["image_url"]["url"] for r in records]
    assert urls == [
        "gs://bucket/cats/1.png",
        "https://example.com/x.jpg",
        _data_uri("image/png", PNG),
        _data_uri("image/jpeg", JPEG),
        _data_uri("image/png", PNG),
    ]
    for r, (q, a) in zip(records, zip(image_df.q, image_df.a)):
        user, assistant = r["messages"]
        assert user["content"][0]["type"] == "image_url"
        assert user["content"][1] == {"type": "text", "text": q}
        assert assistant == {"role": "assistant", "content": a}
    assert ds.report.images == 5 and ds.report.dropped == 0
    assert tuning_magics.validate(str(out), model=IMAGE_MODEL).ok


def test_image_columns_in_generate_content(tmp_path, image_df):
    out = tmp_path / "mm_gc.jsonl"
    tuning_magics.dataset(image_df, out=str(out), prompt="q", completion="a", images=["image"], format="generate_content")
    parts = [r["contents"][0]["parts"][0] for r in read(out)]
    assert parts[0] == {"fileData": {"mimeType": "image/png", "fileUri": "gs://bucket/cats/1.png"}}
    assert parts[1] == {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/x.jpg"}}
    assert parts[3] == {"inlineData": {"mimeType": "image/jpeg", "data": base64.b64encode(JPEG).decode()}}
    assert base64.b64decode(parts[4]["inlineData"]["data"]) == PNG
    assert tuning_magics.validate(str(out)).ok


def test_several_images_in_a_cell_and_several_image_columns(tmp_path):
    df = pd.DataFrame({"q": ["compare"], "a": ["same"], "i1": [["gs://b/1.png", "gs://b/2.png"]], "i2": ["gs://b/3.webp"]})
    out = tmp_path / "x.jsonl"
    tuning_magics.dataset(df, out=str(out), prompt="q", completion="a", images=["i1", "i2"])
    content = read(out)[0]["messages"][0]["content"]
    assert [p["image_url"]["url"] for p in content[:3]] == ["gs://b/1.png", "gs://b/2.png", "gs://b/3.webp"]
    assert content[3] == {"type": "text", "text": "compare"}


def test_images_for_a_text_only_model_fail_and_write_nothing(tmp_path, image_df):
    out = tmp_path / "out" / "mm.jsonl"
    out.parent.mkdir()
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(image_df, out=str(out), prompt="q", completion="a", images="image", model=TEXT_MODEL)
    assert "text-only" in str(info.value)
    assert info.value.report.error_count == 5
    assert not list(out.parent.iterdir())


def test_a_missing_image_file_and_an_unsupported_image_name_the_row(tmp_path):
    df = pd.DataFrame(
        {"q": ["a", "b", "c"], "a": ["x", "y", "z"], "img": ["gs://b/ok.png", str(tmp_path / "missing.png"), b"GIF89a\x01\x00"]},
        index=[10, 11, 12],
    )
    out = tmp_path / "x.jsonl"
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(out), prompt="q", completion="a", images="img")
    errors = {e.field: e.message for e in info.value.report.errors}
    assert "row 11, column 'img'" in errors and "does not exist" in errors["row 11, column 'img'"]
    gif = [f for f in errors if f.startswith("row 12")]
    assert gif and "image/gif" in errors[gif[0]]
    assert not out.exists()


def test_text_only_rows_in_an_image_dataset_warn_and_count_as_dropped(tmp_path):
    df = pd.DataFrame({"q": ["a", "b", "c"], "a": ["x", "y", "z"], "img": ["gs://b/1.png", None, "gs://b/3.png"]})
    out = tmp_path / "x.jsonl"
    ds = tuning_magics.dataset(df, out=str(out), prompt="q", completion="a", images="img", model=IMAGE_MODEL)
    assert ds.report.ok and ds.report.dropped == 1
    assert any(w.line == 2 for w in ds.report.warnings)
    assert read(out)[1] == {"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}


def test_images_do_not_fit_prompt_completion(tmp_path, image_df):
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(image_df, out=str(tmp_path / "x.jsonl"), prompt="q", completion="a", images="image", format="prompt_completion")
    assert info.value.field == "format"


# -- invalid cells: nothing written ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "words"),
    [(None, "null"), (float("nan"), "null"), ("", "blank"), ("  \n\t", "blank"), (42, "must be text"), (["x"], "must be text"), ("cut \ud83d", "Unicode")],
)
def test_a_bad_cell_raises_naming_row_and_column_and_writes_nothing(tmp_path, cell, words):
    df = pd.DataFrame({"question": ["fine", "ok"], "answer": ["good", "fine"]}, index=["first", "second"], dtype=object)
    df.at["second", "answer"] = cell
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "train.jsonl"
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(out), prompt="question", completion="answer")
    err = info.value
    assert isinstance(err, UserError)
    assert "row 'second'" in str(err) and "'answer'" in str(err) and words in str(err)
    assert "nothing was written" in str(err) and "skip_invalid" in str(err)
    assert "\n" not in str(err)
    assert [(e.line, e.field) for e in err.report.errors] == [(2, "row 'second', column 'answer'")]
    assert files(folder) == []  # no file, no temporary file


def test_bad_cells_in_string_dtype_columns(tmp_path):
    df = pd.DataFrame({"q": ["a", None, " ", "d"], "a": ["w", "x", "y", ""]})
    assert pd.api.types.is_string_dtype(df["q"].dtype)
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(tmp_path / "x.jsonl"), prompt="q", completion="a")
    assert sorted(e.field for e in info.value.report.errors) == [
        "row 1, column 'q'",
        "row 2, column 'q'",
        "row 3, column 'a'",
    ]
    assert info.value.report.error_count == 3
    assert not list(tmp_path.iterdir())


def test_non_string_columns_are_refused(tmp_path):
    df = pd.DataFrame({"q": [1, 2], "a": ["x", "y"]})
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(tmp_path / "x.jsonl"), prompt="q", completion="a")
    assert info.value.report.error_count == 2


def test_skip_invalid_writes_the_rest(tmp_path):
    df = pd.DataFrame({"q": ["a", None, "c", " ", "e"], "a": ["1", "2", "3", "4", 5]}, dtype=object)
    out = tmp_path / "x.jsonl"
    ds = tuning_magics.dataset(df, out=str(out), prompt="q", completion="a", skip_invalid=True)
    assert [r["messages"][0]["content"] for r in read(out)] == ["a", "c"]
    assert ds.examples == 2 and ds.report.ok
    assert any("3 invalid rows left out" in w.message for w in ds.report.warnings)


def test_skip_invalid_on_the_general_path(tmp_path):
    df = pd.DataFrame({"q": ["a", "b"], "a": ["x", "y"], "img": ["gs://b/1.png", "gs://b/2.gif"]})
    out = tmp_path / "x.jsonl"
    ds = tuning_magics.dataset(df, out=str(out), prompt="q", completion="a", images="img", skip_invalid=True)
    assert len(read(out)) == 1 and ds.examples == 1


@pytest.mark.parametrize("images", [None, "img"])  # the vectorised text path and the record path
def test_skip_invalid_with_no_valid_rows_left_names_the_first_reason(tmp_path, images):
    df = pd.DataFrame({"q": [5, "x"], "a": ["1", None], "img": ["gs://b/1.png"] * 2}, index=["r1", "r2"])
    out = tmp_path / "x.jsonl"
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(out), prompt="q", completion="a", images=images, skip_invalid=True)
    message = str(info.value)
    assert message.startswith(f"no valid rows are left to write to {out}: skip_invalid left out all 2 (the first: "
                              "row 'r1', ")
    assert "must be text (it must be a string, not a number)" in message
    assert message.count("fix the data") == 1 and "\n" not in message
    assert not list(tmp_path.iterdir())


def test_many_bad_rows_are_all_counted(tmp_path):
    df = pd.DataFrame({"q": [None] * 120 + ["ok"], "a": ["x"] * 121})
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(tmp_path / "x.jsonl"), prompt="q", completion="a")
    assert info.value.report.error_count == 120
    assert "(and 119 more)" in str(info.value)


# -- overwrite protection ------------------------------------------------------------------------


def test_an_existing_file_is_never_overwritten(tmp_path):
    out = tmp_path / "train.jsonl"
    out.write_text("precious\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(), out=str(out), prompt="question", completion="answer")
    message = str(info.value)
    assert str(out) in message and "overwrite=True" in message
    assert "\n" not in message
    assert out.read_text(encoding="utf-8") == "precious\n"
    assert files(tmp_path) == ["train.jsonl"]
    tuning_magics.dataset(qa(), out=str(out), prompt="question", completion="answer", overwrite=True)
    assert len(read(out)) == 3


def test_an_existing_validation_file_blocks_the_pair(tmp_path):
    out = tmp_path / "train.jsonl"
    val = tmp_path / "train_validation.jsonl"
    val.write_text("precious\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(10), out=str(out), prompt="question", completion="answer", validation_split=0.2)
    assert str(val) in str(info.value)
    assert not out.exists() and val.read_text(encoding="utf-8") == "precious\n"


def test_a_failed_pair_write_keeps_the_old_training_file(tmp_path):
    out = tmp_path / "train.jsonl"
    out.write_text("precious\n", encoding="utf-8")
    folder = tmp_path / "val"
    folder.mkdir()
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(4), out=str(out), prompt="question", completion="answer", validation_split=1,
                              validation_out=str(folder), overwrite=True)
    assert str(info.value) == f"{folder} is a folder; give a file path"
    assert out.read_text(encoding="utf-8") == "precious\n"
    assert files(tmp_path) == ["train.jsonl", "val"]  # no temporary file left behind


def test_the_pair_commit_puts_the_old_file_back_when_a_later_move_fails(tmp_path):
    from tuning_magics import storage

    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_bytes(b"old train\n")
    with pytest.raises(UserError, match="val.jsonl is a folder"):
        with storage.atomic_writers([train, val], overwrite=True) as (ft, fv):
            ft.write(b"new train\n")
            fv.write(b"new val\n")
            val.mkdir()  # another program takes the name: the second move fails after the first one
    assert train.read_bytes() == b"old train\n"
    assert files(tmp_path) == ["train.jsonl", "val.jsonl"]  # no temporary file, no copy left aside
    with storage.atomic_writers([train, tmp_path / "v2.jsonl"], overwrite=True) as (ft, fv):
        ft.write(b"new train\n")
        fv.write(b"new val\n")
    assert train.read_bytes() == b"new train\n" and files(tmp_path) == ["train.jsonl", "v2.jsonl", "val.jsonl"]


def test_a_failed_upload_of_the_pair_keeps_the_old_training_object(gcs_emulator):
    from tuning_magics import storage

    out = gcs_emulator.uri("train.jsonl")
    with storage.atomic_writer(out) as fh:
        fh.write(b"precious\n")
    missing = "gs://no-such-bucket-for-tests/val.jsonl"  # found missing only when the upload starts
    with pytest.raises(UserError, match="bucket 'no-such-bucket-for-tests' not found"):
        tuning_magics.dataset(qa(4), out=out, prompt="question", completion="answer", validation_split=1,
                              validation_out=missing, overwrite=True)
    assert storage.read_bytes(out) == b"precious\n"
    assert storage.list_uris(out.rsplit("/", 1)[0]) == [out]  # the copy kept aside is gone
    ds = tuning_magics.dataset(qa(4), out=out, prompt="question", completion="answer", validation_split=1,
                               overwrite=True)
    assert ds.examples == 3 and len(ds.head()) == 3 and ds.validation.examples == 1


def test_validation_out_without_a_split_is_refused(tmp_path):
    val = tmp_path / "val.jsonl"
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(4), out=str(tmp_path / "t.jsonl"), prompt="question", completion="answer",
                              validation_out=str(val))
    message = str(info.value)
    assert "validation_out" in message and "validation_split" in message and "\n" not in message
    assert info.value.field == "validation_out"
    assert not list(tmp_path.iterdir())


# -- unknown columns ------------------------------------------------------------------------------


def test_unknown_column_suggests_the_close_match(tmp_path):
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(), out=str(tmp_path / "x.jsonl"), prompt="questoin", completion="answer")
    message = str(info.value)
    assert "\n" not in message
    assert "'questoin'" in message and "did you mean 'question'?" in message
    assert info.value.field == "prompt"


def test_unknown_column_without_a_close_match_lists_the_columns(tmp_path):
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(), out=str(tmp_path / "x.jsonl"), prompt="zzz", completion="answer")
    assert "question, answer" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"images": "picture"}, "images"), ({"system": "sys"}, "system"), ({"messages": "msgs", "prompt": None, "completion": None}, "messages")],
)
def test_unknown_image_system_or_messages_columns(tmp_path, kwargs, field):
    args = {"prompt": "question", "completion": "answer", **kwargs}
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(), out=str(tmp_path / "x.jsonl"), **args)
    assert info.value.field == field


# -- other argument checks --------------------------------------------------------------------------


def test_not_a_dataframe_empty_dataframe_bad_epochs_and_method(tmp_path):
    out = str(tmp_path / "x.jsonl")
    with pytest.raises(UserError, match="DataFrame"):
        tuning_magics.dataset([{"prompt": "p"}], out=out)
    with pytest.raises(UserError, match="no rows"):
        tuning_magics.dataset(qa(0), out=out, prompt="question", completion="answer")
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(), out=out, prompt="question", completion="answer", epochs=0)
    assert info.value.field == "epochs"
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(), out=out, prompt="question", completion="answer", method="rlhf")
    assert info.value.field == "method"
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(), out=out, prompt="question", completion="answer", model="not-a-model")
    assert info.value.field == "model"
    assert not list(tmp_path.iterdir())


# -- train/validation split ---------------------------------------------------------------------------


def _prompts(path) -> list[str]:
    return [r["messages"][0]["content"] for r in read(path)]


def test_seeded_split_is_deterministic_disjoint_and_sized(tmp_path):
    df = qa(100)
    a = tuning_magics.dataset(df, out=str(tmp_path / "a" / "train.jsonl"), prompt="question", completion="answer", validation_split=0.2, seed=7)
    b = tuning_magics.dataset(df, out=str(tmp_path / "b" / "train.jsonl"), prompt="question", completion="answer", validation_split=0.2, seed=7)
    c = tuning_magics.dataset(df, out=str(tmp_path / "c" / "train.jsonl"), prompt="question", completion="answer", validation_split=0.2, seed=8)
    assert a.examples == 80 and a.validation.examples == 20
    assert a.validation.uri == str(tmp_path / "a" / "train_validation.jsonl")
    assert files(tmp_path / "a") == ["train.jsonl", "train_validation.jsonl"]
    train, val = _prompts(a.uri), _prompts(a.validation.uri)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(df.question)
    # Rows keep their DataFrame order inside each file.
    assert train == sorted(train, key=lambda q: int(q[1:])) and val == sorted(val, key=lambda q: int(q[1:]))
    assert (_prompts(b.uri), _prompts(b.validation.uri)) == (train, val)
    assert _prompts(c.validation.uri) != val
    assert "validation=20" in repr(a)


def test_split_by_row_count_and_explicit_validation_out(tmp_path):
    val_out = tmp_path / "held" / "val.jsonl"
    ds = tuning_magics.dataset(qa(10), out=str(tmp_path / "t.jsonl"), prompt="question", completion="answer",
                               validation_split=3, validation_out=str(val_out))
    assert ds.examples == 7 and ds.validation.examples == 3
    assert ds.validation.uri == str(val_out) and len(read(val_out)) == 3


@pytest.mark.parametrize("split", [1.0, 1.5, -0.1, 10, 11, -1, True, "0.2"])
def test_bad_validation_splits_are_user_errors(tmp_path, split):
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(10), out=str(tmp_path / "t.jsonl"), prompt="question", completion="answer", validation_split=split)
    assert info.value.field == "validation_split"
    assert not list(tmp_path.iterdir())


def test_zero_split_writes_no_validation_file(tmp_path):
    ds = tuning_magics.dataset(qa(5), out=str(tmp_path / "t.jsonl"), prompt="question", completion="answer", validation_split=0)
    assert ds.validation is None and files(tmp_path) == ["t.jsonl"]


def test_a_validation_split_over_5000_rows_writes_nothing(tmp_path, monkeypatch):
    from tuning_magics import catalog

    monkeypatch.setattr(catalog, "MAX_VALIDATION_EXAMPLES", 5)
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(qa(20), out=str(tmp_path / "t.jsonl"), prompt="question", completion="answer", validation_split=6)
    assert "at most 5" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_a_split_whose_validation_file_is_over_a_quarter_of_the_bytes_writes_nothing_for_open_models(tmp_path):
    from tuning_magics.datasets.build import _split

    # Two long rows held out, short ones kept: 20% of the rows, far more than 25% of the bytes.
    frame = pd.DataFrame({"question": [f"q{i}" for i in range(8)] + ["long question " * 20, "another " * 30],
                          "answer": ["a"] * 10})
    seed = next(seed for seed in range(1000) if sorted(_split(10, 0.2, seed)[1]) == [8, 9])
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(frame, out=str(tmp_path / "t.jsonl"), prompt="question", completion="answer",
                              validation_split=0.2, model="qwen3-4b", seed=seed)
    assert info.value.field == "validation_split" and "of the training file's" in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing half-written
    ds = tuning_magics.dataset(frame, out=str(tmp_path / "t.jsonl"), prompt="question", completion="answer",
                               validation_split=0.2, model="local/tiny-qwen3", seed=seed)  # no such rule locally
    assert ds.validation is not None


def test_an_invalid_row_in_the_validation_part_stops_both_files(tmp_path):
    df = qa(10)
    df.loc[3, "answer"] = None
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"), prompt="question", completion="answer", validation_split=0.5, seed=1)
    assert "row 3, column 'answer'" in str(info.value)
    assert not list(tmp_path.iterdir())


# -- model rules and token counts ---------------------------------------------------------------------


def test_model_rules_warn_about_rows_over_the_max_sequence_length(tmp_path):
    df = pd.DataFrame({"q": ["short", "word " * 2000], "a": ["x", "y"]})
    ds = tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"), prompt="q", completion="a", model=IMAGE_MODEL)
    assert ds.report.ok
    assert [w.line for w in ds.report.warnings] == [2]
    assert "2,048" in ds.report.warnings[0].message
    ds8k = tuning_magics.dataset(df, out=str(tmp_path / "t8.jsonl"), prompt="q", completion="a", model=TEXT_MODEL)
    assert ds8k.report.warnings == []
    assert ds8k.model == TEXT_MODEL


def test_vectorised_token_estimate_matches_the_validator(tmp_path):
    df = pd.DataFrame({"q": ["a" * 40, "héllo wörld ✓"], "a": ["b" * 9, "ok"]})
    out = tmp_path / "t.jsonl"
    ds = tuning_magics.dataset(df, out=str(out), prompt="q", completion="a", system_prompt="be brief")
    again = tuning_magics.validate(str(out))
    assert ds.tokens == again.tokens
    assert ds.tokens["estimated"] is True and ds.tokens["total"] > 0


def test_dataset_object_helpers(tmp_path):
    out = tmp_path / "t.jsonl"
    ds = tuning_magics.dataset(qa(4), out=str(out), prompt="question", completion="answer", model="gemini-2.5-flash", epochs=3)
    assert ds.head(2) == read(out)[:2]
    assert ds.billed_tokens() == ds.tokens["total"] * 3
    assert ds.billed_tokens(epochs=1) == ds.tokens["total"]
    assert ds.cost() == round(ds.tokens["total"] * 3 / 1e6 * 5.0, 2)
    assert tuning_magics.dataset(qa(1), out=str(tmp_path / "n.jsonl"), prompt="question", completion="answer").cost() is None


# -- the vectorised text path: exact JSON ------------------------------------------------------------

NASTY = [
    'quotes " and \\" and \\\\" ',
    "back\\slash\\",
    'a","b',
    '","',
    '\\",\\"',
    "new\nline\r\nand\ttab",
    "control \x00\x01\x1f\x7f chars",
    "emoji 😀👩‍👩‍👧 and CJK 한국어 中文",
    "\u2028line\u2029separators",
    "{\"json\": [1, 2]}",
    "trailing space ",
    "é" * 3,
]


@pytest.mark.parametrize("fmt", ["chat", "prompt_completion", "generate_content"])
def test_vectorised_output_parses_back_to_exactly_the_input(tmp_path, fmt):
    df = pd.DataFrame({"q": NASTY, "a": list(reversed(NASTY))})
    out = tmp_path / "t.jsonl"
    kwargs = {} if fmt == "prompt_completion" else {"system_prompt": '","sys\\"'}
    tuning_magics.dataset(df, out=str(out), prompt="q", completion="a", format=fmt, **kwargs)
    records = read(out)
    assert len(records) == len(NASTY)
    for record, q, a in zip(records, NASTY, reversed(NASTY)):
        assert tuning_magics.datasets.formats.convert(record, "prompt_completion" if fmt == "prompt_completion" else "chat") == (
            {"prompt": q, "completion": a} if fmt == "prompt_completion"
            else {"messages": [{"role": "system", "content": '","sys\\"'}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
    assert tuning_magics.validate(str(out)).ok
    # One record per line: no raw newline leaked out of a string.
    assert out.read_bytes().count(b"\n") == len(NASTY)


def test_chunked_writing_keeps_every_row_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "CHUNK_ROWS", 7)
    df = pd.DataFrame({"q": [f"q{i} \"x\"" for i in range(50)], "a": [f"a{i}" for i in range(50)], "s": [f"s{i}" for i in range(50)]})
    out = tmp_path / "t.jsonl"
    tuning_magics.dataset(df, out=str(out), prompt="q", completion="a", system="s")
    records = read(out)
    assert [r["messages"][1]["content"] for r in records] == list(df.q)
    assert [r["messages"][0]["content"] for r in records] == list(df.s)


def test_object_categorical_and_python_string_columns(tmp_path):
    df = pd.DataFrame(
        {
            "q": pd.Series(["x", "y"], dtype=object),
            "a": pd.Categorical(["one", "two"]),
            "s": pd.array(["s1", "s2"], dtype="string[python]"),
        }
    )
    out = tmp_path / "t.jsonl"
    tuning_magics.dataset(df, out=str(out), prompt="q", completion="a", system="s")
    assert read(out)[1]["messages"] == [
        {"role": "system", "content": "s2"},
        {"role": "user", "content": "y"},
        {"role": "assistant", "content": "two"},
    ]


_any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
_row_text = _any_text.filter(lambda s: not V.is_blank(s))


# Texts whose escaped form holds '","' (the separator of an encoded list of strings) or ends in a backslash.
_TRICKY = ['say "hi",', '",', '","', '\\",', 'a\\', '"', ',"', '\\"",', '"\n",']


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.lists(st.one_of(_any_text, st.sampled_from(_TRICKY)), min_size=1, max_size=20))
@hypothesis.example(['say "hi",', "b"])
@hypothesis.example(['",', '",', '"', "x"])
@hypothesis.example(['\\",', "a\\", '","', ',"'])
def test_property_escaping_matches_json_loads(values):
    escaped = B._escaped(values)
    assert len(escaped) == len(values)
    for raw, value in zip(escaped, values):
        assert json.loads(b'"' + raw + b'"') == value


def _intended(fmt: str, q: str, a: str, system: str | None) -> dict:
    """The record dataset() is meant to write for one row, built independently of its writer."""
    if fmt == "prompt_completion":
        return {"prompt": q, "completion": a}
    if fmt == "chat":
        turns = [{"role": "system", "content": system}] if system else []
        return {"messages": turns + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    record = {"systemInstruction": {"parts": [{"text": system}]}} if system else {}
    record["contents"] = [{"role": "user", "parts": [{"text": q}]}, {"role": "model", "parts": [{"text": a}]}]
    return record


_tricky_row_text = st.one_of(_row_text, st.sampled_from(_TRICKY))


@hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(st.lists(st.tuples(_tricky_row_text, _tricky_row_text), min_size=1, max_size=8),
                  st.one_of(st.none(), _tricky_row_text),
                  st.sampled_from(["chat", "prompt_completion", "generate_content"]))
@hypothesis.example([('say "hi",', "x"), ("b", "y")], None, "chat")
@hypothesis.example([('",', '",'), ('","', '\\",')], '",', "generate_content")
@hypothesis.example([('"\n",', "a\\"), (',"', '"')], None, "prompt_completion")
def test_property_every_written_line_is_the_intended_record(tmp_path_factory, rows, system, fmt):
    if fmt == "prompt_completion":
        system = None
    out = tmp_path_factory.mktemp("prop") / "t.jsonl"
    df = pd.DataFrame(rows, columns=["q", "a"])
    tuning_magics.dataset(df, out=str(out), prompt="q", completion="a", system_prompt=system, format=fmt)
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b""  # every line ends with a newline, and there are no others
    assert [json.loads(line) for line in lines[:-1]] == [_intended(fmt, q, a, system) for q, a in rows]
    # A system column goes through its own escaping.
    df["s"] = [system or "sys"] * len(df)
    if fmt != "prompt_completion":
        tuning_magics.dataset(df, out=str(out), prompt="q", completion="a", system="s", format=fmt, overwrite=True)
        assert read(out) == [_intended(fmt, q, a, system or "sys") for q, a in rows]


_invisible = st.sampled_from(["", " ", "\t", "\n", "\u200b", "\u200d", "\ufeff", "\x00", "\x7f", "\u3164",
                              "\u2800", "\ufe0f", "\u00a0", "\u2028", "\u180e", "\U000e0101"])
_cell = st.one_of(
    _any_text,
    st.lists(_invisible, max_size=4).map("".join),
    st.tuples(st.lists(_invisible, max_size=2).map("".join), _any_text).map("".join),
    st.none(), st.integers(), st.floats(), st.booleans(),
)


@hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(st.lists(_cell, min_size=1, max_size=6), st.sampled_from(["object", "str"]))
def test_property_dataframe_checks_agree_with_the_record_validator(tmp_path_factory, cells, dtype):
    """The vectorised column checks and the record validator apply one rule table: same rows, same messages."""
    if dtype == "str" and not all(isinstance(c, str) or c is None for c in cells):
        dtype = "object"
    df = pd.DataFrame({"q": pd.Series(cells, dtype=dtype), "a": ["fine"] * len(cells)})
    expected = [(i + 1, V.text_message(V.text_rule(None if V._is_na(c) else c), c))
                for i, c in enumerate(cells) if V.text_rule(None if V._is_na(c) else c)]
    records = tuning_magics.validate(df.rename(columns={"q": "prompt", "a": "completion"}))
    assert [(e.line, e.message) for e in records.errors] == expected
    out = tmp_path_factory.mktemp("agree") / "t.jsonl"
    if not expected:
        assert tuning_magics.dataset(df, out=str(out), prompt="q", completion="a").examples == len(cells)
        return
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(out), prompt="q", completion="a")
    assert sorted((e.line, e.message) for e in info.value.report.errors) == sorted(expected)
    assert not out.exists()


def test_message_lists_from_parquet_are_plain_lists(tmp_path):
    # Parquet (and Hugging Face datasets) hand nested lists back as numpy arrays.
    turn = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]
    pd.DataFrame({"messages": [turn] * 3}).to_parquet(tmp_path / "m.parquet")
    df = pd.read_parquet(tmp_path / "m.parquet")
    ds = tuning_magics.dataset(df, out=str(tmp_path / "m.jsonl"))
    assert ds.examples == 3
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0]) == {"messages": turn}
    assert tuning_magics.validate(df).ok


def test_duplicate_columns_and_bad_seed_are_one_line_errors(tmp_path):
    dup = pd.DataFrame([["a", "b", "c"]], columns=["prompt", "completion", "completion"])
    with pytest.raises(UserError, match="column 'completion' appears more than once"):
        tuning_magics.dataset(dup, out=str(tmp_path / "x.jsonl"))
    df = pd.DataFrame({"q": ["a", "b"], "a": ["c", "d"]})
    with pytest.raises(UserError, match="seed must be a whole number, not 'x'"):
        tuning_magics.dataset(df, out=str(tmp_path / "y.jsonl"), prompt="q", completion="a",
                              validation_split=0.5, seed="x")
    assert list(tmp_path.iterdir()) == []


def test_missing_image_is_the_only_error(tmp_path):
    df = pd.DataFrame({"q": ["a"], "a": ["b"], "img": [str(tmp_path / "nope.png")]})
    with pytest.raises(UserError) as err:
        tuning_magics.dataset(df, out=str(tmp_path / "z.jsonl"), prompt="q", completion="a", images="img")
    assert err.value.report.error_count == 1
    assert "does not exist; check the path" in str(err.value)


# -- every dtype, every option type, every hint ----------------------------------------------------


def _csv_pyarrow(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("q,a\nWhat is 2+2?,4\nAnd 3+3?,6\n", encoding="utf-8")
    return pd.read_csv(path, dtype_backend="pyarrow")["a"]


@pytest.mark.parametrize(
    "answers",
    [
        lambda _: pd.array([4, None], dtype="Int64"),
        lambda _: pd.array([4.5, None], dtype="Float64"),
        lambda _: pd.array([True, None], dtype="boolean"),
        lambda _: pd.array([4, 6], dtype="int64[pyarrow]"),
        lambda _: pd.array([4.5, 6.5], dtype="double[pyarrow]"),
        lambda _: pd.array(pd.to_datetime(["2024-01-01", "2024-01-02"]), dtype="timestamp[ns][pyarrow]"),
        lambda _: pd.Categorical([4, 6]),
        _csv_pyarrow,
    ],
    ids=["Int64", "Float64", "boolean", "int64[pyarrow]", "double[pyarrow]", "timestamp[pyarrow]",
         "int categories", "read_csv pyarrow"],
)
def test_numeric_nullable_and_arrow_columns_must_be_text(tmp_path, answers):
    values = answers(tmp_path)
    values = values.array if isinstance(values, pd.Series) else values
    df = pd.DataFrame({"q": ["What is 2+2?", "And 3+3?"], "a": values}, index=["r1", "r2"])
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"), prompt="q", completion="a")
    assert str(info.value).startswith("row 'r1', column 'a': ")
    messages = {e.field: e.message for e in info.value.report.errors}
    assert any("must be text" in m for m in messages.values()), messages
    with pytest.raises(DatasetInvalid, match="no valid rows are left"):
        tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"), prompt="q", completion="a", skip_invalid=True)
    assert list(tmp_path.glob("*.jsonl")) == []


def test_rows_with_numbers_in_a_nullable_column_are_left_out_with_skip_invalid(tmp_path):
    df = pd.DataFrame({"q": ["a", "b", "c"], "a": pd.array(["x", "y", "z"], dtype="string[pyarrow]"),
                       "s": pd.Categorical(["be brief", 5, "be kind"])})
    ds = tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"), prompt="q", completion="a", system="s",
                               skip_invalid=True)
    assert ds.examples == 2 and ds.report.warnings[0].message == "1 invalid rows left out (skip_invalid)"
    assert [r["messages"][0]["content"] for r in read(ds.uri)] == ["be brief", "be kind"]


@pytest.mark.parametrize("cell", ["\u200b", "\x00", " \u200d\ufeff ", "\u3164", "\u2800\n", "\x7f"])
def test_invisible_only_text_is_blank_in_dataframes(tmp_path, cell):
    df = pd.DataFrame({"q": ["fine", cell], "a": ["x", "y"]})
    for frame in (df, df.astype(object)):
        with pytest.raises(DatasetInvalid) as info:
            tuning_magics.dataset(frame, out=str(tmp_path / "t.jsonl"), prompt="q", completion="a")
        assert str(info.value).startswith("row 1, column 'q': is blank")
    messages = pd.DataFrame({"messages": [[{"role": "user", "content": cell}, {"role": "assistant", "content": "a"}]]})
    with pytest.raises(DatasetInvalid, match=r"row 0, messages\[0\]\.content: is blank"):
        tuning_magics.dataset(messages, out=str(tmp_path / "m.jsonl"))
    assert list(tmp_path.iterdir()) == []


def test_visible_text_with_invisible_characters_is_kept(tmp_path):
    df = pd.DataFrame({"q": ["zero\u200bwidth", "\u200bword"], "a": ["x\x00y", "👍"]})
    ds = tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"), prompt="q", completion="a")
    assert [r["messages"][0]["content"] for r in read(ds.uri)] == ["zero\u200bwidth", "\u200bword"]


def test_integer_column_names(tmp_path):
    df = pd.DataFrame([["What is 2+2?", "4", "Be brief."], ["Capital?", "Paris", "Be brief."]])
    ds = tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"), prompt=0, completion=1, system=2)
    assert read(ds.uri)[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "What is 2+2?"},
                                           {"role": "assistant", "content": "4"}]
    # The magics pass text: "0" names column 0 when there is no column "0".
    ds = tuning_magics.dataset(df, out=str(tmp_path / "u.jsonl"), user="0", assistant="1")
    assert read(ds.uri)[1]["messages"][1] == {"role": "assistant", "content": "Paris"}
    with pytest.raises(UserError, match="name the column that holds the prompts"):
        tuning_magics.dataset(df, out=str(tmp_path / "v.jsonl"), completion=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"overwrite": "false"}, "overwrite"),
        ({"overwrite": 0}, "overwrite"),
        ({"skip_invalid": "yes"}, "skip_invalid"),
        ({"model": 5}, "model"),
        ({"images": 5}, "images"),
        ({"images": [["img"]]}, "images"),
        ({"prompt": ["question"]}, "prompt"),
        ({"prompt": True}, "prompt"),
        ({"validation_split": float("inf")}, "validation_split"),
        ({"validation_split": 1e400}, "validation_split"),
        ({"validation_split": float("nan")}, "validation_split"),
        ({"epochs": True}, "epochs"),
        ({"epochs": 2.5}, "epochs"),
        ({"out": 5}, "out"),
        ({"out": ""}, "out"),
        ({"validation_out": ["x"], "validation_split": 1}, "validation_out"),
        ({"format": 5}, "format"),
        ({"method": 1}, "method"),
        ({"seed": 1.5, "validation_split": 1}, "seed"),
    ],
)
def test_options_of_the_wrong_type_are_one_line_errors(tmp_path, kwargs, field):
    kwargs = {"out": str(tmp_path / "t.jsonl"), "prompt": "question", "completion": "answer", **kwargs}
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(), **kwargs)
    assert info.value.field == field and field in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_given_as_text_never_replaces_a_file(tmp_path):
    out = tmp_path / "t.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(UserError, match="overwrite must be True or False, not 'false'"):
        tuning_magics.dataset(qa(), out=str(out), overwrite="false")
    assert out.read_text() == "keep me\n"


def test_the_same_path_for_training_and_validation_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out, val in (("same.jsonl", "same.jsonl"), ("same.jsonl", str(tmp_path / "same.jsonl")),
                     ("./d/../same.jsonl", "same.jsonl")):
        (tmp_path / "d").mkdir(exist_ok=True)
        with pytest.raises(UserError, match="is the training file itself") as info:
            tuning_magics.dataset(qa(), out=out, validation_out=val, validation_split=1, overwrite=True)
        assert info.value.field == "validation_out"
    assert not (tmp_path / "same.jsonl").exists()


def test_a_split_that_leaves_no_training_rows_says_so(tmp_path):
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(1), out=str(tmp_path / "t.jsonl"), validation_split=0.1)
    assert info.value.field == "validation_split"
    assert "leaves none to train on" in str(info.value) and "skip_invalid" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_errors_from_tune_name_options_tune_has(tmp_path):
    pytest.importorskip("torch")
    bad = pd.DataFrame({"question": ["What is 2+2?", "   "], "answer": ["4", "x"]})
    with pytest.raises(UserError) as info:
        tuning_magics.tune(base_model="local/tiny-qwen3", train_dataset=bad, output_uri=str(tmp_path / "job"))
    message = str(info.value)
    assert message.startswith("train_dataset: row 1, column 'question': is blank")
    assert "tuning_magics.dataset(df, skip_invalid=True)" in message and "(--skip-invalid)" not in message
    odd = pd.DataFrame({"x": ["a"], "y": ["b"]})
    with pytest.raises(UserError) as info:
        tuning_magics.tune(base_model="local/tiny-qwen3", train_dataset=odd, output_uri=str(tmp_path / "job2"))
    assert "rename them, or build it with tuning_magics.dataset(df, prompt=..., completion=...)" in str(info.value)
    assert "--prompt" not in str(info.value)
    assert not (tmp_path / "job").exists() and not (tmp_path / "job2").exists()


# -- the report as it shows in a notebook ---------------------------------------------------------------


def test_the_report_html_has_inline_styles_only_and_escapes_the_data(tmp_path):
    import re

    from tuning_magics.display import dataset_report as DR

    df = pd.DataFrame({"q": ["<script>alert('q')</script> & \"x\"", "<b>ok</b>"],
                       "a": ["<img src=x onerror=alert(1)> é\n2nd line", "fine"]})
    ds = tuning_magics.dataset(df, out=str(tmp_path / "<t>.jsonl"), prompt="q", completion="a",
                               system_prompt="<i>sys</i>", model="local/tiny-gemma3")
    html = ds._repr_html_()
    # JupyterLab drops <style> blocks from untrusted or reopened notebooks: only style attributes are used.
    assert "<style" not in html and "class=" not in html
    assert "<script" not in html and "<img src=x" not in html and "<b>ok" not in html and "<i>sys" not in html
    assert "&lt;script&gt;alert(&#x27;q&#x27;)&lt;/script&gt; &amp; &quot;x&quot;" in html
    assert "&lt;img src=x onerror=alert(1)&gt; é\n2nd line" in html  # line breaks kept, shown by pre-wrap
    assert "&lt;t&gt;.jsonl" in html
    loss = re.findall(rf"<span style='{re.escape(DR.LOSS_STYLE)}'>(.*?)</span>", html, re.S)
    # the legend, then exactly the engine's loss span: the reply and its end marker, not the newline after it
    assert loss == ["highlighted", "&lt;img src=x onerror=alert(1)&gt; é\n2nd line&lt;|im_end|&gt;"]
    assert "white-space:pre-wrap" in html
    assert "&lt;bos&gt;&lt;|im_start|&gt;system\n&lt;i&gt;sys&lt;/i&gt;" in html
    assert "as the model sees it: the chat template of local/tiny-gemma3&#x27;s own tokenizer" in html
    for level in ("<div", "<span", "<table", "<td", "<th"):  # every styled element is styled inline
        assert not re.search(rf"{level} (?!style=)", html)


def test_dataset_leaves_the_users_matplotlib_alone(tmp_path):
    """After %dataset (and its report shown), the user's backend is the same and their own plots still draw."""
    import subprocess
    import sys

    code = f"""
import sys, io
import matplotlib
matplotlib.use("svg")
import pandas as pd
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "tuning_magics")
df = pd.DataFrame({{"q": [f"question {{i}}" for i in range(64)], "a": [f"answer {{i}}" * (i % 5 + 1) for i in range(64)]}})
ip.push({{"df": df}})
ip.run_line_magic("dataset", "df --prompt q --completion a --out {tmp_path / 't.jsonl'} --model local/tiny-qwen3 --as ds")
html = ip.user_ns["ds"]._repr_html_()
assert "data:image/png;base64" in html
print("pyplot" if "matplotlib.pyplot" in sys.modules else "no pyplot")
print(matplotlib.get_backend())
ax = df.assign(n=range(64)).plot(y="n")
buf = io.StringIO()
ax.figure.savefig(buf, format="svg")
print(len(ax.lines), "<svg" in buf.getvalue())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-3:] == ["no pyplot", "svg", "1 True"]


def test_the_report_never_calls_matplotlib_use_or_pyplot():
    import ast

    for module in ("display/dataset_report.py", "datasets/render.py", "datasets/templates.py",
                   "datasets/validate.py", "datasets/build.py", "datasets/tokens.py"):
        tree = ast.parse((Path(tuning_magics.__file__).parent / module).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any("pyplot" in n or n == "pylab" for n in names), module
            if isinstance(node, ast.Attribute) and node.attr in ("use", "switch_backend"):
                assert not (isinstance(node.value, ast.Name) and node.value.id in ("matplotlib", "plt")), module


# -- the report of an invalid dataset ---------------------------------------------------------------------------

BAD_ROWS = [3, 7, 10, 12]


def bad_qa() -> pd.DataFrame:
    """62 rows: four invalid in different ways and columns, one far over local/tiny-qwen3's 1,024 tokens."""
    rows = [{"question": f"What is {i}+{i}?", "answer": f"It is {2 * i}."} for i in range(62)]
    rows[12]["question"] = ""  # the question column's errors come first column by column: not in row order
    rows[3]["answer"] = "   "
    rows[10]["answer"] = None
    rows[7]["question"] = 42
    rows[20]["answer"] = "word " * 2000
    return pd.DataFrame(rows)


@pytest.mark.parametrize("messages", [False, True])  # the vectorised text path and the record path
def test_an_invalid_dataset_reports_errors_in_row_order_once_and_totals_over_the_valid_rows(tmp_path, messages):
    import html as H

    from tuning_magics.display import dataset_report as DR

    df = bad_qa()
    if messages:
        df = pd.DataFrame({"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                                        for q, a in zip(df["question"], df["answer"])]})
        columns = {"messages": "messages"}
    else:
        columns = {"prompt": "question", "completion": "answer"}
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"), model="local/tiny-qwen3", **columns)
    report = info.value.report
    assert [e.line for e in report.errors] == [r + 1 for r in BAD_ROWS]
    assert report.error_count == 4 and [w.line for w in report.warnings] == [21]  # the long row, beside the errors
    # The counts are those of the valid rows written alone, not zeros (nor a mean over the invalid rows' zeros).
    valid = tuning_magics.dataset(df.drop(index=BAD_ROWS), out=str(tmp_path / "v.jsonl"), model="local/tiny-qwen3",
                                  **columns)
    assert report.tokens == valid.tokens and report.tokens["total"] > 2000
    assert (report.examples, report.valid_examples) == (62, 58)
    text = DR.report_text(report)
    page = H.unescape(DR.report_html(report))
    for shown in (text, page):
        assert "tokens over the 58 valid rows" in shown and "over the 58 valid rows: total 0" not in shown
        assert "billed tokens (1 epoch) over the 58 valid rows" in shown
        at = [shown.index(e.where) for e in report.errors]
        assert at == sorted(at)  # in row order
        for e in report.errors:
            assert shown.count(e.where) == 1 and shown.count(f"{e.where}: {e.message}" if shown is text
                                                              else e.message) >= 1
    assert f"{valid.tokens['total']:,}" in page and "<th style" in page
    assert "line</th>" not in page  # a DataFrame row is named once, by its label: not also by a line number


def test_a_valid_report_says_nothing_of_valid_rows(tmp_path):
    ds = tuning_magics.dataset(qa(), out=str(tmp_path / "t.jsonl"))
    assert ds.report.valid_examples == 3 and ds.report.valid_scope() == ""
    assert "valid rows" not in ds._repr_html_() and "valid rows" not in ds.report.summary()


def test_one_bad_row_of_many_is_counted_as_such(tmp_path):
    df = qa(5)
    df.loc[2, "answer"] = " "
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"))
    assert "tokens (estimated) over the 4 valid rows: total" in info.value.report.summary()
    df = qa(2)
    df.loc[0, "answer"] = " "
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"))
    assert "over the 1 valid row: total" in info.value.report.summary()


@pytest.mark.parametrize("columns", [{"prompt": "q", "completion": "q"}, {"prompt": "q", "completion": "a",
                                                                          "system": "q"}])
def test_a_column_used_for_two_turns_reports_each_bad_cell_once(tmp_path, columns):
    df = pd.DataFrame({"q": ["fine", " "], "a": ["x", "y"]})
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"), **columns)
    assert [str(e) for e in info.value.report.errors] == [
        "row 1, column 'q': is blank (empty, or only white space or invisible characters); give it text or drop "
        "the example"]
    assert info.value.report.error_count == 1 and "(and" not in str(info.value)


def test_more_bad_cells_than_listed_are_listed_in_row_order_and_all_counted(tmp_path):
    n = 2 * V.MAX_LISTED
    q = [None if i % 2 else f"q{i}" for i in range(n)]
    a = [" " if i % 3 == 0 else f"a{i}" for i in range(n)]
    expected = [(i + 1, f"row {i}, column '{c}'") for i in range(n) for c, col in (("q", q), ("a", a))
                if col[i] is None or col[i] == " "]
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(pd.DataFrame({"q": q, "a": a}), out=str(tmp_path / "t.jsonl"), prompt="q",
                              completion="a")
    report = info.value.report
    assert [(e.line, e.field) for e in report.errors] == expected[:V.MAX_LISTED]
    assert report.error_count == len(expected) > V.MAX_LISTED


def test_the_magic_line_beside_the_report_counts_the_errors_without_repeating_them(tmp_path):
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(bad_qa(), out=str(tmp_path / "t.jsonl"))
    exc = info.value
    assert exc.beside_report == (
        f"4 errors in {tmp_path / 't.jsonl'}, listed above (the first: row 3, column 'answer'); nothing was written: "
        "fix the data, or pass skip_invalid=True (--skip-invalid) to leave those rows out")
    assert str(exc).startswith("row 3, column 'answer': is blank")  # without the report, the line says it all


def test_the_report_follows_the_jupyterlab_theme_with_fallbacks_that_survive_its_sanitizer(tmp_path):
    import re

    df = qa(4)
    df.loc[1, "answer"] = " "
    with pytest.raises(DatasetInvalid) as info:
        tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"), model="local/tiny-qwen3")
    page = info.value.report._repr_html_() + tuning_magics.dataset(qa(), out=str(tmp_path / "v.jsonl"),
                                                                   model="local/tiny-qwen3")._repr_html_()
    styles = re.findall(r"style='([^']*)'", page)
    themed = set()
    for style in styles:
        declarations = [d.split(":", 1) for d in style.split(";")]
        for i, (prop, value) in enumerate(declarations):
            if "var(" not in value:
                continue
            found = re.fullmatch(r"(.*)var\((--jp-[a-z0-9-]+),(#[0-9a-f]{3,6})\)", value)
            assert found, style
            themed.add((prop, found[2]))
            # JupyterLab's sanitizer drops a var(...) value from untrusted output: the plain one before it stays.
            assert declarations[i - 1] == [prop, found[1] + found[3]], style
        # Text is given a colour of the theme's font only where its background is set too.
        if any(v.startswith("var(--jp-ui-font-color") for p, v in declarations if p == "color"):
            assert any(p == "background-color" for p, _ in declarations), style
    assert {("border-bottom", "--jp-error-color1"), ("border-bottom", "--jp-success-color1"),
            ("border", "--jp-border-color2"), ("background-color", "--jp-layout-color2"),
            ("color", "--jp-ui-font-color1")} <= themed
    # A status colour marks a verdict; it is never the colour of text (orange on white reads at 2.7:1).
    assert not {(p, v) for p, v in themed if p == "color" and re.search(r"(error|success|warn)-color", v)}
    assert "<style" not in page and "color:#000;" not in page.split("var(--jp-layout-color2")[0]


def test_the_histogram_png_is_transparent_with_mid_grey_text(tmp_path):
    import io

    import numpy as np
    from matplotlib.image import imread

    from tuning_magics.display.dataset_report import histogram_png

    ds = tuning_magics.dataset(qa(40), out=str(tmp_path / "t.jsonl"))
    rgba = imread(io.BytesIO(histogram_png(ds.report)), format="png")
    assert rgba.shape[2] == 4 and rgba[0, 0, 3] == 0 and rgba[-1, -1, 3] == 0  # the notebook shows through
    inked = rgba[rgba[..., 3] > 0.5][:, :3]
    bars = np.all(np.abs(inked - np.array([0x4C, 0x72, 0xB0]) / 255) < 0.02, axis=1)
    text = inked[~bars]  # the labels, ticks and axes
    assert len(text) > 100
    assert np.all(np.ptp(text, axis=1) < 0.02)  # grey
    assert np.all((text.mean(axis=1) > 0.4) & (text.mean(axis=1) < 0.6))  # mid-grey: not black, not white


# -- paths from the user --------------------------------------------------------------------------------------

UNSET = "is the variable in {...} unset? set it, or give a path"
EMPTY = "is the variable in {...} empty? set it, or give a path"


@pytest.mark.parametrize("kwargs, field, message", [
    ({"out": "None/train.jsonl"}, "out", f"out 'None/train.jsonl' starts with 'None': {UNSET}"),
    ({"out": Path("data") / "nan" / "t.jsonl"}, "out", f"out 'data/nan/t.jsonl' has a segment 'nan': {UNSET}"),
    ({"out": "None"}, "out", f"out 'None' starts with 'None': {UNSET}"),
    ({"out": "gs://None/t.jsonl"}, "out", f"out 'gs://None/t.jsonl' starts with 'None': {UNSET}"),
    ({"out": "gs:///t.jsonl"}, "out", f"out 'gs:///t.jsonl' has an empty segment: {EMPTY}"),
    ({"out": "data//t.jsonl"}, "out", f"out 'data//t.jsonl' has an empty segment: {EMPTY}"),
    ({"out": "t.jsonl", "validation_split": 1, "validation_out": "None/v.jsonl"}, "validation_out",
     f"validation_out 'None/v.jsonl' starts with 'None': {UNSET}"),
    ({"out": "t.jsonl", "validation_split": 1, "validation_out": "v/<NA>/v.jsonl"}, "validation_out",
     f"validation_out 'v/<NA>/v.jsonl' has a segment '<NA>': {UNSET}"),
])
def test_a_path_from_an_unset_variable_is_refused_and_makes_no_folder(tmp_path, monkeypatch, kwargs, field,
                                                                       message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        tuning_magics.dataset(qa(), **kwargs)
    assert str(info.value) == message and info.value.field == field
    assert list(tmp_path.iterdir()) == []


def test_paths_that_only_look_like_unset_ones_are_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in ("None.jsonl", "Nonesuch/t.jsonl", "./nano/t.jsonl", str(tmp_path / "abs" / "t.jsonl"),
                "~/../" + str(tmp_path.relative_to(tmp_path.anchor)) + "/tilde.jsonl"):
        assert tuning_magics.dataset(qa(), out=out).examples == 3
    assert files(tmp_path) == ["None.jsonl", "Nonesuch", "abs", "nano", "tilde.jsonl"]


@pytest.mark.parametrize("output_uri, message", [
    ("None/run", f"output_uri 'None/run' starts with 'None': {UNSET}"),
    ("runs/nan", f"output_uri 'runs/nan' has a segment 'nan': {UNSET}"),
    ("gs://None/out", f"output_uri 'gs://None/out' starts with 'None': {UNSET}"),
    ("runs//x", f"output_uri 'runs//x' has an empty segment: {EMPTY}"),
])
def test_tune_refuses_an_output_uri_from_an_unset_variable(tmp_path, monkeypatch, output_uri, message):
    """The local job folder and the Vertex AI output folder come from tune()'s output_uri: refused before both."""
    monkeypatch.chdir(tmp_path)
    for dry_run in (True, False):
        with pytest.raises(UserError) as info:
            tuning_magics.tune(base_model="local/tiny-qwen3", train_dataset=qa(), output_uri=output_uri,
                               dry_run=dry_run)
        assert str(info.value) == message and info.value.field == "output_uri"
    assert list(tmp_path.iterdir()) == []
