"""Preference tuning: pairs in TRL's and Vertex AI's formats, and DPO on the local engine through TRL.

The job test follows Google's advice on a real tiny model: supervised tuning on answers in two styles
first, then preference tuning from that job on pairs preferring one style; the greedy answers to new
prompts move to the preferred style.
"""

from __future__ import annotations

import pytest

import tuning_magics as tm
from tuning_magics.datasets import preference as P
from tuning_magics.datasets.validate import validate
from tuning_magics.errors import UserError

MODEL = "local/tiny-qwen3"


def gemini_pair(prompt: str, chosen: str, rejected: str, system: str | None = None) -> dict:
    record = {"contents": [{"role": "user", "parts": [{"text": prompt}]}],
              "completions": [{"score": 1.0, "completion": {"role": "model", "parts": [{"text": chosen}]}},
                              {"score": 0.0, "completion": {"role": "model", "parts": [{"text": rejected}]}}]}
    if system:
        record["system_instruction"] = {"parts": [{"text": system}]}
    return record


def test_both_preference_formats_validate_and_convert_into_each_other():
    trl = {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
           "chosen": [{"role": "assistant", "content": "Hello, friend."}], "rejected": "go away"}
    gemini = gemini_pair("Hi?", "Hello, friend.", "go away", system="Be kind.")
    for record, fmt in ((trl, P.PREFERENCE), (gemini, P.GEMINI_PREFERENCE)):
        report = validate([record], MODEL, "preference")
        assert report.ok and report.format == fmt, str(report)
        assert P.pair_of(record, fmt) == ([{"role": "system", "content": "Be kind."},
                                           {"role": "user", "content": "Hi?"}], "Hello, friend.", "go away")
    assert P.from_pair(*P.pair_of(trl, P.PREFERENCE), P.GEMINI_PREFERENCE) == {
        **gemini, "completions": [{**c, "score": int(c["score"])} for c in gemini["completions"]]}


@pytest.mark.parametrize("record, where, words", [
    ({"prompt": "Hi?", "chosen": "same", "rejected": " same"}, "chosen", "is the same as rejected"),
    ({"prompt": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hey"}], "chosen": "a",
      "rejected": "b"}, "prompt", "must end with a user turn"),
    ({"prompt": "Hi?", "chosen": "a"}, "rejected", "must be the rejected answer"),
    ({"prompt": "Hi?", "chosen": "a", "rejected": "b", "score": 1}, "score", "unknown key 'score'"),
    ({**gemini_pair("Hi?", "a", "b"), "completions": gemini_pair("Hi?", "a", "b")["completions"][:1]},
     "completions", "exactly two completions"),
    ({**gemini_pair("Hi?", "a", "b"), "completions": [
        {"score": 1, "completion": {"role": "model", "parts": [{"text": "a"}]}},
        {"score": 1, "completion": {"role": "model", "parts": [{"text": "b"}]}}]}, "completions",
     r"scores must be 1 \(preferred\) and 0"),
    ({**gemini_pair("Hi?", "a", "b"), "contents": [{"role": "user", "parts": [
        {"inlineData": {"mimeType": "image/png", "data": "AA=="}}]}]}, "contents", "text only"),
])
def test_a_bad_pair_is_named_by_line_and_field(record, where, words):
    report = validate([record], MODEL, "preference")
    assert not report.ok
    issue = report.errors[0]
    assert issue.field == where and issue.line == 1
    import re

    assert re.search(words, str(issue)), str(issue)


def test_a_dataframe_of_pairs_validates_tunes_and_builds_a_dataset_in_either_format(tmp_path, monkeypatch):
    import json

    import pandas as pd
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.setenv("TUNING_MAGICS_HOME", str(tmp_path))
    frame = pd.DataFrame({"prompt": ["Hi?", "Bye?"], "chosen": ["Hello, friend.", "Goodbye, friend."],
                          "rejected": ["hey", "bye"]})
    assert validate(frame, MODEL, "preference").ok
    plan = tm.tune(MODEL, frame, method="preference", dry_run=True)
    assert plan.request["method"] == "preference" and plan.predicted_stats["examples"] == 2
    # dataset() finds chosen and rejected, writes TRL's pairs, or Gemini's for a Gemini model.
    ds = tm.dataset(frame, method="preference", system_prompt="Be kind.", out=str(tmp_path / "pairs.jsonl"))
    assert ds.format == "preference" and ds.examples == 2
    from tuning_magics.display.dataset_report import dataset_html, dataset_text

    # The report shows the first pair: the prompt with its chosen answer as the model sees it, and the rejected.
    assert "⟦Hello, friend." in dataset_text(ds) and "rejected answer, in the same place: hey" in dataset_text(ds)
    assert "<code>hey</code>" in dataset_html(ds)
    first = json.loads(open(ds.uri).readline())
    assert P.pair_of(first, P.PREFERENCE) == ([{"role": "system", "content": "Be kind."},
                                              {"role": "user", "content": "Hi?"}], "Hello, friend.", "hey")
    gemini = tm.dataset(frame.rename(columns={"prompt": "question", "chosen": "good", "rejected": "bad"}),
                        prompt="question", chosen="good", rejected="bad", method="preference",
                        model="gemini-2.5-flash", out=str(tmp_path / "gemini.jsonl"))
    assert gemini.format == "gemini_preference"
    assert P.pair_of(json.loads(open(gemini.uri).readline()), P.GEMINI_PREFERENCE)[1:] == ("Hello, friend.", "hey")
    broken = frame.assign(rejected=["hey", None])
    with pytest.raises(UserError, match="row 1, rejected"):
        tm.dataset(broken, method="preference", out=str(tmp_path / "broken.jsonl"))
    assert not (tmp_path / "broken.jsonl").exists()  # nothing half-written
    with pytest.raises(UserError, match="preference pairs take method='preference'"):
        tm.dataset(frame, chosen="chosen", rejected="rejected", out=str(tmp_path / "x.jsonl"))
    # %dataset takes the same options.
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "tuning_magics")
    shell.push({"pairs_frame": frame})
    try:
        shell.run_line_magic("dataset", f"pairs_frame --chosen chosen --rejected rejected --method preference "
                                        f"--out {tmp_path / 'magic.jsonl'} --as pairs_ds")
        assert shell.user_ns["pairs_ds"].format == "preference" and shell.user_ns["pairs_ds"].examples == 2
    finally:
        for name in ("pairs_frame", "pairs_ds"):
            shell.user_ns.pop(name, None)


def test_pairs_for_sft_and_answers_for_preference_say_which_method_fits():
    pair = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "no"}
    assert "tune it with method='preference'" in str(validate([pair], MODEL, "sft").errors[0])
    assert "preference tuning needs pairs" in str(validate([{"prompt": "Hi?", "completion": "Hello."}], MODEL,
                                                           "preference").errors[0])
    with pytest.raises(UserError, match="beta is preference tuning's") as info:
        tm.tune(MODEL, [{"prompt": "Hi?", "completion": "Hello."}], beta=0.1)
    assert info.value.field == "beta"
    with pytest.raises(UserError, match="beta must be a finite number above 0"):
        tm.tune(MODEL, [pair], method="preference", beta=0)


STYLES = {"polite": "Blue, thank you kindly.", "curt": "red"}


def colour_prompt(i: int) -> str:
    return f"Name a colour for item {i}."


@pytest.mark.slow
def test_dpo_after_sft_moves_greedy_answers_to_the_preferred_style(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNING_MAGICS_HOME", str(tmp_path))
    mixed = [{"prompt": colour_prompt(i), "completion": STYLES["polite" if i % 2 else "curt"]} for i in range(24)]
    sft = tm.tune(MODEL, mixed, epochs=10, wait=True)
    assert sft.state == "JOB_STATE_SUCCEEDED", sft.error
    held_out = [colour_prompt(i) for i in range(100, 106)]

    def polite(job) -> int:
        return sum(job.chat(q, temperature=0, max_new_tokens=8).startswith("Blue") for q in held_out)

    before = polite(sft)
    pairs = [gemini_pair(colour_prompt(i), STYLES["polite"], STYLES["curt"]) for i in range(24)]
    validation = [{"prompt": colour_prompt(i), "chosen": STYLES["polite"], "rejected": STYLES["curt"]}
                  for i in range(50, 54)]
    job = tm.tune(sft, pairs, method="preference", beta=0.1, epochs=3, validation_dataset=validation,
                  evaluation={"data": [{"prompt": q, "completion": STYLES["polite"]} for q in held_out],
                              "metrics": "contains,rouge_l", "max_new_tokens": 32}, wait=True)
    assert job.state == "JOB_STATE_SUCCEEDED", job.error
    assert job.config["method"] == "preference" and job.config["beta"] == 0.1
    after = polite(job)
    assert after > before and after == len(held_out), (before, after)
    frame = job.metrics()
    assert frame["reward_margin"].dropna().iloc[-1] > 0 and frame["reward_accuracy"].dropna().iloc[-1] == 1.0
    assert frame["eval_reward_margin"].notna().sum() == 3  # the validation pairs, after each epoch
    assert [c.name for c in job.checkpoints] == ["checkpoint-3", "checkpoint-6", "checkpoint-9", "final"]
    scores = job.checkpoint_scores()  # the model it started from, then each checkpoint, as a supervised job
    assert list(scores.index) == ["base", "checkpoint-3", "checkpoint-6", "checkpoint-9"]
    assert scores["rouge_l"].iloc[-1] > 0.5 and scores["rouge_l"].iloc[-1] > scores.loc["base", "rouge_l"], scores
    assert job.best_checkpoint() != "base" and "reward_margin" not in scores.columns  # rewards are not task scores
    from tuning_magics.display.monitor import job_text

    assert "reward margin" in job_text(job) and "chosen preferred 100%" in job_text(job)


@pytest.mark.slow
def test_a_cancelled_preference_run_resumes_from_its_last_checkpoint_and_trains_no_step_twice(tmp_path):
    import json

    from tuning_magics.backends.local import checkpoints as ckpt
    from tuning_magics.backends.local.metrics import read_metrics
    from tuning_magics.backends.local.preference import train_preference
    from tuning_magics.backends.local.trainer import TrainConfig, TrainingCancelled

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": colour_prompt(i), "chosen": STYLES["polite"],
                                         "rejected": STYLES["curt"]}) + "\n" for i in range(16)))
    out = tmp_path / "job"
    config = TrainConfig(base_model=MODEL, train_path=str(pairs), output_dir=str(out), tuning_mode="PEFT_ADAPTER",
                         epochs=3, batch_size=8)
    seen = []

    def stop_after_epoch_1():
        seen.append(1)
        return len(seen) > 3  # steps 1 and 2 make epoch 1 (16 pairs, 8 a step); a third step is cut short

    with pytest.raises(TrainingCancelled):
        train_preference(config, should_stop=stop_after_epoch_1)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    events = []
    result = train_preference(config, resume=True, on_event=events.append)
    assert {"event": "resumed", "step": 2, "epoch": 1, "checkpoint": str(ckpt.checkpoints_dir(out) / "checkpoint-2")} \
        in events
    steps = [row["step"] for row in read_metrics(out) if "train_loss" in row]
    assert steps == list(range(1, 7)) and result.steps == 6  # each step once, however many runs it took
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert ckpt.find_final(out) is not None


@pytest.mark.slow
def test_pairs_whose_prompt_fills_max_seq_len_are_counted_as_dropped_and_the_rest_train_whole_epochs(tmp_path):
    import json

    from tuning_magics.backends.local import checkpoints as ckpt
    from tuning_magics.backends.local.preference import train_preference
    from tuning_magics.backends.local.trainer import TrainConfig

    rows = [{"prompt": colour_prompt(i), "chosen": STYLES["polite"], "rejected": STYLES["curt"]} for i in range(6)]
    rows += [{"prompt": "word " * 200, "chosen": STYLES["polite"], "rejected": STYLES["curt"]}] * 2
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    events = []
    result = train_preference(TrainConfig(base_model=MODEL, train_path=str(pairs), output_dir=str(tmp_path / "job"),
                                          tuning_mode="PEFT_ADAPTER", epochs=2, batch_size=2, max_seq_len=64),
                              on_event=events.append)
    dataset = next(e for e in events if e["event"] == "dataset")
    assert (dataset["examples"], dataset["dropped"]) == (6, 2)  # TRL keeps the six short pairs: 3 steps an epoch
    progress = [e for e in events if e["event"] == "progress"]
    assert [(e["step"], e["total_steps"]) for e in progress] == [(s, 6) for s in range(1, 7)]
    assert progress[-1]["fraction"] == 1.0 and result.steps == 6
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "job")] == ["checkpoint-3", "checkpoint-6"]
    with pytest.raises(UserError, match=r"every pair's prompt fills max_seq_len \(64 tokens\)"):
        pairs.write_text("".join(json.dumps(r) + "\n" for r in rows[6:]))
        train_preference(TrainConfig(base_model=MODEL, train_path=str(pairs), output_dir=str(tmp_path / "job2"),
                                     tuning_mode="PEFT_ADAPTER", epochs=1, batch_size=2, max_seq_len=64))
