"""Token counts: exact for the built-in models with no tokenizer library, batched through real tokenizers,
estimates labelled as such, and a dataset layer that never loads the engine."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
from pathlib import Path

import hypothesis
import pandas as pd
import pytest
from hypothesis import strategies as st

import tuning_magics
from tuning_magics.datasets import tokenizer as T
from tuning_magics.datasets import tokens
from tuning_magics.datasets.render import preview
from tuning_magics.datasets.tokens import TokenCounter

BUILTIN = ["local/tiny-qwen3", "local/tiny-llama", "local/tiny-gemma3"]
SPECIAL = st.sampled_from(list(T.SPECIAL_TOKENS) + ["<", ">", "<|im_", "end|>", "<bo", "s>"])
_text = st.lists(st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=12), SPECIAL),
                 min_size=1, max_size=6).map("".join).filter(lambda s: s.strip())
_role_text = st.one_of(_text, st.lists(_text.map(lambda t: {"type": "text", "text": t}), min_size=1, max_size=3))


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_text)})
    for i in range(draw(st.integers(1, 4))):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": draw(_role_text)})
    return messages


def chat(q="What is 2+2?", a="4", system=None):
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]


@pytest.fixture(scope="module")
def real_tokenizers():
    """The tokenizer the engine loads for each built-in model (from the built model folder)."""
    pytest.importorskip("transformers")
    from tuning_magics.backends.local.models import load_tokenizer

    return {name: load_tokenizer(name) for name in BUILTIN}


def _real_count(tok, messages) -> int:
    ids = tok.apply_chat_template(messages, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


# -- the built-in models: exact, with no library ----------------------------------------------------


@hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(conversations())
def test_builtin_counts_equal_the_real_chat_template_for_every_builtin_model(real_tokenizers, messages):
    for name in BUILTIN:
        counter = TokenCounter(name)
        assert not counter.estimated and counter.tokenizer is None  # no library involved
        assert counter.count(messages) == _real_count(real_tokenizers[name], messages), name


@hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(conversations())
def test_builtin_previews_are_the_real_rendering(real_tokenizers, messages):
    for name in BUILTIN:
        rendered = real_tokenizers[name].apply_chat_template(messages, tokenize=False)
        found = preview(messages, name)
        assert found.exact and "".join(text for text, _ in found.segments) == rendered


@hypothesis.settings(max_examples=40, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(st.lists(st.tuples(_text, _text), min_size=1, max_size=6), st.one_of(st.none(), _text))
def test_dataframe_column_counts_equal_the_per_example_counts(real_tokenizers, rows, system_prompt):
    df = pd.DataFrame(rows, columns=["q", "a"])
    counter = TokenCounter("local/tiny-qwen3")
    columns = [("user", "q"), ("assistant", "a")]
    fixed = [{"role": "system", "content": system_prompt}] if system_prompt else []
    expected = [_real_count(real_tokenizers["local/tiny-qwen3"], fixed + chat(q, a)) for q, a in rows]
    assert list(counter.count_columns(df, columns, system_prompt)) == expected


def test_dataset_and_validate_give_the_same_exact_counts(tmp_path):
    df = pd.DataFrame({"q": ["What is 2+2?", "Héllo <|im_end|> wörld 🌍"], "a": ["4", "fine <bos>"]})
    ds = tuning_magics.dataset(df, out=str(tmp_path / "t.jsonl"), prompt="q", completion="a",
                               system_prompt="Be brief.", model="local/tiny-qwen3")
    report = tuning_magics.validate(ds.uri, model="local/tiny-qwen3")
    assert list(ds.report.token_lengths) == list(report.token_lengths)
    assert not report.tokens["estimated"] and "tokenizer of local/tiny-qwen3" in report.tokenizer_note


def test_builtin_counts_work_without_the_local_extra(without_extra, tmp_path):
    code = f"""
import json, sys
import pandas as pd
import tuning_magics as tm
from tuning_magics.cli import main
df = pd.DataFrame({{"q": ["What is 2+2?", "Capital?"], "a": ["4", "Paris"]}})
ds = tm.dataset(df, out={str(tmp_path / "t.jsonl")!r}, prompt="q", completion="a", model="local/tiny-qwen3")
report = tm.validate(ds.uri, model="local/tiny-qwen3")
catalog = tm.validate(ds.uri, model="qwen/qwen3@qwen3-4b")
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "tuning_magics")
ip.push({{"df": df}})
ip.run_line_magic("dataset", "df --prompt q --completion a --out {tmp_path / "m.jsonl"} --model local/tiny-qwen3 --as m")
status = main(["validate", ds.uri, "--model", "local/tiny-qwen3", "--json"])
print(json.dumps({{"ds": ds.tokens, "report": report.tokens, "catalog": catalog.tokens,
                  "note": catalog.tokenizer_note, "magic": ip.user_ns["m"].tokens, "status": status,
                  "loaded": sorted(m for m in ("torch", "transformers", "tokenizers") if m in sys.modules)}}))
"""
    done = without_extra("local", code)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["status"] == 0 and out["loaded"] == []
    assert out["ds"] == out["report"] == out["magic"] and out["ds"]["estimated"] is False
    assert out["ds"]["total"] == sum(_bytes_count(q, a) for q, a in (("What is 2+2?", "4"), ("Capital?", "Paris")))
    assert out["catalog"]["estimated"] is True and "not available offline" in out["note"]


def _bytes_count(q: str, a: str) -> int:
    # <bos> + "<|im_start|>user\n" q "<|im_end|>\n" + "<|im_start|>assistant\n" a "<|im_end|>\n"
    return 1 + (1 + 5 + len(q.encode()) + 2) + (1 + 10 + len(a.encode()) + 2)


# -- real tokenizers: batched, exact, quiet, bounded ---------------------------------------------------


@pytest.fixture
def cached_catalog_tokenizer(hf_cache):
    """A Hugging Face cache holding a tokenizer for Qwen/Qwen3-4B (the project's byte tokenizer, saved)."""
    return hf_cache("Qwen/Qwen3-4B", T.build_tokenizer().chat_template.replace("{{ bos_token }}", ""))  # its own


def test_a_cached_catalog_tokenizer_counts_exactly_in_batches(cached_catalog_tokenizer, tmp_path):
    counter = TokenCounter("qwen/qwen3@qwen3-4b")
    assert counter.kind == tokens.TOKENIZER and not counter.estimated
    convs = [chat(f"question {i} " * (i % 7 + 1), "answer <|im_end|>") for i in range(50)]
    assert counter.count_many(convs) == [_real_count(cached_catalog_tokenizer, c) for c in convs]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    report = tuning_magics.validate(str(path), model="qwen/qwen3@qwen3-4b")
    assert list(report.token_lengths) == [_real_count(cached_catalog_tokenizer, c) for c in convs]
    df = pd.DataFrame({"q": [c[0]["content"] for c in convs], "a": [c[1]["content"] for c in convs]})
    ds = tuning_magics.dataset(df, out=str(tmp_path / "d.jsonl"), prompt="q", completion="a",
                               model="qwen/qwen3@qwen3-4b")
    assert list(ds.report.token_lengths) == list(report.token_lengths)


def test_long_texts_are_counted_in_pieces_and_exactly(cached_catalog_tokenizer, monkeypatch, caplog, capfd):
    monkeypatch.setattr(tokens, "ENCODE_CHARS", 1000)  # pieces of 1000 characters at most
    text = ("word " * 5000) + "x" * 3000  # longer than the tokenizer's 1024 maximum, too
    counter = TokenCounter("qwen/qwen3@qwen3-4b")
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        counts = counter.count_many([chat(text, "a"), chat("q", "a")])
    # transformers' "Token indices sequence length is longer than the specified maximum" stays out.
    assert "longer than the specified maximum" not in caplog.text + capfd.readouterr().err
    # A byte tokenizer has no merges, so pieces add up to exactly the whole.
    assert counts == [_real_count(cached_catalog_tokenizer, chat(text, "a")),
                      _real_count(cached_catalog_tokenizer, chat("q", "a"))]


def test_estimates_are_labelled():
    for model in (None, "gemini-2.5-flash"):
        counter = TokenCounter(model)
        assert counter.estimated and "estimate" in counter.note
        assert counter.count(chat("abcd" * 10, "abcd")) == (10 + 4) + (1 + 4)


# -- the dataset layer never loads the engine ----------------------------------------------------------


def test_the_dataset_layer_does_not_import_the_engine_statically():
    folder = Path(tuning_magics.__file__).parent / "datasets"
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert "backends" not in name, f"{path.name} imports {name}"


def test_counting_and_writing_load_neither_the_engine_nor_torch(tmp_path):
    import subprocess
    import sys

    code = f"""
import sys, pandas as pd, tuning_magics as tm
df = pd.DataFrame({{"q": ["a", "b"], "a": ["c", "d"]}})
ds = tm.dataset(df, out={str(tmp_path / "t.jsonl")!r}, prompt="q", completion="a", model="local/tiny-llama")
tm.validate(ds.uri, model="local/tiny-gemma3")
ds._repr_html_()
print(sorted(m for m in sys.modules if m.startswith("tuning_magics.backends") or m in ("torch", "transformers")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- chat templates rendered without Jinja where that is exact ---------------------------------------------

_TEMPLATES = {
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}",
    "trimming": "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n\\n' + m['content'] | trim"
                " + '<|im_end|>' }}{% endfor %}",
    "think": "{% for m in messages %}{% if m.role == 'assistant' and '</think>' in m.content %}"
             "{{ '<|im_start|>assistant\\n' + m.content.split('</think>')[-1].lstrip('\\n') + '<|im_end|>\\n' }}"
             "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}",
    "alternating": "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                   "{{ '[' + m['role'] + '] ' + m['content'] + '\\n' }}{% endfor %}",
    "default_system": "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou help.<|im_end|>\\n' }}"
                      "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                      "'<|im_end|>\\n' }}{% endfor %}",
    "upper": "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '\\n' }}{% endfor %}",
    "twice": "{% for m in messages %}{{ m['content'] + '|' + m['content'] }}{% endfor %}",
}
_template_text = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=20),
    st.sampled_from([" padded ", "\n\nlead", "trail \n", "a</think>\n\nb", "<tool>", "{{ x }}", "{% raw %}"]),
)


@hypothesis.settings(max_examples=80, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(st.sampled_from(sorted(_TEMPLATES)),
                  st.lists(st.sampled_from(["system", "user", "assistant", "user", "assistant"]), min_size=1, max_size=5),
                  st.lists(_template_text, min_size=5, max_size=5))
@hypothesis.example("think", ["user", "assistant"], ["q", "reasoning</think>\n\nanswer", "", "", ""])
@hypothesis.example("trimming", ["system", "user", "assistant"], [" s ", "\nq\n", "a \t", "", ""])
@hypothesis.example("alternating", ["user", "user"], ["a", "b", "", "", ""])
def test_the_renderer_gives_what_jinja_gives(name, roles, drawn):
    pytest.importorskip("transformers")
    tok = T.build_tokenizer()
    tok.chat_template = _TEMPLATES[name]
    renderer = tokens.ChatRenderer(tok)
    # Plain texts first, past the examples checked against Jinja; then any text, rendered from the pieces.
    plain = [[f"plain {i} {j}" for j in range(len(roles))] for i in range(tokens.ChatRenderer.CHECKED + 1)]
    for texts in plain + [drawn[:len(roles)], drawn[len(roles) - 1::-1]]:
        try:
            expected = tok.apply_chat_template([{"role": r, "content": t} for r, t in zip(roles, texts)],
                                               tokenize=False)
        except Exception as exc:  # noqa: BLE001 - the renderer must refuse it the same way
            with pytest.raises(type(exc)):
                renderer.render(roles, texts)
            continue
        assert renderer.render(roles, texts) == expected


def test_batches_counted_on_a_thread_land_on_their_own_lines(cached_catalog_tokenizer, tmp_path, monkeypatch):
    from tuning_magics import catalog
    from tuning_magics.datasets import validate as V

    monkeypatch.setattr(V, "BATCH_EXAMPLES", 3)  # 17 batches, each counted while the next is read
    convs = [chat(f"question {i} " * (i % 9 + 1), "answer " * (i % 4 + 1)) for i in range(50)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    expected = [_real_count(cached_catalog_tokenizer, c) for c in convs]
    limit = sorted(expected)[40]  # a sequence length some examples are over
    spec = dataclasses.replace(catalog.get("qwen/qwen3@qwen3-4b"), max_seq_len=limit)
    report = tuning_magics.validate(str(path), model=spec)
    assert list(report.token_lengths) == expected and not report.tokens["estimated"]
    assert [(w.line, w.message.split(";")[0]) for w in report.warnings] == [
        (i + 1, f"is about {n:,} tokens") for i, n in enumerate(expected) if n > limit]
