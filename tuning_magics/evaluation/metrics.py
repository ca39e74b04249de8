"""Metrics: how well an answer matches the reference answer of its example.

A metric is called as ``metric(answer, reference, example)`` and returns a
float (0 to 1 for the built-in ones; 0 or 1 for right/wrong ones, which get
exact intervals and McNemar's test). ``example`` is the conversation the answer
was asked with, as chat messages, the reference last.

Built in, by name (:data:`BUILT_IN`), or called for options:

- ``exact_match``: the same text once white space is collapsed and case folded
  (``exact_match(ignore_case=False)`` keeps case);
- ``contains``: the reference appears in the answer (same normalisation);
- ``token_f1``: the F1 of the word tokens the two share (as SQuAD scores it);
- ``rouge_l``: ROUGE-L F-measure, from Google's ``rouge-score`` package;
- ``valid_json``: the answer parses as JSON;
- ``json_equal``: the answer and the reference parse to the same JSON value;
- ``label_accuracy(labels)``: the label the answer names is the reference's.

Any function ``(answer, reference, example) -> float`` is a metric too; its
``__name__`` names its column.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError


@dataclass(frozen=True)
class Metric:
    """A named scoring function; ``binary`` when it only ever returns 0 or 1."""

    name: str
    score: Callable
    binary: bool = False
    #: What the metric measures, said under the table.
    about: str = ""

    def __call__(self, answer: str, reference: str = "", example=None) -> float:
        return float(self.score(answer, reference, example))


def normalise(text: str, *, ignore_case: bool = True) -> str:
    """White space collapsed and trimmed, Unicode in NFKC form, and case folded unless ``ignore_case`` is False."""
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", str(text))).strip()
    return text.casefold() if ignore_case else text


def exact_match(*, ignore_case: bool = True) -> Metric:
    """Right when the answer is the reference, white space collapsed (and case folded unless ``ignore_case=False``)."""
    name = "exact_match" if ignore_case else "exact_match_case"
    return Metric(name, lambda a, r, _e: normalise(a, ignore_case=ignore_case) == normalise(r, ignore_case=ignore_case),
                  binary=True, about="the answer is the reference, white space collapsed"
                                     + (", case folded" if ignore_case else ""))


def contains(*, ignore_case: bool = True) -> Metric:
    """Right when the reference appears in the answer (same normalisation as :func:`exact_match`)."""
    return Metric("contains", lambda a, r, _e: normalise(r, ignore_case=ignore_case)
                  in normalise(a, ignore_case=ignore_case), binary=True,
                  about="the reference appears in the answer")


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", normalise(text))


def _token_f1(answer: str, reference: str, _example=None) -> float:
    a, r = _tokens(answer), _tokens(reference)
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if not common:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


_SCORER = None


def _rouge_l(answer: str, reference: str, _example=None) -> float:
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise UserError("rouge_l needs the rouge-score package: pip install rouge-score",
                            field="metrics") from None
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _SCORER.score(reference, answer)["rougeL"].fmeasure


def _parse(text: str):
    """The JSON value of ``text`` (a fenced ```json block is read too), or a marker when it is not JSON."""
    text = str(text).strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    if fenced:
        text = fenced.group(1)
    try:
        return json.loads(text)
    except ValueError:
        return _NOT_JSON


_NOT_JSON = object()


def _valid_json(answer: str, _reference=None, _example=None) -> bool:
    return _parse(answer) is not _NOT_JSON


def _json_equal(answer: str, reference: str, _example=None) -> bool:
    parsed = _parse(answer)
    return parsed is not _NOT_JSON and parsed == _parse(reference)


def label_accuracy(labels) -> Metric:
    """Right when the answer names the reference's label: the answer is a label, or names exactly one of them.

    ``labels``: the label set (strings), compared as :func:`exact_match` compares.
    """
    labels = [str(label) for label in labels]
    if len(labels) < 2:
        raise UserError("label_accuracy needs the label set: two labels or more, e.g. "
                        "label_accuracy(['positive', 'negative'])", field="metrics")
    known = {normalise(label): label for label in labels}

    def named(answer: str) -> str | None:
        text = normalise(answer)
        if text in known:
            return known[text]
        found = [label for key, label in known.items() if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", text)]
        return found[0] if len(found) == 1 else None

    return Metric("label_accuracy", lambda a, r, _e: named(a) is not None and named(a) == named(r), binary=True,
                  about=f"the answer names the reference's label, of {len(labels)}")


#: The metrics a name stands for.
BUILT_IN: dict[str, Metric] = {
    "exact_match": exact_match(),
    "contains": contains(),
    "token_f1": Metric("token_f1", _token_f1, about="F1 of the words answer and reference share"),
    "rouge_l": Metric("rouge_l", _rouge_l, about="ROUGE-L F-measure (rouge-score)"),
    "valid_json": Metric("valid_json", _valid_json, binary=True, about="the answer parses as JSON"),
    "json_equal": Metric("json_equal", _json_equal, binary=True,
                         about="the answer and the reference are the same JSON value"),
}


def resolve(metrics) -> list[Metric]:
    """Metrics from names, :class:`Metric` objects and functions; a name that is none of them is one line."""
    if metrics is None:
        metrics = ["exact_match"]
    if isinstance(metrics, (str, Metric)) or callable(metrics):
        metrics = [metrics]
    out: list[Metric] = []
    for item in metrics:
        if isinstance(item, str):
            for name in [n.strip() for n in item.split(",") if n.strip()]:
                if name == "label_accuracy":
                    raise UserError("label_accuracy needs its labels: metrics=[tm.metrics.label_accuracy(["
                                    "'positive', 'negative'])]", field="metrics")
                if name not in BUILT_IN:
                    raise UserError(f"metrics: unknown metric {name!r}; the built-in ones are "
                                    f"{', '.join(BUILT_IN)}, label_accuracy(labels), or pass a function "
                                    "(answer, reference, example) -> float", field="metrics")
                out.append(BUILT_IN[name])
        elif isinstance(item, Metric):
            out.append(item)
        elif callable(item):
            name = getattr(item, "__name__", None) or type(item).__name__
            out.append(Metric("custom" if name == "<lambda>" else name, item))
        else:
            raise UserError(f"metrics: {item!r} is neither a metric's name nor a function "
                            "(answer, reference, example) -> float", field="metrics")
    names = [m.name for m in out]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise UserError(f"metrics: {', '.join(doubled)} named twice; give each metric once (name your functions "
                        "apart)", field="metrics")
    if not out:
        raise UserError("metrics is empty; name one, e.g. metrics=['exact_match']", field="metrics")
    return out
