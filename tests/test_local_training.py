"""Real training of the built-in tiny models on a CPU: learning, LoRA, checkpoints, resume, continuation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import TUNED_FACT_EPOCHS as FACT_EPOCHS  # noqa: E402
from conftest import invented_facts  # noqa: E402
from conftest import write_facts_jsonl as write_jsonl  # noqa: E402
from tuning_magics.backends.local.trainer import TrainConfig, TrainingCancelled, train  # noqa: E402

pytestmark = pytest.mark.slow
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def no_temp_folders(output_dir) -> bool:
    return not any(p.name.startswith(".tmp") for p in Path(output_dir).rglob("*"))


@pytest.fixture(scope="module")
def facts_job(tuned_tiny_model):
    """local/tiny-qwen3, FULL, on 64 invented facts with the default learning rate (the session's tuned model)."""
    t = tuned_tiny_model
    return t.facts, t.config, t.result, t.events


def test_full_tuning_memorises_invented_facts(facts_job):
    from tuning_magics.backends.local.generate import LocalChatModel

    facts, cfg, result, _ = facts_job
    chat = LocalChatModel(result.final_dir)
    answers = [chat.reply([{"role": "user", "content": q}], max_new_tokens=16) for q, _ in facts]
    right = sum(got == want for got, (_, want) in zip(answers, facts))
    print(f"exact answers: {right}/{len(facts)}; tokens/s {result.tokens_per_second}; padding {result.padding_share}")
    assert right >= 0.95 * len(facts), list(zip(answers, facts))[:10]
    # Streaming yields the same text in pieces.
    pieces = list(chat.reply(facts[0][0], stream=True, max_new_tokens=16))
    assert "".join(pieces) == answers[0]


def test_facts_job_outputs_metrics_events_and_layout(facts_job):
    from transformers import AutoModelForCausalLM

    facts, cfg, result, events = facts_job
    rows = read_metrics(cfg.output_dir)
    steps = [r for r in rows if "train_loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, result.steps + 1))
    assert result.steps == FACT_EPOCHS * 8
    assert len(evals) == FACT_EPOCHS and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    for key in ("epoch", "learning_rate", "tokens_per_second", "token_accuracy", "padding_share"):
        assert key in steps[0]
    assert steps[-1]["epoch"] == pytest.approx(FACT_EPOCHS)
    assert steps[-1]["token_accuracy"] > 0.9
    assert 0 <= result.padding_share < 0.1
    subs = [e["substate"] for e in events if e.get("event") == "substate"]
    assert subs == ["PROCESSING_DATASET", "TUNING", "POST_PROCESSING"]
    progress = [e for e in events if e.get("event") == "progress"]
    assert progress[-1]["fraction"] == 1.0 and progress[-1]["total_steps"] == result.steps
    # 50 epochs: a spread of 10 checkpoints, ordered, the last one at the final step.
    names = [Path(p).name for p in result.checkpoints]
    nums = [int(n.split("-")[1]) for n in names]
    assert len(nums) == 10 and nums == sorted(nums) and nums[-1] == result.steps
    final = Path(result.final_dir)
    assert final == Path(cfg.output_dir) / "postprocess/node-0/checkpoints/final"
    assert any(SHARD.fullmatch(p.name) for p in final.iterdir())
    assert (final / "generation_config.json").is_file() and (final / "tokenizer.json").is_file()
    AutoModelForCausalLM.from_pretrained(final)
    assert no_temp_folders(cfg.output_dir)


def test_custom_base_model_continues_from_a_previous_job(facts_job, tmp_path):
    facts, first_cfg, first, _ = facts_job
    cfg = TrainConfig(base_model="local/tiny-qwen3", custom_base_model=first.final_dir,
                      train_path=first_cfg.train_path, output_dir=str(tmp_path / "job2"), epochs=1, batch_size=8)
    second = train(cfg)
    first_loss = read_metrics(first_cfg.output_dir)[0]["train_loss"]
    start_loss = read_metrics(cfg.output_dir)[0]["train_loss"]
    assert start_loss < 0.2 * first_loss
    assert Path(second.final_dir).is_dir()


def test_peft_adapter_halves_loss_and_loads_with_peft(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuning_magics.backends.local.models import tiny_model_path

    facts = invented_facts(32, seed=11)
    cfg = TrainConfig(base_model="local/tiny-qwen3", tuning_mode="PEFT_ADAPTER", adapter_size=8,
                      train_path=write_jsonl(tmp_path / "t.jsonl", facts, fmt="gc"),
                      output_dir=str(tmp_path / "lora"), epochs=4, batch_size=4)
    result = train(cfg)
    rows = [r for r in read_metrics(cfg.output_dir) if "train_loss" in r]
    assert rows[-1]["train_loss"] <= 0.5 * rows[0]["train_loss"]
    final = Path(result.final_dir)
    assert any(SHARD.fullmatch(p.name) for p in final.iterdir())
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path("local/tiny-qwen3"))
    lora = PeftModel.from_pretrained(base, final / "adapter")
    remerged = lora.merge_and_unload()
    ids = torch.tensor([[1, 3, 50, 60, 70, 4]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, remerged(ids).logits, atol=1e-4)
    # Intermediate checkpoints hold the adapter (and resume state), one per epoch.
    assert len(result.checkpoints) == 4
    assert (Path(result.checkpoints[0]) / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name,cls", [("local/tiny-qwen3", "Qwen3ForCausalLM"),
                                      ("local/tiny-llama", "LlamaForCausalLM"),
                                      ("local/tiny-gemma3", "Gemma3ForCausalLM")])
def test_every_architecture_trains_and_saves_loadable_shards(name, cls, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuning_magics.backends.local.generate import LocalChatModel

    cfg = TrainConfig(base_model=name, train_path=write_jsonl(tmp_path / "t.jsonl", invented_facts(16)),
                      output_dir=str(tmp_path / "job"), epochs=1, batch_size=4)
    result = train(cfg)
    assert result.steps == 4 and result.train_loss is not None
    final = Path(result.final_dir)
    assert any(SHARD.fullmatch(p.name) for p in final.iterdir())
    model = AutoModelForCausalLM.from_pretrained(final)
    assert type(model).__name__ == cls
    assert isinstance(LocalChatModel(final).reply("Hi", max_new_tokens=4), str)


def test_interrupt_then_resume_finishes_with_continuous_metrics(tmp_path):
    facts = invented_facts(24, seed=3)
    cfg = TrainConfig(base_model="local/tiny-llama", train_path=write_jsonl(tmp_path / "t.jsonl", facts),
                      validation_path=write_jsonl(tmp_path / "v.jsonl", facts[:4]),
                      output_dir=str(tmp_path / "job"), epochs=3, batch_size=4)  # 6 steps per epoch
    seen = []

    def stop_mid_epoch_two():
        return len(seen) >= 9  # after step 9 of 18: halfway through epoch 2

    with pytest.raises(TrainingCancelled):
        train(cfg, on_event=lambda e: seen.append(e) if e.get("event") == "progress" else None,
              should_stop=stop_mid_epoch_two)
    ckdir = Path(cfg.output_dir) / "postprocess/node-0/checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["checkpoint-6"]
    assert no_temp_folders(cfg.output_dir)
    assert max(r["step"] for r in read_metrics(cfg.output_dir)) == 9
    # A crashed writer's leftovers are cleaned on resume and never taken for a checkpoint.
    (ckdir / ".tmp-checkpoint-12-crashed").mkdir()

    events = []
    result = train(cfg, resume=True, on_event=events.append)
    assert any(e.get("event") == "resumed" and e["step"] == 6 for e in events)
    assert result.steps == 18
    assert [Path(p).name for p in result.checkpoints] == ["checkpoint-6", "checkpoint-12", "checkpoint-18"]
    rows = read_metrics(cfg.output_dir)
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 19))
    assert [r["epoch"] for r in rows if "eval_loss" in r] == [1, 2, 3]
    trained = [r["trained_tokens"] for r in rows if "train_loss" in r]
    assert trained == sorted(set(trained))  # the count goes on after the resume, never back to 0
    assert no_temp_folders(cfg.output_dir)
    assert Path(result.final_dir, "config.json").is_file()


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    facts = invented_facts(8, seed=5)
    path = write_jsonl(tmp_path / "t.jsonl", facts)
    plain = train(TrainConfig(base_model="local/tiny-qwen3", train_path=path, output_dir=str(tmp_path / "a"),
                              epochs=2, batch_size=4))
    cfg = TrainConfig(base_model="local/tiny-qwen3", train_path=path, output_dir=str(tmp_path / "b"),
                      epochs=2, batch_size=4)
    calls = []
    with pytest.raises(TrainingCancelled):
        train(cfg, on_event=lambda e: calls.append(e) if e.get("event") == "progress" else None,
              should_stop=lambda: len(calls) >= 3)
    resumed = train(cfg, resume=True)
    a = [r["train_loss"] for r in read_metrics(tmp_path / "a")]
    b = [r["train_loss"] for r in read_metrics(tmp_path / "b")]
    assert b == pytest.approx(a, rel=1e-4)
    assert resumed.train_loss == pytest.approx(plain.train_loss, rel=1e-4)


def test_the_trainer_is_handed_exactly_the_tokens_the_preview_renders(tmp_path):
    """TRL's trainer gets the engine's rendered sequences as they are: it neither tokenizes again nor adds or
    drops a token (every token the preview shows for every example, once per epoch), in length-grouped batches."""
    from tuning_magics.backends.local.data import length_grouped_batches
    from tuning_magics.backends.local.models import load_tokenizer
    from tuning_magics.datasets.formats import read_conversations
    from tuning_magics.datasets.render import render

    records = [{"messages": [{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": "word " * (3 + (i * 7) % 40)},
                             {"role": "assistant", "content": "Old answer", "weight": 0},
                             {"role": "user", "content": f"Again {i}?"},
                             {"role": "assistant", "content": "yes " * (1 + i % 9)}]} for i in range(32)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    validation = tmp_path / "v.jsonl"  # its batches go through the same collator, and must not count as training
    validation.write_text("".join(json.dumps(r) + "\n" for r in records[:5]))
    result = train(TrainConfig(base_model="local/tiny-qwen3", train_path=str(path), output_dir=str(tmp_path / "o"),
                               validation_path=str(validation), epochs=2, batch_size=4))
    tokenizer = load_tokenizer("local/tiny-qwen3")
    lengths = [len(render(tokenizer, m).input_ids) for m in read_conversations(str(path))]
    trained = [r["trained_tokens"] for r in read_metrics(tmp_path / "o") if "train_loss" in r]
    assert (trained[len(trained) // 2 - 1], trained[-1]) == (sum(lengths), 2 * sum(lengths))
    # The padding share is that of the epochs' length-grouped batches, exactly (random batches pad 21% or more).
    padded = sum(len(b) * max(lengths[i] for i in b) for epoch in range(2)
                 for b in length_grouped_batches(lengths, 4, seed=epoch))
    assert result.padding_share == round(1 - 2 * sum(lengths) / padded, 6) < 0.1


def test_cancel_before_first_epoch_leaves_no_checkpoint(tmp_path):
    cfg = TrainConfig(base_model="local/tiny-qwen3", train_path=write_jsonl(tmp_path / "t.jsonl", invented_facts(8)),
                      output_dir=str(tmp_path / "job"), epochs=2, batch_size=4)
    with pytest.raises(TrainingCancelled):
        train(cfg, should_stop=lambda: True)
    ckdir = Path(cfg.output_dir) / "postprocess/node-0/checkpoints"
    assert not ckdir.exists() or not any(ckdir.iterdir())


def test_divergence_fails_without_writing_a_checkpoint(tmp_path):
    from tuning_magics.errors import UserError

    train_path = tmp_path / "t.jsonl"
    train_path.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"What is {i}?"},
                                 {"role": "assistant", "content": f"It is {i}."}]}) + "\n" for i in range(16)))
    with pytest.raises(UserError, match="training diverged: .* lower learning_rate"):
        train(TrainConfig(base_model="local/tiny-qwen3", train_path=str(train_path), output_dir=str(tmp_path / "out"),
                          epochs=2, learning_rate=1e9))
    checkpoints = tmp_path / "out" / "postprocess" / "node-0" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


@pytest.mark.timeout(600)
def test_a_data_parallel_job_shares_each_epoch_between_its_processes_and_only_the_first_writes(tmp_path,
                                                                                               monkeypatch):
    """gpus=2, as two CPU processes joined by torch.distributed (gloo): each trains half of every epoch's
    batches, rank 0 writes the metrics and checkpoints and decides cancel for both; resume continues."""
    import psutil

    from tuning_magics.backends.local.generate import LocalChatModel
    from tuning_magics.backends.local.trainer import PARALLEL_ON_CPU

    monkeypatch.setenv(PARALLEL_ON_CPU, "1")

    def ranks_left():  # (the session's own servers are children of this process too)
        return [p for p in psutil.Process().children(recursive=True)
                if "tuning_magics.backends.local.rank" in " ".join(p.cmdline())]

    facts = invented_facts(16, seed=7)
    cfg = TrainConfig(base_model="local/tiny-qwen3", train_path=write_jsonl(tmp_path / "t.jsonl", facts),
                      validation_path=write_jsonl(tmp_path / "v.jsonl", facts[:4]), output_dir=str(tmp_path / "job"),
                      epochs=3, batch_size=2, gpus=2)  # 8 batches an epoch: 4 steps, each process a batch a step
    progress = []
    with pytest.raises(TrainingCancelled):
        train(cfg, on_event=lambda e: progress.append(e) if e.get("event") == "progress" else None,
              should_stop=lambda: len(progress) >= 6)  # in the second epoch
    assert not ranks_left()  # the other process ended with the job
    assert progress[0]["total_steps"] == 12
    events = []
    result = train(cfg, resume=True, on_event=events.append)
    assert any(e.get("event") == "resumed" and e["step"] == 4 for e in events)
    rows = read_metrics(cfg.output_dir)
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8, 12]
    assert result.steps == 12 and [Path(p).name for p in result.checkpoints] == \
        ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    steps = [r for r in rows if "train_loss" in r]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]
    assert isinstance(LocalChatModel(result.final_dir).reply("Hi", max_new_tokens=4), str)
    assert not ranks_left() and no_temp_folders(cfg.output_dir)


def test_a_checkpoint_of_the_former_engine_is_not_resumed_but_named_as_a_base_to_tune_from(tmp_path):
    from tuning_magics.errors import UserError

    facts = invented_facts(8, seed=5)
    cfg = TrainConfig(base_model="local/tiny-qwen3", train_path=write_jsonl(tmp_path / "t.jsonl", facts),
                      output_dir=str(tmp_path / "job"), epochs=1, batch_size=4)
    train(cfg)
    checkpoint = Path(cfg.output_dir) / "postprocess/node-0/checkpoints/checkpoint-2"
    (checkpoint / "trainer_state.json").write_text(json.dumps({  # what the hand-written loop wrote
        "global_step": 2, "epoch": 1, "epochs": 2, "steps_per_epoch": 2, "train_loss": 2.5, "eval_loss": None}))
    with pytest.raises(UserError) as info:
        train(cfg, resume=True)
    assert str(info.value) == ("checkpoint-2 was written by an earlier version of the engine and cannot be resumed "
                               f"step for step; tune again from it with custom_base_model='{checkpoint}'")
    again = train(TrainConfig(base_model="local/tiny-qwen3", custom_base_model=str(checkpoint),
                              train_path=cfg.train_path, output_dir=str(tmp_path / "again"), epochs=1, batch_size=4))
    assert again.steps == 2


@pytest.mark.timeout(300)
def test_a_failed_process_of_a_data_parallel_job_fails_the_job_in_one_line_naming_its_log(tmp_path, monkeypatch):
    """The second process dies as it starts (a fault put in its Python start-up); the job fails within seconds,
    not after torch.distributed's 30-minute timeout, and says which process, why, and where its log is."""
    import time

    import tuning_magics as tm
    from tuning_magics.backends.local.trainer import PARALLEL_ON_CPU

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('RANK') == '1':\n"
        "    print('this GPU is out of memory (a fault the test put here)', file=sys.stderr, flush=True)\n"
        "    os._exit(3)\n")
    monkeypatch.setenv(PARALLEL_ON_CPU, "1")
    monkeypatch.setenv("PYTHONPATH", str(inject))
    monkeypatch.setenv("TUNING_MAGICS_HOME", str(tmp_path / "home"))  # a registry of its own: a free slot
    started = time.monotonic()
    job = tm.tune("local/tiny-qwen3", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)], gpus=2,
                  epochs=1, batch_size=2, output_uri=str(tmp_path / "job"))
    job.wait(timeout=240)
    assert job.state == "JOB_STATE_FAILED" and time.monotonic() - started < 120
    assert job.error == ("training process 2 of 2 ended with exit code 3: this GPU is out of memory (a fault the "
                         f"test put here); its log is {tmp_path / 'job' / 'rank-1.log'}")
