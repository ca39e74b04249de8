"""Which models can be tuned, how, and where.

The facts come from the managed service's documentation: supported base
models with their tuning modes, maximum sequence length and modality,
distillation teachers and students, regions, and the Gemini models that
google-genai can tune. The built-in ``local/tiny-*`` models are real
transformers architectures at toy size for the embedded engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

FULL = "FULL"
PEFT = "PEFT_ADAPTER"
TUNING_MODES = (FULL, PEFT)
METHODS = ("sft", "distillation")

REGIONS = ("us-central1", "europe-west4", "us-west1", "us-east5", "asia-southeast1")

#: Largest validation set the service accepts.
MAX_VALIDATION_EXAMPLES = 5000


@dataclass(frozen=True)
class Model:
    """One tunable base model."""

    id: str
    family: str
    modes: tuple[str, ...]
    max_seq_len: int
    modalities: tuple[str, ...] = ("text",)
    hf_repo: str | None = None
    provider: str = "open"  # "open", "gemini" or "local"
    distillation_student: bool = False
    adapter_sizes: tuple[int, ...] = ()
    params: str = ""
    notes: str = ""
    #: List price of one million training tokens in USD, where it is published.
    price_per_million_tokens: float | None = None

    @property
    def multimodal(self) -> bool:
        return "image" in self.modalities

    @property
    def short_name(self) -> str:
        return self.id.split("@")[-1].split("/")[-1]


@dataclass(frozen=True)
class Teacher:
    """A model that can label prompts for distillation."""

    id: str
    hf_repo: str | None = None
    thinking: bool = False
    notes: str = ""


def _open(id, family, modes, hf, params, *, student=False, seq=8192, modalities=("text",)):
    return Model(id, family, modes, seq, modalities, hf, "open", student, (), params)


_MODELS: tuple[Model, ...] = (
    _open("google/gemma3@gemma-3-1b-it", "gemma3", (FULL,), "google/gemma-3-1b-it", "1B", student=True),
    _open("google/gemma3@gemma-3-4b-it", "gemma3", (FULL,), "google/gemma-3-4b-it", "4B", student=True),
    _open("google/gemma3@gemma-3-12b-it", "gemma3", (FULL,), "google/gemma-3-12b-it", "12B", student=True),
    _open("google/gemma3@gemma-3-27b-it", "gemma3", (PEFT, FULL), "google/gemma-3-27b-it", "27B", student=True),
    _open("google/medgemma@medgemma-4b-it", "gemma3", (FULL,), "google/medgemma-4b-it", "4B"),
    _open("meta/llama3_1@llama-3.1-8b", "llama", (PEFT, FULL), "meta-llama/Llama-3.1-8B", "8B"),
    _open("meta/llama3_1@llama-3.1-8b-instruct", "llama", (PEFT, FULL), "meta-llama/Llama-3.1-8B-Instruct", "8B"),
    _open("meta/llama3-2@llama-3.2-1b-instruct", "llama", (FULL,), "meta-llama/Llama-3.2-1B-Instruct", "1B"),
    _open("meta/llama3-2@llama-3.2-3b-instruct", "llama", (FULL,), "meta-llama/Llama-3.2-3B-Instruct", "3B"),
    _open("meta/llama3-3@llama-3.3-70b-instruct", "llama", (PEFT, FULL), "meta-llama/Llama-3.3-70B-Instruct", "70B"),
    _open("qwen/qwen3@qwen3-4b", "qwen3", (FULL,), "Qwen/Qwen3-4B", "4B", student=True),
    _open("qwen/qwen3@qwen3-8b", "qwen3", (FULL,), "Qwen/Qwen3-8B", "8B", student=True),
    _open("qwen/qwen3@qwen3-14b", "qwen3", (FULL,), "Qwen/Qwen3-14B", "14B", student=True),
    _open("qwen/qwen3@qwen3-32b", "qwen3", (PEFT, FULL), "Qwen/Qwen3-32B", "32B", student=True),
    _open(
        "meta/llama4@llama-4-scout-17b-16e-instruct", "llama4", (PEFT,),
        "meta-llama/Llama-4-Scout-17B-16E-Instruct", "17B active / 109B", seq=2048, modalities=("text", "image"),
    ),
    # Gemini: LoRA only, tuned through google-genai; adapter size, epochs and a
    # learning-rate multiplier are the knobs.
    *(
        Model(gid, "gemini", (PEFT,), 131072, ("text", "image", "audio", "video", "document"), None, "gemini",
              False, (1, 2, 4, 8, 16), "", price_per_million_tokens=price)
        for gid, price in (
            ("gemini-2.5-pro", 25.0),
            ("gemini-2.5-flash", 5.0),
            ("gemini-2.5-flash-lite", 1.5),
            ("gemini-2.0-flash-001", 3.0),
            ("gemini-2.0-flash-lite-001", 1.0),
        )
    ),
    # The embedded engine's built-in toy models: real architectures, a byte-level
    # tokenizer and chat template built by the project; they tune on a CPU in seconds.
    *(
        Model(f"local/tiny-{fam}", fam, (FULL, PEFT), 1024, ("text",), None, "local", True, (), "<1M",
              "built-in toy model for tests, tutorials and CI", price_per_million_tokens=0.0)
        for fam in ("qwen3", "llama", "gemma3")
    ),
)

_TEACHERS: tuple[Teacher, ...] = (
    Teacher("deepseek-ai/deepseek-r1-0528-maas", "deepseek-ai/DeepSeek-R1-0528", True),
    Teacher("deepseek-ai/deepseek-v3.2-maas", "deepseek-ai/DeepSeek-V3.2", False),
    Teacher("qwen/qwen3-next-80b-a3b-thinking-maas", "Qwen/Qwen3-Next-80B-A3B-Thinking", True),
)

_BY_ID = {m.id: m for m in _MODELS}
# Users type the short names too ("qwen3-4b", "gemma-3-1b-it", "Qwen/Qwen3-4B").
_ALIASES = {}
for _m in _MODELS:
    for _alias in {_m.short_name, _m.hf_repo}:
        if _alias:
            _ALIASES.setdefault(_alias.lower(), _m.id)


def models(*, provider: str | None = None, mode: str | None = None, student: bool | None = None) -> list[Model]:
    """Every tunable model, optionally filtered by provider, tuning mode or distillation-student role."""
    out = list(_MODELS)
    if provider:
        out = [m for m in out if m.provider == provider]
    if mode:
        out = [m for m in out if mode in m.modes]
    if student is not None:
        out = [m for m in out if m.distillation_student == student]
    return out


def teachers() -> list[Teacher]:
    """The distillation teachers of the managed service."""
    return list(_TEACHERS)


def resolve(model_id: str) -> str:
    """The catalog id for a catalog id, short name or Hugging Face repo id."""
    if model_id in _BY_ID:
        return model_id
    found = _ALIASES.get(str(model_id).lower())
    if found:
        return found
    return model_id


def find(model_id: str | None) -> Model | None:
    """The catalog entry for ``model_id`` (any accepted spelling), or None when it is not in the catalog."""
    if not model_id:
        return None
    return _BY_ID.get(resolve(model_id))


def get(model_id: str) -> Model:
    """The catalog entry for ``model_id``; a UserError naming close matches when it is unknown."""
    found = find(model_id)
    if found is None:
        import difflib

        needle = str(model_id).lower()
        # Ids that contain what was typed ("llama4", "gemma3"), then spellings that look alike.
        contains = [m for m in _BY_ID if len(needle) >= 3 and needle in m.lower()]
        alike = difflib.get_close_matches(str(model_id), [*_BY_ID, *_ALIASES], n=3, cutoff=0.5)
        close = list(dict.fromkeys(contains + [resolve(c) for c in alike]))[:3]
        hint = f"; did you mean {', '.join(close)}?" if close else "; list them with %tune_models or `tuning-magics models`"
        raise UserError(f"model {model_id!r} is not in the catalog{hint}", field="model")
    return found


def get_teacher(teacher_id: str) -> Teacher | None:
    """The catalog teacher for ``teacher_id``, or None (local folders and endpoints are also teachers)."""
    for t in _TEACHERS:
        if teacher_id in (t.id, t.hf_repo):
            return t
    return None


#: Every accepted spelling of a tuning mode (upper case), and the mode it means.
_MODE_SPELLINGS = {"FULL": FULL, "PEFT": PEFT, "PEFT_ADAPTER": PEFT, "LORA": PEFT, "ADAPTER": PEFT}


def normalise_mode(mode) -> str:
    """``FULL`` or ``PEFT_ADAPTER`` for any accepted spelling (``full``, ``lora``, ``peft``, ...); else a UserError."""
    norm = _MODE_SPELLINGS.get(str(mode).strip().upper().replace("-", "_"))
    if norm is None:
        raise UserError(f"tuning_mode must be FULL or PEFT_ADAPTER, not {mode!r}", field="tuning_mode")
    return norm


def check_mode(model: Model, mode: str) -> str:
    """Normalise a tuning mode (see :func:`normalise_mode`) and check the model supports it."""
    norm = normalise_mode(mode)
    if norm not in model.modes:
        raise UserError(
            f"{model.id} supports tuning_mode {' or '.join(model.modes)}, not {norm}; "
            f"choose one of those or another model",
            field="tuning_mode",
        )
    return norm


def check_region(region: str) -> str:
    """Check that open-model tuning runs in ``region``."""
    if region not in REGIONS:
        raise UserError(
            f"location {region!r} does not run open-model tuning; use one of {', '.join(REGIONS)}",
            field="location",
        )
    return region


def table():
    """The catalog as a pandas DataFrame, one row per model."""
    import pandas as pd

    rows = [
        {
            "model": m.id,
            "provider": m.provider,
            "modes": ", ".join(m.modes),
            "max_seq_len": m.max_seq_len,
            "modality": ", ".join(m.modalities),
            "distillation student": "yes" if m.distillation_student else "",
            "hf_repo": m.hf_repo or "",
        }
        for m in _MODELS
    ]
    return pd.DataFrame(rows)
