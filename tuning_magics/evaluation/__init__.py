"""Did tuning help? Evaluation of the base model, each checkpoint and the tuned model on the same examples.

``job.evaluate(data, metrics=["exact_match"])`` (or ``tm.evaluate(model, data)``
for any model) asks every model each example's conversation up to its last
assistant turn, greedily, and scores the answer against that turn (the
reference) with each metric. The :class:`Evaluation` it returns holds:

- ``table``: one row per model (``base``, ``checkpoint-N``..., ``final``), per
  metric its mean and 95 % interval (``<metric>``, ``<metric> low``, ``<metric> high``);
- ``examples``: one row per example and model: prompt, reference, answer, scores;
- ``flips``: the examples one model gets right and the other wrong (``final`` vs
  ``base`` by default, regressions first);
- ``best(metric)``: the checkpoint to keep by a task metric rather than by loss;
- ``significance(metric)``: the paired test of two models on the same examples.

Answers are cached by content (the model's files or name, the conversation, the
generation settings) under ``<home>/evaluations.sqlite3``: evaluating again costs
nothing, and adding a checkpoint generates only its answers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from . import metrics as metrics_module
from .metrics import Metric
from .stats import highest, interval, is_binary, paired_p

#: Tokens an answer may take unless ``max_new_tokens`` says otherwise.
DEFAULT_MAX_NEW_TOKENS = 128
#: The most examples one evaluation takes unless ``limit`` says otherwise.
DEFAULT_LIMIT = 1000


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    """One evaluation example: the conversation asked (``prompt``, chat messages) and the reference answer."""

    prompt: list
    reference: str

    @property
    def question(self) -> str:
        """The last user turn, as text: what a table shows for the example."""
        from ..datasets.formats import text_of

        users = [m for m in self.prompt if m.get("role") == "user"]
        return text_of(users[-1]["content"]) if users else ""


def examples_of(data, model, *, name: str = "data", limit: int | None = DEFAULT_LIMIT,
                method: str = "sft") -> list[Example]:
    """The examples of ``data`` (anything ``tune()`` takes), validated for ``model`` as for tuning.

    Each conversation is cut before its last assistant turn, which is the reference. Preference pairs
    (``method="preference"``) are their prompt, and the preferred answer as the reference.
    """
    from ..datasets.formats import read_conversations, text_of
    from ..datasets.prepare import to_jsonl

    with tempfile.TemporaryDirectory(prefix="tuning-magics-eval-") as folder:
        prepared = to_jsonl(name, data, Path(folder) / "eval.jsonl", model, method)
        from .. import storage

        with storage.local_copy(prepared.uri) as local:
            conversations = read_conversations(local)
    out = []
    for number, conversation in enumerate(conversations, start=1):
        last = max((i for i, m in enumerate(conversation) if m.get("role") in ("assistant", "model")), default=None)
        if last is None:
            raise UserError(f"{name}: example {number} has no answer to compare with; give each example an "
                            "assistant turn (a completion)", field=name)
        out.append(Example(prompt=conversation[:last], reference=text_of(conversation[last]["content"])))
    if limit is not None and len(out) > limit:
        raise UserError(f"{name} has {len(out):,} examples, more than limit={limit:,}; pass limit=None to evaluate "
                        "them all, or a sample (data.sample(n))", field=name)
    return out


# ---------------------------------------------------------------------------------------------- the cache


def _cache_path() -> Path:
    from ..paths import data_home

    return data_home() / "evaluations.sqlite3"


class AnswerCache:
    """Answers by content: the model's fingerprint, the conversation and the generation settings."""

    def __init__(self, path: Path | None = None):
        self.path = path or _cache_path()

    def _connect(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30)
        conn.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL)")
        return conn

    @staticmethod
    def key(model_key: str, prompt: list, settings: dict) -> str:
        blob = json.dumps([model_key, prompt, settings], sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get_many(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        try:
            with self._connect() as conn:
                for start in range(0, len(keys), 500):
                    part = keys[start:start + 500]
                    rows = conn.execute(f"SELECT key, answer FROM answers WHERE key IN ({','.join('?' * len(part))})",
                                        part)
                    found.update(dict(rows))
        except sqlite3.Error:
            return {}  # a damaged or locked cache costs time, never an answer
        return found

    def put_many(self, pairs: dict[str, str]) -> None:
        try:
            with self._connect() as conn:
                conn.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?)", list(pairs.items()))
        except sqlite3.Error:
            pass


# ---------------------------------------------------------------------------------------------- what answers


class Answerer:
    """A model that answers evaluation prompts: ``label`` names its row, ``key`` identifies it for the cache."""

    label: str
    key: str

    def answer(self, prompts: list[list], *, max_new_tokens: int) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError


#: Requests a chat model is asked at once, and the waits before asking again after a transient failure
#: (a 429 or 5xx, a dropped connection: a UserError whose ``transient`` says so).
CONCURRENCY = 4
RETRY_WAITS = (1.0, 2.0, 4.0, 8.0, 16.0)


def ask_all(ask, items: list, *, concurrency: int = CONCURRENCY, waits=None, name: str = "eval") -> list:
    """``ask(item)`` for every item, ``concurrency`` at a time, in order; a transient failure (a UserError whose
    ``transient`` says so: a quota's 429, a 5xx, a dropped connection) is asked again after each of ``waits``
    (default :data:`RETRY_WAITS`); any other failure, or one that persists, is raised."""
    import time

    waits = RETRY_WAITS if waits is None else waits

    def one(item):
        for wait in (*waits, None):
            try:
                return ask(item)
            except UserError as exc:
                if wait is None or not getattr(exc, "transient", None):
                    raise
                time.sleep(wait)
        raise AssertionError("unreachable")

    if concurrency <= 1 or len(items) < 2:
        return [one(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(concurrency, thread_name_prefix=f"tuning-magics-{name}") as pool:
        return list(pool.map(one, items))


class ChatAnswerer(Answerer):
    """Anything with ``chat(messages, temperature=0, max_new_tokens=...)`` (a Vertex AI model or endpoint, a
    server), asked as :func:`ask_all` asks."""

    def __init__(self, label: str, key: str, chat, *, concurrency: int = CONCURRENCY, waits=RETRY_WAITS):
        self.label, self.key, self._chat = label, key, chat
        self.concurrency, self.waits = max(1, int(concurrency)), tuple(waits)

    def answer(self, prompts, *, max_new_tokens: int) -> list[str]:
        return ask_all(lambda p: str(self._chat(p, temperature=0, max_new_tokens=max_new_tokens)), prompts,
                       concurrency=self.concurrency, waits=self.waits, name=f"eval-{self.label}")


def fingerprint(source: str) -> str:
    """A model folder's identity for the cache: its path and its files' sizes and times; else the name itself."""
    path = Path(source)
    if not path.is_dir():
        return source
    digest = hashlib.sha256(str(path.resolve()).encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return f"{path.resolve()}#{digest.hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------- the result


@dataclass
class Evaluation:
    """Models scored on the same examples: ``table``, ``examples``, ``flips``, ``best()``, ``significance()``."""

    labels: list[str]
    metrics: list[Metric]
    cases: list[Example]
    answers: dict[str, list[str]]  # label -> one answer per example
    scores: dict[str, dict[str, list[float]]]  # label -> metric name -> one score per example
    settings: dict = field(default_factory=dict)
    leaked: list[int] = field(default_factory=list)  # examples that are also in the training data
    near: list[int] = field(default_factory=list)  # those of them that are near-duplicates, not exact copies
    title: str = "Evaluation"
    #: The judge's pairwise verdicts: {"model", "against", "scores" (per example: 1 better, 0.5 tie, 0 worse,
    #: NaN unreadable), "judge"}; None without a judge or a second model.
    pairwise: dict | None = None
    #: What the judge cost: {"calls" asked, "cached" (asked before, free), "tokens" (about), "billed" (who, or
    #: None)}; None without a judge.
    judge_usage: dict | None = None

    # -- tables --------------------------------------------------------------------------------------
    @property
    def table(self):
        """One row per model; per metric its mean, and the bounds of its 95 % interval."""
        import pandas as pd

        rows = []
        for label in self.labels:
            row = {"model": label}
            for metric in self.metrics:
                found = interval(self.scores[label][metric.name])
                row[metric.name], row[f"{metric.name} low"], row[f"{metric.name} high"] = \
                    found.mean, found.low, found.high
            row["examples"] = len(self.cases)
            rows.append(row)
        return pd.DataFrame(rows).set_index("model")

    @property
    def examples(self):
        """One row per example and model: the question, the reference, the answer and each metric's score."""
        import pandas as pd

        rows = []
        for i, case in enumerate(self.cases):
            for label in self.labels:
                row = {"example": i, "model": label, "question": case.question, "reference": case.reference,
                       "answer": self.answers[label][i]}
                for metric in self.metrics:
                    row[metric.name] = self.scores[label][metric.name][i]
                row["in training data"] = ("near-duplicate" if i in self.near else "exact") if i in self.leaked else ""
                rows.append(row)
        return pd.DataFrame(rows)

    def _pair(self, a: str | None, b: str | None) -> tuple[str, str]:
        a = a or self.labels[-1]
        b = b or ("base" if "base" in self.labels and a != "base" else self.labels[0])
        for label in (a, b):
            if label not in self.labels:
                raise UserError(f"no model {label!r} in this evaluation; it has {', '.join(self.labels)}",
                                field="model")
        return a, b

    def _metric(self, metric: str | None) -> Metric:
        if metric is None:
            return self.metrics[0]
        for m in self.metrics:
            if m.name == metric:
                return m
        raise UserError(f"no metric {metric!r} in this evaluation; it has {', '.join(m.name for m in self.metrics)}",
                        field="metric")

    def flips(self, metric: str | None = None, *, model: str | None = None, against: str | None = None):
        """The examples ``model`` (default ``final``, else the last) and ``against`` (default ``base``) score
        differently on ``metric`` (default the first): regressions (``model`` worse) first, then the gains."""
        import pandas as pd

        m = self._metric(metric)
        a, b = self._pair(model, against)
        rows = []
        for i, case in enumerate(self.cases):
            new, old = self.scores[a][m.name][i], self.scores[b][m.name][i]
            if new == old or any(isinstance(v, float) and math.isnan(v) for v in (new, old)):
                continue
            rows.append({"example": i, "change": "regression" if new < old else "gain", "question": case.question,
                         "reference": case.reference, f"{b} answer": self.answers[b][i],
                         f"{a} answer": self.answers[a][i], f"{b} {m.name}": old, f"{a} {m.name}": new})
        frame = pd.DataFrame(rows, columns=["example", "change", "question", "reference", f"{b} answer",
                                            f"{a} answer", f"{b} {m.name}", f"{a} {m.name}"])
        return frame.sort_values(["change", "example"], key=lambda s: s.map({"regression": 0, "gain": 1})
                                 if s.name == "change" else s).reset_index(drop=True)

    def best(self, metric: str | None = None) -> str:
        """The model (checkpoint) with the highest mean ``metric``; a tie goes to the earliest, which trained least."""
        m = self._metric(metric)
        candidates = [label for label in self.labels if label != "base"] or self.labels
        return highest({label: interval(self.scores[label][m.name]).mean for label in candidates}) or candidates[-1]

    def significance(self, metric: str | None = None, *, model: str | None = None,
                     against: str | None = None) -> float:
        """The two-sided p-value that ``model`` and ``against`` score the same on ``metric``, paired by example
        (McNemar's exact test for right/wrong metrics, else a paired bootstrap)."""
        m = self._metric(metric)
        a, b = self._pair(model, against)
        return paired_p(self.scores[a][m.name], self.scores[b][m.name])

    def win_rate(self) -> str:
        """The judge's pairwise verdict in words: how often it preferred the tuned model, with the sign test."""
        if not self.pairwise:
            return ""
        from .stats import mcnemar

        scores = self.pairwise["scores"]
        read = [s for s in scores if not math.isnan(s)]
        if not read:  # no verdict to count: no rate and no test, rather than figures made of nothing
            return (f"judge {self.pairwise['judge']}: all {len(scores)} verdicts unreadable (none said which answer "
                    "it preferred), so there is no win rate; print(judge) shows what it was asked")
        wins, losses, ties = read.count(1.0), read.count(0.0), read.count(0.5)
        found = interval(read)
        p = mcnemar([1] * wins + [0] * losses, [0] * wins + [1] * losses)
        unread = len(scores) - len(read)
        return (f"judge {self.pairwise['judge']}: {self.pairwise['model']} preferred to {self.pairwise['against']} "
                f"in {wins}, {self.pairwise['against']} in {losses}, ties {ties} "
                f"(win rate {_score(found, binary=False)}, "
                f"p {_p(p)}, sign test; order swapped every other example)"
                + (f"; {unread} verdicts unreadable" if unread else ""))

    def summary(self, metric: str | None = None) -> str:
        """One sentence: the tuned model against the base, with intervals and the paired test's p-value."""
        m = self._metric(metric)
        if len(self.labels) < 2:
            only = self.labels[0]
            return f"{m.name}: {only} {_score(interval(self.scores[only][m.name]), m.binary)}"
        a, b = self._pair(None, None)
        p = self.significance(m.name, model=a, against=b)
        return (f"{m.name}: {a} {_score(interval(self.scores[a][m.name]), m.binary)} vs {b} "
                f"{_score(interval(self.scores[b][m.name]), m.binary)}, p {_p(p)} "
                f"({'McNemar' if m.binary or _all_binary(self.scores, m) else 'paired bootstrap'}, "
                f"{len(self.cases)} examples)")

    # -- display -------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return self.text()

    def text(self) -> str:
        lines = [f"{self.title}: {len(self.cases)} examples, {', '.join(self.labels)}"]
        width = max(len(label) for label in self.labels)
        for label in self.labels:
            parts = [f"{m.name} {_score(interval(self.scores[label][m.name]), m.binary)}" for m in self.metrics]
            lines.append(f"  {label:<{width}}  " + " · ".join(parts))
        lines += [s for s in (self.summary(m.name) for m in self.metrics) if len(self.labels) > 1]
        if len(self.labels) > 1:
            flips = self.flips()
            lines.append(f"{(flips['change'] == 'regression').sum()} regressions, {(flips['change'] == 'gain').sum()} "
                         "gains (evaluation.flips())")
            lines.append(f"best by {self.metrics[0].name}: {self.best()}")
        if self.pairwise:
            lines.append(self.win_rate())
        if self.judge_usage:
            lines.append(self._judge_note())
        if self.leaked:
            lines.append(f"note: {self._leak_note()}")
        return "\n".join(lines)

    def _judge_note(self) -> str:
        used = self.judge_usage or {}
        billed = f", billed to {used['billed']}" if used.get("billed") and used.get("calls") else ""
        return (f"judge: {used.get('calls', 0)} calls, about {used.get('tokens', 0):,} tokens{billed}; "
                f"{used.get('cached', 0)} verdicts from the cache")

    def _leak_note(self) -> str:
        if not self.leaked:
            return ""
        kinds = f" ({len(self.leaked) - len(self.near)} exact, {len(self.near)} near-duplicates)" if self.near else ""
        return (f"{len(self.leaked)} of the {len(self.cases)} examples are also in the training data{kinds} (a score on "
                "them measures recall, not generalisation)")

    def _view(self) -> dict:
        """What the HTML view shows, as plain values (the display layer knows nothing of evaluations)."""
        several = len(self.labels) > 1
        found = {label: {m.name: interval(self.scores[label][m.name]) for m in self.metrics} for label in self.labels}
        return {"title": self.title, "examples": len(self.cases), "labels": self.labels,
                "metrics": [m.name for m in self.metrics],
                "scores": {label: [_score(found[label][m.name], m.binary) for m in self.metrics]
                           for label in self.labels},
                "intervals": {m.name: [found[label][m.name] for label in self.labels] for m in self.metrics},
                "best": self.best() if several else None,
                "summaries": ([self.summary(m.name) for m in self.metrics] if several else [])
                + ([self.win_rate()] if self.pairwise else []) + ([self._judge_note()] if self.judge_usage else []),
                "flips": self.flips() if several else None, "pair": self._pair(None, None) if several else None,
                "leak_note": self._leak_note()}

    def _repr_html_(self) -> str:
        from ..display.evaluation import evaluation_html

        return evaluation_html(self._view())




def _all_binary(scores, metric: Metric) -> bool:
    return all(is_binary(by[metric.name]) for by in scores.values())


def _score(found, binary: bool) -> str:
    if math.isnan(found.mean):
        return "—"
    if binary:
        return f"{found.mean:.1%} ± {found.half_width * 100:.1f}"
    return f"{found.mean:.3f} ± {found.half_width:.3f}"


def _p(p: float) -> str:
    """A p-value as its relation: ``< 0.001``, ``= 0.012``, ``= 0.07``."""
    return "< 0.001" if p < 0.001 else f"= {p:.3f}" if p < 0.1 else f"= {p:.2f}"


# ---------------------------------------------------------------------------------------------- running it


#: Items asked (and cached) at a time: an interrupted evaluation keeps what it has, and the progress moves.
CHUNK = 16


def _cached(cache: AnswerCache, key_of, items: list, ask, *, progress=None, phase: str = "",
            announce=None, chunk=CHUNK) -> list[str]:
    """``ask(items)`` for the items whose key (``key_of(item)``) the cache lacks, :data:`CHUNK` at a time, each
    chunk cached as it comes; every reply, in order. ``progress(phase, done, total)`` after each chunk;
    ``announce(missing items)`` before any is asked (what it will cost), and its text, if any, is the phase's.
    ``chunk``: items asked at a time, or a function of how many are missing that says it."""
    keys = [key_of(item) for item in items]
    found = cache.get_many(keys)
    missing = [i for i, key in enumerate(keys) if key not in found]
    if announce is not None:
        phase = announce([items[i] for i in missing]) or phase
    if progress is not None:
        progress(phase, len(items) - len(missing), len(items))
    size = max(1, int(chunk(len(missing)) if callable(chunk) else chunk))
    for start in range(0, len(missing), size):
        part = missing[start:start + size]
        new = {keys[i]: text for i, text in zip(part, ask([items[i] for i in part]))}
        cache.put_many(new)
        found.update(new)
        if progress is not None:
            progress(phase, len(items) - len(missing) + start + len(part), len(items))
    return [found[key] for key in keys]


def greedy(max_new_tokens: int) -> dict:
    """The generation settings every evaluation answer is asked with, and cached under."""
    return {"temperature": 0, "max_new_tokens": int(max_new_tokens)}


def answers_of(answerer: Answerer, prompts: list, *, max_new_tokens: int, cache: AnswerCache,
               progress=None) -> list[str]:
    """``answerer``'s greedy answers to ``prompts``, in order: those in the cache are not asked again, the rest
    are asked and cached a chunk at a time (all at once where the answerer says so: a batch prediction)."""
    settings = greedy(max_new_tokens)
    return _cached(cache, lambda prompt: AnswerCache.key(answerer.key, prompt, settings), prompts,
                   lambda part: answerer.answer(part, max_new_tokens=int(max_new_tokens)), progress=progress,
                   phase=answerer.label, chunk=getattr(answerer, "chunk_size", CHUNK))


def _judge(judge, cases: list[Example], answers: dict, labels: list[str], cache: AnswerCache, progress=None):
    """The judge's pointwise scores per label, its pairwise verdicts of the last model against the base, and
    what the judge cost (calls asked, cached, tokens, who bills them)."""
    from .judge import JUDGE_MAX_TOKENS, pairwise_choice, pointwise_score

    settings = {"judge_max_tokens": JUDGE_MAX_TOKENS}
    usage = {"calls": 0, "cached": 0, "tokens": 0, "billed": judge.billed}

    def grading(kind: str, values: list[dict], phase: str) -> list[str]:
        def announce(missing: list[dict]) -> str:
            cost = judge.cost([judge.prompt(kind, v) for v in missing])
            usage["calls"] += cost["calls"]
            usage["cached"] += len(values) - cost["calls"]
            usage["tokens"] += cost["tokens"]
            billed = f", billed to {cost['billed']}" if cost["billed"] and cost["calls"] else ""
            return f"{phase} ({cost['calls']} calls, about {cost['tokens']:,} tokens{billed})"

        return _cached(cache, lambda v: AnswerCache.key(judge.key, [judge.prompt(kind, v)], settings), values,
                       lambda part: judge.grade(kind, part), progress=progress, phase=phase, announce=announce)

    pointwise = {}
    for label in labels:
        values = [{"question": case.question, "reference": case.reference, "answer": answers[label][i]}
                  for i, case in enumerate(cases)]
        pointwise[label] = [pointwise_score(r) for r in grading("pointwise", values, f"judge: {label}")]
    pairwise = None
    if len(labels) > 1:
        model = labels[-1]
        against = "base" if "base" in labels and model != "base" else labels[0]
        values = []
        for i, case in enumerate(cases):
            first, second = answers[model][i], answers[against][i]
            if i % 2:  # every other example the other way round: the judge's liking for a position cancels out
                first, second = second, first
            values.append({"question": case.question, "reference": case.reference, "answer_a": first,
                           "answer_b": second})
        scores = []
        for i, reply in enumerate(grading("pairwise", values, f"judge: {model} vs {against}")):
            choice = pairwise_choice(reply)
            if choice is None:
                scores.append(math.nan)
            elif choice == "tie":
                scores.append(0.5)
            else:
                model_is_a = i % 2 == 0
                scores.append(1.0 if (choice == "A") == model_is_a else 0.0)
        pairwise = {"model": model, "against": against, "scores": scores, "judge": judge.name}
    return pointwise, pairwise, usage


def run(answerers: list[Answerer], cases: list[Example], metrics, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        cache: AnswerCache | None = None, leaked=None, title: str = "Evaluation", progress=None,
        judge=None) -> Evaluation:
    """Ask each answerer every example (answers found in the cache are not asked again) and score them;
    with a :class:`~tuning_magics.evaluation.judge.Judge`, its grades are the metric ``judge`` and its pairwise
    verdicts :meth:`Evaluation.win_rate`. ``progress(phase, done, total)`` hears how far it is (default: a
    progress bar below the cell where widgets render; ``False``: none). Answers are cached a chunk at a
    time, so an interrupted evaluation (Ctrl-C, a kernel interrupt) continues where it stopped."""
    chosen = metrics_module.resolve(metrics)
    labels = [a.label for a in answerers]
    doubled = sorted({label for label in labels if labels.count(label) > 1})
    if doubled:
        raise UserError(f"two models are labelled {', '.join(doubled)}; give each a label of its own", field="models")
    cache = cache or AnswerCache()
    settings = greedy(max_new_tokens)
    if progress is None:
        from ..display.evaluation import progress_view

        progress = progress_view(title)
    answers = {a.label: answers_of(a, [c.prompt for c in cases], max_new_tokens=max_new_tokens, cache=cache,
                                   progress=progress or None) for a in answerers}
    scores: dict[str, dict[str, list[float]]] = {}
    for label in labels:
        scores[label] = {}
        for metric in chosen:
            values = []
            for i, case in enumerate(cases):
                try:
                    values.append(metric(answers[label][i], case.reference, case.prompt + [
                        {"role": "assistant", "content": case.reference}]))
                except UserError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a user's metric that fails is one line naming it
                    raise UserError(f"metric {metric.name} failed on example {i} ({type(exc).__name__}: {exc}); "
                                    "fix the function or leave it out", field="metrics") from None
            scores[label][metric.name] = values
    pairwise = judge_usage = None
    if judge is not None:
        if "judge" in [m.name for m in chosen]:
            raise UserError("a metric is named judge, the name of the judge's grades; rename it", field="metrics")
        pointwise, pairwise, judge_usage = _judge(judge, cases, answers, labels, cache, progress or None)
        chosen = chosen + [Metric("judge", lambda *_: math.nan, about=f"the grade of judge {judge.name}, 1 to 5 "
                                                                       "as 0 to 1")]
        for label in labels:
            scores[label]["judge"] = pointwise[label]
    if progress:
        progress("done", 1, 1)
    return Evaluation(labels=labels, metrics=chosen, cases=cases, answers=answers, scores=scores, settings=settings,
                      leaked=sorted(leaked or {}), near=sorted(i for i, kind in (leaked or {}).items() if kind == "near"),
                      title=title, pairwise=pairwise, judge_usage=judge_usage)


#: Word-pair overlap (Jaccard) from which an example counts as a near-duplicate of a training example.
NEAR_DUPLICATE = 0.8


def leaked_examples(cases: list[Example], training: list[list]) -> dict[int, str]:
    """The examples also in the training conversations: ``{index: "exact"}`` when question and reference are the
    same once normalised, ``{index: "near"}`` when their word pairs overlap by :data:`NEAR_DUPLICATE` or more
    (a paraphrase, a changed number)."""
    from collections import Counter

    from ..datasets.formats import text_of
    from .metrics import normalise

    def signature(prompt: list, reference: str) -> tuple[str, str]:
        users = [m for m in prompt if m.get("role") == "user"]
        return (normalise(text_of(users[-1]["content"])) if users else "", normalise(reference))

    def pairs(sig: tuple[str, str]) -> set[str]:
        words = re.findall(r"\w+", " ".join(sig))
        return {f"{a} {b}" for a, b in zip(words, words[1:])} or set(words)

    seen: set = set()
    shingles: list[set] = []
    index: dict[str, list[int]] = {}
    for conversation in training:
        last = max((i for i, m in enumerate(conversation) if m.get("role") in ("assistant", "model")), default=None)
        if last is None:
            continue
        sig = signature(conversation[:last], text_of(conversation[last]["content"]))
        if sig in seen:
            continue
        seen.add(sig)
        shingles.append(pairs(sig))
        for pair in shingles[-1]:
            index.setdefault(pair, []).append(len(shingles) - 1)
    found: dict[int, str] = {}
    for i, case in enumerate(cases):
        sig = signature(case.prompt, case.reference)
        if sig in seen:
            found[i] = "exact"
            continue
        mine = pairs(sig)
        shared = Counter(j for pair in mine for j in index.get(pair, ()))
        if any(n / (len(mine) + len(shingles[j]) - n) >= NEAR_DUPLICATE for j, n in shared.items()):
            found[i] = "near"
    return found


def evaluate(model, data, metrics=None, *, label: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             limit: int | None = DEFAULT_LIMIT, batch_size: int = 16, judge=None) -> Evaluation:
    """Evaluate any model on ``data``: a Job (its base, checkpoints and final, see :meth:`Job.evaluate`), a catalog
    id or a local model folder (the local engine, batched), or anything with ``chat()`` (an endpoint).

    ``data``: anything ``tune()`` takes; each example's last assistant turn is the reference.
    ``metrics``: names of :mod:`tuning_magics.evaluation.metrics`, metrics, or functions
    ``(answer, reference, example) -> float`` (default: exact match).
    """
    if hasattr(model, "checkpoints") and callable(getattr(model, "evaluate", None)):  # a Job
        return model.evaluate(data, metrics, max_new_tokens=max_new_tokens, limit=limit, judge=judge)
    from .. import backends, catalog

    if isinstance(model, (str, Path)):
        text = str(model)
        if Path(text).expanduser().is_dir():  # a folder of weights: the home backend loads it
            source, catalog_model, backend = str(Path(text).expanduser()), None, backends.get(backends.HOME)
        else:
            catalog_model = catalog.get(text)
            source, backend = catalog_model.id, backends.choose(catalog_model)
        answerer: Answerer = backend.answerer(source, label or Path(text).name or text, batch_size=batch_size)
        cases = examples_of(data, catalog_model, limit=limit)
    elif callable(getattr(model, "chat", None)):
        name = str(getattr(model, "name", None) or type(model).__name__)
        answerer = ChatAnswerer(label or name, f"chat:{name}", model.chat)
        cases = examples_of(data, None, limit=limit)
    else:
        raise UserError(f"evaluate() takes a job, a model id, a model folder or an endpoint, not {type(model).__name__}",
                        field="model")
    return run([answerer], cases, metrics, max_new_tokens=max_new_tokens, title=f"Evaluation of {answerer.label}",
               judge=_as_judge(judge))


#: From this many answers not yet in the cache, a Gemini model on Vertex AI answers through one batch prediction.
BATCH_FROM = 500


def evaluate_job(job, data=None, metrics=None, *, checkpoints="all", baseline: bool = True,
                 max_new_tokens: int | None = None, limit: int | None = DEFAULT_LIMIT, judge=None,
                 batch_from: int | None = BATCH_FROM) -> Evaluation:
    """:meth:`Job.evaluate <tuning_magics.jobs.Job.evaluate>`: the job's base, checkpoints and final, side by side."""
    from .. import catalog
    from ..datasets.formats import read_conversations

    config = job.config or {}
    try:
        model = catalog.get(str(config.get("base_model")))
    except UserError:
        model = None  # a model outside the catalog: the rules every model shares
    name = "data"
    if data is None:
        data, name = job._validation_file(), "validation_dataset"
        if data is None:
            raise UserError(f"job {job.id} had no validation set; pass data= (a DataFrame, a JSONL path, a Dataset), "
                            "or data='train' to measure how much of the training set it recalls", field="data")
    elif isinstance(data, str) and data in ("train", "training"):
        data, name = job._training_file(), "train_dataset"
        if data is None:
            raise UserError(f"job {job.id} does not record its training data; pass it as data=", field="data")
    cases = examples_of(data, model, name=name, limit=limit)

    names = [c.name for c in job.checkpoints]
    if checkpoints in (None, "all") and "final" not in names:
        raise UserError(f"job {job.id} has no final model yet ({job.state}); evaluate once it has succeeded, or pass "
                        f"checkpoints=[...] with those it has ({', '.join(names) or 'none yet'})", field="checkpoints")
    if checkpoints == "all":
        chosen = names
    elif checkpoints is None:
        chosen = ["final"]
    else:
        wanted = [checkpoints] if isinstance(checkpoints, (str, int)) else list(checkpoints)
        chosen = []
        for item in wanted:
            label = f"checkpoint-{int(item)}" if isinstance(item, int) or str(item).isdigit() else str(item)
            if label not in names:
                raise UserError(f"job {job.id} has no checkpoint {item!r}; it has {', '.join(names) or 'none'}",
                                field="checkpoints")
            chosen.append(label)
        chosen = [n for n in names if n in chosen]  # in training order, final last
    labels = (["base"] if baseline else []) + chosen
    if batch_from is not None:
        from .. import params

        batch_from = params.whole_at_least_1("batch_from", batch_from)
    answerers = [job._answerer(label, batch_from=batch_from) for label in labels]

    leaked: dict[int, str] = {}
    if name != "train_dataset":
        training = job._training_file()
        if training is not None:
            from .. import storage

            try:
                with storage.local_copy(training) as local:
                    leaked = leaked_examples(cases, read_conversations(local))
            except (OSError, UserError):
                leaked = {}  # the training data could not be read: no leak check, nothing else lost
    title = f"Evaluation of {job.display_name or job.id}" + (" on its training set" if name == "train_dataset" else "")
    # The answer length the job scored its checkpoints with, so those answers come from the cache.
    during = (config.get("evaluation") or {}).get("max_new_tokens")
    return run(answerers, cases, metrics, max_new_tokens=max_new_tokens or during or DEFAULT_MAX_NEW_TOKENS,
               leaked=leaked, title=title, judge=_as_judge(judge))


def _as_judge(judge):
    """A Judge from what the user gave: a Judge, a model with chat(), or an OpenAI-compatible URL; None stays."""
    if judge is None:
        return None
    from .judge import Judge

    return judge if isinstance(judge, Judge) else Judge(judge)
