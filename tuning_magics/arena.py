"""The checkpoint arena: two models answer the same prompts side by side, anonymous and in random order; you vote.

``job.arena(prompts, against="base")`` (or ``tm.Arena(a, b, prompts)``) puts two models
face to face: two checkpoints of a job, its base and its tuned model, two jobs, or a job
and anything with ``chat()`` (an endpoint). Each round shows one prompt and the two
answers as A and B, in an order drawn per round, so you judge the answers, not the names.
You vote ``"A"``, ``"B"``, ``"tie"`` or ``"both bad"`` (buttons in the notebook, or
``arena.vote(...)``). A judge can vote too (``arena.judge(judge)``), its votes labelled as
a judge's.

Every vote is appended to ``<home>/arenas/<name>.jsonl`` as it is cast (one line, flushed
to disk): nothing is lost on a kernel restart, and ``Arena`` with the same models and
prompts (or the same ``name``) continues where the votes stop. Answers are greedy and
cached with the evaluation's answers, so a round shows the same answers again.

``arena.ranking()`` ranks the models from the votes (Bradley-Terry strengths, each model's
share of the decided votes with its 95 % interval), and ``arena.to_preference_dataset()``
turns the decided votes into preference pairs (the winner's answer chosen, the loser's
rejected), a validated Dataset for ``tune(method="preference")`` on either backend.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass

from .errors import UserError

#: The votes a round takes: A (shown first) better, B better, a tie, or neither any good.
VOTES = ("A", "B", "tie", "both bad")
_SPELLINGS = {"a": "A", "left": "A", "1": "A", "b": "B", "right": "B", "2": "B", "tie": "tie", "t": "tie",
              "=": "tie", "same": "tie", "both bad": "both bad", "both_bad": "both bad", "bad": "both bad",
              "neither": "both bad", "x": "both bad"}
#: What the arena asks a judge: which answer is better, with no reference answer to compare with.
JUDGE_PROMPT = """You compare two answers to the same request.

Request:
{question}

{reference}

Answer A:
{answer_a}

Answer B:
{answer_b}

Which answer serves the request better: correct, helpful, in a fitting tone? Ignore length as such.
Reply with one line: "Better: A", "Better: B" or "Better: tie"."""


@dataclass
class Contender:
    """One side of the arena: its ``label`` (kept from the voter until the votes are counted) and what answers."""

    label: str
    answerer: object  # an evaluation Answerer


def contender(side, label: str | None = None) -> Contender:
    """A side from what the user gave: a job (its tuned model), ``(job, checkpoint)`` (``"base"``, a checkpoint's
    name, ``"final"``), or anything with ``chat()``."""
    from .evaluation import ChatAnswerer

    job, checkpoint = (side if isinstance(side, tuple) and len(side) == 2 else (side, "final"))
    if hasattr(job, "checkpoints") and hasattr(job, "_answerer"):
        name = str(checkpoint)
        if name.isdigit():
            name = f"checkpoint-{name}"
        names = ["base", *(c.name for c in job.checkpoints)]
        if name not in names:
            raise UserError(f"job {job.id} has no {name!r} to put in the arena; it has {', '.join(names)}",
                            field="checkpoint")
        return Contender(label or f"{job.display_name or job.id}:{name}", job._answerer(name))
    if callable(getattr(side, "chat", None)):
        name = str(getattr(side, "name", None) or type(side).__name__)
        return Contender(label or name, ChatAnswerer(name, f"chat:{name}", side.chat))
    raise UserError(f"the arena takes jobs, (job, checkpoint) pairs or models with chat(), not {type(side).__name__}",
                    field="model")


def _prompt(item, number: int) -> list[dict]:
    """A prompt as chat messages: a text, or messages ending with the user's turn."""
    if isinstance(item, str) and item.strip():
        return [{"role": "user", "content": item}]
    if isinstance(item, list) and item and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                for m in item) and item[-1].get("role") == "user":
        return [{"role": m["role"], "content": m["content"]} for m in item]
    raise UserError(f"prompt {number}: give a text or chat messages ending with the user's turn", field="prompts")


def strengths(pairs: list[tuple[str, str, float]], iterations: int = 200) -> dict[str, float]:
    """Bradley-Terry strengths (summing to the number of models) from ``(a, b, score of a)`` comparisons, score
    1 (a won), 0 (b won) or 0.5 (a tie, half a win each), by the minorise-maximise iteration (Hunter, 2004)."""
    models = sorted({m for a, b, _ in pairs for m in (a, b)})
    if not models:
        return {}
    wins = {m: 0.0 for m in models}
    games: dict[tuple[str, str], int] = {}
    for a, b, score in pairs:
        wins[a] += score
        wins[b] += 1 - score
        key = tuple(sorted((a, b)))
        games[key] = games.get(key, 0) + 1
    # A pseudo-game won half by each against every other keeps a model that never won finite and above 0.
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            games[(a, b)] = games.get((a, b), 0) + 1
            wins[a] += 0.5
            wins[b] += 0.5
    strength = {m: 1.0 for m in models}
    for _ in range(iterations):
        new = {}
        for m in models:
            denominator = sum(n / (strength[a] + strength[b]) for (a, b), n in games.items() if m in (a, b))
            new[m] = wins[m] / denominator if denominator else strength[m]
        total = sum(new.values())
        strength = {m: v * len(models) / total for m, v in new.items()}
    return strength


class Arena:
    """Two models on the same prompts, voted on; see the module's description."""

    def __init__(self, a, b, prompts, *, name: str | None = None, labels: tuple[str, str] | None = None,
                 seed: int = 0, max_new_tokens: int = 128):
        from . import params

        self.sides = [contender(a, labels[0] if labels else None), contender(b, labels[1] if labels else None)]
        if self.sides[0].label == self.sides[1].label:
            raise UserError(f"both sides of the arena are {self.sides[0].label}; put two different models in it",
                            field="model")
        if isinstance(prompts, (str, dict)) or not hasattr(prompts, "__iter__"):
            raise UserError("prompts must be a list of texts (or chat conversations), at least one", field="prompts")
        prompts = list(prompts)  # a pandas Series, a tuple, a generator
        if not prompts:
            raise UserError("prompts must be a list of texts (or chat conversations), at least one", field="prompts")
        self.prompts = [_prompt(p, i) for i, p in enumerate(prompts, 1)]
        self.seed, self.max_new_tokens = int(seed), params.whole_at_least_1("max_new_tokens", max_new_tokens)
        # The answers voted on are the arena: other models, prompts, order or answer length make another.
        identity = json.dumps([[s.answerer.key for s in self.sides], self.prompts, self.seed, self.max_new_tokens],
                              sort_keys=True)
        self.name = name or "arena-" + hashlib.sha256(identity.encode()).hexdigest()[:12]
        from .paths import data_home

        self.path = data_home() / "arenas" / f"{self.name}.jsonl"
        self._answers: dict[str, list[str]] | None = None
        self.votes: list[dict] = self._load()

    # -- the votes file ------------------------------------------------------------------------------
    def _load(self) -> list[dict]:
        """The votes already cast (a last line cut short by a crash is left out)."""
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                vote = json.loads(line)
            except ValueError:
                continue
            if isinstance(vote, dict) and vote.get("vote") in VOTES and isinstance(vote.get("round"), int):
                out.append(vote)
        return out

    def _append(self, vote: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(vote, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.votes.append(vote)

    # -- rounds --------------------------------------------------------------------------------------
    def answers(self) -> dict[str, list[str]]:
        """Each side's answers to every prompt (greedy, cached with the evaluation's answers), by label."""
        if self._answers is None:
            from .evaluation import AnswerCache, answers_of

            cache = AnswerCache()
            self._answers = {side.label: answers_of(side.answerer, self.prompts, max_new_tokens=self.max_new_tokens,
                                                    cache=cache) for side in self.sides}
        return self._answers

    def _order(self, number: int) -> tuple[Contender, Contender]:
        """Which side is A in round ``number``: drawn per round from the arena's seed, the same every time."""
        swap = random.Random(f"{self.seed}:{number}").random() < 0.5
        return (self.sides[1], self.sides[0]) if swap else (self.sides[0], self.sides[1])

    def round(self, number: int) -> dict:
        """Round ``number`` (0-based here, as ``vote(round=)`` counts; the view says "round 1" for round 0):
        ``prompt``, ``A`` and ``B`` (the answers), and ``vote`` if cast."""
        a, b = self._order(number)
        answers = self.answers()
        cast = [v for v in self.votes if v["round"] == number]
        return {"round": number, "prompt": self.prompts[number], "A": answers[a.label][number],
                "B": answers[b.label][number], "vote": cast[-1]["vote"] if cast else None}

    @property
    def voted(self) -> set[int]:
        return {v["round"] for v in self.votes}

    def next(self) -> dict | None:
        """The first round without a vote, or None once every prompt has one."""
        left = [i for i in range(len(self.prompts)) if i not in self.voted]
        return self.round(left[0]) if left else None

    def vote(self, choice: str, *, round: int | None = None, voter: str = "you") -> dict:  # noqa: A002
        """Vote on ``round`` (default: the next without a vote): ``"A"``, ``"B"``, ``"tie"`` or ``"both bad"``.
        The vote is on disk when this returns."""
        given, choice = choice, _SPELLINGS.get(str(choice).strip().lower())
        if choice is None:
            raise UserError(f"vote A, B, tie or both bad, not {given!r}", field="vote")
        if round is None:
            upcoming = self.next()
            if upcoming is None:
                raise UserError("every prompt has a vote; arena.ranking() counts them", field="vote")
            round = upcoming["round"]  # noqa: A001
        if not isinstance(round, int) or not 0 <= round < len(self.prompts):
            raise UserError(f"round must be 0 to {len(self.prompts) - 1}, not {round!r}", field="round")
        a, b = self._order(round)
        answers = self.answers()
        vote = {"round": round, "prompt": self.prompts[round], "A": a.label, "B": b.label,
                "answers": {a.label: answers[a.label][round], b.label: answers[b.label][round]},
                "vote": choice, "voter": voter, "time": time.time()}
        self._append(vote)
        return vote

    def judge(self, judge, *, instructions: str = "") -> int:
        """A judge votes on every round without a vote, by :data:`JUDGE_PROMPT` (which answer serves the request
        better; ``instructions`` say what you look for, such as a house style); its votes are labelled
        ``judge:<name>``. Returns how many it cast; a reply naming no answer casts none and is counted in a
        warning."""
        import dataclasses
        import warnings

        from .evaluation import _as_judge
        from .evaluation.judge import pairwise_choice

        judge = _as_judge(judge)
        if judge._service is None:  # a chat judge reads the arena's own question; a judge service its template
            judge = dataclasses.replace(judge, pairwise_prompt=JUDGE_PROMPT, model_name=judge.name)
        cast = unread = 0
        for number in [i for i in range(len(self.prompts)) if i not in self.voted]:
            shown = self.round(number)
            question = "\n".join(f"{m['role']}: {m['content']}" for m in shown["prompt"])
            notes = f"What to look for: {instructions}" if instructions else ""
            try:
                reply = judge.grade("pairwise", [{"question": question, "reference": notes, "answer_a": shown["A"],
                                                  "answer_b": shown["B"]}])[0]
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - the judge's own failure, in one line
                raise UserError(f"judge {judge.name} failed on round {number + 1}: {type(exc).__name__}: {exc}"[:300],
                                field="judge") from None
            choice = pairwise_choice(reply)
            if choice is None:
                unread += 1
                continue
            self.vote(choice, round=number, voter=f"judge:{judge.name}")
            cast += 1
        if unread:
            warnings.warn(f"judge {judge.name} named no answer in {unread} replies (it should reply 'Better: A', "
                          "'Better: B' or 'Better: tie'); those rounds have no vote", stacklevel=2)
        return cast

    # -- results -------------------------------------------------------------------------------------
    def _decided(self) -> list[dict]:
        """The last vote of each round (a later vote replaces an earlier one)."""
        last = {}
        for vote in self.votes:
            last[vote["round"]] = vote
        return [last[k] for k in sorted(last)]

    def ranking(self):
        """One row per model, strongest first: ``strength`` (Bradley-Terry), ``wins``, ``losses``, ``ties``,
        ``both bad``, and its share of the decided votes (``win rate``, ties half) with a 95 % interval."""
        import pandas as pd

        from .evaluation.stats import wilson

        votes = self._decided()
        rows = {s.label: {"wins": 0, "losses": 0, "ties": 0, "both bad": 0} for s in self.sides}
        pairs = []
        for v in votes:
            a, b = v["A"], v["B"]
            if v["vote"] in ("A", "B"):
                winner, loser = (a, b) if v["vote"] == "A" else (b, a)
                rows[winner]["wins"] += 1
                rows[loser]["losses"] += 1
                pairs.append((winner, loser, 1.0))
            elif v["vote"] == "tie":
                rows[a]["ties"] += 1
                rows[b]["ties"] += 1
                pairs.append((a, b, 0.5))
            else:
                rows[a]["both bad"] += 1
                rows[b]["both bad"] += 1
        strength = strengths(pairs)
        for label, row in rows.items():
            n = row["wins"] + row["losses"] + row["ties"]
            share = row["wins"] + row["ties"] / 2
            row["strength"] = strength.get(label, math.nan)
            row["win rate"] = share / n if n else math.nan
            row["win rate low"], row["win rate high"] = wilson(round(share), n)
        frame = pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")
        return frame[["strength", "win rate", "win rate low", "win rate high", "wins", "losses", "ties",
                      "both bad"]].sort_values("strength", ascending=False)

    def to_preference_dataset(self, out: str | os.PathLike | None = None, *, model: str | None = None,
                              overwrite: bool = False):
        """The decided votes as preference pairs (the winner's answer chosen, the loser's rejected), written as
        JSONL at ``out`` (default beside the votes) and validated for ``tune(method="preference")``: a Dataset.
        Ties, both-bad votes and pairs with an empty answer are left out, with a warning that counts them.
        ``out`` (a local path or a gs:// URI) is never replaced unless ``overwrite``; the default file beside
        the votes is the arena's own and is written again each time."""
        from .datasets.build import Dataset
        from .datasets.validate import validate
        from .storage import atomic_writer

        pairs = []
        for v in self._decided():
            if v["vote"] not in ("A", "B"):
                continue
            winner, loser = (v["A"], v["B"]) if v["vote"] == "A" else (v["B"], v["A"])
            pairs.append({"prompt": v["prompt"], "chosen": [{"role": "assistant", "content": v["answers"][winner]}],
                          "rejected": [{"role": "assistant", "content": v["answers"][loser]}]})
        from .datasets.validate import is_blank

        usable = [p for p in pairs if not any(is_blank(p[k][0]["content"]) for k in ("chosen", "rejected"))
                  and p["chosen"][0]["content"].strip() != p["rejected"][0]["content"].strip()]
        if len(usable) < len(pairs):
            import warnings

            warnings.warn(f"{len(pairs) - len(usable)} of the {len(pairs)} decided votes are left out: an answer "
                          "was empty, or both were the same, which no tuning service takes as a pair", stacklevel=2)
        if not usable:
            raise UserError(f"none of the {len(pairs)} votes for an answer makes a pair: an answer was empty or both "
                            "were the same; vote on other rounds" if pairs else
                            "no vote prefers one answer to another yet (ties and both-bad teach nothing); vote on "
                            "more rounds", field="votes")
        pairs = usable
        from . import storage

        if out is not None:
            target = storage.check_path("out", out)
        else:
            target, overwrite = str(self.path.with_name(f"{self.name}-preferences.jsonl")), True
        with atomic_writer(target, overwrite=overwrite) as fh:
            for pair in pairs:
                fh.write(json.dumps(pair, ensure_ascii=False).encode() + b"\n")
        report = validate(target, model=model, method="preference")
        if not report.ok:
            raise UserError(f"the arena's pairs did not validate: {report.errors[0]}", field="votes")
        return Dataset(uri=target, report=report, model=model)

    # -- display -------------------------------------------------------------------------------------
    def text(self) -> str:
        n, done = len(self.prompts), len(self.voted)
        lines = [f"arena {self.name}: {self.sides[0].label} vs {self.sides[1].label}, {done} of {n} rounds voted"]
        upcoming = self.next() if done < n else None
        if upcoming is not None:
            question = upcoming["prompt"][-1]["content"]
            lines += [f"round {upcoming['round'] + 1}: {question}", f"  A: {upcoming['A']}", f"  B: {upcoming['B']}",
                      "arena.vote('A' | 'B' | 'tie' | 'both bad')"]
        else:
            lines.append(self.ranking().to_string(float_format="{:.2f}".format))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()

    def _repr_mimebundle_(self, include=None, exclude=None):
        from .display.arena import arena_bundle

        return arena_bundle(self)
