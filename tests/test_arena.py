"""The checkpoint arena: anonymous side-by-side answers, votes kept on disk as cast, a ranking, and the votes
as a preference dataset that tunes (real tiny-model jobs)."""

from __future__ import annotations

import json
import math

import pytest

import tuning_magics as tm
from tuning_magics.arena import Arena, strengths
from tuning_magics.errors import UserError

MODEL = "local/tiny-qwen3"


def test_bradley_terry_strengths_order_the_models_by_their_wins():
    found = strengths([("a", "b", 1.0)] * 8 + [("b", "a", 1.0)] * 2 + [("a", "b", 0.5)] * 2)
    assert found["a"] > 2 * found["b"] and math.isclose(sum(found.values()), 2)
    three = strengths([("a", "b", 1.0), ("b", "c", 1.0), ("a", "c", 1.0)] * 3)
    assert three["a"] > three["b"] > three["c"]
    assert strengths([]) == {}


class Echo:
    """A model with chat(): it answers with its name and the question (so each side is told apart)."""

    def __init__(self, name):
        self.name = name

    def chat(self, messages, **gen):
        return f"{self.name} says: {messages[-1]['content']}"


def test_votes_are_on_disk_as_cast_and_a_new_arena_continues_where_they_stop(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNING_MAGICS_HOME", str(tmp_path))
    prompts = [f"Question {i}?" for i in range(6)]
    arena = Arena(Echo("polite"), Echo("curt"), prompts)
    first = arena.next()
    assert first["round"] == 0 and {first["A"], first["B"]} == {"polite says: Question 0?", "curt says: Question 0?"}
    orders = {arena.round(i)["A"].split()[0] for i in range(6)}
    assert orders == {"polite", "curt"}  # the order is drawn per round: neither side is always A
    for i in range(4):
        shown = arena.next()
        arena.vote("A" if shown["A"].startswith("polite") else "B")  # the voter likes the polite answers
    lines = arena.path.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["voter"] == "you"
    # A kernel restart: the same models and prompts are the same arena, and go on at round 5.
    again = Arena(Echo("polite"), Echo("curt"), prompts)
    assert again.path == arena.path and again.next()["round"] == 4 and len(again.votes) == 4
    assert Arena(Echo("polite"), Echo("curt"), prompts, max_new_tokens=12).path != arena.path  # other answers
    again.vote("tie")
    again.vote("both bad")
    assert again.next() is None
    ranking = again.ranking()
    assert list(ranking.index) == ["polite", "curt"]
    assert ranking.loc["polite", "wins"] == 4 and ranking.loc["curt", "losses"] == 4
    assert ranking.loc["polite", "ties"] == 1 and ranking.loc["polite", "both bad"] == 1
    assert ranking.loc["polite", "win rate"] == pytest.approx(4.5 / 5)
    assert ranking.loc["polite", "win rate low"] < 0.9 < ranking.loc["polite", "win rate high"] + 1e-9
    assert ranking.loc["curt", "win rate low"] == 0.0  # no win: the bound is 0, not a float's rounding error
    data = again.to_preference_dataset()
    assert data.report.ok and data.format == "preference" and data.examples == 4
    pair = json.loads(open(data.uri).readline())
    assert pair["chosen"][0]["content"].startswith("polite") and pair["rejected"][0]["content"].startswith("curt")
    assert "4 of 6" not in again.text() and "6 of 6 rounds voted" in again.text()
    with pytest.raises(UserError, match="every prompt has a vote"):
        again.vote("A")
    with pytest.raises(UserError, match="vote A, B, tie or both bad"):
        again.vote("maybe", round=0)


def test_the_widget_casts_a_vote_per_button_and_shows_the_ranking_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNING_MAGICS_HOME", str(tmp_path))
    from tuning_magics.display.arena import ArenaView

    arena = Arena(Echo("x<b>"), Echo("y"), ["One?", "Two?"])
    view = ArenaView(arena)
    assert "x&lt;b&gt; says: One?" in view.body.value or "x&lt;b&gt; says: One?" in view.body.value
    assert "<b>x" not in view.body.value  # model text is escaped
    view.buttons[0].click()  # A is better
    assert len(arena.votes) == 1 and "round 2" in view.body.value
    view.keys.value = "q"  # the vote box takes a, b, t or x
    assert len(arena.votes) == 1 and "type a, b, t or x" in view.message.value and view.keys.value == ""
    view.keys.value = "t"  # tie, by key
    assert view.row.layout.display == "none" and "strength" in view.body.value and view.message.value == ""
    assert [v["vote"] for v in arena._load()] == ["A", "tie"]


def test_mistakes_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNING_MAGICS_HOME", str(tmp_path))
    for args, words in [((Echo("a"), Echo("a"), ["x"]), "both sides of the arena are a"),
                        ((Echo("a"), Echo("b"), "x"), "prompts must be a list"),
                        ((Echo("a"), Echo("b"), [""]), "prompt 1: give a text"),
                        ((Echo("a"), 3, ["x"]), "not int")]:
        with pytest.raises(UserError, match=words) as info:
            Arena(*args)
        assert "\n" not in str(info.value)
    arena = Arena(Echo("a"), Echo("b"), ["x"])
    arena.vote("tie")
    with pytest.raises(UserError, match="no vote prefers one answer"):
        arena.to_preference_dataset()


@pytest.mark.slow
def test_a_jobs_checkpoints_in_the_arena_and_a_judges_votes_become_pairs_that_tune(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNING_MAGICS_HOME", str(tmp_path))
    facts = [{"prompt": f"What is the code of box {i}?", "completion": f"Box {i} has code {i * 7}."}
             for i in range(16)]
    job = tm.tune(MODEL, facts, epochs=20, wait=True)
    assert job.state == "JOB_STATE_SUCCEEDED", job.error
    early = job.checkpoints[0].name  # two epochs in: it answers, not yet in the trained form
    arena = job.arena([f["prompt"] for f in facts[:6]], against=early)
    name = job.display_name or job.id
    assert {s.label for s in arena.sides} == {f"{name}:final", f"{name}:{early}"}

    class Referee:
        """A judge that prefers an answer in the trained form, "Box N has code M."."""

        def chat(self, messages, **gen):
            import re

            text = messages[-1]["content"]
            a = text.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]
            b = text.split("Answer B:\n", 1)[1].split("\n\n", 1)[0]
            good_a, good_b = (bool(re.fullmatch(r"Box \d+ has code \d+\.", x)) for x in (a, b))
            return "Better: tie" if good_a == good_b else "Better: A" if good_a else "Better: B"

    assert arena.judge(tm.Judge(Referee(), model_name="referee")) == 6
    assert {v["voter"] for v in arena.votes} == {"judge:referee"}
    ranking = arena.ranking()
    assert ranking.index[0] == f"{name}:final" and ranking.iloc[0]["wins"] >= 1 and ranking.iloc[0]["losses"] == 0
    pairs = arena.to_preference_dataset(model=MODEL)
    assert pairs.examples == ranking.iloc[0]["wins"]
    dpo = tm.tune(job, pairs, method="preference", epochs=1, wait=True)
    assert dpo.state == "JOB_STATE_SUCCEEDED", dpo.error


def test_what_a_new_user_tripped_on(tmp_path, monkeypatch):
    """A file of the user's is never replaced, a gs:// name is not a local folder, votes spelled as the keys,
    a pandas Series of prompts, a blank answer shown as such, and a judge that fails or names no answer."""
    import pandas as pd

    monkeypatch.setenv("TUNING_MAGICS_HOME", str(tmp_path))
    questions = pd.Series(["One?", "Two?", "Three?"])
    arena = Arena(Echo("polite"), Echo("curt"), questions)
    assert len(arena.prompts) == 3
    with pytest.raises(UserError, match="not 'C'"):
        arena.vote("C")
    arena.vote("A" if arena.next()["A"].startswith("polite") else "b")
    mine = tmp_path / "mine.jsonl"
    mine.write_text("precious\n")
    with pytest.raises(UserError, match="already exists"):
        arena.to_preference_dataset(mine)
    assert mine.read_text() == "precious\n"
    assert arena.to_preference_dataset(mine, overwrite=True).examples == 1
    arena.vote("t")
    arena.vote("x")
    assert [v["vote"] for v in arena.votes][1:] == ["tie", "both bad"]  # spelled as the vote box's keys

    class Silent:
        def chat(self, messages, **gen):
            return "" if "Answer B:\ncurt" not in messages[-1]["content"] else "\n\n\n"

    from tuning_magics.display.arena import round_html

    blank = Arena(Echo("x"), Silent(), ["Q?"])
    assert "an empty answer" in round_html(blank, blank.next())

    class Broken:
        def chat(self, messages, **gen):
            raise RuntimeError("server exploded")

    class Mute:
        def chat(self, messages, **gen):
            return "I cannot decide."

    fresh = Arena(Echo("one"), Echo("two"), ["Q1?", "Q2?"])
    with pytest.raises(UserError, match="judge .* failed on round 1: RuntimeError: server exploded") as info:
        fresh.judge(tm.Judge(Broken(), model_name="broken"))
    assert "\n" not in str(info.value)
    with pytest.warns(UserWarning, match="named no answer in 2 replies"):
        assert fresh.judge(tm.Judge(Mute(), model_name="mute")) == 0
