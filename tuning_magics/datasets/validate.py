"""One validator for every way a dataset reaches the service.

``validate(source, model=None, method="sft")`` accepts a local path, a
``gs://`` URI, a pandas DataFrame whose columns are a format's keys, or a list
of records, and returns a :class:`ValidationReport`: the format, the number of
examples, errors (each with a 1-based line, a field and a message), warnings,
token statistics and the number of examples the service would drop.

Errors make a dataset unusable (the service would reject the job); warnings
do not (an example will be truncated, text-only rows dropped from an image
dataset, ...). Files are read line by line with a bound on a line's size, so
memory stays small whatever the file holds.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from . import formats as F
from .tokens import BATCH_CHARS, BATCH_EXAMPLES, TOKENIZER, TokenCounter

#: Stop listing errors after this many; the count stays exact.
MAX_LISTED = 200
#: Longest line read as one example. A longer line is reported and skipped without being held in memory.
MAX_LINE_BYTES = 32 * 2**20
_SKIP_CHUNK = 1 << 20
#: Levels of nested objects and arrays a record may have: JSON writers (orjson) stop there.
MAX_DEPTH = 254
TOO_DEEP = f"is nested too deeply (more than {MAX_DEPTH} levels of objects and arrays); flatten it"
# The end of a key: its closing quote and the colon, with any JSON white space between them.
_KEY_END = re.compile(rb'"[ \t\r\n]*:')

_CHAT_ROLES = {"system", "user", "assistant", "model"}
_GC_ROLES = {"user", "model", "assistant"}
_IMAGE_EXTENSIONS = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
_DETAILS = {"low", "high", "auto"}


# -- the rules for one text value -----------------------------------------------------------
# One message per rule, used by the record validator and by the DataFrame writer's
# vectorised checks alike.

TEXT_RULES = {
    "missing": "missing; add it",
    "null": "is null; give it text or drop the example",
    "type": "must be text (it must be a string, not {type})",
    "blank": "is blank (empty, or only white space or invisible characters); give it text or drop the example",
    "surrogate": "is not valid Unicode text (it holds a lone surrogate); fix or remove it",
}

# Characters that show nothing: white space, control and format characters (zero-width
# spaces and joiners, the byte-order mark, NUL ...) and a few fillers of other categories.
_INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})
_INVISIBLE_RANGES = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x2800, 0x2800),
                     (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xE0100, 0xE01EF))
_INVISIBLE_POINTS = frozenset(c for lo, hi in _INVISIBLE_RANGES for c in range(lo, hi + 1))
#: The same set as an RE2 pattern (Arrow's regex engine) matching a blank text.
BLANK_PATTERN = "^[\\p{Z}\\p{Cc}\\p{Cf}" + "".join(
    f"\\x{{{lo:04X}}}" + (f"-\\x{{{hi:04X}}}" if hi != lo else "") for lo, hi in _INVISIBLE_RANGES) + "]*$"


def is_blank(text: str) -> bool:
    """True when the text shows nothing: empty, or only white space and invisible characters."""
    for ch in text:
        if " " < ch < "\x7f":  # visible ASCII: the common first character
            return False
        if ord(ch) not in _INVISIBLE_POINTS and unicodedata.category(ch) not in _INVISIBLE_CATEGORIES:
            return False
    return True


def text_rule(value) -> str | None:
    """The TEXT_RULES key that ``value`` breaks as a text field, or None when it is good text."""
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    if not isinstance(value, str):
        return "type"
    if is_blank(value):
        return "blank"
    if not _is_unicode(value):
        return "surrogate"
    return None


def text_message(rule: str, value=None) -> str:
    """The message of a TEXT_RULES rule (``value`` names the wrong type)."""
    return TEXT_RULES[rule].format(type=json_type(value))


@dataclass
class Issue:
    """One problem found: where it is and what to do."""

    message: str
    line: int | None = None
    field: str | None = None

    def to_dict(self) -> dict:
        return {"line": self.line, "field": self.field, "message": self.message}

    @property
    def where(self) -> str:
        """Where the problem is: ``line 3, completion``, or ``row 'r2', column 'q'`` for a DataFrame row."""
        where = []
        # DataFrame rows are named by their index label in the field; lines are for files.
        if self.line is not None and not (self.field or "").startswith("row "):
            where.append(f"line {self.line}")
        if self.field:
            where.append(self.field)
        return ", ".join(where)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


@dataclass
class ValidationReport:
    """What the validator found in one dataset."""

    source: str
    format: str | None = None
    examples: int = 0
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    error_count: int = 0
    warning_count: int = 0
    dropped: int = 0
    images: int = 0
    #: Assistant turns with ``"weight": 0``: the local engine does not learn them; Vertex AI learns every turn.
    unlearned_turns: int = 0
    #: Preference data: the first pair's rejected answer (``example`` holds its prompt and chosen answer).
    example_rejected: str | None = field(default=None, repr=False)
    model: str | None = None
    method: str = "sft"
    #: Tokens of each valid example, in order: an example with an error has none (its count would mislead).
    token_lengths: object = field(default_factory=lambda: array("q"), repr=False)
    tokens_estimated: bool = True
    tokenizer_note: str = ""
    example: list[dict] | None = field(default=None, repr=False)
    #: The DataFrame's index when lines are its rows: issues then name the row by its label.
    row_labels: object = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    @property
    def valid_examples(self) -> int:
        """Examples without errors: those the token counts are taken over."""
        return len(self.token_lengths)

    def valid_scope(self) -> str:
        """What token counts are taken over: `` over the 57 valid rows`` when some examples have errors, else ''."""
        valid = self.valid_examples
        return f" over the {valid:,} valid row{'s' if valid != 1 else ''}" if valid < self.examples else ""

    @property
    def tokens(self) -> dict:
        """Token counts over the valid examples: total, max, mean, and whether they are estimated."""
        import numpy as np

        lengths = np.asarray(self.token_lengths, dtype=np.int64)
        total = int(lengths.sum())
        return {
            "total": total,
            "max": int(lengths.max()) if len(lengths) else 0,
            "mean": round(total / len(lengths), 1) if len(lengths) else 0.0,
            "estimated": self.tokens_estimated,
        }

    def length_histogram(self, bins: int = 8) -> list[tuple[int, int, int]]:
        """Token lengths of the valid examples in at most ``bins`` integer bins: [(first, last, count)].

        Bins are whole numbers of tokens wide, so no two bins cover the same lengths.
        """
        import numpy as np

        lengths = np.asarray(self.token_lengths, dtype=np.int64)
        lengths = lengths[lengths > 0]
        if not len(lengths):
            return []
        lo, hi = int(lengths.min()), int(lengths.max())
        width = -(-(hi - lo + 1) // bins)
        counts = np.bincount((lengths - lo) // width)
        return [(lo + i * width, min(hi, lo + (i + 1) * width - 1), int(c)) for i, c in enumerate(counts)]

    @property
    def example_preview(self):
        """The first example as the model sees it in training (a :class:`~.render.Preview`), or None."""
        from .render import preview

        return preview(self.example, self.model) if self.example else None

    @property
    def example_segments(self) -> list[tuple[str, bool]]:
        """The first example in the model's chat template, as (text, carries_loss) pieces."""
        found = self.example_preview
        return found.segments if found is not None else []

    def _field(self, line, field):
        if self.row_labels is None or line is None:
            return field
        label = self.row_labels[line - 1]
        label = label.item() if hasattr(label, "item") else label  # 5, not np.int64(5)
        return f"row {label!r}" + (f", {field}" if field else "")

    def error(self, message: str, line: int | None = None, field: str | None = None) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_LISTED:
            self.errors.append(Issue(message, line, self._field(line, field)))

    def warn(self, message: str, line: int | None = None, field: str | None = None) -> None:
        self.warning_count += 1
        if len(self.warnings) < MAX_LISTED:
            self.warnings.append(Issue(message, line, self._field(line, field)))

    def to_dict(self) -> dict:
        """The report as plain JSON-ready data (what ``--json`` prints)."""
        return {
            "ok": self.ok,
            "source": self.source,
            "format": self.format,
            "model": self.model,
            "method": self.method,
            "examples": self.examples,
            "errors": [e.to_dict() for e in self.errors],
            "error_count": self.error_count,
            "warnings": [w.to_dict() for w in self.warnings],
            "warning_count": self.warning_count,
            "tokens": self.tokens,
            "dropped": self.dropped,
        }

    def summary(self) -> str:
        """A few lines of plain text: verdict, counts, the first problems."""
        verdict = "valid" if self.ok else "INVALID"
        tok = self.tokens
        est = " (estimated)" if tok["estimated"] else ""
        lines = [
            f"{self.source}: {verdict}: {self.examples} examples ({self.format or 'unknown format'}), "
            f"{self.error_count} errors, {self.warning_count} warnings",
            f"tokens{est}{self.valid_scope()}: total {tok['total']:,}, max {tok['max']:,}, mean {tok['mean']:,}",
        ]
        if self.dropped:
            lines.append(f"dropped by the service: {self.dropped} examples")
        for issue in self.errors[:10]:
            lines.append(f"  error   {issue}")
        if self.error_count > 10:
            lines.append(f"  ... and {self.error_count - 10} more errors")
        for issue in self.warnings[:5]:
            lines.append(f"  warning {issue}")
        if self.warning_count > 5:
            lines.append(f"  ... and {self.warning_count - 5} more warnings")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        from ..display.dataset_report import report_html

        return report_html(self)

    def _repr_pretty_(self, printer, cycle) -> None:
        from ..display.dataset_report import report_text

        printer.text(report_text(self))


# -- one record -----------------------------------------------------------------


def preference_problems(record: dict, fmt: str) -> list[tuple[str, str | None]]:
    """What is wrong with one preference record: (message, field) pairs, empty when it is valid."""
    from .preference import PREFERENCE, TOP_KEYS, answer_text, parts_text

    found: list[tuple[str, str | None]] = []
    unknown = sorted(set(record) - TOP_KEYS[fmt])
    if unknown:
        found.append((f"unknown key {unknown[0]!r} for the {fmt} format; remove it", unknown[0]))
    if fmt == PREFERENCE:
        prompt = record.get("prompt")
        if isinstance(prompt, list):
            if not prompt or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
                found.append(("must be chat messages with text content", "prompt"))
            elif prompt[-1].get("role") != "user":
                found.append(("must end with a user turn, the one the two answers reply to", "prompt"))
        elif not isinstance(prompt, str) or is_blank(prompt):
            found.append(("is missing or empty; give the question both answers reply to", "prompt"))
        for key in ("chosen", "rejected"):
            text = answer_text(record.get(key))
            if text is None or is_blank(text):
                found.append((f"must be the {'preferred' if key == 'chosen' else 'rejected'} answer: a text or one "
                               "assistant message", key))
        if not found and answer_text(record["chosen"]).strip() == answer_text(record["rejected"]).strip():
            found.append(("is the same as rejected; a pair teaches nothing when both answers are one", "chosen"))
        return found
    contents = record.get("contents")
    if not isinstance(contents, list) or not contents:
        found.append(("must be a list of turns ending with the user's", "contents"))
    else:
        for i, turn in enumerate(contents):
            if not isinstance(turn, dict) or parts_text(turn.get("parts")) is None:
                found.append((f"turn {i + 1} must have text parts only (preference tuning is text only)", "contents"))
                break
        else:
            if contents[-1].get("role", "user") != "user":
                found.append(("must end with a user turn, the one the completions reply to", "contents"))
    completions = record.get("completions")
    if not isinstance(completions, list) or len(completions) != 2:
        found.append(("must hold exactly two completions, the preferred one scored 1 and the other 0",
                      "completions"))
        return found
    scores, texts = [], []
    for i, item in enumerate(completions):
        completion = item.get("completion") if isinstance(item, dict) else None
        if not isinstance(completion, dict) or completion.get("role", "model") != "model" or \
                parts_text(completion.get("parts")) is None:
            found.append((f"completion {i + 1} must be a model turn with text parts", "completions"))
        else:
            texts.append(parts_text(completion.get("parts")).strip())
        scores.append(item.get("score") if isinstance(item, dict) else None)
    if sorted(s for s in scores if isinstance(s, (int, float)) and not isinstance(s, bool)) != [0, 1]:
        found.append((f"scores must be 1 (preferred) and 0, not {scores}", "completions"))
    elif len(texts) == 2 and texts[0] == texts[1]:
        found.append(("hold the same answer twice; a pair teaches nothing when both answers are one", "completions"))
    return found


class RecordChecker:
    """Checks single records; shared by the file, record and DataFrame paths."""

    def __init__(self, report: ValidationReport, method: str):
        self.report = report
        self.method = method

    def check(self, record, line: int) -> tuple[str | None, bool]:
        """Check one record; returns (format, has_image). Problems go to the report."""
        if record is TOO_DEEP_CELL:
            self.report.error(TOO_DEEP, line)
            return None, False
        if not isinstance(record, dict):
            self.report.error(f"each line must be a JSON object, not {json_type(record)}", line)
            return None, False
        fmt = F.detect(record)
        if fmt is None:
            keys = ", ".join(sorted(record)) or "none"
            if {"input_text", "output_text"} & set(record):
                self.report.error("input_text/output_text is the retired Vertex AI format: rename them prompt and "
                                  "completion (tm.dataset(df, prompt='input_text', completion='output_text') "
                                  "converts a DataFrame)", line)
                return None, False
            self.report.error(
                f"unknown keys ({keys}); expected prompt/completion, messages, or contents", line
            )
            return None, False
        from . import preference

        if (fmt in preference.FORMATS) != (self.method == "preference"):
            if self.method == "preference":
                self.report.error("preference tuning needs pairs: prompt, chosen and rejected (or Vertex AI's "
                                  "contents and completions)", line)
            else:
                self.report.error(f"is preference data ({fmt}); tune it with method='preference'", line)
            return None, False
        if fmt in preference.FORMATS:
            for message, where in preference_problems(record, fmt):
                self.report.error(message, line, where)
            return fmt, False
        unknown = sorted(set(record) - F.TOP_KEYS[fmt])
        if unknown:
            self.report.error(f"unknown key {unknown[0]!r} for the {fmt} format; remove it", line, unknown[0])
        if fmt == F.CHAT:
            has_image = self._chat(record, line)
        elif fmt == F.GENERATE_CONTENT:
            has_image = self._generate_content(record, line)
        else:
            has_image = self._prompt_completion(record, line)
        return fmt, has_image

    # prompt/completion
    def _prompt_completion(self, record, line) -> bool:
        for key in ("prompt", "completion"):
            if key == "completion" and self.method == "distillation" and key not in record:
                continue
            self._text(record.get(key, _MISSING), line, key)
        return False

    def _text(self, value, line, field_name) -> bool:
        rule = text_rule(value)
        if rule is None:
            return True
        self.report.error(text_message(rule, value), line, field_name)
        return False

    # chat
    def _chat(self, record, line) -> bool:
        messages = record["messages"]
        if not isinstance(messages, list):
            self.report.error(f"must be a list of messages, not {json_type(messages)}", line, "messages")
            return False
        if not messages:
            self.report.error("is empty; add user and assistant messages", line, "messages")
            return False
        has_image = False
        roles = []
        learned = 0
        for i, msg in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(msg, dict):
                self.report.error(f"must be an object with role and content, not {json_type(msg)}", line, where)
                continue
            extra = sorted(set(msg) - {"role", "content", "weight"})
            if extra:
                self.report.error(f"unknown key {extra[0]!r}; a message has role and content", line, f"{where}.{extra[0]}")
            if "weight" in msg:
                # OpenAI's chat format: an assistant turn's weight 0 (not learned) or 1 (learned).
                if msg.get("role") not in ("assistant", "model"):
                    self.report.error("only an assistant turn has a weight (0: not learned, 1: learned)", line,
                                      f"{where}.weight")
                elif isinstance(msg["weight"], bool) or msg["weight"] not in (0, 1):
                    self.report.error(f"must be 0 (not learned) or 1 (learned), not {msg['weight']!r}", line,
                                      f"{where}.weight")
                elif msg["weight"] == 0:
                    self.report.unlearned_turns += 1
                else:
                    learned += 1
            elif msg.get("role") in ("assistant", "model"):
                learned += 1
            role = msg.get("role", _MISSING)
            if role is _MISSING or role is None:
                self.report.error("missing; use system, user or assistant", line, f"{where}.role")
            elif not isinstance(role, str) or role not in _CHAT_ROLES:
                self.report.error(f"unknown role {role!r}; use system, user or assistant", line, f"{where}.role")
            else:
                roles.append("assistant" if role == "model" else role)
                if role == "system" and i != 0:
                    self.report.error("a system message must come first", line, f"{where}.role")
            has_image |= self._chat_content(msg.get("content", _MISSING), line, f"{where}.content")
        self._turns(roles, line, "messages")
        if self.method == "sft" and "assistant" in roles and not learned:
            self.report.error("every assistant turn has weight 0: nothing to learn; set weight 1 on the answers to "
                              "learn", line, "messages")
        return has_image

    def _chat_content(self, content, line, where) -> bool:
        if isinstance(content, list):
            if not content:
                self.report.error("is an empty list of parts; add a text part", line, where)
                return False
            has_image = False
            for j, part in enumerate(content):
                pw = f"{where}[{j}]"
                if not isinstance(part, dict):
                    self.report.error(f"must be an object with a type, not {json_type(part)}", line, pw)
                    continue
                kind = part.get("type")
                if kind == "text":
                    extra = sorted(set(part) - {"type", "text"})
                    if extra:
                        self.report.error(f"unknown key {extra[0]!r} in a text part", line, f"{pw}.{extra[0]}")
                    self._text(part.get("text", _MISSING), line, f"{pw}.text")
                elif kind == "image_url":
                    has_image = True
                    self._image_url_part(part, line, pw)
                else:
                    self.report.error(f"unknown part type {kind!r}; use text or image_url", line, f"{pw}.type")
            return has_image
        self._text(content, line, where)
        return False

    def _image_url_part(self, part, line, where) -> None:
        extra = sorted(set(part) - {"type", "image_url"})
        if extra:
            self.report.error(f"unknown key {extra[0]!r} in an image_url part", line, f"{where}.{extra[0]}")
        image = part.get("image_url", _MISSING)
        if isinstance(image, str):
            url = image
        elif isinstance(image, dict):
            bad = sorted(set(image) - {"url", "detail"})
            if bad:
                self.report.error(f"unknown key {bad[0]!r}; image_url has url and detail", line, f"{where}.image_url.{bad[0]}")
            detail = image.get("detail")
            if detail is not None and (not isinstance(detail, str) or detail not in _DETAILS):
                self.report.error(f"detail must be low, high or auto, not {detail!r}", line, f"{where}.image_url.detail")
            url = image.get("url", _MISSING)
        else:
            self.report.error("missing or not an object with a url", line, f"{where}.image_url")
            return
        self._image_uri(url, line, f"{where}.image_url.url")

    def _image_uri(self, url, line, where, mime: str | None = None) -> None:
        if not self._text(url, line, where):
            return
        if url.startswith("data:"):
            self._data_uri(url, line, where)
            return
        if not url.startswith(("gs://", "https://", "http://")):
            if not is_local_image(url):
                self.report.error("must be a gs://, https:// or data: URI, or an image file on this machine "
                                  "(not found here)", line, where)
                return
        path = url.split("?", 1)[0].lower()
        ext = "." + path.rsplit(".", 1)[-1] if "." in path.rsplit("/", 1)[-1] else ""
        if ext and ext not in _IMAGE_EXTENSIONS:
            self.report.error(f"{ext} images are not supported; use JPEG, PNG or WEBP", line, where)

    def _data_uri(self, url, line, where) -> None:
        header, sep, payload = url.partition(",")
        mime = header[5:].split(";", 1)[0]
        if not sep or ";base64" not in header:
            self.report.error("a data: URI must look like data:image/jpeg;base64,<data>", line, where)
            return
        if mime not in F.IMAGE_MIME_TYPES:
            self.report.error(f"{mime or 'missing'} images are not supported; use image/jpeg, image/png or image/webp", line, where)
            return
        self._base64(payload, line, where)

    def _base64(self, payload, line, where) -> None:
        try:
            if not payload:
                raise binascii.Error("empty")
            base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            self.report.error("the image data is not valid base64", line, where)

    def _turns(self, roles: list[str], line, where) -> None:
        convo = [r for r in roles if r != "system"]
        if not convo:
            self.report.error("has no user or assistant turn", line, where)
            return
        if self.method == "sft" and "assistant" not in convo:
            self.report.error("has no assistant turn to learn from; add the answer (or use method='distillation')", line, where)
        elif self.method == "sft" and convo[-1] != "assistant":
            # For distillation a last user turn is the prompt; for tuning it is a cut-off example.
            self.report.error("ends with a user turn that has no answer (a truncated example); add the answer "
                              "or remove the last turn", line, where)
        if convo and convo[0] != "user":
            self.report.error("must start with a user turn (after the system message)", line, where)

    # GenerateContent
    def _generate_content(self, record, line) -> bool:
        system = F.get(record, "system_instruction", "systemInstruction")
        key = "systemInstruction" if "systemInstruction" in record else "system_instruction"
        if system is not None:
            if not isinstance(system, dict) or not isinstance(system.get("parts"), list) or not system["parts"]:
                self.report.error("must be an object with a non-empty parts list", line, key)
            else:
                extra = sorted(set(system) - {"parts", "role"})
                if extra:
                    self.report.error(f"unknown key {extra[0]!r}", line, f"{key}.{extra[0]}")
                for j, part in enumerate(system["parts"]):
                    if not isinstance(part, dict) or set(part) != {"text"}:
                        self.report.error("system instruction parts must be text parts", line, f"{key}.parts[{j}]")
                    else:
                        self._text(part["text"], line, f"{key}.parts[{j}].text")
        contents = record.get("contents", _MISSING)
        if contents is _MISSING:
            self.report.error("missing; add the conversation turns", line, "contents")
            return False
        if not isinstance(contents, list):
            self.report.error(f"must be a list of turns, not {json_type(contents)}", line, "contents")
            return False
        has_image = False
        roles = []
        for i, turn in enumerate(contents):
            where = f"contents[{i}]"
            if not isinstance(turn, dict):
                self.report.error(f"must be an object with role and parts, not {json_type(turn)}", line, where)
                continue
            extra = sorted(set(turn) - {"role", "parts"})
            if extra:
                self.report.error(f"unknown key {extra[0]!r}; a turn has role and parts", line, f"{where}.{extra[0]}")
            role = turn.get("role")
            if not isinstance(role, str) or role not in _GC_ROLES:
                self.report.error(f"role must be user or model, not {role!r}", line, f"{where}.role")
            else:
                roles.append("assistant" if role in ("model", "assistant") else "user")
            parts = turn.get("parts", _MISSING)
            if not isinstance(parts, list) or not parts:
                self.report.error("must be a non-empty list of parts", line, f"{where}.parts")
                continue
            for j, part in enumerate(parts):
                has_image |= self._gc_part(part, line, f"{where}.parts[{j}]")
        self._turns(roles, line, "contents")
        return has_image

    def _gc_part(self, part, line, where) -> bool:
        if not isinstance(part, dict):
            self.report.error(f"must be an object, not {json_type(part)}", line, where)
            return False
        kinds = [k for k in part if k in ("text", "file_data", "fileData", "inline_data", "inlineData")]
        extra = sorted(set(part) - set(kinds))
        if extra:
            self.report.error(f"unknown key {extra[0]!r}; a part has text, fileData or inlineData", line, f"{where}.{extra[0]}")
            return False
        if len(kinds) != 1:
            self.report.error("a part needs exactly one of text, fileData or inlineData", line, where)
            return False
        kind = kinds[0]
        if kind == "text":
            self._text(part["text"], line, f"{where}.text")
            return False
        data = part[kind]
        if not isinstance(data, dict):
            self.report.error("must be an object", line, f"{where}.{kind}")
            return True
        mime = F.get(data, "mime_type", "mimeType")
        mime_key = "mime_type" if "mime_type" in data else "mimeType"
        if mime is None:
            self.report.error("missing; use image/jpeg, image/png or image/webp", line, f"{where}.{kind}.{mime_key}")
        elif mime not in F.IMAGE_MIME_TYPES:
            self.report.error(f"{mime} is not supported; use image/jpeg, image/png or image/webp", line, f"{where}.{kind}.{mime_key}")
        if kind in ("file_data", "fileData"):
            uri_key = "file_uri" if "file_uri" in data else "fileUri"
            uri = F.get(data, "file_uri", "fileUri", _MISSING)
            if (self._text(uri, line, f"{where}.{kind}.{uri_key}")
                    and not uri.startswith(("gs://", "https://", "http://")) and not is_local_image(uri)):
                self.report.error("must be a gs:// or https:// URI, or an image file on this machine (not found "
                                  "here)", line, f"{where}.{kind}.{uri_key}")
        else:
            self._base64(data.get("data", ""), line, f"{where}.{kind}.data")
        return True


def is_local_image(uri: str) -> bool:
    """True for a path (not a URI) of an image file on this machine: uploaded when the dataset goes to the cloud."""
    if "://" in uri or uri.startswith("data:"):
        return False
    try:
        return Path(uri).expanduser().is_file()
    except (OSError, ValueError):
        return False


class _Missing:
    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()
_NOT_JSON = object()  # a line that is not JSON: the line itself stands for the record
#: Stands for a DataFrame row with a cell nested too deeply to read.
TOO_DEEP_CELL = object()


def _is_unicode(text: str) -> bool:
    """False for text that cannot be written as UTF-8 (lone surrogates, e.g. from a cut emoji)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_type(value) -> str:
    """What a value is, in words: "null", "a number", "a string", ... ("a Timestamp" for other types)."""
    import numbers

    if value is None:
        return "null"
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):
        return "a boolean"
    if isinstance(value, numbers.Number):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


# -- reading files ------------------------------------------------------------------------------

# First bytes of files that are often handed over in place of JSONL.
_MAGIC = (
    (b"\x1f\x8b", "looks gzip-compressed", "decompress it first (gunzip FILE)"),
    (b"PK\x03\x04", "looks like a zip archive", "extract the JSONL file from it first"),
    (b"PAR1", "looks like a Parquet file", "read it with pandas.read_parquet and pass the DataFrame"),
    (b"BZh", "looks bzip2-compressed", "decompress it first (bunzip2 FILE)"),
    (b"\xfd7zXZ\x00", "looks xz-compressed", "decompress it first (unxz FILE)"),
    (b"\x28\xb5\x2f\xfd", "looks zstd-compressed", "decompress it first (unzstd FILE)"),
    (b"\xff\xfe", "is UTF-16 text", "save it as UTF-8"),
    (b"\xfe\xff", "is UTF-16 text", "save it as UTF-8"),
)


def _not_text(first: bytes) -> str | None:
    """Why a file whose first line is ``first`` is not JSONL text at all, or None."""
    for magic, what, fix in _MAGIC:
        if first.startswith(magic):
            return f"the file {what}, not JSONL text; {fix}"
    if b"\x00" in first:
        return "the file holds NUL bytes: it is binary (or UTF-16) data, not JSONL text; give a UTF-8 JSONL file"
    return None


def _raw_lines(fh, report: ValidationReport) -> Iterator[tuple[int, bytes]]:
    """(line number, stripped bytes) of every non-blank line, each at most MAX_LINE_BYTES.

    A longer line is one error, and the rest of it is read past in chunks. A file
    that is compressed or binary is one error, and nothing more of it is read.
    """
    limit = MAX_LINE_BYTES
    number = 0
    while True:
        raw = fh.readline(limit + 1)
        if not raw:
            return
        number += 1
        if number == 1:
            problem = _not_text(raw)
            if problem:
                report.error(problem)
                return
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
        if len(raw) > limit and not raw.endswith(b"\n"):
            report.examples += 1
            report.error(f"is longer than {limit:,} bytes, the most one example may take; shorten it "
                         "(images: give gs:// URIs rather than inline data)", number)
            while True:
                chunk = fh.readline(_SKIP_CHUNK)
                if not chunk or chunk.endswith(b"\n"):
                    break
                if b"\x00" in chunk:  # binary data, where a newline may never come
                    report.error("holds NUL bytes: the rest of the file is binary data, not JSONL text", number)
                    return
            continue
        stripped = raw.strip()
        if stripped:
            yield number, stripped


def _parsed(lines: Iterable[tuple[int, bytes]], report: ValidationReport) -> Iterator[tuple[int, object]]:
    import orjson

    loads, dumps = orjson.loads, orjson.dumps
    for number, raw in lines:
        try:
            record = loads(raw)
        except orjson.JSONDecodeError as exc:
            report.examples += 1
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                report.error(f"is not valid UTF-8 (byte {bad.start + 1}); save the file as UTF-8", number)
            else:
                deep = exc.msg.startswith("depth limit")  # orjson reads at most 1024 levels
                report.error(TOO_DEEP if deep else f"is not valid JSON ({exc.msg} at column {exc.colno})", number)
            continue
        if type(record) is not dict:
            yield number, record
            continue
        try:
            written = dumps(record)
        except TypeError:  # the only thing orjson cannot write back of what it read: too many levels
            report.examples += 1
            report.error(TOO_DEEP, number)
            continue
        # orjson keeps the last of duplicate keys silently. A line naming more keys than the
        # parsed record holds is parsed again, slowly, to find the duplicate. A compact line
        # (orjson's own spelling, as dataset() writes) that re-serialises to its own length
        # lost nothing, which spares counting.
        if len(written) != len(raw) and len(_KEY_END.findall(raw)) > _key_count(record):
            duplicate = _duplicate_key(raw)
            if duplicate is not None:
                report.examples += 1
                report.error(f"key {duplicate!r} appears twice in one object; keep one (JSON readers keep only "
                             "the last, silently)", number, duplicate)
                continue
        yield number, record


def _key_count(value) -> int:
    """Keys of every object inside ``value`` (a dict or a list), counted recursively."""
    if type(value) is dict:
        n, children = len(value), value.values()
    else:
        n, children = 0, value
    for child in children:
        if type(child) in (dict, list):
            n += _key_count(child)
    return n


def _duplicate_key(raw: bytes) -> str | None:
    import json

    found = []

    def pairs(items):
        seen = set()
        for key, _ in items:
            if key in seen and not found:
                found.append(key)
            seen.add(key)
        return dict(items)

    json.loads(raw, object_pairs_hook=pairs)
    return found[0] if found else None


# -- whole datasets -------------------------------------------------------------------


def check_records(
    records: Iterable[tuple[int, object]],
    report: ValidationReport,
    *,
    model=None,
    counter: TokenCounter | None = None,
    bad_lines: set | None = None,
) -> ValidationReport:
    """Validate numbered records into ``report``: per-record checks, then dataset-wide rules.

    ``bad_lines``, when given, collects the line of every example with an error.
    """
    from concurrent.futures import ThreadPoolExecutor

    checker = RecordChecker(report, report.method)
    counter = counter or TokenCounter(model.id if model else None)
    batched = counter.kind == TOKENIZER
    lengths = report.token_lengths = array("q")
    max_len = model.max_seq_len if model else None
    first_line = None
    text_only, text_only_lines = 0, []
    pending: list[tuple[int, int, list]] = []
    pending_chars = 0

    def record_length(slot: int, line: int, n: int) -> None:
        lengths[slot] = n
        if max_len and n > max_len:
            report.warn(f"is about {n:,} tokens; {model.id} takes at most {max_len:,}, so it will be truncated", line)

    # A batch is counted on a thread (the Rust encoder releases the GIL) while the next one is read.
    inflight: list[tuple[list, object]] = []

    def collect() -> None:
        for batch, future in inflight:
            for (slot, line, _), n in zip(batch, future.result()):
                record_length(slot, line, n)
        inflight.clear()

    def flush() -> None:
        nonlocal pending
        collect()
        if pending:
            inflight.append((pending, pool.submit(counter.count_many, [m for _, _, m in pending])))
            pending = []

    with ThreadPoolExecutor(1, thread_name_prefix="tuning-magics-tokens") as pool:
        for line, record in records:
            report.examples += 1
            before = report.error_count
            fmt, has_image = checker.check(record, line)
            if fmt is not None:
                if report.format is None:
                    report.format, first_line = fmt, line
                elif fmt != report.format:
                    report.error(
                        f"is {fmt} but line {first_line} is {report.format}; one file holds one format", line
                    )
            if has_image and report.error_count == before:
                report.images += 1
                if model is not None and not model.multimodal:
                    report.error(f"has an image but {model.id} is text-only; remove images or pick an image model",
                                 line)
            if report.error_count != before or fmt is None:
                if bad_lines is not None:
                    bad_lines.add(line)
                continue
            if not has_image:
                text_only += 1
                if len(text_only_lines) < 20:
                    text_only_lines.append(line)
            messages = F.to_messages(record, fmt)
            lengths.append(0)  # a valid example's slot: its count comes now or with its batch
            if report.example is None:
                report.example = messages
                if fmt in ("preference", "gemini_preference"):
                    from .preference import pair_of

                    report.example_rejected = pair_of(record, fmt)[2]
            if batched:
                pending.append((len(lengths) - 1, line, messages))
                pending_chars += sum(len(F.text_of(m["content"])) for m in messages)
                if len(pending) >= BATCH_EXAMPLES or pending_chars >= BATCH_CHARS:
                    flush()
                    pending_chars = 0
            else:
                record_length(len(lengths) - 1, line, counter.count(messages))
        flush()
        collect()
    if report.examples == 0 and report.ok:  # after errors, "no examples" would only repeat them
        report.error("the dataset has no examples; add at least one line")
    if report.images and text_only:
        report.dropped = text_only
        report.warn(
            f"{text_only} text-only examples will be dropped: the dataset has images, and the service "
            "drops every text-only example of an image dataset; add images to them or split the dataset"
        )
        for line in text_only_lines:
            report.warn("is text-only in an image dataset: the service will drop it", line)
    if report.unlearned_turns and model is not None and model.provider != "local":
        n = report.unlearned_turns
        report.warn(f"{n:,} assistant turn{'s have' if n != 1 else ' has'} weight 0: the local engine does not learn "
                    f"{'them' if n != 1 else 'it'}, but Vertex AI learns every model turn; drop such turns (with the "
                    "user turn each answers) to keep them out there, or tune with backend='local'")
    report.tokens_estimated = counter.estimated
    report.tokenizer_note = counter.note
    return report


def _resolve_model(model):
    from .. import catalog
    from ..errors import UserError

    if model is None or isinstance(model, catalog.Model):
        return model
    if not isinstance(model, str):
        raise UserError(f"model must be a model id such as 'local/tiny-qwen3', not {model!r}", field="model")
    return catalog.get(model)


def _check_method(method: str) -> str:
    from ..catalog import METHOD_SPELLINGS, METHODS
    from ..errors import UserError

    m = METHOD_SPELLINGS.get(method.strip().lower()) if isinstance(method, str) else None
    if m not in METHODS:
        raise UserError(f"method must be {', '.join(METHODS[:-1])} or {METHODS[-1]}, not {method!r}", field="method")
    return m


def validate(
    source,
    model: str | None = None,
    method: str = "sft",
    *,
    training: object | None = None,
) -> ValidationReport:
    """Validate a dataset: a local path, a gs:// URI, a DataFrame or a list of records.

    ``model`` (any catalog spelling) adds the model's rules: sequence length,
    modality and its own tokenizer where available offline. ``method`` is
    ``"sft"`` (every example needs an answer), ``"distillation"`` (prompts
    alone are enough) or ``"preference"`` (pairs: a prompt, the preferred answer
    and the rejected one; see :mod:`tuning_magics.datasets.preference`). Pass the training set as ``training=`` when validating
    a validation set: it may hold at most 5000 examples, must differ from it,
    and for open models may be at most 25% of its size in bytes.
    """
    method = _check_method(method)
    spec = _resolve_model(model)
    report = ValidationReport(source=_describe(source), model=spec.id if spec else None, method=method)
    counter = TokenCounter(spec.id if spec else None)
    if isinstance(source, (list, tuple)):
        check_records(enumerate(source, start=1), report, model=spec, counter=counter)
    elif is_dataframe(source):
        check_records(enumerate(_frame_records(source), start=1), report, model=spec, counter=counter)
    else:
        from .. import storage

        with storage.open_read(_uri(source)) as fh:
            check_records(_parsed(_raw_lines(fh, report), report), report, model=spec, counter=counter)
    if training is not None:
        _check_validation_set(report, source, training, spec)
    return report


def _uri(source) -> str:
    return str(getattr(source, "uri", source))


def _frame_records(df) -> Iterator[dict]:
    """The rows of a DataFrame whose columns are record keys, as plain records (missing cells as null)."""
    for r in df.to_dict(orient="records"):
        try:
            record = {k: (None if _is_na(v) else plain(v)) for k, v in r.items()}
        except RecursionError:
            record = TOO_DEEP_CELL
        yield record


def _check_validation_set(report: ValidationReport, source, training, spec=None) -> None:
    from ..catalog import GEMINI_VALIDATION_FREE, MAX_VALIDATION_EXAMPLES, validation_limit

    train_fingerprint, train_examples = _fingerprint(training, count=True)
    limit = MAX_VALIDATION_EXAMPLES
    if spec is not None and report.examples > GEMINI_VALIDATION_FREE:
        limit = validation_limit(spec, train_examples)
    if report.examples > limit:
        why = "" if limit == MAX_VALIDATION_EXAMPLES else (
            f" for {spec.id} with {train_examples:,} training examples (30% of them, above 1,000)")
        report.error(
            f"the validation set has {report.examples:,} examples; the service takes at most "
            f"{limit:,}{why}: sample it down"
        )
    if _fingerprint(source) == train_fingerprint:
        report.error("the validation set is identical to the training set; hold out different examples")
    if spec is not None and spec.provider == "open":
        from ..catalog import OPEN_VALIDATION_BYTES_SHARE

        size, train_size = _jsonl_bytes(source), _jsonl_bytes(training)
        if train_size and size > OPEN_VALIDATION_BYTES_SHARE * train_size:
            report.error(
                f"the validation set is {size:,} bytes, {size / train_size:.2%} of the training set's {train_size:,}; "
                f"for open models the service takes at most {OPEN_VALIDATION_BYTES_SHARE:.0%}: hold out fewer "
                f"examples (at most {int(OPEN_VALIDATION_BYTES_SHARE * train_size):,} bytes)"
            )


def _jsonl_bytes(source) -> int:
    """The size in bytes of ``source`` as a JSONL file: the file's own size, or the lines its records make."""
    if isinstance(source, (list, tuple)) or is_dataframe(source):
        import orjson

        return sum(len(orjson.dumps(r, default=str, option=orjson.OPT_SERIALIZE_NUMPY)) + 1
                   for r, _ in _records_of(source))
    from .. import storage

    return storage.size(_uri(source))


def _fingerprint(source, *, count: bool = False):
    """A hash of the examples themselves: the same data gives the same hash whether it is a
    file, a DataFrame or a list of records, whatever its key order and white space.

    With ``count=True``, ``(hash, number of examples)``.
    """
    import hashlib

    import orjson

    h = hashlib.sha256()
    examples = 0
    for record, raw in _records_of(source):
        examples += 1
        if record is not _NOT_JSON:
            try:
                h.update(orjson.dumps(record, default=str, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)
                         + b"\n")
                continue
            except TypeError:  # nested too deeply to write: compared as it is, like a line that is not JSON
                pass
        h.update(b"\x00" + (raw if raw is not None else b"%d" % id(record)) + b"\n")  # else by identity
    return (h.hexdigest(), examples) if count else h.hexdigest()


def _records_of(source) -> Iterator[tuple[object, bytes | None]]:
    """(record, its line) of a JSONL file, or (record, None) of a list or a DataFrame.

    A line that is not JSON gives itself in place of the record.
    """
    if isinstance(source, (list, tuple)):
        yield from ((r, None) for r in source)
    elif is_dataframe(source):
        yield from ((r, None) for r in _frame_records(source))
    else:
        import orjson

        from .. import storage

        with storage.open_read(_uri(source)) as fh:
            for _, raw in _raw_lines(fh, ValidationReport(source="")):
                try:
                    yield orjson.loads(raw), raw
                except orjson.JSONDecodeError:
                    yield _NOT_JSON, raw


def plain(value):
    """Plain Python from what a DataFrame cell may hold: numpy arrays become lists, numpy scalars numbers.

    Parquet and Hugging Face datasets hand message lists back as numpy arrays.
    """
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        return plain(value.tolist())
    return value


def is_dataframe(obj) -> bool:
    """True for a pandas DataFrame (told by its class, so pandas is not imported to ask)."""
    return any(c.__name__ == "DataFrame" and c.__module__.split(".")[0] == "pandas" for c in type(obj).__mro__)


def _is_na(value) -> bool:
    """True for a missing cell: None, NaN, NA or NaT. Text, numbers, lists and arrays are values."""
    if value is None:
        return True
    if hasattr(value, "__len__"):  # text, lists, dicts, arrays
        return False
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _describe(source) -> str:
    if isinstance(source, (list, tuple)):
        return f"<{len(source)} records>"
    if is_dataframe(source):
        return f"<DataFrame {len(source)} rows>"
    return _uri(source)
