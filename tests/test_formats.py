"""The five JSONL formats: detection, reading as chat messages, writing, and lossless conversion."""

from __future__ import annotations

import copy
import json

import hypothesis
import pytest
from hypothesis import strategies as st

from tuning_magics.datasets import formats as F
from tuning_magics.errors import UserError

PNG_B64 = "iVBORw0KGgoAAAANSUhEUg=="

PROMPT_COMPLETION = {"prompt": "What is 2+2?", "completion": "4"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
GENERATE_CONTENT = {
    "systemInstruction": {"parts": [{"text": "Answer briefly."}]},
    "contents": [
        {"role": "user", "parts": [{"text": "What is 2+2?"}]},
        {"role": "model", "parts": [{"text": "4"}]},
    ],
}
MULTIMODAL_CHAT = {
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "gs://bucket/cat.png"}},
                {"type": "image_url", "image_url": {"url": f"data:image/webp;base64,{PNG_B64}"}},
                {"type": "text", "text": "What animals are these?"},
            ],
        },
        {"role": "assistant", "content": "Two cats."},
    ]
}
MULTIMODAL_GC = {
    "contents": [
        {
            "role": "user",
            "parts": [
                {"fileData": {"mimeType": "image/png", "fileUri": "gs://bucket/cat.png"}},
                {"inlineData": {"mimeType": "image/webp", "data": PNG_B64}},
                {"text": "What animals are these?"},
            ],
        },
        {"role": "model", "parts": [{"text": "Two cats."}]},
    ]
}


# -- detection and names --------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        (PROMPT_COMPLETION, F.PROMPT_COMPLETION),
        ({"prompt": "only a prompt"}, F.PROMPT_COMPLETION),
        (CHAT, F.CHAT),
        (MULTIMODAL_CHAT, F.CHAT),
        (GENERATE_CONTENT, F.GENERATE_CONTENT),
        (MULTIMODAL_GC, F.GENERATE_CONTENT),
        ({"system_instruction": {"parts": [{"text": "s"}]}, "contents": []}, F.GENERATE_CONTENT),
        ({"text": "no format"}, None),
        ({}, None),
        (["not", "a", "dict"], None),
        ("a string", None),
    ],
)
def test_detect_judges_the_format_by_its_keys(record, fmt):
    assert F.detect(record) == fmt


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("chat", F.CHAT),
        ("Messages", F.CHAT),
        ("generate_content", F.GENERATE_CONTENT),
        ("generate-content", F.GENERATE_CONTENT),
        ("GenerateContent", F.GENERATE_CONTENT),
        ("gemini", F.GENERATE_CONTENT),
        ("prompt_completion", F.PROMPT_COMPLETION),
        ("prompt completion", F.PROMPT_COMPLETION),
    ],
)
def test_normalise_format_accepts_common_spellings(spelling, canonical):
    assert F.normalise_format(spelling) == canonical


def test_normalise_format_rejects_an_unknown_name_with_a_user_error():
    with pytest.raises(UserError) as info:
        F.normalise_format("parquet")
    assert info.value.field == "format"
    assert "parquet" in str(info.value) and "chat" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "mime"),
    [
        ("gs://b/x.png", "image/png"),
        ("gs://b/x.JPG", "image/jpeg"),
        ("https://example.com/a/b.jpeg?sig=abc.gif", "image/jpeg"),
        ("gs://b/photo.webp", "image/webp"),
        ("data:image/png;base64,AAAA", "image/png"),
        ("data:image/gif;base64,AAAA", "image/gif"),
        ("gs://b/no-extension", "image/jpeg"),
    ],
)
def test_guess_image_mime_from_data_uri_or_extension(url, mime):
    assert F.guess_image_mime(url) == mime


def test_get_reads_snake_case_before_camel_case():
    assert F.get({"file_data": 1}, "file_data", "fileData") == 1
    assert F.get({"fileData": 2}, "file_data", "fileData") == 2
    assert F.get({}, "file_data", "fileData", "default") == "default"


# -- reading every format as chat messages ------------------------------------------------


def test_prompt_completion_reads_as_a_user_and_an_assistant_turn():
    assert F.to_messages(PROMPT_COMPLETION) == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    # Distillation datasets hold prompts only.
    assert F.to_messages({"prompt": "p"}) == [{"role": "user", "content": "p"}]


def test_generate_content_reads_as_chat_with_system_instruction_first():
    assert F.to_messages(GENERATE_CONTENT) == CHAT["messages"]


def test_snake_case_generate_content_and_assistant_role_read_like_camel_case_and_model():
    snake = {
        "system_instruction": {"parts": [{"text": "Answer briefly."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "What is 2+2?"}]},
            {"role": "assistant", "parts": [{"text": "4"}]},
        ],
    }
    assert F.to_messages(snake) == F.to_messages(GENERATE_CONTENT)


def test_chat_model_role_reads_as_assistant():
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "model", "content": "hello"}]}
    assert [m["role"] for m in F.to_messages(record)] == ["user", "assistant"]


def test_multimodal_generate_content_parts_read_as_image_url_parts():
    messages = F.to_messages(MULTIMODAL_GC)
    assert messages == MULTIMODAL_CHAT["messages"]


def test_snake_case_file_data_and_inline_data_parts_are_read():
    snake = {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"file_data": {"mime_type": "image/png", "file_uri": "gs://bucket/cat.png"}},
                    {"inline_data": {"mime_type": "image/webp", "data": PNG_B64}},
                    {"text": "What animals are these?"},
                ],
            },
            {"role": "model", "parts": [{"text": "Two cats."}]},
        ]
    }
    assert F.to_messages(snake) == MULTIMODAL_CHAT["messages"]
    # ... and written back in camelCase with the same meaning.
    assert F.convert(snake, "generate_content") == MULTIMODAL_GC


def test_to_messages_rejects_an_unknown_format():
    with pytest.raises(ValueError):
        F.to_messages({"text": "x"})


def test_an_unknown_generate_content_part_is_refused_not_dropped():
    record = {"contents": [{"role": "user", "parts": [{"video": "x"}]}]}
    with pytest.raises(ValueError, match="unknown part"):
        F.to_messages(record)


# -- lossless conversion ---------------------------------------------------------------------


def test_chat_to_generate_content_and_back_is_lossless():
    gc = F.convert(CHAT, "generate_content")
    assert gc == GENERATE_CONTENT
    assert F.convert(gc, "chat") == CHAT


def test_generate_content_to_chat_and_back_is_lossless():
    chat = F.convert(GENERATE_CONTENT, "chat")
    assert chat == CHAT
    assert F.convert(chat, "generate_content") == GENERATE_CONTENT


def test_multimodal_chat_to_generate_content_and_back_is_lossless():
    gc = F.convert(MULTIMODAL_CHAT, "gemini")
    assert gc == MULTIMODAL_GC
    assert F.convert(gc, "chat") == MULTIMODAL_CHAT


def test_several_text_parts_of_one_turn_and_of_the_system_instruction_are_kept():
    record = {
        "systemInstruction": {"parts": [{"text": "You are careful."}, {"text": "Cite sources."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "first half of a long question"}, {"text": "second half"}]},
            {"role": "model", "parts": [{"text": "answer"}]},
            {"role": "user", "parts": [{"text": "follow-up"}]},
            {"role": "model", "parts": [{"text": "part 1"}, {"text": "part 2"}]},
        ],
    }
    original = copy.deepcopy(record)
    chat = F.convert(record, "chat")
    assert record == original, "convert must not modify its input"
    assert len(chat["messages"]) == 5  # turn boundaries kept
    assert chat["messages"][0]["role"] == "system"
    assert chat["messages"][1]["content"] == [
        {"type": "text", "text": "first half of a long question"},
        {"type": "text", "text": "second half"},
    ]
    assert F.convert(chat, "generate_content") == record


def test_convert_to_chat_normalises_the_model_role():
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "model", "content": "hello"}]}
    assert F.convert(record, "chat") == {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }


def test_convert_generate_content_with_assistant_role_writes_model():
    record = {"contents": [{"role": "user", "parts": [{"text": "q"}]}, {"role": "assistant", "parts": [{"text": "a"}]}]}
    assert F.convert(record, "generate_content")["contents"][1]["role"] == "model"


def test_prompt_completion_converts_to_chat_and_generate_content_and_back():
    chat = F.convert(PROMPT_COMPLETION, "chat")
    assert chat == {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
    gc = F.convert(PROMPT_COMPLETION, "generate_content")
    assert gc == {
        "contents": [
            {"role": "user", "parts": [{"text": "What is 2+2?"}]},
            {"role": "model", "parts": [{"text": "4"}]},
        ]
    }
    assert F.convert(gc, "prompt_completion") == PROMPT_COMPLETION
    assert F.convert(chat, "prompt_completion") == PROMPT_COMPLETION
    assert F.convert({"prompt": "p"}, "chat") == {"messages": [{"role": "user", "content": "p"}]}


@pytest.mark.parametrize("record", [CHAT, MULTIMODAL_CHAT, GENERATE_CONTENT])
def test_records_that_do_not_fit_prompt_completion_are_refused(record):
    with pytest.raises(ValueError, match="prompt/completion"):
        F.convert(record, "prompt_completion")


def test_from_messages_builds_each_format():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert F.from_messages(messages, F.CHAT) == {"messages": messages}
    assert F.from_messages(messages, F.PROMPT_COMPLETION) == {"prompt": "q", "completion": "a"}
    assert F.from_messages(messages, F.GENERATE_CONTENT) == {
        "contents": [{"role": "user", "parts": [{"text": "q"}]}, {"role": "model", "parts": [{"text": "a"}]}]
    }
    with pytest.raises(ValueError):
        F.from_messages(messages, "csv")


def test_image_url_given_as_a_plain_string_converts_to_file_data():
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": "https://x.org/a.jpg"}, {"type": "text", "text": "q"}]},
            {"role": "assistant", "content": "a"},
        ]
    }
    gc = F.convert(record, "generate_content")
    assert gc["contents"][0]["parts"][0] == {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://x.org/a.jpg"}}


def test_text_of_and_images_of():
    content = MULTIMODAL_CHAT["messages"][0]["content"]
    assert F.text_of(content) == "What animals are these?"
    assert F.text_of("plain") == "plain"
    assert F.images_of(content) == ["gs://bucket/cat.png", f"data:image/webp;base64,{PNG_B64}"]
    assert F.images_of("plain") == []
    two_texts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert F.text_of(two_texts) == "a\nb"


def test_read_conversations_of_every_format(tmp_path):
    for name, record in [("pc", PROMPT_COMPLETION), ("chat", CHAT), ("gc", GENERATE_CONTENT), ("mm", MULTIMODAL_GC)]:
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(record) + "\n\n" + json.dumps(record) + "\n", encoding="utf-8")
        conversations = F.read_conversations(path)
        assert len(conversations) == 2  # the blank line is skipped
        for convo in conversations:
            assert all(isinstance(m["content"], str) for m in convo)
            assert convo[-1]["role"] == "assistant"
    assert F.read_conversations(tmp_path / "gc.jsonl")[0] == CHAT["messages"]
    assert F.read_conversations(tmp_path / "mm.jsonl")[0][0] == {"role": "user", "content": "What animals are these?"}


# -- a property: chat <-> generate_content round trips for any text ------------------------

_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30)
_content = st.one_of(
    _text, st.lists(_text.map(lambda t: {"type": "text", "text": t}), min_size=2, max_size=3)
)


@st.composite
def _chats(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_content)})
    for i in range(draw(st.integers(1, 4))):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": draw(_content)})
    return {"messages": messages}


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(_chats())
def test_property_chat_generate_content_round_trip(record):
    gc = F.convert(record, "generate_content")
    back = F.convert(json.loads(json.dumps(gc)), "chat")
    assert back == record
    assert F.convert(back, "generate_content") == gc
