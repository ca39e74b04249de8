"""A judge: a chat model that grades answers, pointwise against a rubric and pairwise (which of two is better).

``Judge(model)`` takes anything with ``chat(messages, temperature=0, max_new_tokens=...)``
(a job, ``job.deploy()``'s endpoint, a Vertex AI endpoint), the base URL of an
OpenAI-compatible server (``http://127.0.0.1:8000/v1``, with ``model_name=``), or
``"vertex"`` / ``"vertex:gemini-2.5-flash"``: Gemini grading through Vertex AI's Gen AI
evaluation service (:mod:`tuning_magics.backends.vertex.judge`), in the configured project. Its
prompts are plain text with ``{question}``, ``{reference}``, ``{answer}`` (pointwise)
or ``{answer_a}``, ``{answer_b}`` (pairwise) in them: shown by ``print(judge)`` and
changed by passing ``pointwise_prompt=`` / ``pairwise_prompt=``.

- Pointwise: the judge replies ``Score: N`` on a 1 to 5 scale; the score is
  ``(N - 1) / 4``, so 0 to 1 like the other metrics. A reply without a score is
  NaN and counted (``unreadable``).
- Pairwise: the judge names the better answer, ``A``, ``B`` or ``tie``. Every other
  example shows the two answers the other way round, which cancels the judge's
  preference for a position; the score of the first model is 1 (better), 0.5 (tie)
  or 0 (worse).

Judge replies are cached with the answers (by the judge's identity and the exact
prompt), so grading again costs nothing. Before the judge is asked, the evaluation's
progress says how many calls and about how many tokens it will cost
(:meth:`Judge.cost`), and the :class:`~tuning_magics.evaluation.Evaluation` keeps what was
spent (``judge_usage``).
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..errors import UserError

POINTWISE_PROMPT = """You grade an answer against a reference answer.

Question:
{question}

Reference answer:
{reference}

Answer to grade:
{answer}

Rate how well the answer agrees with the reference in meaning and facts, on a scale of 1 to 5:
5 = the same meaning and facts; 4 = nearly, a small slip; 3 = partly right; 2 = mostly wrong;
1 = wrong, empty or off topic. Reply with one line: "Score: N"."""

PAIRWISE_PROMPT = """You compare two answers to the same question, given a reference answer.

Question:
{question}

Reference answer:
{reference}

Answer A:
{answer_a}

Answer B:
{answer_b}

Which answer agrees better with the reference in meaning and facts? Ignore length and style.
Reply with one line: "Better: A", "Better: B" or "Better: tie"."""

#: Tokens a judge's reply may take: one line is asked for.
JUDGE_MAX_TOKENS = 32


def fill(template: str, **values: str) -> str:
    """The template with each ``{name}`` replaced (braces in the values stay as they are)."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", str(value))
    return template


class _OpenAICompatible:
    """The chat completions API of an OpenAI-compatible server (vLLM, llama.cpp, the local engine's server)."""

    def __init__(self, base_url: str, model_name: str, api_key: str | None = None, timeout: float = 120.0):
        self.base_url, self.model_name, self.api_key, self.timeout = base_url.rstrip("/"), model_name, api_key, timeout

    def chat(self, messages, *, temperature: float = 0, max_new_tokens: int = JUDGE_MAX_TOKENS, **_):
        body = json.dumps({"model": self.model_name, "messages": messages, "temperature": temperature,
                           "max_tokens": max_new_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            raise UserError(f"the judge at {self.base_url} answered {exc.code}: {detail}", field="judge") from None
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(f"the judge at {self.base_url} cannot be reached ({getattr(exc, 'reason', exc)}); "
                            "start its server or give another judge", field="judge") from None
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"the judge at {self.base_url} answered without a chat completion", field="judge") from None


@dataclass
class Judge:
    """A chat model that grades answers; see the module's description."""

    model: object
    model_name: str | None = None
    pointwise_prompt: str = POINTWISE_PROMPT
    pairwise_prompt: str = PAIRWISE_PROMPT
    api_key: str | None = None

    def __post_init__(self):
        for text, fields in ((self.pointwise_prompt, ("question", "reference", "answer")),
                             (self.pairwise_prompt, ("question", "reference", "answer_a", "answer_b"))):
            missing = [f for f in fields if "{" + f + "}" not in text]
            if missing:
                raise UserError(f"the judge's prompt lacks {', '.join('{' + f + '}' for f in missing)}; keep every "
                                "placeholder of the default prompt", field="judge")
        self._service = self._judge_service()
        if self._service is not None:
            if self.pointwise_prompt == POINTWISE_PROMPT:  # the service's autorater answers its own structure
                self.pointwise_prompt = self._service.pointwise_template
            if self.pairwise_prompt == PAIRWISE_PROMPT:
                self.pairwise_prompt = self._service.pairwise_template
            autorater = self._service.autorater
            self.model_name = self.model_name or f"{(autorater or 'default autorater').rsplit('/', 1)[-1]} on " \
                                                 f"{self.model.partition(':')[0]}'s judge service"
            self.key = f"{self.model.partition(':')[0]}-judge:{autorater or 'default'}"
        elif isinstance(self.model, str):
            if not re.match(r"https?://", self.model):
                raise UserError(f"judge {self.model!r}: give a model with chat() (a job, an endpoint), the base "
                                "URL of an OpenAI-compatible server, http://host:port/v1, or 'vertex' (Gemini on "
                                "Vertex AI's evaluation service)", field="judge")
            self._chat = _OpenAICompatible(self.model, self.model_name or "default", self.api_key).chat
            self.key = f"openai:{self.model}:{self.model_name or 'default'}"
        elif callable(getattr(self.model, "chat", None)):
            self._chat = self.model.chat
            self.key = f"chat:{self.model_name or getattr(self.model, 'url', None) or getattr(self.model, 'id', None) or type(self.model).__name__}"
        else:
            raise UserError(f"judge: a {type(self.model).__name__} cannot chat; give a job, an endpoint or an "
                            "OpenAI-compatible URL", field="judge")

    def _judge_service(self):
        """``"<backend>"`` or ``"<backend>:<model>"``: that backend's judge service (Vertex AI's evaluation
        service for ``vertex``), else None."""
        if not isinstance(self.model, str) or re.match(r"https?://", self.model):
            return None
        from .. import backends

        name, _, model = self.model.partition(":")
        try:
            backends.check_name(name, auto=False)
        except UserError:
            return None
        return backends.get(name).judge_service(model or None)

    @property
    def name(self) -> str:
        return self.model_name or self.key.split(":", 1)[1]

    def __str__(self) -> str:
        return (f"judge {self.name}\n--- pointwise prompt ---\n{self.pointwise_prompt}\n"
                f"--- pairwise prompt ---\n{self.pairwise_prompt}")

    def ask(self, prompts: list[str]) -> list[str]:
        """The judge's replies to prompts (user messages), greedily."""
        return [str(self._chat([{"role": "user", "content": p}], temperature=0, max_new_tokens=JUDGE_MAX_TOKENS))
                for p in prompts]

    def prompt(self, kind: str, values: dict) -> str:
        """The whole prompt the judge reads for one example (``kind``: ``pointwise`` or ``pairwise``)."""
        return fill(self.pointwise_prompt if kind == "pointwise" else self.pairwise_prompt, **values)

    def grade(self, kind: str, values: list[dict]) -> list[str]:
        """The judge's verdicts (``Score: N``, ``Better: A|B|tie``) on examples given as their placeholders'
        values; the evaluation service fills its template itself, a chat judge reads it filled."""
        if self._service is not None:
            template = self.pointwise_prompt if kind == "pointwise" else self.pairwise_prompt
            return self._service.grade(kind, template, values)
        return self.ask([self.prompt(kind, v) for v in values])

    @property
    def billed(self) -> str | None:
        """Who bills the judge's calls, where someone does."""
        return self._service.billed if self._service is not None else None

    def cost(self, prompts: list[str]) -> dict:
        """What asking these prompts costs: ``calls``, and ``tokens`` read and written (about 4 characters a
        token), and who bills them (None: a judge of your own)."""
        written = self._service.reply_tokens if self._service is not None else JUDGE_MAX_TOKENS
        return {"calls": len(prompts), "tokens": sum(len(p) for p in prompts) // 4 + written * len(prompts),
                "billed": self.billed}


def pointwise_score(reply: str) -> float:
    """``Score: N`` (1 to 5) as (N - 1) / 4; NaN when the reply has no such score."""
    found = re.search(r"score\s*[:=]?\s*([1-5])\b", reply, flags=re.I) or re.fullmatch(r"\s*([1-5])\s*\.?\s*", reply)
    return (int(found.group(1)) - 1) / 4 if found else math.nan


def pairwise_choice(reply: str) -> str | None:
    """``A``, ``B`` or ``tie`` from ``Better: X``; None when the reply names none."""
    found = re.search(r"better\s*[:=]?\s*(a|b|tie)\b", reply, flags=re.I) or \
        re.fullmatch(r"\s*(a|b|tie)\s*\.?\s*", reply, flags=re.I)
    return found.group(1).upper().replace("TIE", "tie") if found else None
