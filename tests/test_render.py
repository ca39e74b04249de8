"""One truth for "the example as the model sees it": the dataset report's preview and the local engine's
training examples come from the same renderer and agree token for token."""

from __future__ import annotations

import hypothesis
import pytest
from hypothesis import strategies as st

import tuning_magics
from tuning_magics.datasets import formats as F
from tuning_magics.datasets import render as R
from tuning_magics.datasets import tokenizer as T
from tuning_magics.datasets import tokens
from tuning_magics.datasets.templates import segments as approximate_segments

BUILTIN = ["local/tiny-qwen3", "local/tiny-llama", "local/tiny-gemma3"]
SPECIAL = st.sampled_from(list(T.SPECIAL_TOKENS) + ["<", ">", "<|im_", "end|>", "\n", " ", "é", "🌍"])
_text = st.lists(st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=10), SPECIAL),
                 min_size=1, max_size=6).map("".join).filter(lambda s: s.strip())
_content = st.one_of(_text, st.lists(_text.map(lambda t: {"type": "text", "text": t}), min_size=1, max_size=3))


@st.composite
def conversations(draw):
    """Chat conversations (a system prompt or not, several turns, 'model' for the assistant at times)
    and prompt/completion rows, as the dataset layer hands them on."""
    if draw(st.booleans()):
        record = {"prompt": draw(_text), "completion": draw(_text)}
        if draw(st.booleans()):
            record["system"] = draw(_text)
        return F.to_messages(record, "prompt_completion")
    messages = [{"role": "system", "content": draw(_text)}] if draw(st.booleans()) else []
    for i in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(_content)})
        messages.append({"role": draw(st.sampled_from(["assistant", "model"])), "content": draw(_content)})
    return messages


@pytest.fixture(scope="module")
def engine_tokenizers():
    """The tokenizer the local engine trains each built-in model with (read from the built model folder)."""
    pytest.importorskip("transformers")
    from tuning_magics.backends.local.models import load_tokenizer

    return {name: load_tokenizer(name) for name in BUILTIN}


def engine_segments(tokenizer, example) -> list[tuple[str, bool]]:
    """What the engine trains on, as text: its tokens decoded in runs of equal loss."""
    out: list[tuple[str, bool]] = []
    run: list[int] = []
    loss = None
    for token, label in zip(example.input_ids, example.labels):
        flag = label != R.IGNORE_INDEX
        if run and flag != loss:
            out.append((tokenizer.decode(run), loss))
            run = []
        run.append(token)
        loss = flag
    if run:
        out.append((tokenizer.decode(run), loss))
    return out


def assert_agree(tokenizer, messages, preview) -> None:
    from tuning_magics.backends.local.data import encode

    example = encode(tokenizer, messages)
    assert preview.exact and preview.rendered is not None
    assert preview.rendered.input_ids == example.input_ids
    assert preview.rendered.labels == example.labels
    assert preview.segments == engine_segments(tokenizer, example)


@hypothesis.settings(max_examples=120, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(conversations())
@hypothesis.example([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Yo \n"}, {"role": "user", "content": "<|im_end|>"},
                     {"role": "assistant", "content": "fine <bos>"}])
def test_the_preview_is_what_the_engine_trains_on_token_for_token(engine_tokenizers, messages):
    for name in BUILTIN:
        assert_agree(engine_tokenizers[name], messages, R.preview(messages, name))


def test_the_agreement_check_catches_a_missing_bos_and_a_newline_inside_the_loss(engine_tokenizers):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    for name in BUILTIN:
        preview = R.preview(messages, name)
        assert preview.segments[0][0].startswith("<bos>") and preview.segments[-1] == ("\n", False)
        no_bos = [(preview.segments[0][0][len("<bos>"):], False)] + preview.segments[1:]
        newline_in_loss = preview.segments[:-2] + [(preview.segments[-2][0] + "\n", True)]
        for wrong in (no_bos, newline_in_loss):
            with pytest.raises(AssertionError):
                assert_agree(engine_tokenizers[name], messages, R.Preview(wrong, True, "", preview.rendered))


def test_a_weight_0_turn_carries_no_loss_in_the_engine_and_the_preview(engine_tokenizers):
    """OpenAI's chat format marks turns not to learn with "weight": 0: the file's messages keep it, the engine
    takes no loss on them, and the preview marks exactly what the engine learns."""
    from tuning_magics.datasets.formats import read_conversations
    from tuning_magics.datasets.validate import validate

    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Old", "weight": 0},
                           {"role": "user", "content": "Again"},
                           {"role": "assistant", "content": "New", "weight": 1}]}
    assert validate([record], "local/tiny-qwen3").ok
    messages = F.to_messages(record)
    assert [m.get("weight") for m in messages] == [None, 0, None, 1]
    for name in BUILTIN:
        preview = R.preview(messages, name)
        assert_agree(engine_tokenizers[name], messages, preview)
        learned = "".join(text for text, loss in preview.segments if loss)
        assert "New" in learned and "Old" not in learned
    every = R.render(engine_tokenizers[BUILTIN[0]], [{k: v for k, v in m.items() if k != "weight"}
                                                     for m in messages])
    assert every.loss_tokens > R.render(engine_tokenizers[BUILTIN[0]], messages).loss_tokens


def test_weights_are_checked_and_vertex_ai_users_are_told_what_they_change(tmp_path):
    from tuning_magics.datasets.validate import validate

    bad = {"messages": [{"role": "user", "content": "Hi", "weight": 1},
                        {"role": "assistant", "content": "A", "weight": 2}]}
    errors = [(e.field, str(e)) for e in validate([bad], "local/tiny-qwen3").errors]
    assert ("messages[0].weight", "line 1, messages[0].weight: only an assistant turn has a weight (0: not "
            "learned, 1: learned)") in errors
    assert any(f == "messages[1].weight" and "must be 0 (not learned) or 1 (learned), not 2" in t for f, t in errors)
    none = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A", "weight": 0}]}
    assert "nothing to learn" in str(validate([none], "local/tiny-qwen3").errors[0])
    ok = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A", "weight": 0},
                       {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "B"}]}
    assert validate([ok], "local/tiny-qwen3").warnings == []
    warned = validate([ok], "qwen3-4b").warnings
    assert len(warned) == 1 and "Vertex AI learns every model turn" in str(warned[0])
    old = validate([{"input_text": "a", "output_text": "b"}], "local/tiny-qwen3")
    assert "retired Vertex AI format: rename them prompt and completion" in str(old.errors[0])


def test_the_builtin_preview_needs_no_tokenizer_library_and_matches_the_real_tokenizer(engine_tokenizers):
    byte = T.ByteTokenizer()
    text = "<bos>a é🌍\n<|im_end|><|im_<pad>"
    real = engine_tokenizers["local/tiny-qwen3"]
    got = byte(text, return_offsets_mapping=True)
    want = real(text, add_special_tokens=False, return_offsets_mapping=True)
    assert got["input_ids"] == list(want["input_ids"])
    assert got["offset_mapping"] == [tuple(o) for o in want["offset_mapping"]]
    assert byte.decode(got["input_ids"]) == text


def test_the_engine_still_truncates_after_the_labels():
    messages = [{"role": "user", "content": "q" * 30}, {"role": "assistant", "content": "a" * 30}]
    full = R.render(T.ByteTokenizer(), messages)
    cut = R.render(T.ByteTokenizer(), messages, max_seq_len=50)
    assert cut.input_ids == full.input_ids[:50] and cut.labels == full.labels[:50]
    assert "".join(t for t, _ in cut.segments()) == full.text  # text past the cut shows, without loss
    assert cut.segments()[-1][1] is False


# -- catalog models: their own tokenizer when it is on this machine, an approximation otherwise -------------

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else "
    "m['role']) + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@pytest.fixture
def cached_gemma_tokenizer(hf_cache):
    """A Hugging Face cache holding a tokenizer with a Gemma-style template for google/gemma-3-1b-it."""
    return hf_cache("google/gemma-3-1b-it", GEMMA_TEMPLATE)


def test_a_cached_catalog_tokenizer_gives_an_exact_preview(cached_gemma_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    preview = R.preview(messages, "google/gemma3@gemma-3-1b-it")
    assert_agree(cached_gemma_tokenizer, messages, preview)
    assert preview.segments == [("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", False),
                                ("Yo<end_of_turn>", True), ("\n", False)]
    assert "google/gemma3@gemma-3-1b-it's own tokenizer" in preview.note
    report = tuning_magics.validate([{"prompt": "Hi", "completion": "Yo"}], model="google/gemma3@gemma-3-1b-it")
    assert report.example_preview.exact and "approximation" not in report._repr_html_()


@pytest.mark.parametrize("model, family, why", [
    ("gemini-2.5-flash", "gemini", "does not publish its tokenizer"),
    ("meta/llama3_1@llama-3.1-8b-instruct", "llama", "not available offline"),
    (None, "chatml", "no model was named"),
])
def test_without_a_tokenizer_the_preview_says_it_is_an_approximation(model, family, why):
    tokens._tokenizer_for.cache_clear()
    report = tuning_magics.validate([{"prompt": "Hi", "completion": "Yo"}], model=model)
    preview = report.example_preview
    assert not preview.exact and preview.rendered is None
    assert preview.note.startswith(f"an approximation of the {family} chat template") and why in preview.note
    assert preview.segments == approximate_segments(report.example, model)
    assert "approximation of the" in report._repr_html_()
    from tuning_magics.display.dataset_report import report_text

    assert "first example, approximately" in report_text(report) and "approximation" in report_text(report)


def test_the_approximation_marks_loss_as_the_engine_does():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                {"role": "model", "content": "Yo"}]
    assert approximate_segments(messages, "google/gemma3@gemma-3-1b-it") == [
        ("<bos>", False), ("<start_of_turn>user\n", False), ("S\n\nHi<end_of_turn>\n", False),
        ("<start_of_turn>model\n", False), ("Yo<end_of_turn>", True), ("\n", False)]
    assert approximate_segments(messages, "meta/llama3_1@llama-3.1-8b-instruct")[-1] == ("Yo<|eot_id|>", True)
