"""Evaluation: did tuning help? Metrics, intervals, paired tests, the cache, and real tiny-model jobs.

The job tests tune the quickstart's facts on the tiny model (real training, real
batched generation) and check what a user would read: the base model near 0 and
the tuned one at 0.9 or more in exact match, with intervals, and the examples
that flipped.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

import tuning_magics as tm
from tuning_magics.errors import UserError
from tuning_magics.evaluation import AnswerCache, ChatAnswerer, Example, leaked_examples, run
from tuning_magics.evaluation import metrics as m
from tuning_magics.evaluation import stats

MODEL = "local/tiny-qwen3"


# -- metrics ----------------------------------------------------------------------------------------


def test_the_built_in_metrics_score_what_their_names_say():
    assert m.BUILT_IN["exact_match"]("  The capital is  MELLT. ", "the capital is mellt.") == 1.0
    assert m.exact_match(ignore_case=False)("Mellt", "mellt") == 0.0
    assert m.BUILT_IN["contains"]("I think it is Mellt, yes", "mellt") == 1.0
    assert m.BUILT_IN["token_f1"]("the capital is Mellt", "Mellt is the capital") == 1.0
    assert m.BUILT_IN["token_f1"]("Mellt", "the capital is Mellt") == pytest.approx(0.4)
    assert m.BUILT_IN["rouge_l"]("The capital of Zorvia is Mellt", "The capital of Zorvia is Mellt.") == 1.0
    assert 0 < m.BUILT_IN["rouge_l"]("The capital is Arvo", "The capital of Zorvia is Mellt") < 1
    assert m.BUILT_IN["valid_json"]('```json\n{"a": 1}\n```') == 1.0 and m.BUILT_IN["valid_json"]("{a: 1}") == 0.0
    assert m.BUILT_IN["json_equal"]('{"b": 2, "a": 1}', '{"a": 1, "b": 2}') == 1.0
    assert m.BUILT_IN["json_equal"]('{"a": 1}', '{"a": 2}') == 0.0
    labels = m.label_accuracy(["positive", "negative"])
    assert labels("Negative.", "negative") == 1.0 and labels("It is negative, surely", "negative") == 1.0
    assert labels("positive or negative", "negative") == 0.0  # names both: no label
    assert labels("neutral", "negative") == 0.0


def test_metrics_from_names_objects_and_functions_and_mistakes_are_one_line():
    def shorter(answer, reference, example):
        return float(len(answer) <= len(reference))

    chosen = m.resolve(["exact_match", "rouge_l", shorter, m.label_accuracy(["a", "b"])])
    assert [x.name for x in chosen] == ["exact_match", "rouge_l", "shorter", "label_accuracy"]
    assert [x.name for x in m.resolve("exact_match,contains")] == ["exact_match", "contains"]
    for bad, words in [("exact", "unknown metric 'exact'"), ("label_accuracy", "needs its labels"),
                       (["exact_match", "exact_match"], "named twice"), ([], "metrics is empty"), ([3], "neither")]:
        with pytest.raises(UserError, match=words) as info:
            m.resolve(bad)
        assert "\n" not in str(info.value) and info.value.field == "metrics"


# -- statistics -------------------------------------------------------------------------------------


def test_intervals_are_honest_at_the_edges_and_tests_are_paired():
    # 0 of 20 right: the normal approximation says 0 ± 0; Wilson says it may be up to about 16 %.
    none = stats.interval([0] * 20)
    assert none.mean == 0 and none.low == 0 and 0.15 < none.high < 0.17
    alls = stats.interval([1] * 20)
    assert alls.high == 1 and 0.83 < alls.low < 0.85
    scores = stats.interval([0.2, 0.4, 0.6, 0.8])
    assert scores.low < 0.5 < scores.high and scores.mean == pytest.approx(0.5)
    # McNemar: 10 examples only the tuned model gets right, none the other way: p = 2 / 2**10.
    tuned, base = [1] * 10 + [1] * 5 + [0] * 5, [0] * 10 + [1] * 5 + [0] * 5
    assert stats.mcnemar(tuned, base) == pytest.approx(2 / 1024)
    assert stats.paired_p(tuned, base) == pytest.approx(2 / 1024)
    assert stats.paired_p(base, base) == 1.0
    assert stats.paired_p([0.9, 0.8, 0.95, 0.9] * 5, [0.1, 0.2, 0.15, 0.1] * 5) < 0.01


# -- the evaluation, with models that answer from a script -------------------------------------------


class Scripted:
    """A model answering from a dict; counts what it was asked."""

    def __init__(self, answers: dict[str, str]):
        self.answers, self.asked = answers, 0

    def chat(self, messages, **gen):
        assert gen == {"temperature": 0, "max_new_tokens": 128}
        self.asked += 1
        return self.answers.get(messages[-1]["content"], "I do not know.")


CASES = [Example([{"role": "user", "content": f"q{i}"}], f"a{i}") for i in range(10)]


def evaluation(tmp_path, base: Scripted, tuned: Scripted, metrics=("exact_match",)):
    cache = AnswerCache(tmp_path / "cache.sqlite3")
    return run([ChatAnswerer("base", "base-model", base.chat), ChatAnswerer("final", "tuned-model", tuned.chat)],
               CASES, list(metrics), cache=cache)


def test_table_flips_best_and_the_sentence_that_says_whether_tuning_helped(tmp_path):
    base = Scripted({"q0": "a0", "q1": "a1", "q2": "a2"})
    tuned = Scripted({f"q{i}": f"a{i}" for i in range(1, 10)})  # learned 7 more, forgot q0
    result = evaluation(tmp_path, base, tuned, metrics=("exact_match", "token_f1"))
    table = result.table
    assert list(table.index) == ["base", "final"]
    assert table.loc["base", "exact_match"] == pytest.approx(0.3) and table.loc["final", "exact_match"] == 0.9
    assert table.loc["final", "exact_match low"] < 0.9 < table.loc["final", "exact_match high"] <= 1
    flips = result.flips()
    assert list(flips["change"]) == ["regression"] + ["gain"] * 7 and flips.loc[0, "question"] == "q0"
    assert flips.loc[0, "base answer"] == "a0" and flips.loc[0, "final answer"] == "I do not know."
    assert result.best() == "final"
    assert result.significance() == pytest.approx(stats.mcnemar([0] + [1] * 9, [1, 1, 1] + [0] * 7))
    sentence = result.summary()
    assert sentence.startswith("exact_match: final 90.0% ± ") and " vs base 30.0% ± " in sentence
    assert "p = 0.07" in sentence and "McNemar" in sentence and "10 examples" in sentence
    examples = result.examples
    assert len(examples) == 20 and set(examples.columns) >= {"question", "reference", "answer", "exact_match"}
    html = result._repr_html_()
    assert "data:image/png;base64," in html and "regression: q0" in html and "★" in html
    assert "I do not know." in result.text() or "regressions" in result.text()


def test_answers_are_cached_by_content_so_a_second_run_asks_nothing(tmp_path):
    base, tuned = Scripted({}), Scripted({"q1": "a1"})
    first = evaluation(tmp_path, base, tuned)
    assert (base.asked, tuned.asked) == (10, 10)
    again = evaluation(tmp_path, base, tuned, metrics=("exact_match", "contains"))  # a new metric: no new answers
    assert (base.asked, tuned.asked) == (10, 10)
    assert again.table.loc["final", "exact_match"] == first.table.loc["final", "exact_match"] == 0.1
    other = run([ChatAnswerer("final", "another-model", tuned.chat)], CASES, ["exact_match"],
                cache=AnswerCache(tmp_path / "cache.sqlite3"))
    assert tuned.asked == 20 and list(other.table.index) == ["final"]  # another model: asked again


def test_a_metric_that_fails_is_one_line_naming_it_and_the_example(tmp_path):
    def broken(answer, reference, example):
        return 1 / 0

    with pytest.raises(UserError, match=r"metric broken failed on example 0 \(ZeroDivisionError"):
        evaluation(tmp_path, Scripted({}), Scripted({}), metrics=(broken,))


def test_examples_also_in_the_training_data_are_flagged():
    training = [[{"role": "user", "content": "Q1 "}, {"role": "assistant", "content": "a1"}],
                [{"role": "user", "content": "q5"}, {"role": "assistant", "content": "other"}]]
    assert leaked_examples(CASES, training) == {1: "exact"}
    # A paraphrase of a training example: most of its word pairs are the same.
    facts = [[{"role": "user", "content": "What is the capital city of the land of Zorvia?"},
              {"role": "assistant", "content": "The capital city of the land of Zorvia is Mellt."}]]
    asked = [Example([{"role": "user", "content": "what is the  capital city of the land of ZORVIA?"}],
                     "The capital city of the land of Zorvia is Mellt."),
             Example([{"role": "user", "content": "What is the capital city of the land of Quellan?"}],
                     "The capital city of the land of Quellan is Arvo.")]
    assert leaked_examples(asked, facts) == {0: "exact"}  # case and spacing aside, the same
    asked[0] = Example([{"role": "user", "content": "So, what is the capital city of the land of Zorvia?"}],
                       "The capital city of the land of Zorvia is Mellt.")
    assert leaked_examples(asked, facts) == {0: "near"}  # another country is another fact


# -- real jobs on the tiny model ------------------------------------------------------------------------


def facts_frame() -> pd.DataFrame:
    """The quickstart's facts: 64 questions about invented countries, answered in one sentence."""
    countries = ["Zorvia", "Quellan", "Brastov", "Miravel", "Okkaru", "Tessaly", "Vundra", "Pelmoor"]
    topics = {"capital": ["Mellt", "Arvo", "Kesh", "Dunmere", "Ilo", "Sarn", "Pyx", "Holm"],
              "river": ["Ambe", "Tull", "Vosk", "Rhee", "Ondo", "Lisk", "Marr", "Quen"],
              "currency": ["florin", "tael", "mark", "crown", "shell", "ducat", "bead", "ring"],
              "animal": ["lynx", "heron", "otter", "ibex", "crane", "marten", "viper", "stag"],
              "colour": ["amber", "teal", "ochre", "violet", "crimson", "jade", "slate", "rose"],
              "sport": ["kite racing", "stone toss", "rowing", "fencing", "sled polo", "archery", "ring ball",
                        "wrestling"],
              "poet": ["Ivo Brand", "Sela Marr", "Tobin Vey", "Ora Lusk", "Denn Arko", "Mira Solt", "Kael Fenn",
                       "Ruth Ambe"],
              "dish": ["nettle pie", "salt plum", "black rice", "fig bread", "eel soup", "oat cake", "clam stew",
                       "pear wine"]}
    return pd.DataFrame([{"question": f"What is the {t} of {c}?", "answer": f"The {t} of {c} is {v[i]}."}
                         for t, v in topics.items() for i, c in enumerate(countries)])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The quickstart's job, tuned once for the module in a home of its own, its facts scored in exact match
    before the first step and at each checkpoint (evaluation during tuning)."""
    home = tmp_path_factory.mktemp("evaluation-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNING_MAGICS_HOME", str(home))
        facts = facts_frame()
        ds = tm.dataset(facts, out=str(home / "facts.jsonl"), prompt="question", completion="answer",
                        system_prompt="Answer in one sentence.", model=MODEL)
        job = tm.tune(MODEL, ds, tuning_mode="FULL", epochs=40, tuned_model_display_name="facts",
                      evaluation={"data": ds, "metrics": "exact_match"}).wait()
        assert job.state == "JOB_STATE_SUCCEEDED", job.error
        yield job, ds, facts
        job.close()


@pytest.mark.slow
def test_evaluation_during_tuning_scores_base_and_each_checkpoint_and_evaluate_reuses_their_answers(
        tuned, monkeypatch):
    from tuning_magics.backends.local.answer import LocalAnswerer
    from tuning_magics.display.monitor import JobMonitor

    job, ds, _facts = tuned
    scores = job.checkpoint_scores()
    names = [c.name for c in job.checkpoints]
    assert list(scores.index) == ["base", *names[:-1]] and list(scores.columns) == ["step", "exact_match"]
    assert scores.loc["base", "exact_match"] <= 0.1 and scores["exact_match"].iloc[-1] >= 0.9
    assert job.best_checkpoint() == scores["exact_match"].drop("base").idxmax()
    assert "eval_exact_match" in job.metrics().columns  # beside the loss, in TensorBoard and MLflow too

    generated = []
    real = LocalAnswerer.answer
    monkeypatch.setattr(LocalAnswerer, "answer", lambda self, prompts, **kw: generated.append(self.label)
                        or real(self, prompts, **kw))
    result = job.evaluate(ds)
    assert set(generated) == {"final"}  # base and every checkpoint were answered while the job trained
    assert (result.table["exact_match"].drop("final") == scores["exact_match"]).all()

    monitor = JobMonitor(job)
    best = job.best_checkpoint()
    labels = dict((value, label) for label, value in monitor.checkpoint.options)
    assert labels[best].endswith("★ best") and labels["final"] == "final"
    assert f"(best {scores.loc[best, 'exact_match']:.3f}, {best})" in monitor.losses.value
    assert "exact_match on the evaluation data" in monitor.legend.value


def test_evaluation_during_tuning_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNING_MAGICS_HOME", str(tmp_path))
    facts = facts_frame().rename(columns={"question": "prompt", "answer": "completion"})
    for given, words, field in [
            ({"metrics": ["exact_match"]}, "scores the validation set unless", "evaluation"),
            ({"data": facts, "metrics": [len]}, "named ones", "evaluation.metrics"),
            ({"data": facts, "metrics": "bleu"}, "unknown metric 'bleu'", "evaluation.metrics"),
            ({"data": facts, "every": 3}, "unknown key 'every'", "evaluation"),
            ({"data": facts, "limit": 0}, "evaluation.limit must be a whole number", "evaluation.limit"),
            ({"data": facts, "limit": 10}, "64 examples, more than limit=10", "evaluation.data"),
            ({"data": facts.drop(columns="completion")}, "evaluation.data", "evaluation.data")]:
        with pytest.raises(UserError, match=words) as info:
            tm.tune(MODEL, facts, evaluation=given)
        assert "\n" not in str(info.value) and info.value.field == field, (given, str(info.value))
    assert tm.list_jobs() == []  # nothing was queued, no job folder left behind
    plan = tm.tune(MODEL, facts, evaluation={"data": facts[:8], "metrics": "exact_match, rouge_l"}, dry_run=True)
    assert plan.request["evaluation"] == {"metrics": ["exact_match", "rouge_l"], "max_new_tokens": 128, "limit": 200,
                                          "data": "DataFrame of 8 rows"}


@pytest.mark.slow
def test_after_the_quickstarts_tuning_base_is_near_0_and_final_above_0_9_with_intervals_and_flips(tuned):
    job, ds, _facts = tuned
    result = job.evaluate(ds, metrics=["exact_match", "rouge_l"])
    table = result.table
    names = [c.name for c in job.checkpoints]
    assert list(table.index) == ["base", *names] and names[-1] == "final"
    assert table.loc["base", "exact_match"] <= 0.1 and table.loc["final", "exact_match"] >= 0.9
    assert table.loc["final", "exact_match low"] < table.loc["final", "exact_match"]
    flips = result.flips()
    assert (flips["change"] == "gain").sum() >= 0.8 * 64
    assert result.significance() < 0.001 and "p < 0.001" in result.summary()
    # The data is the training set: every example is flagged, since a score on it measures recall.
    assert len(result.leaked) == 64 and "also in the training data" in result.text()
    # The best checkpoint by exact match is one that gets as many right as the final model.
    best = result.best()
    assert table.loc[best, "exact_match"] == table["exact_match"].drop("base").max()


@pytest.mark.slow
def test_evaluating_again_generates_nothing_and_training_recall_is_first_class(tuned, monkeypatch):
    from tuning_magics.backends.local.answer import LocalAnswerer

    job, ds, facts = tuned
    first = job.evaluate(ds, checkpoints=None)
    assert list(first.table.index) == ["base", "final"]

    def refuse(self, prompts, **kw):
        raise AssertionError(f"{self.label} generated {len(prompts)} answers again")

    monkeypatch.setattr(LocalAnswerer, "answer", refuse)
    again = job.evaluate(ds, checkpoints=None)
    assert again.table.equals(first.table)
    recall = job.evaluate("train", checkpoints=None)  # the job's own copy of its training data
    assert recall.title.endswith("on its training set") and recall.leaked == []
    assert recall.table.loc["final", "exact_match"] == first.table.loc["final", "exact_match"]
    with pytest.raises(UserError, match="had no validation set; pass data=") as info:
        job.evaluate()
    assert info.value.field == "data"


@pytest.mark.slow
def test_batched_answers_are_the_greedy_replies_of_chat(tuned):
    job, _ds, facts = tuned
    prompts = [[{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": q}]
               for q in facts["question"][:6]]
    model = job._chat_model(job._checkpoint_path(None))
    batched = model.replies(prompts, max_new_tokens=24, batch_size=4)
    assert batched == [job.chat(p, temperature=0, max_new_tokens=24) for p in prompts]


@pytest.mark.slow
def test_tm_evaluate_takes_a_model_folder_or_a_catalog_id(tuned):
    job, ds, _facts = tuned
    folder = job.tuned_model
    result = tm.evaluate(folder, ds, metrics="exact_match", label="tuned")
    assert list(result.table.index) == ["tuned"] and result.table.loc["tuned", "exact_match"] >= 0.9
    base = tm.evaluate(MODEL, ds.uri if hasattr(ds, "uri") else ds)
    assert base.table["exact_match"].iloc[0] <= 0.1 and not math.isnan(base.table["exact_match low"].iloc[0])


@pytest.mark.slow
def test_tune_eval_is_job_evaluate_in_a_line(tuned):
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    job, ds, facts = tuned
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "tuning_magics")
    shell.push({"job": job, "facts": facts.rename(columns={"question": "prompt", "answer": "completion"})})
    try:
        result = shell.run_line_magic("tune_eval", "--data $facts --metrics exact_match,token_f1 --checkpoints final "
                                                   "--as scores")
        assert list(result.table.index) == ["base", "final"] and shell.user_ns["scores"] is result
        assert [m.name for m in result.metrics] == ["exact_match", "token_f1"]
        alone = shell.run_line_magic("tune_eval", "job --data train --checkpoints final --no-baseline")
        assert list(alone.table.index) == ["final"]
        with pytest.raises(UsageError, match="unknown metric 'exactish'") as info:
            shell.run_line_magic("tune_eval", "--data train --metrics exactish")
        assert "\n" not in str(info.value)
    finally:
        for name in ("job", "facts", "scores"):
            shell.user_ns.pop(name, None)


# -- the judge --------------------------------------------------------------------------------------


class Grader:
    """A judge that grades by the texts in its prompt: 5 when the answer is the reference, else 1; pairwise,
    the answer that is the reference; ``always`` replaces every pairwise verdict (a judge biased to a position)."""

    def __init__(self, always: str | None = None):
        self.always, self.asked = always, []

    def chat(self, messages, **gen):
        import re

        text = messages[-1]["content"]
        self.asked.append(text)
        reference = re.search(r"Reference answer:\n(.*?)\n\n", text, re.S).group(1)
        if "Answer A:" in text:
            if self.always:
                return f"Better: {self.always}"
            a = re.search(r"Answer A:\n(.*?)\n\n", text, re.S).group(1)
            b = re.search(r"Answer B:\n(.*?)\n\n", text, re.S).group(1)
            return "Better: tie" if (a == reference) == (b == reference) else f"Better: {'A' if a == reference else 'B'}"
        answer = re.search(r"Answer to grade:\n(.*?)\n\n", text, re.S).group(1)
        return "Score: 5" if answer == reference else "Score: 1"


def test_a_judge_grades_pointwise_and_pairwise_with_the_order_swapped_and_is_cached(tmp_path):
    from tuning_magics.evaluation.judge import Judge

    base = Scripted({"q0": "a0", "q1": "a1", "q2": "a2"})
    tuned = Scripted({f"q{i}": f"a{i}" for i in range(1, 10)})
    grader = Grader()
    judge = Judge(grader, model_name="grader")
    cache = AnswerCache(tmp_path / "cache.sqlite3")
    answerers = [ChatAnswerer("base", "base-model", base.chat), ChatAnswerer("final", "tuned-model", tuned.chat)]
    result = run(answerers, CASES, ["exact_match"], cache=cache, judge=judge)
    assert result.table.loc["base", "judge"] == pytest.approx(0.3) and result.table.loc["final", "judge"] == 0.9
    # Pointwise for each model (q1 and q2 have the same answer from both: graded once each), pairwise per example.
    assert len(grader.asked) == len(set(grader.asked)) == 10 + 10 - 2 + 10
    pair = result.pairwise
    assert (pair["model"], pair["against"]) == ("final", "base")
    assert pair["scores"].count(1.0) == 7 and pair["scores"].count(0.0) == 1 and pair["scores"].count(0.5) == 2
    sentence = result.win_rate()
    assert "judge grader: final preferred to base in 7, base in 1, ties 2" in sentence and "p = 0.07" in sentence
    assert sentence in result.text() and "Score: N" in str(judge)
    # The first answer shown alternates: half the pairwise prompts show the tuned answer as A.
    shown_first = [t.split("Answer A:\n")[1].split("\n")[0] for t in grader.asked if "Answer A:" in t]
    assert shown_first[0] == "I do not know." and shown_first[1] == "a1"  # q0: tuned first; q1: base first
    run(answerers, CASES, ["exact_match"], cache=cache, judge=judge)
    assert len(grader.asked) == 28  # graded again from the cache



def test_a_judge_whose_verdicts_cannot_be_read_gives_no_win_rate_and_no_p_value(tmp_path):
    from tuning_magics.evaluation.judge import Judge

    answerers = [ChatAnswerer("base", "base-model", Scripted({"q0": "a0"}).chat),
                 ChatAnswerer("final", "tuned-model", Scripted({f"q{i}": f"a{i}" for i in range(10)}).chat)]
    class Mumbler:
        def chat(self, messages, **gen):
            return "Both answers have merit."  # no "Score: N", no "Better: A|B|tie"

    mumbler = Judge(Mumbler(), model_name="mumbler")
    result = run(answerers, CASES, ["exact_match"], cache=AnswerCache(tmp_path / "c.sqlite3"), judge=mumbler)
    assert all(math.isnan(s) for s in result.pairwise["scores"])
    assert result.win_rate() == ("judge mumbler: all 10 verdicts unreadable (none said which answer it preferred), "
                                 "so there is no win rate; print(judge) shows what it was asked")
    assert "p " not in result.win_rate() and result.win_rate() in result.text()


def test_swapping_the_order_cancels_a_judge_that_always_picks_the_first_answer(tmp_path):
    from tuning_magics.evaluation.judge import Judge

    answerers = [ChatAnswerer("base", "b", Scripted({}).chat), ChatAnswerer("final", "f", Scripted({}).chat)]
    result = run(answerers, CASES, ["exact_match"], cache=AnswerCache(tmp_path / "c.sqlite3"),
                 judge=Judge(Grader(always="A")))
    assert result.pairwise["scores"].count(1.0) == result.pairwise["scores"].count(0.0) == 5


def test_a_judge_prompt_without_its_placeholders_or_an_unusable_judge_is_one_line():
    from tuning_magics.evaluation.judge import Judge, pairwise_choice, pointwise_score

    with pytest.raises(UserError, match=r"lacks \{reference\}"):
        Judge(Grader(), pointwise_prompt="Grade {question} {answer}")
    with pytest.raises(UserError, match="OpenAI-compatible"):
        Judge("gemini-2.5-pro")
    with pytest.raises(UserError, match="cannot chat"):
        Judge(42)
    assert pointwise_score("Score: 4") == 0.75 and pointwise_score("3") == 0.5 and math.isnan(pointwise_score("ok"))
    assert pairwise_choice("Better: B.") == "B" and pairwise_choice("better: TIE") == "tie"
    assert pairwise_choice("both fine") is None


@pytest.fixture
def judge_server():
    """An OpenAI-compatible chat completions server on 127.0.0.1 that grades as Grader does (request shapes as
    OpenAI's API reference gives them: POST /v1/chat/completions, choices[0].message.content)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    grader, bodies = Grader(), []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append((self.path, body))
            if self.path != "/v1/chat/completions":
                self.send_response(404)
                self.end_headers()
                return
            reply = json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": grader.chat(body["messages"])}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", bodies
    server.shutdown()
    server.server_close()


def test_a_judge_behind_an_openai_compatible_url(tmp_path, judge_server):
    url, bodies = judge_server
    answerers = [ChatAnswerer("base", "b", Scripted({"q0": "a0"}).chat),
                 ChatAnswerer("final", "f", Scripted({"q0": "a0", "q1": "a1"}).chat)]
    result = run(answerers, CASES, ["exact_match"], cache=AnswerCache(tmp_path / "c.sqlite3"),
                 judge=tm.Judge(url, model_name="grader-1"))
    assert result.table.loc["final", "judge"] == pytest.approx(0.2)
    prompts = [b["messages"][0]["content"] for _, b in bodies]
    assert len(prompts) == len(set(prompts)) == 11 + 10  # the same answer twice is graded once
    assert {path for path, _ in bodies} == {"/v1/chat/completions"}
    assert all(b["model"] == "grader-1" and b["temperature"] == 0 and b["messages"][0]["role"] == "user"
               for _, b in bodies)
    with pytest.raises(UserError, match=r"the judge at http://127.0.0.1:9/v1 cannot be reached") as info:
        run(answerers, CASES, ["exact_match"], cache=AnswerCache(tmp_path / "c2.sqlite3"),
            judge=tm.Judge("http://127.0.0.1:9/v1"))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_a_served_local_job_is_a_judge_and_an_unreadable_verdict_is_counted_not_invented(tuned):
    job, ds, facts = tuned
    endpoint = job.deploy()  # the tiny model as judge: its verdicts are no "Score: N", and say so
    try:
        small = facts.head(4).rename(columns={"question": "prompt", "answer": "completion"})
        result = job.evaluate(small, checkpoints=None, judge=tm.Judge(endpoint.url, model_name=endpoint.model_name))
    finally:
        endpoint.stop()
    assert "judge" in result.table.columns
    verdicts = result.pairwise["scores"]
    unread = sum(math.isnan(s) for s in verdicts)
    assert len(verdicts) == 4 and (unread == 0 or f"{unread} verdicts unreadable" in result.win_rate())


def test_a_chat_model_is_asked_a_few_at_a_time_and_again_after_a_transient_failure():
    import threading
    import time as clock

    lock, now, most, failed = threading.Lock(), [0], [0], []

    def chat(messages, **gen):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            clock.sleep(0.02)
            question = messages[-1]["content"]
            if question == "q3" and not failed:
                failed.append(question)
                error = UserError("quota exceeded (429)")
                error.transient = "Vertex AI answered 429 RESOURCE_EXHAUSTED"
                raise error
            if question == "q7":
                raise UserError("not found: the endpoint is gone")
            return question.replace("q", "a")
        finally:
            with lock:
                now[0] -= 1

    answerer = ChatAnswerer("final", "m", chat, concurrency=3, waits=(0.01, 0.01))
    assert answerer.answer([c.prompt for c in CASES[:7]], max_new_tokens=8) == [f"a{i}" for i in range(7)]
    assert failed == ["q3"] and 1 < most[0] <= 3  # asked in parallel, never more than 3 at once
    with pytest.raises(UserError, match="the endpoint is gone"):  # not transient: no second try
        answerer.answer([c.prompt for c in CASES], max_new_tokens=8)


def test_progress_moves_a_chunk_at_a_time_and_an_interrupted_evaluation_keeps_what_it_has(tmp_path):
    from tuning_magics import evaluation

    cases = [Example([{"role": "user", "content": f"q{i}"}], f"a{i}") for i in range(40)]
    asked: list[str] = []
    stop_at = [20]

    def chat(messages, **gen):
        if len(asked) == stop_at[0]:
            stop_at[0] = None
            raise KeyboardInterrupt  # the user stops the cell halfway
        asked.append(messages[-1]["content"])
        return messages[-1]["content"].replace("q", "a")

    heard = []
    answerer = ChatAnswerer("final", "m", chat, concurrency=1)
    cache = AnswerCache(tmp_path / "cache.sqlite3")
    with pytest.raises(KeyboardInterrupt):
        run([answerer], cases, ["exact_match"], cache=cache, progress=lambda *a: heard.append(a))
    assert heard == [("final", 0, 40), ("final", 16, 40)]  # the first chunk was cached before the interrupt
    asked.clear()
    heard.clear()
    result = run([answerer], cases, ["exact_match"], cache=cache, progress=lambda *a: heard.append(a))
    assert asked == [f"q{i}" for i in range(16, 40)] and result.table.loc["final", "exact_match"] == 1.0
    assert heard == [("final", 16, 40), ("final", 32, 40), ("final", 40, 40), ("done", 1, 1)]
    assert evaluation.CHUNK == 16


def test_the_progress_bar_says_the_phase_the_rate_and_the_time_left(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: shown.append(obj))
    from tuning_magics.display.evaluation import EvaluationProgress

    view = EvaluationProgress("Evaluation of facts")
    now = [100.0]
    view._time = lambda: now[0]
    view("base", 8, 64)
    assert view.text.value == "base: 8 of 64 (8 cached)" and view.bar.value == pytest.approx(0.125)
    now[0] += 4.0
    view("base", 24, 64)
    assert view.text.value == "base: 24 of 64 · 4.0/s · 0:10 left"
    view("done", 1, 1)
    assert view.widget.layout.display == "none" and shown == [view.widget]


def test_stopping_early_keeps_the_checkpoint_the_task_metric_picks_before_the_loss(tmp_path):
    """With evaluation during tuning, Stop early keeps the best checkpoint by the first task metric (the
    earliest on a tie), as job.best_checkpoint() does; without it, the lowest validation loss."""
    import json

    from tuning_magics.backends.local import checkpoints as ckpt
    from tuning_magics.backends.local.trainer import _best_checkpoint

    for step, loss in ((4, 0.9), (8, 0.5), (12, 0.7)):
        folder = ckpt.checkpoints_dir(tmp_path) / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / ckpt.TRAINER_STATE).write_text(json.dumps({"global_step": step, "eval_loss": loss}))
    assert _best_checkpoint(tmp_path, True) == (ckpt.checkpoints_dir(tmp_path) / "checkpoint-8",
                                                "lowest validation loss, 0.5")
    rows = [{"step": 0, "epoch": 0, "eval_exact_match": 0.0}, {"step": 4, "epoch": 1, "eval_exact_match": 0.75},
            {"step": 8, "epoch": 2, "eval_exact_match": 0.5, "eval_loss": 0.5},
            {"step": 12, "epoch": 3, "eval_exact_match": 0.75}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _best_checkpoint(tmp_path, True) == (ckpt.checkpoints_dir(tmp_path) / "checkpoint-4",
                                                "best exact_match, 0.75")
