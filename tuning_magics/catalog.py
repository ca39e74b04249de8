"""Which models can be tuned, how, and where.

The facts come from the managed service's documentation: supported base
models with their tuning modes, maximum sequence length and modality,
distillation teachers and students, regions, and the Gemini models that
google-genai can tune. The built-in ``local/tiny-*`` models are real
transformers architectures at toy size for the embedded engine.

Gemini facts (models, adapter sizes, limits, tuning regions, continued tuning)
come from the Google Cloud documentation of Gemini supervised fine-tuning,
continuous tuning and tuning regions (docs.cloud.google.com/gemini-enterprise-
agent-platform/models/tuning/...), checked 2026-11; see ``_GEMINI`` below for
each fact's page and what could not be confirmed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

FULL = "FULL"
PEFT = "PEFT_ADAPTER"
TUNING_MODES = (FULL, PEFT)
METHODS = ("sft", "distillation", "preference")
#: Every spelling of a tuning method that tune(), validate() and dataset() take.
METHOD_SPELLINGS = {"sft": "sft", "supervised": "sft", "supervised_fine_tuning": "sft",
                    "distillation": "distillation", "distill": "distillation",
                    "preference": "preference", "preference_tuning": "preference",
                    "preference_optimization": "preference", "dpo": "preference"}

#: Where open-model tuning runs. Source: Google's own tuning skill, github.com/google/skills
#: skills/cloud/agent-platform-tuning/SKILL.md, "0.2 Possible Locations" (2026-08-19), as MISSION.md has it;
#: the open-model tuning page's own region list could not be read in 2026-12. No ``global`` location:
#: neither page lists it, and docs.cloud.google.com/gemini-enterprise-agent-platform/machine-learning/
#: general/locations says the platform "doesn't support a global location" (read 2026-12-06).
REGIONS = ("us-central1", "europe-west4", "us-west1", "us-east5", "asia-southeast1")

#: Where Gemini 3.x tuning jobs run ("Supported endpoints for model tuning" in the
#: limitations table of the supervised fine-tuning page, 2026-11).
GEMINI_3_REGIONS = ("us-central1", "europe-west4")

#: Largest validation set the service accepts.
MAX_VALIDATION_EXAMPLES = 5000
#: Gemini: a validation set of more than this many examples may hold at most
#: ``GEMINI_VALIDATION_SHARE`` of the training set's example count (still at most 5000).
GEMINI_VALIDATION_FREE = 1000
GEMINI_VALIDATION_SHARE = 0.3
#: Open models: the validation file may be at most this share of the training file's size in bytes
#: (Vertex AI's open-model tuning refuses more: an 80/20 split of rows that came to 25.03% of the
#: bytes was refused, so the rule is on bytes, not rows; issue 12's review of the service, 2026-12).
OPEN_VALIDATION_BYTES_SHARE = 0.25


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
    #: Regions where the managed service tunes this model; None: the catalog holds no
    #: rule for it (local models, or a list the documentation could not confirm).
    regions: tuple[str, ...] | None = None
    #: Whether a tuned checkpoint of this model can be tuned further (the service's
    #: continuous tuning, ``pre_tuned_model`` / ``pre_tuned_model_checkpoint_id``).
    continued_tuning: bool = False
    #: Whether the managed service preference-tunes this model (``method="preference"``); every model the
    #: local engine tunes, it also preference-tunes.
    preference_tuning: bool = False

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


def _open(id, family, modes, hf, params, *, student=False, seq=8192, modalities=("text",), notes=""):
    return Model(id, family, modes, seq, modalities, hf, "open", student, (), params, notes, regions=REGIONS)


_UNREAD_LIMITS = ("the page's limits table could not be read (2026-12): 8192 tokens and text, as for the "
                  "page's other models, are not confirmed")


_GEMINI_MODALITIES = ("text", "image", "audio", "video", "document")
_GEMINI_3_NOTES = (
    "131,072 input+output tokens per training example; up to 10M text-only or 300K multimodal "
    "training examples, 1 GB JSONL; tuned models are served only from the us and eu multi-region "
    "endpoints; CMEK not supported"
)


def _gemini(gid, adapter_sizes, *, regions=None, continued=False, price=None, preference=False, notes=""):
    return Model(
        gid, "gemini", (PEFT,), 131072, _GEMINI_MODALITIES, None, "gemini", False, tuple(adapter_sizes), "",
        notes, price_per_million_tokens=price, regions=regions, continued_tuning=continued,
        preference_tuning=preference,
    )


# Gemini: LoRA only, tuned through google-genai; adapter size, epochs and a
# learning-rate multiplier are the knobs. Sources (checked 2026-11; the list of models that can be
# tuned read again 2026-12-06, unchanged; no ``global`` tuning location is listed for any of them):
# - models that can be tuned: docs.cloud.google.com/gemini-enterprise-agent-platform/reference/models/tuning
#   (Gemini 3.5 Flash-Lite, 3.5 Flash, 3.1 Flash-Lite, 2.5 Pro, 2.5 Flash, 2.5 Flash-Lite);
# - adapter sizes, 131,072 tokens per example, validation rule, 3.x tuning regions:
#   docs.cloud.google.com/gemini-enterprise-agent-platform/models/tuning/supervised-tuning ("Limitations");
# - continued tuning: .../models/tuning/continuous-tuning lists 3.5 Flash, 3.1 Flash-Lite and 2.5 Pro
#   first; the rest of that list was cut in the copy we could read, so 2.5 Flash, 2.5 Flash-Lite and
#   3.5 Flash-Lite stay False until confirmed;
# - Gemini 2.0 Flash and Flash-Lite were discontinued on 2026-06-01 (.../models/gemini/2-0-flash-lite):
#   no longer in the catalog;
# - 2.5 models tune in the regions of .../gemini-supervised-tuning-region-settings; the copy we could
#   read lost the tail of that list (us-* after us-central1), so no local rule is kept for them and the
#   service decides;
# - training prices: the 2.5 prices are the ones published on the Vertex AI generative AI pricing page
#   when this catalog was first written, not re-found in 2026-11; no published 3.x tuning price was
#   found, so those are None (no cost estimate rather than a guessed one);
# - preference tuning (text pairs, adapter sizes 1-16, beta): Gemini 2.5 Flash and Flash-Lite, as Google
#   announced it (discuss.google.dev "Preference tuning now available for Gemini 2.5 Flash models on Vertex
#   AI", 2025-11) and its console steps (.../docs/models/gemini-use-preference-tuning); the page's own list of
#   models could not be read, so no other model is marked.
_GEMINI: tuple[Model, ...] = (
    _gemini("gemini-3.5-flash", (1, 2, 4, 8, 16), regions=GEMINI_3_REGIONS, continued=True,
            notes=_GEMINI_3_NOTES + "; the Gemini API lists gemini-3.5-flash as deprecated (served by "
            "gemini-3.6-flash), the tuning documentation still tunes it"),
    _gemini("gemini-3.5-flash-lite", (1, 2, 4, 8, 16), regions=GEMINI_3_REGIONS, notes=_GEMINI_3_NOTES),
    _gemini("gemini-3.1-flash-lite", (1, 2, 4, 8, 16), regions=GEMINI_3_REGIONS, continued=True,
            notes=_GEMINI_3_NOTES),
    _gemini("gemini-2.5-pro", (1, 2, 4, 8), continued=True, price=25.0),
    _gemini("gemini-2.5-flash", (1, 2, 4, 8, 16), price=5.0, preference=True),
    _gemini("gemini-2.5-flash-lite", (1, 2, 4, 8, 16), price=1.5, preference=True),
)


# Open models, as of 2026-12-06. Ids: "Supervised and distillation fine-tuning for open models",
# docs.cloud.google.com/gemini-enterprise-agent-platform/models/open-model-tuning ("Models that support
# supervised fine-tuning", the ja and ko copies, read 2026-12-06; the en copy's list was cut). Tuning modes:
# github.com/google/skills skills/cloud/agent-platform-tuning/references/models.md (2026-08-19), whose table
# gives Gemma 4 LoRA only, MedGemma 1.5 and Qwen 3.5 full tuning only. Medgemma 4B IT
# (google/medgemma@medgemma-4b-it) is no longer listed: Medgemma 1.5 4B IT replaces it. Qwen 3.6 27B and
# 35B A3B appear only in one copy of the page (documentation.s3ns.fr, zh-cn) without their modes: not added.
# Distillation students are MISSION.md's; the page's student list could not be read.
_MODELS: tuple[Model, ...] = (
    _open("google/gemma4@gemma-4-e2b-it", "gemma4", (PEFT,), "google/gemma-4-E2B-it", "2B effective",
          notes=_UNREAD_LIMITS),
    _open("google/gemma4@gemma-4-e4b-it", "gemma4", (PEFT,), "google/gemma-4-E4B-it", "4B effective",
          notes=_UNREAD_LIMITS),
    _open("google/gemma4@gemma-4-26b-a4b-it", "gemma4", (PEFT,), "google/gemma-4-26B-A4B-it", "4B active / 26B",
          notes=_UNREAD_LIMITS),
    _open("google/gemma4@gemma-4-31b-it", "gemma4", (PEFT,), "google/gemma-4-31B-it", "31B", notes=_UNREAD_LIMITS),
    _open("google/gemma3@gemma-3-1b-it", "gemma3", (FULL,), "google/gemma-3-1b-it", "1B", student=True),
    _open("google/gemma3@gemma-3-4b-it", "gemma3", (FULL,), "google/gemma-3-4b-it", "4B", student=True),
    _open("google/gemma3@gemma-3-12b-it", "gemma3", (FULL,), "google/gemma-3-12b-it", "12B", student=True),
    _open("google/gemma3@gemma-3-27b-it", "gemma3", (PEFT, FULL), "google/gemma-3-27b-it", "27B", student=True),
    _open("google/medgemma@medgemma-1.5-4b-it", "gemma3", (FULL,), "google/medgemma-1.5-4b-it", "4B",
          notes=_UNREAD_LIMITS),
    _open("meta/llama3_1@llama-3.1-8b", "llama", (PEFT, FULL), "meta-llama/Llama-3.1-8B", "8B"),
    _open("meta/llama3_1@llama-3.1-8b-instruct", "llama", (PEFT, FULL), "meta-llama/Llama-3.1-8B-Instruct", "8B"),
    _open("meta/llama3-2@llama-3.2-1b-instruct", "llama", (FULL,), "meta-llama/Llama-3.2-1B-Instruct", "1B"),
    _open("meta/llama3-2@llama-3.2-3b-instruct", "llama", (FULL,), "meta-llama/Llama-3.2-3B-Instruct", "3B"),
    _open("meta/llama3-3@llama-3.3-70b-instruct", "llama", (PEFT, FULL), "meta-llama/Llama-3.3-70B-Instruct", "70B"),
    _open("qwen/qwen3-5@qwen3.5-9b", "qwen3", (FULL,), "Qwen/Qwen3.5-9B", "9B", notes=_UNREAD_LIMITS),
    _open("qwen/qwen3@qwen3-4b", "qwen3", (FULL,), "Qwen/Qwen3-4B", "4B", student=True),
    _open("qwen/qwen3@qwen3-8b", "qwen3", (FULL,), "Qwen/Qwen3-8B", "8B", student=True),
    _open("qwen/qwen3@qwen3-14b", "qwen3", (FULL,), "Qwen/Qwen3-14B", "14B", student=True),
    _open("qwen/qwen3@qwen3-32b", "qwen3", (PEFT, FULL), "Qwen/Qwen3-32B", "32B", student=True),
    _open(
        "meta/llama4@llama-4-scout-17b-16e-instruct", "llama4", (PEFT,),
        "meta-llama/Llama-4-Scout-17B-16E-Instruct", "17B active / 109B", seq=2048, modalities=("text", "image"),
    ),
    *_GEMINI,
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


def check_region(region: str, model: Model | str | None = None) -> str:
    """Check that the managed service tunes ``model`` in ``region``.

    Without a model this is the open-model rule (:data:`REGIONS`). With one, its own
    ``regions`` apply; a model whose ``regions`` is None has no rule here and any
    region passes (the service has the last word).
    """
    if model is None:
        if region not in REGIONS:
            raise UserError(
                f"location {region!r} does not run open-model tuning; use one of {', '.join(REGIONS)}",
                field="location",
            )
        return region
    spec = model if isinstance(model, Model) else get(model)
    if spec.regions is not None and region not in spec.regions:
        raise UserError(
            f"location {region!r} does not run tuning of {spec.id}; use one of {', '.join(spec.regions)}",
            field="location",
        )
    return region


def validation_limit(model: Model | str | None = None, train_examples: int | None = None) -> int:
    """The most validation examples the service takes for ``model`` and a training set of ``train_examples``.

    Every model: at most :data:`MAX_VALIDATION_EXAMPLES`. Gemini models also cap a validation
    set of more than :data:`GEMINI_VALIDATION_FREE` examples at :data:`GEMINI_VALIDATION_SHARE`
    of the training examples.
    """
    spec = model if isinstance(model, Model) or model is None else get(model)
    if spec is None or spec.provider != "gemini" or train_examples is None:
        return MAX_VALIDATION_EXAMPLES
    share = int(train_examples * GEMINI_VALIDATION_SHARE)
    return min(MAX_VALIDATION_EXAMPLES, max(GEMINI_VALIDATION_FREE, share))


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
