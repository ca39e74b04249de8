"""The local engine's building blocks: tokenizer, tiny models, loading, labels, batches, checkpoints, memory."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tuning_magics.errors import UserError  # noqa: E402


def test_tokenizer_is_byte_level_and_round_trips():
    from tuning_magics.datasets.tokenizer import VOCAB_SIZE, build_tokenizer

    tok = build_tokenizer()
    text = "héllo, 世界! <tag> \n\t end"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == VOCAB_SIZE
    # Built twice, identical: nothing random, nothing read from disk.
    assert build_tokenizer()(text, add_special_tokens=False)["input_ids"] == ids


def test_chat_template_is_chatml_with_generation_prompt():
    from tuning_magics.datasets.tokenizer import build_tokenizer

    tok = build_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<bos><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\n")
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Yo"}], tokenize=False)
    assert full.endswith("<|im_start|>assistant\nYo<|im_end|>\n")
    # Special tokens are single tokens.
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|im_start|>")]


def test_labels_mask_everything_but_assistant_tokens():
    from tuning_magics.backends.local.data import IGNORE_INDEX, encode
    from tuning_magics.datasets.tokenizer import build_tokenizer

    tok = build_tokenizer()
    msgs = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is the capital of Zorvia?"},
        {"role": "assistant", "content": "Mellt"},
        {"role": "user", "content": "And of Quandor?"},
        {"role": "assistant", "content": "Bzz"},
    ]
    ex = encode(tok, msgs)
    assert len(ex.input_ids) == len(ex.labels)
    learned = [(i, lab) for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert all(i == lab for i, lab in learned)
    # Exactly the two replies, each followed by its end-of-turn token, nothing else.
    assert tok.decode([i for i, _ in learned]) == "Mellt<|im_end|>Bzz<|im_end|>"
    masked_text = tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE_INDEX])
    assert "Zorvia" in masked_text and "Answer in one word." in masked_text and "Mellt" not in masked_text
    # Labelled tokens are contiguous per reply.
    flags = [lab != IGNORE_INDEX for lab in ex.labels]
    runs = sum(1 for a, b in zip([False] + flags, flags) if b and not a)
    assert runs == 2


def test_prompt_without_reply_is_dropped_and_truncation_keeps_loss_tokens():
    from tuning_magics.backends.local.data import encode_all
    from tuning_magics.datasets.tokenizer import build_tokenizer

    tok = build_tokenizer()
    convs = [[{"role": "user", "content": "no answer"}],
             [{"role": "user", "content": "q" * 50}, {"role": "assistant", "content": "a"}],
             [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    kept, dropped = encode_all(tok, convs, max_seq_len=40)
    assert dropped == 2 and len(kept) == 1 and len(kept[0]) <= 40


def test_length_grouped_batches_are_deterministic_and_pad_little():
    from tuning_magics.backends.local.data import length_grouped_batches

    lengths = [10 + (i * 37) % 200 for i in range(256)]
    a = length_grouped_batches(lengths, 8, seed=3)
    assert a == length_grouped_batches(lengths, 8, seed=3)
    assert a != length_grouped_batches(lengths, 8, seed=4)
    assert sorted(i for b in a for i in b) == list(range(256))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in a)
    assert 1 - sum(lengths) / padded < 0.05


def test_checkpoint_epochs_rule():
    from tuning_magics.backends.local.checkpoints import checkpoint_epochs

    assert checkpoint_epochs(1) == [1]
    assert checkpoint_epochs(10) == list(range(1, 11))
    for epochs in (11, 12, 25, 100):
        got = checkpoint_epochs(epochs)
        assert len(got) == 10 and got == sorted(set(got)) and got[-1] == epochs


def test_atomic_folder_leaves_nothing_on_error(tmp_path):
    from tuning_magics.storage import atomic_folder

    target = tmp_path / "checkpoint-3"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(target) as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]
    with atomic_folder(target) as tmp:  # replacing an existing folder is also atomic
        (tmp / "new.bin").write_bytes(b"z")
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]
    with atomic_folder(target, replace=False) as tmp:  # first writer wins: the existing copy stays
        (tmp / "late.bin").write_bytes(b"w")
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]


# A process that writes final/, then replaces it and dies (os._exit: no cleanup) just
# before its Nth rename: the crash points of a folder replacement. 1: tmp -> final (refused:
# final exists), 2: tmp -> new copy, 3: final -> old copy, 4: new copy -> final. Before the
# 4th, neither copy is called final: only recover_folder brings one back.
_CRASH_WHILE_REPLACING = """
import os, sys
from pathlib import Path
from tuning_magics.storage import atomic_folder

target, crash_at = Path(sys.argv[1]), int(sys.argv[2])
with atomic_folder(target) as tmp:
    (tmp / "weights").write_text("old")
real_rename, calls = os.rename, []

def rename(src, dst):
    calls.append(src)
    if len(calls) == crash_at:
        os._exit(9)
    real_rename(src, dst)

os.rename = rename
with atomic_folder(target) as tmp:
    (tmp / "weights").write_text("new")
"""


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4])
def test_a_crash_while_replacing_final_loses_neither_copy(tmp_path, crash_at):
    import subprocess
    import sys

    from tuning_magics.backends.local.checkpoints import final_dir, job_checkpoints, remove_stale_temp

    out = tmp_path / "job"
    final = final_dir(out)
    proc = subprocess.run([sys.executable, "-c", _CRASH_WHILE_REPLACING, str(final), str(crash_at)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert final.exists() == (crash_at < 4)
    # A reader finds a whole final/: the old copy, or the new one once it was complete.
    expected = "new" if crash_at == 4 else "old"
    found = {c.name: c.uri for c in job_checkpoints(out)}
    assert found == {"final": str(final)}
    assert (final / "weights").read_text() == expected
    # A resumed job's clean-up keeps it, and leaves nothing else.
    remove_stale_temp(out)
    assert [p.name for p in final.parent.iterdir()] == ["final"]
    assert (final / "weights").read_text() == expected


def test_a_folder_in_use_is_not_replaced_and_says_so(tmp_path, monkeypatch):
    import os

    from tuning_magics.storage import atomic_folder

    target = tmp_path / "final"
    with atomic_folder(target) as tmp:
        (tmp / "weights").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(src) == os.fspath(target):  # what Windows does while a file in it is open
            raise PermissionError(13, "Access is denied", os.fspath(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(UserError) as err:
        with atomic_folder(target) as tmp:
            (tmp / "weights").write_text("new")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"cannot replace {target}: permission denied")
    assert "job.chat()" in message and "the old copy is kept" in message
    assert [p.name for p in tmp_path.iterdir()] == ["final"] and (target / "weights").read_text() == "old"


def test_tuning_mode_spellings_have_one_normaliser():
    from tuning_magics import catalog
    from tuning_magics.backends.local import memory, trainer

    assert trainer.FULL is catalog.FULL and trainer.PEFT is catalog.PEFT
    for spelling in ("lora", "LoRA", "peft", "adapter", " peft_adapter ", "PEFT-ADAPTER"):
        assert catalog.normalise_mode(spelling) == catalog.PEFT
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 300}
    lora = memory.estimate_memory(shape, "PEFT_ADAPTER", 128, 2)
    assert lora < memory.estimate_memory(shape, "FULL", 128, 2)
    # Every spelling catalog accepts means the same to the memory estimate...
    assert memory.estimate_memory(shape, "adapter", 128, 2) == lora
    # ...and one it refuses is refused there too, not estimated as full tuning.
    with pytest.raises(UserError, match="tuning_mode must be FULL or PEFT_ADAPTER, not 'qlora'"):
        memory.estimate_memory(shape, "qlora", 128, 2)


def test_engine_options_have_one_check(tmp_path):
    from tuning_magics.backends.local.trainer import TrainConfig, check_engine_options
    from tuning_magics.backends.local.worker import Worker

    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n')
    base = dict(base_model="local/tiny-qwen3", train_path=str(data), output_dir=str(tmp_path / "out"))
    cases = [(dict(warmup_ratio=5), "warmup_ratio must be a number from 0 up to (not including) 1, not 5"),
             (dict(lr_scheduler="foo"), "lr_scheduler must be cosine, linear or constant, not 'foo'"),
             (dict(batch_size=0), "batch_size must be a whole number of at least 1, not 0"),
             (dict(device="tpu"), "device must be cpu, cuda, cuda:N, mps or auto, not 'tpu'"),
             (dict(bf16="no"), "bf16 must be True, False or None (automatic), not 'no'")]
    for option, message in cases:
        # The same words whether tune() checks the option or the trainer is called directly.
        with pytest.raises(UserError) as direct:
            TrainConfig(**base, **option).check()
        with pytest.raises(UserError) as submitted:
            check_engine_options(option)
        assert str(direct.value) == str(submitted.value) == message
    with pytest.raises(UserError, match="tuning_mode must be FULL or PEFT_ADAPTER"):
        TrainConfig(**base, tuning_mode="qlora").check()
    # A queued job whose options this trainer does not know: the worker says so in the same words as tune().
    with pytest.raises(UserError) as unknown:
        Worker("tune-x")._train_config({"base_model": "local/tiny-qwen3", "tuning_mode": "FULL",
                                        "engine_options": {"batch_sise": 2}}, str(data), tmp_path)
    assert str(unknown.value).startswith("tune() got an unknown parameter 'batch_sise'; engine options are ")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the machine has a GPU; the GPU benchmark "
                                                                         "covers these options there")
def test_gpu_options_are_refused_before_the_job_starts_where_the_machine_cannot(tmp_path, monkeypatch):
    import tuning_magics as tm
    from tuning_magics.backends.local.trainer import PARALLEL_ON_CPU

    monkeypatch.delenv(PARALLEL_ON_CPU, raising=False)
    from tuning_magics.backends.local.trainer import TrainConfig

    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n')
    cases = [
        (dict(load_in_4bit=True), "load_in_4bit",
         "load_in_4bit=True (QLoRA) trains a LoRA adapter over 4-bit base weights; add tuning_mode='PEFT_ADAPTER', "
         "or leave load_in_4bit out for full tuning"),
        (dict(load_in_4bit=True, tuning_mode="PEFT_ADAPTER"), "load_in_4bit",
         "load_in_4bit=True (QLoRA, 4-bit base weights) needs a CUDA GPU and this machine has none; leave "
         "load_in_4bit out here"),
        (dict(padding_free=True), "padding_free",
         "padding_free=True (padding-free batches) needs a CUDA GPU and this machine has none; leave padding_free "
         "out here"),
        (dict(kernels=True, device="cpu"), "kernels",
         "kernels=True (the Hub's optimised kernels) runs on a CUDA GPU, and device='cpu'; leave one of them out"),
        (dict(padding_free="yes"), "padding_free", "padding_free must be True or False, not 'yes'"),
        (dict(gpus=2), "gpus", "gpus=2 trains on 2 CUDA GPUs and this machine has 0; leave gpus out"),
        (dict(gpus=0), "gpus", "gpus must be a whole number of at least 1, not 0"),
    ]
    for options, field, message in cases:
        # The same line from tune() (before anything is written) and from the trainer called directly.
        with pytest.raises(UserError) as submitted:
            tm.tune("local/tiny-qwen3", str(data), output_uri=str(tmp_path / "job"), **options)
        with pytest.raises(UserError) as direct:
            TrainConfig(base_model="local/tiny-qwen3", train_path=str(data), output_dir=str(tmp_path / "out"),
                        **options).check()
        assert (str(submitted.value), submitted.value.field) == (str(direct.value), direct.value.field) == \
            (message, field)
    assert not (tmp_path / "job").exists() and not (tmp_path / "out").exists()


def test_the_sampler_hands_the_trainer_whole_length_grouped_batches_a_new_order_each_epoch():
    from tuning_magics.backends.local.data import LengthGroupedSampler, length_grouped_batches

    lengths = [10 + (i * 37) % 200 for i in range(101)]  # 12 full batches of 8 and one of 5
    sampler = LengthGroupedSampler(lengths, 8, seed=2)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(101)) and first != second
    # Read back in batches of 8, as the DataLoader does, they are exactly the grouped batches: the short one last.
    assert [first[i:i + 8] for i in range(0, 101, 8)] == length_grouped_batches(lengths, 8, seed=2000)
    assert [len(b) for b in length_grouped_batches(lengths, 8, seed=2001)][-1] == 5


@pytest.mark.parametrize("name, value, message", [
    ("epochs", 0, "epochs must be a whole number of at least 1, not 0"),
    ("epochs", 1.5, "epochs must be a whole number of at least 1, not 1.5"),
    ("learning_rate", -1, "learning_rate must be a finite number above 0, not -1"),
    ("learning_rate_multiplier", float("nan"), "learning_rate_multiplier must be a finite number above 0, not nan"),
    ("adapter_size", 0, "adapter_size must be a whole number of at least 1, not 0"),
])
def test_each_tuning_parameter_has_one_rule(tmp_path, name, value, message):
    import pandas as pd

    import tuning_magics as tm
    from tuning_magics.backends.local.trainer import TrainConfig

    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n')
    checks = {
        "tune()": lambda: tm.tune("local/tiny-qwen3", str(data), **{name: value}),
        "the trainer": TrainConfig(base_model="local/tiny-qwen3", train_path=str(data),
                                   output_dir=str(tmp_path / "out"), **{name: value}).check,
    }
    if name == "epochs":
        df = pd.DataFrame({"prompt": ["q"], "completion": ["a"]})
        checks["dataset()"] = lambda: tm.dataset(df, out=str(tmp_path / "d.jsonl"), epochs=value)
    for where, call in checks.items():
        with pytest.raises(UserError) as err:
            call()
        assert (str(err.value), err.value.field) == (message, name), where
    assert not (tmp_path / "out").exists() and not (tmp_path / "d.jsonl").exists()


def test_parameters_come_back_in_their_plain_types(tmp_path):
    import numpy as np

    from tuning_magics import params
    from tuning_magics.backends.local.trainer import TrainConfig, check_engine_options

    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n')
    cfg = TrainConfig(base_model="local/tiny-qwen3", train_path=str(data), output_dir=str(tmp_path / "out"),
                      epochs=np.int64(2), learning_rate=np.float32(0.5), batch_size=np.int32(4))
    cfg.check()
    assert (type(cfg.epochs), type(cfg.learning_rate), type(cfg.batch_size)) == (int, float, int)
    assert check_engine_options({"seed": np.int64(3), "max_seq_len": None}) == {"seed": 3, "max_seq_len": None}
    assert type(params.check("epochs", np.int16(5))) is int and params.check("adapter_size", None) is None
    with pytest.raises(UserError, match="epochs must be a whole number of at least 1, not None"):
        params.check("epochs", None, optional=False)


@pytest.mark.parametrize("name,cls", [("local/tiny-qwen3", "Qwen3ForCausalLM"),
                                      ("local/tiny-llama", "LlamaForCausalLM"),
                                      ("local/tiny-gemma3", "Gemma3ForCausalLM")])
def test_tiny_models_are_real_hf_folders(name, cls):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuning_magics.backends.local.models import data_home, load_model_and_tokenizer, tiny_model_path

    folder = tiny_model_path(name)
    assert str(folder).startswith(str(data_home()))
    assert tiny_model_path(name) == folder  # cached
    files = {p.name for p in folder.iterdir()}
    assert "model-00001-of-00001.safetensors" in files and "config.json" in files
    assert not any(n.startswith(".tmp") for n in (p.name for p in folder.parent.iterdir()))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == cls
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template
    m2, t2 = load_model_and_tokenizer(name)
    assert type(m2).__name__ == cls and t2.eos_token == "<|im_end|>"
    # Seeded init: same weights as the folder.
    import torch

    a = dict(model.named_parameters())
    assert all(torch.equal(a[k], v) for k, v in m2.named_parameters())


@pytest.mark.parametrize("model_id", ["qwen/qwen3@qwen3-4b", "Qwen/Qwen3-4B", "meta-llama/Llama-3.2-1B-Instruct"])
def test_missing_weights_give_one_line_advice(model_id):
    from tuning_magics.backends.local.models import load_model_and_tokenizer, load_tokenizer

    for fn in (load_tokenizer, load_model_and_tokenizer):
        with pytest.raises(UserError) as info:
            fn(model_id)
        msg = str(info.value)
        assert "\n" not in msg and "huggingface-cli download" in msg and "custom_base_model" in msg


def test_bad_folder_and_gemini_are_user_errors(tmp_path):
    from tuning_magics.backends.local.models import load_tokenizer

    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="holds no model"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="Gemini"):
        load_tokenizer("gemini-2.5-flash")


def test_memory_estimate_orders_modes_and_sizes():
    from tuning_magics.backends.local.memory import estimate_memory
    from tuning_magics.backends.local.models import load_config

    cfg = load_config("local/tiny-qwen3")
    full = estimate_memory(cfg, "FULL", 256, 8, "float32")
    lora = estimate_memory(cfg, "PEFT_ADAPTER", 256, 8, "float32")
    assert lora < full < 2 * 1024**3
    assert estimate_memory(cfg, "FULL", 512, 8, "float32") > full
    assert estimate_memory("qwen/qwen3@qwen3-32b", "FULL", 2048, 1, "bfloat16") > 300 * 1024**3


def test_memory_check_refuses_impossible_config_with_advice():
    from tuning_magics.backends.local.memory import GiB, available_memory, check_fits

    assert available_memory("cpu") > 0
    with pytest.raises(UserError) as info:
        check_fits("meta/llama3-3@llama-3.3-70b-instruct", "FULL", 4096, 8, "bfloat16", available=24 * GiB)
    msg = str(info.value)
    assert "\n" not in msg
    assert re.search(r"needs ~\d+ GiB but this machine has 24 GiB free: use ", msg), msg
    assert "smaller model such as meta/llama" in msg
    with pytest.raises(UserError, match="PEFT_ADAPTER"):
        check_fits("meta/llama3_1@llama-3.1-8b", "FULL", 512, 1, "bfloat16", available=40 * GiB)
    # Never a fix the model cannot take: Llama 3.2 1B is tuned in FULL only.
    with pytest.raises(UserError) as info:
        check_fits("meta/llama3-2@llama-3.2-1b-instruct", "FULL", 512, 8, "float32", available=20 * GiB,
                   modes=("FULL",))
    assert "PEFT_ADAPTER" not in str(info.value) and "batch_size=1" in str(info.value)
    # The tiny models fit anywhere.
    assert check_fits("local/tiny-qwen3", "FULL", 512, 8, "float32", available=2 * GiB) < 2 * GiB


def test_save_model_writes_sharded_names(tmp_path):
    from transformers import AutoModelForCausalLM

    from tuning_magics.backends.local.models import load_model_and_tokenizer, save_model

    model, _ = load_model_and_tokenizer("local/tiny-llama")
    save_model(model, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert any(re.fullmatch(r"model-0000\d-of-0000\d\.safetensors", n) for n in names)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
