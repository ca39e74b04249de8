"""A fake Vertex AI REST API on 127.0.0.1 that the real SDKs run against in the tests.

``FakeVertex(storage_host)`` serves, under ``/v1beta1/`` and ``/v1/``, what google-genai
(``client.tunings``, ``client.models.generate_content``) and google-cloud-aiplatform
(Model Garden deploy, ``Endpoint.predict``, experiments and TensorBoard reads) send and
expect, in the JSON shapes the SDKs parse:

- ``tuningJobs``: create (validated like the service: base model, region, datasets read
  from the Cloud Storage emulator), get, list (newest first, pageSize/pageToken), cancel.
  A job's lifecycle is driven by the clock, so ``get`` advances it; on success it carries
  data stats, an experiment backed by a TensorBoard, and either Gemini's tuned model and
  checkpoints or an open model's files under ``outputUri`` (written into the emulator). A Gemini job with
  ``supervisedTuningSpec.evaluationConfig`` (checked as the service checks it) lists ``evaluateDatasetRuns``, a
  scored run per checkpoint reached.
- ``projects/P/locations/L:deploy`` (a long-running operation of ``deploy_seconds`` on the fake's clock, 20
  minutes unless set) and ``operations/O``.
- ``endpoints/E`` get, delete, ``:undeployModel``, ``:predict`` (a ``prompt``, or a chat request with
  ``"@requestFormat": "chatCompletions"`` framed by :func:`chat_template`), ``:generateContent``,
  ``:streamGenerateContent``, ``endpoints/openapi/chat/completions`` (and ``endpoints/E/chat/completions``).
  Model Garden endpoints are dedicated: their predictions are answered at ``fake.dedicated_dns`` (HTTPS on
  127.0.0.1 with ``fake.ca_file``, trusted through ``REQUESTS_CA_BUNDLE`` while the fake runs), never on the shared
  host.
- ``batchPredictionJobs`` create and get: Gemini batch prediction from a JSONL file in the
  emulator, pending then running for a clock step each, then its predictions are written.
- ``metadataStores/default/contexts|artifacts/X`` and ``tensorboards/...`` reads:
  experiment, its runs (contexts listed by ``ExperimentRun.list``'s filter), each run's ``-tb-run``
  artifact naming its TensorBoard run (ids of its own unless ``fake.tensorboard_names =
  "experiment"``), runs, time series, ``:read`` and ``:batchRead``. As the service does, a read
  returns at most 1,000 points of a series (``:read``: ``maxDataPoints``, up to 10,000, or -1 for
  all), chosen at random when it has more. ``fake.metrics_every = 1`` logs a point at every step
  (by default about 100 points a series), for jobs of more than 1,000 steps.

Every request needs ``Authorization: Bearer <fake.token>`` and is recorded in
``fake.requests``. Failures and outcomes are scripted per test (``next_outcome``,
``disable_api``, ``deny``, ``exhaust_quota``, ``fail_next``, ``drop_next``, ``regions``).
Unasked, every 5th GET of the same tuning job answers 429 (``throttle_every``), as the
service's read quota does under load, so every test that polls a job shows it survives that.
Nothing but 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import json
import math
import os
import random
import re
import secrets
import shutil
import ssl
import struct
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# ====================================================================== what the service offers

# The fake's own copy of what the service accepts (not read from tuning_magics.catalog, so a drift between
# the two fails tests/test_catalog_settings.py). Open models: the open-model tuning page's list, 2026-12-06
# (docs.cloud.google.com/gemini-enterprise-agent-platform/models/open-model-tuning). Gemini: the models
# the supervised tuning reference lists (.../reference/models/tuning), 2026-12-06; 2.0 Flash and Flash-Lite
# were discontinued on 2026-06-01. Regions: open models in REGIONS; Gemini 3.x only in us-central1 and
# europe-west4 (the supervised tuning page's limits); Gemini 2.5 in the regions of the tuning region
# settings page that could be read. No "global": no page lists it for tuning.
OPEN_MODELS = {
    "google/gemma4@gemma-4-e2b-it", "google/gemma4@gemma-4-e4b-it", "google/gemma4@gemma-4-26b-a4b-it",
    "google/gemma4@gemma-4-31b-it",
    "google/gemma3@gemma-3-1b-it", "google/gemma3@gemma-3-4b-it", "google/gemma3@gemma-3-12b-it",
    "google/gemma3@gemma-3-27b-it", "google/medgemma@medgemma-1.5-4b-it",
    "meta/llama3_1@llama-3.1-8b", "meta/llama3_1@llama-3.1-8b-instruct",
    "meta/llama3-2@llama-3.2-1b-instruct", "meta/llama3-2@llama-3.2-3b-instruct",
    "meta/llama3-3@llama-3.3-70b-instruct", "meta/llama4@llama-4-scout-17b-16e-instruct",
    "qwen/qwen3-5@qwen3.5-9b",
    "qwen/qwen3@qwen3-4b", "qwen/qwen3@qwen3-8b", "qwen/qwen3@qwen3-14b", "qwen/qwen3@qwen3-32b",
}  # fmt: skip
STUDENTS = {m for m in OPEN_MODELS if m.startswith(("qwen/qwen3@", "google/gemma3@"))}
TEACHERS = {"deepseek-ai/deepseek-r1-0528-maas", "deepseek-ai/deepseek-v3.2-maas",
            "qwen/qwen3-next-80b-a3b-thinking-maas"}  # fmt: skip
GEMINI_MODELS = {"gemini-3.5-flash", "gemini-3.5-flash-lite", "gemini-3.1-flash-lite", "gemini-2.5-pro",
                 "gemini-2.5-flash", "gemini-2.5-flash-lite"}  # fmt: skip
OPEN_REGIONS = {"us-central1", "europe-west4", "us-west1", "us-east5", "asia-southeast1"}
GEMINI_REGIONS = OPEN_REGIONS | {"us-east1", "us-east4", "us-south1", "us-west4", "europe-west1", "europe-west2",
                                 "europe-west3", "europe-west9", "asia-northeast1", "asia-south1",
                                 "australia-southeast1"}  # fmt: skip
GEMINI_3_REGIONS = {"us-central1", "europe-west4"}


def regions_for(base: str) -> set[str]:
    """The regions that tune ``base`` (unless a test sets ``fake.regions``)."""
    if base.startswith("gemini-3"):
        return GEMINI_3_REGIONS
    return GEMINI_REGIONS if base.startswith("gemini-") else OPEN_REGIONS


PHASES = (  # (state, tuningJobState) in the order a job goes through them
    ("JOB_STATE_PENDING", "TUNING_JOB_STATE_WAITING_FOR_QUOTA"),
    ("JOB_STATE_PENDING", "TUNING_JOB_STATE_PROCESSING_DATASET"),
    ("JOB_STATE_PENDING", "TUNING_JOB_STATE_WAITING_FOR_CAPACITY"),
    ("JOB_STATE_RUNNING", "TUNING_JOB_STATE_TUNING"),
    ("JOB_STATE_RUNNING", "TUNING_JOB_STATE_POST_PROCESSING"),
)
_PHASE_INDEX = {sub: i for i, (_, sub) in enumerate(PHASES)}
OUTCOMES = {  # outcome -> (final state, default phase it happens in)
    "succeeded": ("JOB_STATE_SUCCEEDED", "TUNING_JOB_STATE_POST_PROCESSING"),
    "failed": ("JOB_STATE_FAILED", "TUNING_JOB_STATE_TUNING"),
    "cancelled": ("JOB_STATE_CANCELLED", "TUNING_JOB_STATE_TUNING"),
    "expired": ("JOB_STATE_EXPIRED", "TUNING_JOB_STATE_WAITING_FOR_CAPACITY"),
    "paused": ("JOB_STATE_PAUSED", "TUNING_JOB_STATE_TUNING"),
    "running": (None, "TUNING_JOB_STATE_TUNING"),  # stays in that phase for good
    # JobState's "some results may be missing due to errors" (aiplatform_v1beta1 job_state.py): outputs are written
    "partially_succeeded": ("JOB_STATE_PARTIALLY_SUCCEEDED", "TUNING_JOB_STATE_POST_PROCESSING"),
}
#: The states in which a job has written its outputs (tuned model, checkpoints, data stats).
SUCCEEDED_STATES = ("JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED")
ENDED_STATES = (*SUCCEEDED_STATES, "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")
METRICS = ("/train_total_loss", "/train_fraction_of_correct_next_step_preds", "/train_num_predictions",
           "/eval_total_loss", "/eval_fraction_of_correct_next_step_preds")  # fmt: skip
DEFAULT_EPOCHS, DEFAULT_BATCH = 3, 8
#: By default every 5th GET of the same tuning job answers 429 RESOURCE_EXHAUSTED (``FakeVertex.throttle_every``).
THROTTLE_EVERY = 5
#: Seconds a Model Garden deploy takes on the fake's clock (Google's notebooks: 15-30 minutes); fake.advance() moves it.
DEPLOY_SECONDS = 20 * 60
# The fields the service knows; any other is refused like the real JSON parser does.
JOB_FIELDS = {"name", "tunedModelDisplayName", "description", "baseModel", "preTunedModel", "supervisedTuningSpec",
              "distillationSpec", "preferenceOptimizationSpec", "reinforcementTuningSpec", "partnerModelTuningSpec",
              "veoTuningSpec", "labels", "encryptionSpec", "serviceAccount", "customBaseModel", "outputUri",
              "evaluationConfig", "tuningJobMetadata"}
# Each tuning spec's own fields and hyperparameters: what google-genai's _CreateTuningJobConfig_to_vertex
# (tunings.py, 2.x) puts under it for each method, and what aiplatform_v1beta1's tuning_job.py declares.
# Supervised tuning has no teacher, prompt set or SFT loss weight; distillation has no other spec's fields.
SPEC_FIELDS = {
    "supervisedTuningSpec": {"trainingDatasetUri", "validationDatasetUri", "hyperParameters",
                             "exportLastCheckpointOnly", "evaluationConfig", "tuningMode"},
    "distillationSpec": {"promptDatasetUri", "trainingDatasetUri", "validationDatasetUri", "hyperParameters",
                         "exportLastCheckpointOnly", "evaluationConfig", "tuningMode", "baseTeacherModel",
                         "tunedTeacherModelSource", "pipelineRootDirectory", "studentModel"},
    # google-genai's PreferenceOptimizationSpec (types.py) and the request's evaluationConfig (tunings.py)
    "preferenceOptimizationSpec": {"trainingDatasetUri", "validationDatasetUri", "hyperParameters",
                                   "exportLastCheckpointOnly", "evaluationConfig"},
}  # fmt: skip
HYPER_FIELDS = {
    "supervisedTuningSpec": {"epochCount", "learningRateMultiplier", "learningRate", "adapterSize", "batchSize"},
    "distillationSpec": {"epochCount", "learningRateMultiplier", "learningRate", "adapterSize", "batchSize",
                         "sftLossWeightMultiplier"},
    "preferenceOptimizationSpec": {"epochCount", "learningRateMultiplier", "adapterSize", "beta"},
}  # fmt: skip
#: Gemini models the service preference-tunes (Google's announcement, 2025-11: 2.5 Flash and Flash-Lite).
PREFERENCE_MODELS = {"gemini-2.5-flash", "gemini-2.5-flash-lite"}
#: The oneof ``tuning_spec`` of a TuningJob: at most one of them.
TUNING_SPECS = ("supervisedTuningSpec", "distillationSpec", "preferenceOptimizationSpec", "reinforcementTuningSpec",
                "partnerModelTuningSpec", "veoTuningSpec")
#: Hyperparameters Gemini models refuse: they take learningRateMultiplier, and no batch size.
GEMINI_REFUSES = {"learningRate": "learningRateMultiplier", "batchSize": None}
ENUMS = {"tuningMode": ("TuningMode", ["TUNING_MODE_UNSPECIFIED", "TUNING_MODE_FULL", "TUNING_MODE_PEFT_ADAPTER"]),
         "adapterSize": ("AdapterSize", ["ADAPTER_SIZE_UNSPECIFIED", "ADAPTER_SIZE_ONE", "ADAPTER_SIZE_TWO",
                                         "ADAPTER_SIZE_FOUR", "ADAPTER_SIZE_EIGHT", "ADAPTER_SIZE_SIXTEEN",
                                         "ADAPTER_SIZE_THIRTY_TWO"])}
# Evaluation during tuning (a preview, us-central1 only): ``supervisedTuningSpec.evaluationConfig`` as
# google-genai's _EvaluationConfig_to_vertex and t_metrics (tunings.py, _transformers.py, 2.x) send it: each
# metric in snake_case with exactly one of these specs (the REST reference's METRIC_SPEC list), its
# ``aggregation_metrics``; ``outputConfig.gcs_destination.output_uri_prefix`` a gs:// folder. A validation set is
# what is scored ("tested against the latter at each checkpoint", Google's sft_gemini_automatic_evaluation
# notebook). Proto JSON reads camelCase and snake_case alike and null as unset.
EVALUATION_SPECS = ("pointwise_metric_spec", "pairwise_metric_spec", "exact_match_spec", "bleu_spec", "rouge_spec")
EVALUATION_REGION = "us-central1"
#: ROUGE types the service knows (RougeSpec's docs: rougen[1-9], rougeL, rougeLsum); case matters.
ROUGE_TYPES = {*(f"rouge{n}" for n in range(1, 10)), "rougeL", "rougeLsum"}
AGGREGATIONS = {"AVERAGE", "MODE", "STANDARD_DEVIATION", "VARIANCE", "MINIMUM", "MAXIMUM", "MEDIAN",
                "PERCENTILE_P90", "PERCENTILE_P95", "PERCENTILE_P99"}
#: Each spec's aggregation result field (EvaluateDatasetRun's AggregationResult) and the score the fake gives a
#: checkpoint a fraction ``x`` of the way through training: rising as it learns, as a real task score does.
EVALUATION_RESULTS = {"exact_match_spec": ("exactMatchMetricValue", lambda x: 0.1 + 0.75 * (1 - math.exp(-3 * x))),
                      "rouge_spec": ("rougeMetricValue", lambda x: 0.3 + 0.6 * (1 - math.exp(-3 * x))),
                      "bleu_spec": ("bleuMetricValue", lambda x: 0.2 + 0.5 * (1 - math.exp(-3 * x))),
                      "pointwise_metric_spec": ("pointwiseMetricResult", lambda x: 2 + 2.5 * (1 - math.exp(-3 * x)))}


def _snake_keys(value):
    """A proto-JSON object with camelCase keys in snake_case and null members left out, as the parser reads it."""
    if isinstance(value, dict):
        return {re.sub(r"(?<!^)([A-Z])", lambda m: "_" + m.group(1).lower(), k): _snake_keys(v)
                for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_snake_keys(v) for v in value]
    return value


_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}  # fmt: skip


class _Dropped(Exception):
    """Raised to close a request's connection without an answer (``FakeVertex.drop_next``)."""


class ApiError(Exception):
    """An error answered in Google's JSON shape: {"error": {code, message, status, details?}}."""

    def __init__(self, code: int, message: str, status: str | None = None, details: list | None = None):
        super().__init__(message)
        self.code, self.message = code, message
        self.status = status or _STATUS_NAMES.get(code, "UNKNOWN")
        self.details = details

    def body(self) -> dict:
        err = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            err["details"] = self.details
        return {"error": err}


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def rfc3339(t: float) -> str:
    """Seconds since the epoch as the service writes times: UTC, microseconds, 'Z'."""
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ====================================================================== Cloud Storage (the emulator)


class Storage:
    """Reads and writes ``gs://`` objects through the emulator's JSON API on 127.0.0.1."""

    def __init__(self, host: str | None):
        if host and urllib.parse.urlparse(host).hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the storage emulator must be local, not {host}")
        self.host = host.rstrip("/") if host else None

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        m = re.fullmatch(r"gs://([^/]+)/(.+)", uri or "")
        if not m:
            raise ValueError(uri)
        return m.group(1), m.group(2)

    def read(self, uri: str) -> bytes | None:
        """The object's bytes, or None when it does not exist (or the URI is not gs://)."""
        try:
            bucket, name = self.split(uri)
        except ValueError:
            return None
        if not self.host:
            return None
        url = f"{self.host}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def write(self, uri: str, data: bytes) -> None:
        # the emulator would parse a JSON content type itself, so every object goes up as bytes
        bucket, name = self.split(uri)
        if not self.host:
            return
        url = (f"{self.host}/upload/storage/v1/b/{bucket}/o?uploadType=media&"
               f"name={urllib.parse.quote(name, safe='')}")  # fmt: skip
        headers = {"Content-Type": "application/octet-stream"}
        req = urllib.request.Request(url, data=data, method="POST", headers=headers)
        with urllib.request.urlopen(req, timeout=10):
            pass


def _safetensors(tag: str) -> bytes:
    """A valid, empty safetensors file whose metadata names what it stands for."""
    header = json.dumps({"__metadata__": {"format": "pt", "checkpoint": tag}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def _checkpoint_files(folder: Path, dtype: str | None = None) -> dict[str, bytes]:
    """A Hugging Face model folder in the service's layout (numbered shards with their index, as the local engine
    writes them too) as an open-model tuning job leaves a checkpoint, with no more than the service documents:
    the shards, the index, config.json and the tokenizer files, the chat template inside tokenizer_config.json; no
    generation config ("Tune open models", Tuned model artifacts; "Deploy models with custom weights", Model files)."""
    files = {p.name: p.read_bytes() for p in folder.glob("model-*.safetensors")}
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    if (folder / "chat_template.jinja").is_file():
        tokenizer_config["chat_template"] = (folder / "chat_template.jinja").read_text()
    for name in ("model.safetensors.index.json", "config.json", "tokenizer.json"):
        files[name] = (folder / name).read_bytes()
    files["tokenizer_config.json"] = json.dumps(tokenizer_config).encode()
    if dtype == "bfloat16":  # as the service keeps open models: the shards in bfloat16, the config saying so
        import torch
        from safetensors.torch import load, save

        for name in [n for n in files if n.endswith(".safetensors")]:
            files[name] = save({k: v.to(torch.bfloat16) for k, v in load(files[name]).items()},
                               metadata={"format": "pt"})
        config = json.loads(files["config.json"])
        config["dtype"] = "bfloat16"
        files["config.json"] = json.dumps(config).encode()
    return files


# ====================================================================== datasets and the fake model

_NOT_TEXT = {"role", "type", "mime_type", "mimeType", "file_uri", "fileUri", "detail", "url"}


def _texts(value, key=None):
    if isinstance(value, str):
        if key not in _NOT_TEXT:
            yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _texts(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v, key)


def _preference_problem(record: dict) -> str | None:
    """Why one line of a preference dataset is refused ("Prepare preference tuning data for Gemini models":
    contents ending with a user turn, text only; exactly two single model-turn completions scored 1 and 0),
    else None."""
    if set(record) - {"contents", "completions", "system_instruction", "systemInstruction"}:
        return f"unknown fields {sorted(set(record) - {'contents', 'completions', 'system_instruction'})}"
    contents, completions = record.get("contents"), record.get("completions")
    if not isinstance(contents, list) or not contents or contents[-1].get("role", "user") != "user":
        return "contents must end with a user turn"
    if any("text" not in part for turn in contents for part in turn.get("parts") or [{}]):
        return "preference tuning takes text only"
    if not isinstance(completions, list) or len(completions) != 2:
        return "completions must hold exactly two completions"
    if sorted(float(c.get("score", -1)) for c in completions) != [0.0, 1.0]:
        return "completion scores must be 1 (preferred) and 0 (dispreferred)"
    if any((c.get("completion") or {}).get("role") != "model" for c in completions):
        return "each completion must be a model turn"
    return None


def _split_example(rec: dict) -> tuple[list[str], list[str]]:
    """(input texts, output texts) of one example in any of the supported formats (a preference pair's
    outputs are its two completions)."""
    if "completions" in rec:
        ins = list(_texts(rec.get("system_instruction") or rec.get("systemInstruction"))) + list(_texts(
            rec.get("contents")))
        return ins, list(_texts([c.get("completion") for c in rec["completions"]]))
    if "prompt" in rec:
        return [str(rec["prompt"])], [str(rec.get("completion", ""))]
    turns = rec.get("messages") or rec.get("contents") or []
    ins, outs = list(_texts(rec.get("systemInstruction"))), []
    for turn in turns if isinstance(turns, list) else []:
        role = turn.get("role") if isinstance(turn, dict) else None
        texts = list(_texts(turn.get("content", turn.get("parts")) if isinstance(turn, dict) else turn))
        (outs if role in ("assistant", "model") else ins).extend(texts)
    return ins, outs


def _prompt_of(rec: dict) -> str:
    if "prompt" in rec:
        return str(rec["prompt"])
    turns = [t for t in rec.get("messages") or rec.get("contents") or [] if isinstance(t, dict)]
    users = [t for t in turns if t.get("role") not in ("assistant", "model")]
    return " ".join(_texts(users[-1].get("content", users[-1].get("parts")))) if users else ""


def reply_to(prompt: str, max_tokens: int | None = None) -> str:
    """The fake model's deterministic answer to a prompt."""
    digest = hashlib.sha1(prompt.encode()).hexdigest()[:8]
    words = f"Answer {digest} to: {prompt.strip()}".split()
    return " ".join(words[:max_tokens] if max_tokens else words)


def base_reply_to(model: str, prompt: str, max_tokens: int | None = None) -> str:
    """A Gemini model's answer before tuning: ``base <model>:`` and :func:`reply_to`'s answer."""
    words = f"base {model}: {reply_to(prompt)}".split()
    return " ".join(words[:max_tokens] if max_tokens else words)


def chat_template(messages: list[dict]) -> str:
    """The chat template of the fake's deployed models (Llama 3's): messages framed as the model was tuned on them."""
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{' '.join(_texts(m.get('content')))}"
                    "<|eot_id|>" for m in messages)
    return f"<|begin_of_text|>{turns}<|start_header_id|>assistant<|end_header_id|>\n\n"


def chat_reply(messages: list[dict], max_tokens: int | None = None) -> str:
    """A deployed model's answer to a conversation: to its last user message, marked by the whole templated text."""
    users = [m for m in messages if m.get("role") == "user"]
    digest = hashlib.sha1(chat_template(messages).encode()).hexdigest()[:8]
    words = f"Answer {digest} to: {' '.join(_texts(users[-1].get('content'))) if users else ''}".split()
    return " ".join(words[:max_tokens] if max_tokens else words)


def _self_signed(folder: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 that is its own authority, and its key: (cert file, key file) in ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake Vertex AI dedicated endpoints")])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(days=1)).not_valid_after(now + _dt.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))  # fmt: skip
    cert_file, key_file = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(cert_file, "wb") as out:
        out.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return cert_file, key_file


def _distribution(values: list[int]) -> dict:
    if not values:
        return {}
    s = sorted(values)
    q = lambda p: float(s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))])  # noqa: E731
    return {"sum": str(sum(s)), "billableSum": str(sum(s)), "min": float(s[0]), "max": float(s[-1]),
            "mean": sum(s) / len(s), "median": q(0.5), "p5": q(0.05), "p95": q(0.95),
            "buckets": [{"count": float(len(s)), "left": float(s[0]), "right": float(s[-1])}]}  # fmt: skip


@dataclass
class Dataset:
    """A parsed JSONL dataset and the service-side counts of it (whitespace tokens)."""

    uri: str
    records: list[dict]

    @property
    def example_count(self) -> int:
        return len(self.records)

    def token_counts(self) -> list[tuple[int, int, int]]:
        """(input tokens, output tokens, messages) per example."""
        out = []
        for rec in self.records:
            ins, outs = _split_example(rec)
            turns = rec.get("messages") or rec.get("contents") or []
            out.append((sum(len(t.split()) for t in ins), sum(len(t.split()) for t in outs),
                        len(turns) if isinstance(turns, list) and turns else 2))  # fmt: skip
        return out

    def stats(self, epochs: int, steps: int, max_tokens: int = 8192, *, distillation: bool = False) -> dict:
        """The service's counts of this dataset, in the JSON shape of its ``tuningDataStats``.

        Supervised tuning answers ``SupervisedTuningDataStats``, distillation ``DatasetStats``
        (google-genai's types.py and aiplatform_v1beta1's tuning_job.py): the total of the
        examples cut or dropped is ``totalTruncatedExampleCount`` (SFT only), and the indices
        are "a partial sample of the indices (starting from 1)", at most
        :data:`SAMPLED_INDICES` here, each with its reason. As proto3 JSON does, a count
        of 0 and an empty list are left out.
        """
        counts = self.token_counts()
        chars = sum(len(t) for rec in self.records for t in _texts(rec))
        totals = [i + o for i, o, _ in counts]
        truncated = [k + 1 for k, n in enumerate(totals) if n > max_tokens]  # 1-based, as the service counts
        sample = truncated[:SAMPLED_INDICES]
        reasons = [f"example {k} has more than {max_tokens} tokens and was truncated" for k in sample]
        stats = {
            "tuningDatasetExampleCount": str(len(self.records)),
            "totalTuningCharacterCount": str(chars),
            "totalBillableCharacterCount": str(chars * epochs),
            "totalBillableTokenCount": str(sum(min(n, max_tokens) for n in totals) * epochs),
            "tuningStepCount": str(steps),
            "userInputTokenDistribution": _distribution([i for i, _, _ in counts]),
            "userOutputTokenDistribution": _distribution([o for _, o, _ in counts]),
            "userMessagePerExampleDistribution": _distribution([m for _, _, m in counts]),
            "userDatasetExamples": [{"role": role, "parts": [{"text": texts[0]}]}
                                    for role, texts in zip(("user", "model"), _split_example(self.records[0]))
                                    if texts],
        }  # fmt: skip
        if distillation:
            stats.update(droppedExampleIndices=[str(k) for k in sample], droppedExampleReasons=reasons)
        else:
            stats.update(totalTruncatedExampleCount=str(len(truncated)),
                         truncatedExampleIndices=[str(k) for k in sample], droppedExampleReasons=reasons)
        return proto3_json(stats)


#: How many indices of truncated or dropped examples the data stats list (the rest are only counted).
SAMPLED_INDICES = 5


def proto3_json(value):
    """``value`` as proto3's JSON mapping writes it: fields holding 0, "0", false, [] or {} are left out."""
    if isinstance(value, dict):
        out = {k: proto3_json(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, 0, "0", False, [], {})}
    if isinstance(value, list):
        return [proto3_json(v) for v in value]
    return value


# ====================================================================== jobs and their lifecycle


@dataclass
class Outcome:
    """How a job created next will end: which outcome, in which phase, with what error."""

    outcome: str = "succeeded"
    at: str | None = None
    error: dict | None = None
    step_seconds: float | None = None
    #: tuningJobState -> the JobState the job shows in that phase instead of PHASES' own
    #: (e.g. {"TUNING_JOB_STATE_WAITING_FOR_QUOTA": "JOB_STATE_QUEUED"}).
    states: dict = field(default_factory=dict)


@dataclass
class Job:
    name: str
    project: str  # the project number used in resource names
    location: str
    body: dict
    created: float
    outcome: Outcome
    step_seconds: float
    train: Dataset
    validation: Dataset | None
    cancel_requested: float | None = None
    artifacts_written: bool = False
    endpoints: list[str] = field(default_factory=list)
    resolved_base: str = ""  # a continued job's base: that of the job that tuned its starting model

    @property
    def id(self) -> str:
        return self.name.rsplit("/", 1)[1]

    @property
    def base_model(self) -> str:
        return self.body.get("baseModel") or self.resolved_base

    @property
    def is_gemini(self) -> bool:
        return self.base_model.startswith("gemini-")

    @property
    def spec(self) -> dict:
        return (self.body.get("distillationSpec") or self.body.get("supervisedTuningSpec")
                or self.body.get("preferenceOptimizationSpec") or {})

    @property
    def epochs(self) -> int:
        return int(self.spec.get("hyperParameters", {}).get("epochCount") or DEFAULT_EPOCHS)

    @property
    def steps_per_epoch(self) -> int:
        batch = int(self.spec.get("hyperParameters", {}).get("batchSize") or DEFAULT_BATCH)
        return max(1, math.ceil(self.train.example_count / batch))

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def experiment_id(self) -> str:
        return f"tuning-experiment-{self.id}"

    @property
    def run_id(self) -> str:
        return f"tuning-experiment-run-{self.id}"

    def checkpoint_steps(self) -> list[tuple[int, int]]:
        """(epoch, step) of the saved checkpoints: one per epoch, at most 10, evenly spread."""
        epochs = list(range(1, self.epochs + 1))
        if len(epochs) > 10:
            epochs = sorted({round(1 + k * (self.epochs - 1) / 9) for k in range(10)})
        return [(e, e * self.steps_per_epoch) for e in epochs]

    def status(self, now: float) -> tuple[str, str | None, float | None, float | None]:
        """(state, tuningJobState, start time, end time) at ``now``; ``progress`` in tuning is separate."""
        final, at = OUTCOMES[self.outcome.outcome]
        stop = _PHASE_INDEX[self.outcome.at or at]
        step = self.step_seconds

        def phase(t: float) -> int:
            return min(stop, int((t - self.created) / step)) if step > 0 else stop

        def started(index: int) -> float | None:
            return self.created + 3 * step if index >= 3 else None  # RUNNING begins with TUNING

        natural_end = self.created + (stop + 1) * step
        if self.cancel_requested is not None and (final in (None, "JOB_STATE_PAUSED")
                                                  or self.cancel_requested < natural_end):  # fmt: skip
            index, done = phase(self.cancel_requested), self.cancel_requested + step
            if now < done:
                return "JOB_STATE_CANCELLING", PHASES[index][1], started(index), None
            return "JOB_STATE_CANCELLED", PHASES[index][1], started(index), done
        if now < natural_end or final is None:
            state, sub = PHASES[phase(now)]
            return self.outcome.states.get(sub, state), sub, started(phase(now)), None
        return final, PHASES[stop][1], started(stop), None if final == "JOB_STATE_PAUSED" else natural_end

    def progress(self, now: float) -> float:
        """How much of the tuning phase has been done, 0..1 (metrics exist up to there)."""
        final, at = OUTCOMES[self.outcome.outcome]
        stop = _PHASE_INDEX[self.outcome.at or at]
        if stop < 3:
            return 0.0
        if self.status(now)[0] in SUCCEEDED_STATES:
            return 1.0
        if self.cancel_requested is not None:
            now = min(now, self.cancel_requested)
        t0 = self.created + 3 * self.step_seconds
        frac = (now - t0) / self.step_seconds if self.step_seconds > 0 else 1.0
        if final not in SUCCEEDED_STATES and stop == 3:
            frac = min(frac, 0.5)  # a job that stops (or is held) while tuning gets half way
        return max(0.0, min(1.0, frac))

    def metrics(self, now: float, every: int | None = None) -> dict[str, list[tuple[int, float, float]]]:
        """Time series name -> [(step, wall time, value)] logged so far: train points ``every`` N steps."""
        total = self.total_steps
        done = int(total * self.progress(now))
        seed = int(hashlib.sha1(self.name.encode()).hexdigest()[:8], 16)
        t0 = self.created + 3 * self.step_seconds
        every = every or max(1, total // 100)  # by default, at most about 100 points per series
        out: dict[str, list] = {name: [] for name in METRICS}
        for step in range(1, done + 1):
            x = step / total
            noise = ((seed * 7919 + step * 104729) % 1000) / 1000 - 0.5
            wall = t0 + self.step_seconds * x
            if step % every == 0 or step == total:
                loss = 0.35 + 2.1 * math.exp(-3.0 * x) + 0.06 * noise
                out["/train_total_loss"].append((step, wall, round(loss, 6)))
                acc = min(0.99, 0.42 + 0.5 * (1 - math.exp(-3.0 * x)) + 0.02 * noise)
                out["/train_fraction_of_correct_next_step_preds"].append((step, wall, round(acc, 6)))
                out["/train_num_predictions"].append((step, wall, float(DEFAULT_BATCH * 64)))
            if self.validation and step % self.steps_per_epoch == 0:
                out["/eval_total_loss"].append((step, wall, round(0.45 + 2.1 * math.exp(-2.7 * x), 6)))
                acc = min(0.98, 0.40 + 0.48 * (1 - math.exp(-2.7 * x)))
                out["/eval_fraction_of_correct_next_step_preds"].append((step, wall, round(acc, 6)))
        return {k: v for k, v in out.items() if v}


# ====================================================================== the server


@dataclass
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str  # without the query string
    query: dict  # name -> list of values
    body: dict | None
    headers: dict


class FakeVertex:
    """A fake Vertex AI REST API on 127.0.0.1 (see the module docstring)."""

    def __init__(self, storage_host: str | None = None, *, step_seconds: float = 0.2,
                 deploy_seconds: float = DEPLOY_SECONDS,
                 project_numbers: dict[str, str] | None = None):  # fmt: skip
        self.storage = Storage(storage_host)
        self.bucket: str | None = None  # the emulator's ready bucket, when the fixture knows it
        self.token = f"ya29.fake-vertex-token-{secrets.token_hex(8)}"
        self.step_seconds = step_seconds
        self.deploy_seconds = deploy_seconds  # how long a Model Garden deploy takes, on the fake's clock
        self.dns_delay = 0.0  # seconds after a deploy ends before its endpoint has a dedicated DNS name
        self.dedicated_dns = ""  # the host:port that answers dedicated endpoints (TLS), once started
        self.ca_file = ""  # the certificate of that host, which requests trusts while the fake runs
        self._deploy_errors: list[dict] = []
        self._tls: ThreadingHTTPServer | None = None
        self._tls_dir: str | None = None
        self._saved_ca: str | None = None
        self.metrics_every: int | None = None  # log train metrics every N steps (None: about 100 points a series)
        #: How a job's TensorBoard experiment and run are named: "own" (ids of their own, found only through
        #: the experiment run's "-tb-run" artifact, as aiplatform finds them) or "experiment" (named after the
        #: experiment context and its run, with no such artifact, as older jobs may be).
        self.tensorboard_names = "own"
        #: Every Nth GET of the same tuning job answers 429, as the service's per-minute read quota does
        #: under load (None: never). On by default, so every Vertex test also shows that polling survives it.
        self.throttle_every: int | None = THROTTLE_EVERY
        self.throttled = 0  # how many GETs were answered 429 that way
        self._gets: dict[str, int] = {}
        self.project_numbers = {"fake-project": "123456789012", **(project_numbers or {})}
        self.regions: dict[str, set[str]] = {}  # base model -> regions that tune it (overrides the defaults)
        #: A Hugging Face model folder whose weights an open-model job leaves in each checkpoint, in the service's
        #: layout (None: empty placeholder weights, which nothing can load), cast to ``weights_dtype`` if set; or a
        #: list of folders, one for each checkpoint in order (the last for ``final`` and any checkpoint beyond).
        self.weights: Path | list[Path] | None = None
        self.weights_dtype: str | None = None
        self.requests: list[Recorded] = []
        #: Every instance the evaluation service graded: {"kind", "values", "model", "template"}.
        self.evaluations: list[dict] = []
        self.jobs: dict[str, Job] = {}
        self.endpoints: dict[str, dict] = {}
        self.operations: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self._outcomes: list[Outcome] = []
        self._failures: list[tuple[dict, ApiError]] = []
        self._disabled: set[str] = set()
        self._denied: dict[str, str | None] = {}
        self._counter = 0
        self._offset = 0.0  # what advance() has added to the clock
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self.url = ""

    # ------------------------------------------------------------------ life
    def start(self) -> "FakeVertex":
        """Listen on a free port of 127.0.0.1 and serve from a background thread."""
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, name="fake-vertex", daemon=True).start()
        # Dedicated endpoints answer at their own DNS name over HTTPS (https://{dedicatedEndpointDns}/v1/...:predict).
        # Here that name is "127.0.0.1:PORT", a second listener with a certificate of its own for 127.0.0.1, which
        # requests trusts (REQUESTS_CA_BUNDLE) until stop(), as a machine trusts Google's: nothing in the code under
        # test knows it is not Google's host.
        self._tls_dir = tempfile.mkdtemp(prefix="fake-vertex-tls-")
        cert, key = _self_signed(self._tls_dir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._tls = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._tls.daemon_threads = True
        self._tls.socket = context.wrap_socket(self._tls.socket, server_side=True, do_handshake_on_connect=False)
        self.dedicated_dns, self.ca_file = f"127.0.0.1:{self._tls.server_address[1]}", cert
        self._saved_ca = os.environ.get("REQUESTS_CA_BUNDLE")
        os.environ["REQUESTS_CA_BUNDLE"] = cert
        threading.Thread(target=self._tls.serve_forever, name="fake-vertex-dedicated", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._tls:
            self._tls.shutdown()
            self._tls.server_close()
            self._tls = None
            if os.environ.get("REQUESTS_CA_BUNDLE") == self.ca_file:
                if self._saved_ca is None:
                    os.environ.pop("REQUESTS_CA_BUNDLE", None)
                else:
                    os.environ["REQUESTS_CA_BUNDLE"] = self._saved_ca
            shutil.rmtree(self._tls_dir or "", ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def credentials(self):
        """Static-token OAuth credentials that this fake accepts (never refreshed)."""
        from google.oauth2.credentials import Credentials

        return Credentials(token=self.token)

    def genai_client(self, project: str = "fake-project", location: str = "us-central1"):
        """A google-genai client in Vertex AI mode pointed at this fake."""
        from google import genai
        from google.genai import types

        return genai.Client(vertexai=True, project=project, location=location, credentials=self.credentials(),
                            http_options=types.HttpOptions(base_url=self.url))  # fmt: skip

    def init_vertexai(self, project: str = "fake-project", location: str = "us-central1") -> None:
        """Point the vertexai / aiplatform SDK (REST transport) at this fake."""
        import vertexai

        vertexai.init(project=project, location=location, api_transport="rest", api_endpoint=self.url,
                      credentials=self.credentials())  # fmt: skip

    def uri(self, name: str) -> str:
        """A fresh gs:// URI in the emulator's bucket."""
        return f"gs://{self.bucket}/{secrets.token_hex(6)}/{name}"

    def put(self, uri: str, data: bytes | str | list) -> str:
        """Write an object into the storage emulator (a list is written as JSONL) and return its URI."""
        if isinstance(data, list):
            data = "".join(json.dumps(rec) + "\n" for rec in data)
        self.storage.write(uri, data.encode() if isinstance(data, str) else data)
        return uri

    # ------------------------------------------------------------------ scripting
    def next_outcome(self, outcome: str = "succeeded", *, at: str | None = None, error: dict | None = None,
                     step_seconds: float | None = None, states: dict | None = None) -> None:  # fmt: skip
        """Script how the next created job ends (queued: one call per job).

        ``outcome``: succeeded, partially_succeeded, failed, cancelled, expired, paused, or running (never ends).
        ``at``: the tuningJobState it happens in (e.g. "TUNING_JOB_STATE_WAITING_FOR_QUOTA").
        ``error``: the job's ``error`` ({"code": ..., "message": ...}) for failed (or partly failed) jobs.
        ``states``: tuningJobState -> the JobState shown in that phase, e.g. JOB_STATE_QUEUED while
        waiting for quota, JOB_STATE_UPDATING while tuning.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}")
        if at is not None and at not in _PHASE_INDEX:
            raise ValueError(f"at must be one of {list(_PHASE_INDEX)}")
        for sub in states or {}:
            if sub not in _PHASE_INDEX:
                raise ValueError(f"states' keys must be among {list(_PHASE_INDEX)}")
        self._outcomes.append(Outcome(outcome, at, error, step_seconds, dict(states or {})))

    def fail_next(self, code: int, message: str, *, status: str | None = None, method: str | None = None,
                  path: str | None = None, times: int = 1, details: list | None = None) -> None:  # fmt: skip
        """Answer the next ``times`` matching requests (method, regex on the path) with this error."""
        rule = {"method": method, "path": path, "left": times}
        self._failures.append((rule, ApiError(code, message, status, details)))

    def drop_next(self, *, method: str | None = None, path: str | None = None, times: int = 1) -> None:
        """Close the connection of the next ``times`` matching requests without answering (a dropped connection)."""
        self._failures.append(({"method": method, "path": path, "left": times}, None))

    def disable_api(self, project: str = "fake-project") -> None:
        """Answer every request for ``project`` as a project without the Vertex AI API enabled."""
        self._disabled.add(project)

    def deny(self, permission: str, *, project: str | None = None) -> None:
        """Refuse requests needing ``permission`` (e.g. "aiplatform.tuningJobs.create")."""
        self._denied[permission] = project

    def exhaust_quota(self, times: int = 1, *, model: str | None = None) -> None:
        """Answer the next ``times`` job creations with 429 RESOURCE_EXHAUSTED."""
        what = f"base model {model}" if model else "tuning jobs"
        self.fail_next(
            429, "Quota exceeded for aiplatform.googleapis.com/global_concurrent_managed_oss_tuning_jobs_per_project "
            f"with base model: {what}. Please submit a quota increase request "
            "(https://cloud.google.com/vertex-ai/docs/generative-ai/quotas-genai).",
            method="POST", path=r"/tuningJobs$", times=times)  # fmt: skip

    def now(self) -> float:
        """The fake's clock: real time plus whatever :meth:`advance` added."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the fake's clock forward, so jobs and deployments move on without waiting."""
        with self._lock:
            self._offset += seconds

    # ------------------------------------------------------------------ reading what happened
    def bodies(self, method: str = "POST", path: str = r"/tuningJobs$") -> list[dict]:
        """The JSON bodies of the recorded requests with this method whose path matches the regex."""
        return [r.body for r in self.requests if r.method == method and re.search(path, r.path)]

    def job(self, name_or_id: str) -> Job:
        return next(j for j in self.jobs.values() if j.name == name_or_id or j.id == name_or_id)

    def project_number(self, project: str) -> str:
        if project.isdigit():
            return project
        made_up = str(10**11 + int(hashlib.sha1(project.encode()).hexdigest()[:8], 16))
        return self.project_numbers.setdefault(project, made_up)

    def _new_id(self) -> str:
        with self._lock:
            self._counter += 1
            return str(int(time.time() * 1000) % 10**13 * 1000 + self._counter)

    # ------------------------------------------------------------------ dispatch
    def handle(self, method: str, path: str, query: dict, body: dict | None, headers: dict):
        """Answer one request: (status, JSON body) or (status, list of SSE events)."""
        with self._lock:
            self.requests.append(Recorded(method, path, query, body, headers))
        if headers.get("authorization", "") != f"Bearer {self.token}":
            raise ApiError(401, "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                                "login cookie or other valid authentication credential. See "
                                "https://developers.google.com/identity/sign-in/web/devconsole-project.")
        m = re.fullmatch(r"/(v1|v1beta1|ui)/projects/([^/]+)/locations/([^/:]+)(.*)", path)
        if not m:
            raise ApiError(404, f"The requested URL {path} was not found on this server.", "NOT_FOUND")
        project, location, rest = m.group(2), m.group(3), m.group(4)
        self._check_access(method, path, project)
        if self.dedicated_dns and headers.get("host") == self.dedicated_dns:  # the dedicated endpoints' own host
            hit = re.fullmatch(r"/endpoints/([^/:]+):predict", rest)
            if method != "POST" or not hit or m.group(1) != "v1":
                raise ApiError(404, f"The requested URL {path} was not found on this server.", "NOT_FOUND")
            with self._lock:
                return self._predict(self.project_number(project), location, hit.group(1), query=query,
                                     body=body or {}, project_id=project, dedicated_host=True)
        routes = [
            ("POST", r"/tuningJobs", self._create_job),
            ("GET", r"/tuningJobs", self._list_jobs),
            ("GET", r"/tuningJobs/([^/:]+)", self._get_job),
            ("POST", r"/tuningJobs/([^/:]+):cancel", self._cancel_job),
            ("POST", r":deploy", self._deploy),
            ("POST", r":evaluateInstances", self._evaluate_instances),
            ("GET", r"/operations/([^/:]+)", self._get_operation),
            ("GET", r"/endpoints/([^/:]+)", self._get_endpoint),
            ("POST", r"/endpoints/([^/:]+):predict", self._predict),
            ("POST", r"/endpoints/([^/:]+):undeployModel", self._undeploy_model),
            ("DELETE", r"/endpoints/([^/:]+)", self._delete_endpoint),
            ("POST", r"/endpoints/([^/:]+):(generateContent|streamGenerateContent)", self._generate),
            # Google's own models: POST .../publishers/google/models/{MODEL}:generateContent (Vertex AI's
            # generateContent REST reference); the fake serves its Gemini models, and answers as base_reply_to.
            ("POST", r"/publishers/google/models/(gemini-[\w.-]+):(generateContent|streamGenerateContent)",
             self._generate_base),
            ("POST", r"/endpoints/([^/:]+)/chat/completions", self._chat),
            ("POST", r"/batchPredictionJobs", self._create_batch),
            ("GET", r"/batchPredictionJobs/([^/:]+)", self._get_batch),
            ("GET", r"/models/([^/:@]+)(@\d+)?", self._get_model),
            ("GET", r"/metadataStores/default/contexts", self._list_contexts),
            ("GET", r"/metadataStores/default/contexts/([^/:]+)", self._get_context),
            ("GET", r"/metadataStores/default/artifacts/([^/:]+)", self._get_artifact),
            ("GET", r"/tensorboards/([^/:]+)", self._get_tensorboard),
            ("GET", r"/tensorboards/([^/:]+):batchRead", self._batch_read),
            ("GET", r"/tensorboards/([^/:]+)/experiments/([^/:]+)", self._get_tb_experiment),
            ("GET", r"/tensorboards/([^/:]+)/experiments/([^/:]+)/runs", self._list_tb_runs),
            ("GET", r"/tensorboards/([^/:]+)/experiments/([^/:]+)/runs/([^/:]+)", self._get_tb_run),
            ("GET", r"/tensorboards/([^/:]+)/experiments/([^/:]+)/runs/([^/:]+)/timeSeries", self._list_series),
            ("GET", r"/tensorboards/([^/:]+)/experiments/([^/:]+)/runs/([^/:]+)/timeSeries/([^/:]+)",
             self._get_series),
            ("GET", r"/tensorboards/([^/:]+)/experiments/([^/:]+)/runs/([^/:]+)/timeSeries/([^/:]+):read",
             self._read_series),
        ]  # fmt: skip
        for verb, pattern, fn in routes:
            hit = re.fullmatch(pattern, rest)
            if verb == method and hit:
                with self._lock:
                    return fn(self.project_number(project), location, *hit.groups(), query=query, body=body or {},
                              project_id=project)  # fmt: skip
        raise ApiError(404, f"The requested URL {path} was not found on this server.", "NOT_FOUND")

    _PERMISSIONS = ((r"/tuningJobs$", "POST", "aiplatform.tuningJobs.create"),
                    (r"/tuningJobs$", "GET", "aiplatform.tuningJobs.list"),
                    (r"/tuningJobs/[^/:]+$", "GET", "aiplatform.tuningJobs.get"),
                    (r":cancel$", "POST", "aiplatform.tuningJobs.cancel"),
                    (r":deploy$", "POST", "aiplatform.endpoints.deploy"),
                    (r":evaluateInstances$", "POST", "aiplatform.locations.evaluateInstances"),
                    (r"/endpoints/[^/]+[:/]", "POST", "aiplatform.endpoints.predict"),
                    (r"/endpoints/[^/:]+$", "GET", "aiplatform.endpoints.get"),
                    (r"/metadataStores/[^/]+/contexts/", "GET", "aiplatform.contexts.get"),
                    (r"/metadataStores/[^/]+/artifacts/", "GET", "aiplatform.artifacts.get"),
                    (r"/tensorboards/", "GET", "aiplatform.tensorboardTimeSeries.read"))  # fmt: skip

    def _check_access(self, method: str, path: str, project: str) -> None:
        names, number = {project, self.project_number(project)}, self.project_number(project)
        if any(self.project_number(p) == number for p in self._disabled):
            raise ApiError(403, f"Vertex AI API has not been used in project {number} before or it is disabled. "
                                f"Enable it by visiting https://console.developers.google.com/apis/api/"
                                f"aiplatform.googleapis.com/overview?project={number} then retry. If you enabled this "
                                "API recently, wait a few minutes for the action to propagate to our systems and "
                                "retry.",
                           "PERMISSION_DENIED",
                           [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "SERVICE_DISABLED",
                             "domain": "googleapis.com",
                             "metadata": {"service": "aiplatform.googleapis.com", "consumer": f"projects/{number}"}}])
        for pattern, verb, permission in self._PERMISSIONS:
            if verb == method and re.search(pattern, path) and permission in self._denied:
                only = self._denied[permission]
                if only is None or only in names:
                    resource = "/".join(path.split("/")[2:6])
                    raise ApiError(403, f"Permission '{permission}' denied on resource "
                                        f"'//aiplatform.googleapis.com/{resource}' (or it may not exist).",
                                   "PERMISSION_DENIED",
                                   [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                     "reason": "IAM_PERMISSION_DENIED", "domain": "aiplatform.googleapis.com",
                                     "metadata": {"permission": permission}}])  # fmt: skip
                break
        with self._lock:
            for rule, error in self._failures:
                if rule["left"] > 0 and rule["method"] in (None, method) and (
                        rule["path"] is None or re.search(rule["path"], path)):  # fmt: skip
                    rule["left"] -= 1
                    raise error or _Dropped()

    # ------------------------------------------------------------------ tuning jobs
    def _load_dataset(self, uri: str | None, field_name: str, required: bool) -> Dataset | None:
        if not uri:
            if required:
                raise ApiError(400, f"{field_name} is required.")
            return None
        if not uri.startswith("gs://"):
            raise ApiError(400, f"{field_name} must be a Cloud Storage URI (gs://...), got {uri!r}.")
        data = self.storage.read(uri)
        if data is None:
            raise ApiError(400, f"Dataset {uri} given as {field_name} does not exist or cannot be read.")
        records = []
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ApiError(400, f"Line {n} of {uri} ({field_name}) is not valid JSON: {e.msg}.") from None
            if not isinstance(rec, dict):
                raise ApiError(400, f"Line {n} of {uri} ({field_name}) is not a JSON object.")
            records.append(rec)
        if not records:
            raise ApiError(400, f"Dataset {uri} given as {field_name} has no examples.")
        return Dataset(uri, records)

    @staticmethod
    def _check_fields(body: dict) -> None:
        """Refuse unknown fields and enum values as the service's JSON parser does."""
        def bad_name(name, where):
            raise ApiError(400, f'Invalid JSON payload received. Unknown name "{name}" at \'{where}\': '
                                "Cannot find field.")

        def bad_enum(key, value, where, message):
            raise ApiError(400, f"Invalid value at '{where}.{_snake(key)}' (type.googleapis.com/google.cloud."
                                f"aiplatform.v1beta1.{message}.{ENUMS[key][0]}), {json.dumps(value)}",
                           details=[{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
                               {"field": f"{where}.{_snake(key)}", "description": f"Invalid value at "
                                f"'{where}.{_snake(key)}', {json.dumps(value)}"}]}])  # fmt: skip

        for key in body:
            if key not in JOB_FIELDS:
                bad_name(key, "tuning_job")
        specs = [key for key in TUNING_SPECS if key in body]
        if len(specs) > 1:
            raise ApiError(400, f"Invalid JSON payload received. Oneof field 'tuning_spec' is already set. "
                                f"Cannot set '{specs[1]}'")
        for spec_key, message, hyper_message in (
                ("supervisedTuningSpec", "SupervisedTuningSpec", "SupervisedHyperParameters"),
                ("distillationSpec", "DistillationSpec", "DistillationHyperParameters"),
                ("preferenceOptimizationSpec", "PreferenceOptimizationSpec",
                 "PreferenceOptimizationHyperParameters")):  # fmt: skip
            spec = body.get(spec_key)
            if not isinstance(spec, dict):
                continue
            where = f"tuning_job.{_snake(spec_key)}"
            for key, value in spec.items():
                if key not in SPEC_FIELDS[spec_key]:
                    bad_name(key, where)
                if key in ENUMS and not (value in ENUMS[key][1] or isinstance(value, int)):
                    bad_enum(key, value, where, message)
            hp = spec.get("hyperParameters") or {}
            for key, value in hp.items():
                if key not in HYPER_FIELDS[spec_key]:
                    bad_name(key, f"{where}.hyper_parameters")
                if key in ENUMS and not (value in ENUMS[key][1] or isinstance(value, int)):
                    bad_enum(key, value, f"{where}.hyper_parameters", hyper_message)

    def _create_job(self, project, location, *, query, body, project_id):
        self._check_fields(body)
        labels = body.get("labels") or {}
        if len(labels) > 64:
            raise ApiError(400, f"Too many labels: {len(labels)}; a tuning job takes at most 64.")
        for key, value in labels.items():
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", key) or not re.fullmatch(r"[a-z0-9_-]{0,63}", str(value)):
                raise ApiError(400, f"Invalid label {key}={value}: keys and values are lower-case letters, digits, "
                                    "'_' or '-', at most 63 characters; keys start with a letter.")
        base = body.get("baseModel")
        pre = body.get("preTunedModel")
        if pre:  # continuing a tuned Gemini model: its base is the base of the job that tuned it
            name = pre.get("tunedModelName") or pre.get("tuned_model_name") or ""
            m = re.fullmatch(r"projects/[^/]+/locations/[^/]+/models/([^/@]+)(@\d+)?", name)
            source = next((j for j in self.jobs.values() if m and j.id == m.group(1) and j.is_gemini), None)
            if source is None:
                raise ApiError(404, f"Tuned model {name} not found.", "NOT_FOUND")
            base = base or source.base_model
        if not base:
            raise ApiError(400, "base_model is required.")
        known = OPEN_MODELS | GEMINI_MODELS
        if base not in known:
            raise ApiError(400, f"Base model {base} is not supported for tuning. Supported models: "
                                f"{', '.join(sorted(known))}.")  # fmt: skip
        hyper = (body.get("supervisedTuningSpec") or {}).get("hyperParameters") or {}
        for key, instead in GEMINI_REFUSES.items():
            if base.startswith("gemini-") and key in hyper:
                raise ApiError(400, f"{key} is not supported for tuning {base}"
                                    + (f"; use {instead}." if instead else "."))
        regions = self.regions.get(base, regions_for(base))
        if location not in regions:
            raise ApiError(400, f"Base model {base} is not supported for tuning in region {location}. "
                                f"Supported regions: {', '.join(sorted(regions))}.", "FAILED_PRECONDITION")
        if "distillationSpec" in body:
            spec, prefix = body["distillationSpec"], "distillationSpec"
            teacher = spec.get("baseTeacherModel")
            if base not in STUDENTS:
                raise ApiError(400, f"Base model {base} is not supported as a distillation student.")
            if teacher not in TEACHERS:
                raise ApiError(400, f"Teacher model {teacher} is not supported for distillation. "
                                    f"Supported teachers: {', '.join(sorted(TEACHERS))}.")
            train_field = "promptDatasetUri"
        elif "preferenceOptimizationSpec" in body:
            spec, prefix = body["preferenceOptimizationSpec"], "preferenceOptimizationSpec"
            if base not in PREFERENCE_MODELS:
                raise ApiError(400, f"Base model {base} is not supported for preference tuning.")
            train_field = "trainingDatasetUri"
        else:
            spec, prefix = body.get("supervisedTuningSpec") or {}, "supervisedTuningSpec"
            train_field = "trainingDatasetUri"
        if not base.startswith("gemini-") and not body.get("outputUri"):
            raise ApiError(400, "output_uri is required to tune an open model.")
        train = self._load_dataset(spec.get(train_field), f"{prefix}.{train_field}", True)
        validation = self._load_dataset(spec.get("validationDatasetUri"), f"{prefix}.validationDatasetUri", False)
        if prefix == "preferenceOptimizationSpec":
            for data, where in ((train, "trainingDatasetUri"), (validation, "validationDatasetUri")):
                for line, record in enumerate(data.records if data else [], 1):
                    problem = _preference_problem(record)
                    if problem:
                        raise ApiError(400, f"{prefix}.{where}: line {line}: {problem}")
        if spec.get("evaluationConfig") is not None:
            self._check_evaluation(spec["evaluationConfig"], base, location, validation, prefix)
        if body.get("customBaseModel") and not body["customBaseModel"].startswith("gs://"):
            raise ApiError(400, f"customBaseModel must be a Cloud Storage folder, got {body['customBaseModel']!r}.")
        outcome = self._outcomes.pop(0) if self._outcomes else Outcome()
        name = f"projects/{project}/locations/{location}/tuningJobs/{self._new_id()}"
        job = Job(name, project, location, json.loads(json.dumps(body)), self.now(), outcome,
                  outcome.step_seconds if outcome.step_seconds is not None else self.step_seconds, train, validation)
        if pre:
            job.resolved_base = base
        self.jobs[name] = job
        return 200, self._render(job)

    @staticmethod
    def _check_evaluation(config: dict, base: str, location: str, validation, prefix: str) -> None:
        """Evaluation during tuning, refused as the service refuses it (see EVALUATION_SPECS)."""
        where = f"{prefix}.evaluation_config"
        if not base.startswith("gemini-"):
            raise ApiError(400, f"{where} is not supported for base model {base}.")
        if location != EVALUATION_REGION:
            raise ApiError(400, f"{where} is only supported in {EVALUATION_REGION}.", "FAILED_PRECONDITION")
        if validation is None:
            raise ApiError(400, f"{where} requires {prefix}.validation_dataset_uri: it is what each checkpoint is "
                                "evaluated on.")
        config = _snake_keys(config)
        unknown = sorted(set(config) - {"metrics", "output_config", "autorater_config", "inference_generation_config"})
        if unknown:
            raise ApiError(400, f'Invalid JSON payload received. Unknown name "{unknown[0]}" at \'{where}\': '
                                "Cannot find field.")
        metrics = config.get("metrics") or []
        if not metrics:
            raise ApiError(400, f"{where}.metrics must not be empty.")
        for i, metric in enumerate(metrics):
            specs = [k for k in metric if k != "aggregation_metrics"]
            if any(k not in EVALUATION_SPECS for k in specs) or len(specs) != 1:
                raise ApiError(400, f"{where}.metrics[{i}] must set exactly one of {', '.join(EVALUATION_SPECS)}; "
                                    f"got {', '.join(specs) or 'none'}.")
            bad = [a for a in metric.get("aggregation_metrics") or [] if a not in AGGREGATIONS]
            if bad:
                raise ApiError(400, f"Invalid value at '{where}.metrics[{i}].aggregation_metrics' ({bad[0]}).")
            kind = specs[0]
            if kind == "rouge_spec" and metric[kind].get("rouge_type") not in ROUGE_TYPES:
                raise ApiError(400, f"{where}.metrics[{i}].rouge_spec.rouge_type {metric[kind].get('rouge_type')!r} "
                                    f"is not one of {', '.join(sorted(ROUGE_TYPES))}.")
            if kind in ("pointwise_metric_spec", "pairwise_metric_spec") and \
                    not metric[kind].get("metric_prompt_template"):
                raise ApiError(400, f"{where}.metrics[{i}].{kind}.metric_prompt_template is required.")
        prefix_uri = ((config.get("output_config") or {}).get("gcs_destination") or {}).get("output_uri_prefix")
        if not str(prefix_uri or "").startswith("gs://"):
            raise ApiError(400, f"{where}.output_config.gcs_destination.output_uri_prefix must be a gs:// folder.")

    def _evaluation_runs(self, job: Job, state: str) -> list[dict]:
        """``evaluateDatasetRuns``: one per checkpoint the job has reached, the newest still running (only its
        ``evaluationRun``) until the job ends; each metric's AVERAGE and STANDARD_DEVIATION, in config order."""
        config = _snake_keys(job.spec.get("evaluationConfig") or {})
        reached = job.total_steps * job.progress(self.now())
        runs = []
        output = config["output_config"]["gcs_destination"]["output_uri_prefix"].rstrip("/")
        done = [(epoch, step) for epoch, step in job.checkpoint_steps() if step <= reached]
        for epoch, step in done:
            run = {"checkpointId": str(epoch),
                   "evaluationRun": f"projects/{job.project}/locations/{job.location}/evaluationRuns/{job.id}{epoch}"}
            runs.append(run)
            if (epoch, step) == done[-1] and state not in ENDED_STATES:
                continue  # the last checkpoint's evaluation is still running
            results = []
            for metric in config["metrics"]:
                kind = next(k for k in metric if k != "aggregation_metrics")
                field_name, score = EVALUATION_RESULTS.get(kind, ("pairwiseMetricResult", None))
                for aggregation in metric.get("aggregation_metrics") or ["AVERAGE"]:
                    value = score(step / job.total_steps) if score else None
                    if aggregation == "STANDARD_DEVIATION" and value is not None:
                        value = 0.1
                    results.append({"aggregationMetric": aggregation, field_name:
                                    {"score": round(value, 4)} if value is not None else {"pairwiseChoice": "TIE"}})
            run["evaluateDatasetResponse"] = {
                "aggregationOutput": {"aggregationResults": results,
                                      "dataset": {"gcsSource": {"uris": [job.validation.uri]}}},
                "outputInfo": {"gcsOutputDirectory": f"{output}/evaluation_{rfc3339(job.created)}_{epoch}"}}
        return runs

    def _evaluate_instances(self, project, location, *, query, body, project_id):
        """The Gen AI evaluation service's ``evaluateInstances`` for an autorater metric (EvaluationService in
        aiplatform_v1beta1's evaluation_service.py): one instance of ``pointwiseMetricInput`` or
        ``pairwiseMetricInput``, whose template the service fills from ``jsonInstance`` (a JSON object of strings;
        every ``{variable}`` of the template must be in it), graded by a fake Gemini: pointwise 5 when the response
        is the reference, 3 when it holds it, else 1; pairwise the response that is the reference (``CANDIDATE``
        is ``response``, ``BASELINE`` is ``baseline_model_response``), else ``TIE``. Proto JSON: camelCase or
        snake_case keys alike, null as unset."""
        request = _snake_keys(body)
        kinds = [k for k in ("pointwise_metric_input", "pairwise_metric_input") if k in request]
        other = sorted(set(request) - {"pointwise_metric_input", "pairwise_metric_input", "autorater_config",
                                       "location"} - {k for k in request if k.endswith("_input")})
        if other:
            raise ApiError(400, f'Invalid JSON payload received. Unknown name "{other[0]}": Cannot find field.')
        if len(kinds) != 1:
            raise ApiError(400, "EvaluateInstancesRequest.metric_inputs: set exactly one of pointwise_metric_input "
                                "and pairwise_metric_input (the fake grades autorater metrics only).")
        given = request[kinds[0]]
        template = (given.get("metric_spec") or {}).get("metric_prompt_template")
        if not template:
            raise ApiError(400, f"{kinds[0]}.metric_spec.metric_prompt_template is required.")
        try:
            values = json.loads((given.get("instance") or {}).get("json_instance") or "")
        except ValueError:
            raise ApiError(400, f"{kinds[0]}.instance.json_instance must be a JSON object.") from None
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            raise ApiError(400, f"{kinds[0]}.instance.json_instance must be a JSON object of strings.")
        missing = sorted(set(re.findall(r"\{(\w+)\}", template)) - set(values))
        if missing:
            raise ApiError(400, f"The metric prompt template needs {{{missing[0]}}}, which the instance lacks.")
        model = (request.get("autorater_config") or {}).get("autorater_model")
        if model is not None and not re.fullmatch(r"projects/[^/]+/locations/[^/]+/(publishers/google/models/"
                                                  r"gemini-[\w.-]+|endpoints/[^/]+)", model):
            raise ApiError(400, f"autorater_config.autorater_model {model!r} must be a publisher model "
                                "(projects/P/locations/L/publishers/google/models/M) or an endpoint.")
        self.evaluations.append({"kind": kinds[0], "values": values, "model": model, "template": template})

        def same(a: str, b: str) -> bool:
            return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()

        reference, response = values.get("reference", ""), values.get("response", "")
        if kinds[0] == "pointwise_metric_input":
            score = 5.0 if same(response, reference) else 3.0 if reference.casefold() in response.casefold() else 1.0
            return 200, {"pointwiseMetricResult": {"score": score, "explanation": f"Rated {score:g} against the "
                                                                                  "reference."}}
        baseline = values.get("baseline_model_response", "")
        choice = "TIE" if same(response, reference) == same(baseline, reference) else \
            "CANDIDATE" if same(response, reference) else "BASELINE"
        return 200, {"pairwiseMetricResult": {"pairwiseChoice": choice, "explanation": f"{choice} agrees better."}}

    def _find_job(self, project, location, job_id) -> Job:
        job = self.jobs.get(f"projects/{project}/locations/{location}/tuningJobs/{job_id}")
        if not job:
            raise ApiError(404, f"The TuningJob projects/{project}/locations/{location}/tuningJobs/{job_id} "
                                "does not exist.")  # fmt: skip
        return job

    def _get_job(self, project, location, job_id, *, query, body, project_id):
        job = self._find_job(project, location, job_id)
        self._gets[job.name] = looks = self._gets.get(job.name, 0) + 1
        if self.throttle_every and looks % self.throttle_every == 0:
            self.throttled += 1
            raise ApiError(429, "Quota exceeded for quota metric 'Resource management (CRUD) requests' and limit "
                                "'Resource management (CRUD) requests per minute per region' of service "
                                f"'aiplatform.googleapis.com' for consumer 'project_number:{project}'.")
        return 200, self._render(job)

    def _list_jobs(self, project, location, *, query, body, project_id):
        jobs = sorted((j for j in self.jobs.values() if j.project == project and j.location == location),
                      key=lambda j: (j.created, j.name), reverse=True)  # fmt: skip
        size = int((query.get("pageSize") or ["0"])[0]) or 100
        start = int((query.get("pageToken") or ["0"])[0] or 0)
        page = jobs[start:start + size]
        out: dict = {"tuningJobs": [self._render(j) for j in page]} if page else {}
        if start + size < len(jobs):
            out["nextPageToken"] = str(start + size)
        return 200, out

    def _cancel_job(self, project, location, job_id, *, query, body, project_id):
        job = self._find_job(project, location, job_id)
        state = self._render(job)["state"]
        if state in ENDED_STATES:
            raise ApiError(400, f"Cannot cancel tuning job {job.name} in state {state}.", "FAILED_PRECONDITION")
        if job.cancel_requested is None:
            job.cancel_requested = self.now()
        return 200, {}

    def _render(self, job: Job) -> dict:
        """The job as the service returns it at this moment (writing its outputs once it has succeeded)."""
        now = self.now()
        state, sub, start, end = job.status(now)
        out = json.loads(json.dumps(job.body))  # the service's defaults go into a copy
        out.update(name=job.name, state=state, createTime=rfc3339(job.created), updateTime=rfc3339(min(
            now, end or now)))  # fmt: skip
        if sub:
            out["tuningJobState"] = sub
        if "preTunedModel" in out:  # answered in proto JSON's camelCase, with the base the service resolved
            pre = {re.sub(r"_(\w)", lambda m: m.group(1).upper(), k): v for k, v in out["preTunedModel"].items()}
            out["preTunedModel"] = {**pre, "baseModel": job.resolved_base}
        if start:
            out["startTime"] = rfc3339(start)
        if end:
            out["endTime"] = rfc3339(end)
        if "tunedModelDisplayName" not in out and job.is_gemini:
            out["tunedModelDisplayName"] = f"{job.base_model}-tuned-{job.id}"
        filled = "supervisedTuningSpec" if "supervisedTuningSpec" in out else "preferenceOptimizationSpec"
        if job.is_gemini and filled in out:  # the service fills in its defaults
            hp = out[filled].setdefault("hyperParameters", {})
            hp.setdefault("epochCount", str(job.epochs))
            hp.setdefault("learningRateMultiplier", 1.0)
            hp.setdefault("adapterSize", "ADAPTER_SIZE_FOUR")
        if _PHASE_INDEX.get(sub or "", 0) >= 2 or state in SUCCEEDED_STATES:  # the dataset has been read
            out["tuningDataStats"] = self._data_stats(job)
        if start:
            out["experiment"] = self._experiment_name(job)
        if state == "JOB_STATE_FAILED":
            out["error"] = job.outcome.error or {"code": 13, "message": "Internal error occurred while tuning. "
                                                                        "Please retry."}
        elif state == "JOB_STATE_CANCELLED":
            out["error"] = {"code": 1, "message": "CANCELED"}
        elif state == "JOB_STATE_EXPIRED":
            out["error"] = job.outcome.error or {"code": 4, "message": "The tuning job waited too long for capacity "
                                                                       "and expired. Please retry later."}
        elif state == "JOB_STATE_PARTIALLY_SUCCEEDED" and job.outcome.error:
            out["error"] = job.outcome.error
        if job.spec.get("evaluationConfig") is not None and start:
            out["evaluateDatasetRuns"] = self._evaluation_runs(job, state)
        if state in SUCCEEDED_STATES:
            if job.is_gemini:
                out["tunedModel"] = self._tuned_gemini(job)
            else:  # registered in the Model Registry too, without checkpoints or an endpoint
                out["tunedModel"] = {"model": f"projects/{job.project}/locations/{job.location}/models/{job.id}@1"}
                if not job.artifacts_written:
                    self._write_artifacts(job)
        return out

    def _data_stats(self, job: Job) -> dict:
        if "distillationSpec" in job.body:
            stats = job.train.stats(job.epochs, job.total_steps, distillation=True)
            return {"distillationDataStats": {"trainingDatasetStats": stats}}
        if "preferenceOptimizationSpec" in job.body:  # PreferenceOptimizationDataStats: no truncation counts
            stats = job.train.stats(job.epochs, job.total_steps)
            for key in ("totalTruncatedExampleCount", "truncatedExampleIndices", "totalTuningCharacterCount",
                        "totalBillableCharacterCount", "userMessagePerExampleDistribution"):
                stats.pop(key, None)
            return {"preferenceOptimizationDataStats": stats}
        return {"supervisedTuningDataStats": job.train.stats(job.epochs, job.total_steps)}

    def _tuned_gemini(self, job: Job) -> dict:
        prefix = f"projects/{job.project}/locations/{job.location}"
        if not job.endpoints:
            for epoch, _step in job.checkpoint_steps():
                endpoint = f"{prefix}/endpoints/{self._new_id()}"
                self.endpoints[endpoint] = {"kind": "gemini", "job": job.name, "model": f"{prefix}/models/{job.id}",
                                            "checkpoint": str(epoch), "created": self.now()}  # fmt: skip
                job.endpoints.append(endpoint)
        checkpoints = [{"checkpointId": str(e), "epoch": str(e), "step": str(s), "endpoint": ep}
                       for (e, s), ep in zip(job.checkpoint_steps(), job.endpoints)]  # fmt: skip
        return {"model": f"{prefix}/models/{job.id}@1", "endpoint": job.endpoints[-1], "checkpoints": checkpoints}

    def _write_artifacts(self, job: Job) -> None:
        out = job.body["outputUri"].rstrip("/")
        config = json.dumps({"architectures": ["FakeForCausalLM"], "base_model": job.base_model}).encode()
        folders = [f"checkpoint-{step}" for _, step in job.checkpoint_steps()] + ["final"]
        sources = self.weights if isinstance(self.weights, list) else [self.weights]
        for number, folder in enumerate(folders):
            base = f"{out}/postprocess/node-0/checkpoints/{folder}"
            if self.weights is not None:
                source = sources[-1] if folder == "final" else sources[min(number, len(sources) - 1)]
                for name, data in _checkpoint_files(Path(source), self.weights_dtype).items():
                    self.storage.write(f"{base}/{name}", data)
                continue
            self.storage.write(f"{base}/model-00001-of-00001.safetensors", _safetensors(folder))
            self.storage.write(f"{base}/config.json", config)
        if "distillationSpec" in job.body:
            lines = []
            for rec in job.train.records:
                prompt = _prompt_of(rec)
                lines.append(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                      {"role": "assistant", "content": reply_to(prompt)}]}))
            self.storage.write(f"{out}/distillation_labelled_dataset.jsonl", ("\n".join(lines) + "\n").encode())
        job.artifacts_written = True

    # ------------------------------------------------------------------ experiments and TensorBoard
    def _experiment_name(self, job: Job) -> str:
        return f"projects/{job.project}/locations/{job.location}/metadataStores/default/contexts/{job.experiment_id}"

    def _tensorboard(self, project, location) -> str:
        return f"projects/{project}/locations/{location}/tensorboards/{int(project) % 9_000_000 + 1_000_000}"

    def _started_job(self, project, location, predicate) -> Job | None:
        now = self.now()
        for job in self.jobs.values():
            if job.project == project and job.location == location and predicate(job) and job.status(now)[2]:
                return job
        return None

    def _get_context(self, project, location, context_id, *, query, body, project_id):
        prefix = f"projects/{project}/locations/{location}/metadataStores/default/contexts"
        job = self._started_job(project, location, lambda j: context_id == j.experiment_id)
        base = {"schemaVersion": "0.0.1", "etag": "1"}
        if job:
            return 200, {**base, "name": f"{prefix}/{context_id}", "displayName": context_id,
                         "schemaTitle": "system.Experiment", "createTime": rfc3339(job.created),
                         "updateTime": rfc3339(job.created), "description": f"Tuning experiment of {job.name}",
                         "metadata": {"backing_tensorboard_resource": self._tensorboard(project, location),
                                      "experiment_deleted": False}}  # fmt: skip
        job = self._started_job(project, location, lambda j: context_id == f"{j.experiment_id}-{j.run_id}")
        if job:
            return 200, self._run_context(job)
        raise ApiError(404, f"Context {prefix}/{context_id} not found.")

    def _run_context(self, job: Job) -> dict:
        """The experiment run's context: its id is ``<experiment>-<run>`` (aiplatform's
        ``_format_experiment_run_resource_id``), its parent the experiment."""
        state = "COMPLETE" if job.status(self.now())[3] else "RUNNING"
        return {"name": f"{self._experiment_name(job)}-{job.run_id}", "displayName": job.run_id,
                "schemaTitle": "system.ExperimentRun", "schemaVersion": "0.0.1", "etag": "1",
                "createTime": rfc3339(job.created), "updateTime": rfc3339(job.created),
                "parentContexts": [self._experiment_name(job)],
                "metadata": {"state": state, "params": {}, "metrics": {}}}  # fmt: skip

    def _list_contexts(self, project, location, *, query, body, project_id):
        """Contexts matching a filter of the form aiplatform's ``ExperimentRun.list`` sends
        (``schema_title="..." AND parent_contexts:"..."``, metadata/utils.py ``_make_filter_string``);
        any other filter is refused."""
        text = (query.get("filter") or [""])[-1]
        terms = {}
        for part in filter(None, text.split(" AND ")):
            m = re.fullmatch(r'(schema_title)="([^"]+)"|(parent_contexts):"([^"]+)"', part.strip())
            if not m:
                raise ApiError(400, f"Invalid filter: {text!r}.")
            terms[m.group(1) or m.group(3)] = m.group(2) or m.group(4)
        now = self.now()
        found = [self._run_context(j) for j in self.jobs.values()
                 if j.project == project and j.location == location and j.status(now)[2]]
        found = [c for c in found if terms.get("schema_title", c["schemaTitle"]) == c["schemaTitle"]
                 and terms.get("parent_contexts", c["parentContexts"][0]) in c["parentContexts"]]
        return 200, {"contexts": found} if found else {}

    def _get_artifact(self, project, location, artifact_id, *, query, body, project_id):
        job = self._started_job(project, location, lambda j: artifact_id == f"{j.experiment_id}-{j.run_id}-tb-run")
        name = f"projects/{project}/locations/{location}/metadataStores/default/artifacts/{artifact_id}"
        if not job or self.tensorboard_names == "experiment":
            raise ApiError(404, f"Artifact {name} not found.")
        run = self._tb_run_name(job)
        return 200, {"name": name, "displayName": job.run_id, "schemaTitle": "google.VertexTensorboardRun",
                     "schemaVersion": "0.0.1", "state": "LIVE", "etag": "1", "uri": f"https://{location}-"
                     f"aiplatform.googleapis.com/v1/{run}", "createTime": rfc3339(job.created),
                     "updateTime": rfc3339(job.created),
                     "metadata": {"resourceName": run, "vertex_experiment_tracking": True}}  # fmt: skip

    def _tb_ids(self, job: Job) -> tuple[str, str]:
        """(TensorBoard experiment id, run id) of a job's metrics (see ``tensorboard_names``)."""
        if self.tensorboard_names == "experiment":
            return job.experiment_id, job.run_id
        digest = hashlib.sha1(job.name.encode()).hexdigest()[:12]
        return f"tuning-{digest}", f"run-{digest}"

    def _tb_run_name(self, job: Job) -> str:
        experiment, run = self._tb_ids(job)
        return f"{self._tensorboard(job.project, job.location)}/experiments/{experiment}/runs/{run}"

    def _tb_job(self, project, location, tb, experiment=None, run=None) -> Job | None:
        if self._tensorboard(project, location).rsplit("/", 1)[1] != tb:
            raise ApiError(404, f"Tensorboard projects/{project}/locations/{location}/tensorboards/{tb} not found.")
        if experiment is None:
            return None
        job = self._started_job(project, location,
                                lambda j: self._tb_ids(j)[0] == experiment and run in (None, self._tb_ids(j)[1]))
        if not job:
            raise ApiError(404, f"{'TensorboardRun ' + run if run else 'TensorboardExperiment ' + experiment} "
                                "not found.")  # fmt: skip
        return job

    def _get_tensorboard(self, project, location, tb, *, query, body, project_id):
        self._tb_job(project, location, tb)
        return 200, {"name": self._tensorboard(project, location), "displayName": "Tuning experiments",
                     "createTime": rfc3339(0), "updateTime": rfc3339(0), "etag": "1", "runCount": len(self.jobs),
                     "blobStoragePathPrefix": f"cloud-ai-platform-{tb}/tensorboard-{tb}"}  # fmt: skip

    def _get_tb_experiment(self, project, location, tb, experiment, *, query, body, project_id):
        job = self._tb_job(project, location, tb, experiment)
        return 200, {"name": f"{self._tensorboard(project, location)}/experiments/{experiment}",
                     "displayName": experiment, "createTime": rfc3339(job.created),
                     "updateTime": rfc3339(job.created), "etag": "1", "source": "vertex_ai_tuning"}  # fmt: skip

    def _run_json(self, job: Job) -> dict:
        return {"name": self._tb_run_name(job), "displayName": self._tb_ids(job)[1], "createTime": rfc3339(job.created),
                "updateTime": rfc3339(job.created), "etag": "1"}  # fmt: skip

    def _list_tb_runs(self, project, location, tb, experiment, *, query, body, project_id):
        job = self._tb_job(project, location, tb, experiment)
        return 200, {"tensorboardRuns": [self._run_json(job)]}

    def _get_tb_run(self, project, location, tb, experiment, run, *, query, body, project_id):
        return 200, self._run_json(self._tb_job(project, location, tb, experiment, run))

    def _metrics(self, job: Job) -> dict[str, list[tuple[int, float, float]]]:
        return job.metrics(self.now(), self.metrics_every)

    def _series_id(self, name: str) -> str:
        return str(1000 + METRICS.index(name))

    def _series_json(self, job: Job, name: str, points: list) -> dict:
        return {"name": f"{self._tb_run_name(job)}/timeSeries/{self._series_id(name)}", "displayName": name,
                "valueType": "SCALAR", "pluginName": "scalars", "createTime": rfc3339(job.created),
                "updateTime": rfc3339(points[-1][1]), "etag": "1",
                "metadata": {"maxStep": str(points[-1][0]), "maxWallTime": rfc3339(points[-1][1])}}  # fmt: skip

    def _list_series(self, project, location, tb, experiment, run, *, query, body, project_id):
        job = self._tb_job(project, location, tb, experiment, run)
        series = [self._series_json(job, n, p) for n, p in self._metrics(job).items()]
        return 200, {"tensorboardTimeSeries": series} if series else {}

    def _series_data(self, job: Job, series_id: str, limit: int = 1000) -> dict:
        """A series' points; ``limit`` of them (-1: all) chosen at random when it has more, as the service does."""
        names = {self._series_id(n): n for n in METRICS}
        points = self._metrics(job).get(names.get(series_id, ""))
        if not points:
            raise ApiError(404, f"TensorboardTimeSeries {series_id} not found.")
        if 0 < limit < len(points):
            picked = random.Random(f"{job.name}/{series_id}/{len(points)}").sample(range(len(points)), limit)
            points = [points[k] for k in sorted(picked)]
        return {"tensorboardTimeSeriesId": series_id, "valueType": "SCALAR",
                "values": [{"step": str(s), "wallTime": rfc3339(w), "scalar": {"value": v}} for s, w, v in points]}

    def _get_series(self, project, location, tb, experiment, run, series_id, *, query, body, project_id):
        job = self._tb_job(project, location, tb, experiment, run)
        for name, points in self._metrics(job).items():
            if self._series_id(name) == series_id:
                return 200, self._series_json(job, name, points)
        raise ApiError(404, f"TensorboardTimeSeries {series_id} not found.")

    def _read_series(self, project, location, tb, experiment, run, series_id, *, query, body, project_id):
        job = self._tb_job(project, location, tb, experiment, run)
        raw = (query.get("maxDataPoints") or query.get("max_data_points") or ["0"])[-1]
        try:
            limit = int(raw)
        except ValueError:
            raise ApiError(400, f"Invalid value at 'max_data_points' (TYPE_INT32), \"{raw}\"") from None
        if limit < -1 or limit > 10_000:
            raise ApiError(400, f"max_data_points must be between 1 and 10000, or -1 for all data, not {limit}.")
        return 200, {"timeSeriesData": self._series_data(job, series_id, limit or 1000)}

    def _batch_read(self, project, location, tb, *, query, body, project_id):
        names = query.get("timeSeries") or query.get("time_series") or []
        if not names:
            raise ApiError(400, "time_series is required.")
        if len(names) > 20:
            raise ApiError(400, "At most 20 time series can be read at once.")
        data = []
        for name in names:
            m = re.fullmatch(r"projects/[^/]+/locations/[^/]+/tensorboards/([^/]+)/experiments/([^/]+)/runs/([^/]+)"
                             r"/timeSeries/([^/]+)", name)  # fmt: skip
            if not m or m.group(1) != tb:
                raise ApiError(400, f"Invalid time series name {name}.")
            data.append(self._series_data(self._tb_job(project, location, tb, m.group(2), m.group(3)), m.group(4)))
        return 200, {"timeSeriesData": data}

    # ------------------------------------------------------------------ deploy and operations
    # Model Garden's deploy (ModelGardenService.Deploy, google/cloud/aiplatform_v1beta1/types/model_garden_service.py):
    # a DeployRequest answered with a long-running operation that takes ``deploy_seconds`` of the fake's clock
    # (15-30 minutes by Google's notebooks). Its DeployOperationMetadata carries no endpoint (generic_metadata,
    # publisher_model, destination, project_number, model_id): the endpoint is named by the DeployResponse at the
    # end, or from the start by EndpointConfig.endpoint_user_id. The endpoint itself appears a third of the way in,
    # empty; its model is deployed at the end. Model Garden endpoints are dedicated (unless
    # dedicated_endpoint_disabled): their DNS name comes ``dns_delay`` seconds after the deploy ends, so the first
    # reads of the endpoint lack it.
    _DEPLOY_FIELDS = {"publisherModelName", "huggingFaceModelId", "customModel", "endpointConfig", "modelConfig",
                      "deployConfig"}
    _ENDPOINT_CONFIG_FIELDS = {"endpointDisplayName", "dedicatedEndpointEnabled", "dedicatedEndpointDisabled",
                               "privateServiceConnectConfig", "endpointUserId"}

    def fail_deploy(self, code: int = 8, message: str = "The following quota metrics exceed quota limits: "
                    "aiplatform.googleapis.com/custom_model_serving_nvidia_l4_gpus") -> None:
        """Make the next deploy's operation end with this error (a google.rpc.Status code; 8: RESOURCE_EXHAUSTED)."""
        self._deploy_errors.append({"code": code, "message": message})

    def _deploy(self, project, location, *, query, body, project_id):
        for key in body:
            if key not in self._DEPLOY_FIELDS:
                raise ApiError(400, f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.')
        config = body.get("endpointConfig") or {}
        for key in config:
            if key not in self._ENDPOINT_CONFIG_FIELDS:
                raise ApiError(400, f'Invalid JSON payload received. Unknown name "{key}" at \'endpoint_config\': '
                                    "Cannot find field.")
        uri = (body.get("customModel") or {}).get("gcsUri")
        if not uri:
            raise ApiError(400, "custom_model.gcs_uri is required to deploy a custom model.")
        spec = ((body.get("deployConfig") or {}).get("dedicatedResources") or {}).get("machineSpec") or {}
        accelerator = spec.get("acceleratorType")
        if accelerator is not None:
            from google.cloud.aiplatform_v1beta1.types import AcceleratorType

            known = accelerator in AcceleratorType.__members__ or (
                isinstance(accelerator, int) and accelerator in {a.value for a in AcceleratorType})
            if not known or accelerator in ("ACCELERATOR_TYPE_UNSPECIFIED", 0):
                raise ApiError(400, "Invalid value at 'deploy_config.dedicated_resources.machine_spec."
                                    "accelerator_type' (type.googleapis.com/google.cloud.aiplatform.v1beta1."
                                    f"AcceleratorType), {json.dumps(accelerator)}")
        bucket_path = uri.rstrip("/") + "/model-00001-of-00001.safetensors"
        if self.storage.host and self.storage.read(bucket_path) is None:
            raise ApiError(400, f"No model weights (*.safetensors) found in {uri}.")
        prefix = f"projects/{project}/locations/{location}"
        wanted = config.get("endpointUserId")
        if wanted is not None and not re.fullmatch(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?|[1-9][0-9]{0,8}", str(wanted)):
            raise ApiError(400, f"Invalid endpoint_user_id {wanted!r}: a letter then up to 62 of [a-z0-9-] ending "
                                "with a letter or digit, or a number of up to 9 digits without leading zeros.")
        endpoint = f"{prefix}/endpoints/{wanted or self._new_id()}"
        if endpoint in self.endpoints:
            raise ApiError(409, f"Endpoint {endpoint} already exists.", "ALREADY_EXISTS")
        op, model = f"{prefix}/operations/{self._new_id()}", f"{prefix}/models/{self._new_id()}"
        now = self.now()
        ready = now + self.deploy_seconds
        dedicated = not config.get("dedicatedEndpointDisabled")
        self.endpoints[endpoint] = {"kind": "open", "gcsUri": uri, "model": model,
                                    "created": now + self.deploy_seconds / 3,
                                    "displayName": config.get("endpointDisplayName") or "custom-model-endpoint",
                                    "deployConfig": body.get("deployConfig", {}), "ready": ready,
                                    "dedicated": dedicated, "dns_at": ready + self.dns_delay,
                                    "error": self._deploy_errors.pop(0) if self._deploy_errors else None}  # fmt: skip
        self.operations[op] = {"endpoint": endpoint, "model": model, "done_at": ready, "created": now,
                               "project_number": project}  # fmt: skip
        return 200, self._operation(op)

    def _operation(self, op: str) -> dict:
        info = self.operations[op]
        now = self.now()
        meta = {"@type": f"type.googleapis.com/{info.get('package', 'google.cloud.aiplatform.v1beta1')}."
                         f"{info.get('metadata_type', 'DeployOperationMetadata')}",
                "genericMetadata": {"createTime": rfc3339(info["created"]), "updateTime": rfc3339(now)},
                "destination": op.rsplit("/operations/", 1)[0]}  # fmt: skip
        deployed = self.endpoints.get(info.get("endpoint") or "")
        if "project_number" in info:  # a deploy: DeployOperationMetadata's own fields, the model once it is made
            meta["projectNumber"] = info["project_number"]
            if deployed and now >= deployed["created"]:
                meta["modelId"] = info["model"].rsplit("/", 1)[1]
        out = {"name": op, "metadata": meta}
        if now >= info["done_at"]:
            out["done"] = True
            if deployed and deployed.get("error"):
                out["error"] = deployed["error"]
            else:
                out["response"] = info.get("response") or {
                    "@type": "type.googleapis.com/google.cloud.aiplatform.v1beta1.DeployResponse",
                    "endpoint": info["endpoint"], "model": info["model"]}  # fmt: skip
        return out

    def _get_operation(self, project, location, op_id, *, query, body, project_id):
        op = f"projects/{project}/locations/{location}/operations/{op_id}"
        if op not in self.operations:
            raise ApiError(404, f"Operation {op} not found.")
        return 200, self._operation(op)

    # ------------------------------------------------------------------ endpoints and prediction
    def _endpoint(self, project, location, endpoint_id) -> tuple[str, dict]:
        name = f"projects/{project}/locations/{location}/endpoints/{endpoint_id}"
        info = self.endpoints.get(name)
        if not info or self.now() < info["created"]:  # a deploy makes its endpoint part-way
            raise ApiError(404, f"Endpoint {name} not found.")
        return name, info

    def _serving(self, info: dict) -> bool:
        """Whether an endpoint has a model deployed that answers (a deploy's is, once it ended well)."""
        if info.get("undeployed") or info.get("error"):
            return False
        return self.now() >= info.get("ready", 0)

    def _get_endpoint(self, project, location, endpoint_id, *, query, body, project_id):
        name, info = self._endpoint(project, location, endpoint_id)
        out = {"name": name, "displayName": info.get("displayName", name.rsplit("/", 1)[1]), "etag": "1",
               "createTime": rfc3339(info["created"]), "updateTime": rfc3339(info["created"])}
        if info.get("dedicated"):
            out["dedicatedEndpointEnabled"] = True
            if self.now() >= info["dns_at"]:
                out["dedicatedEndpointDns"] = self.dedicated_dns
        if not self._serving(info):
            return 200, {**out, "etag": "2", "updateTime": rfc3339(self.now())}
        deployed = {"id": info["model"].rsplit("/", 1)[1], "model": info["model"], "modelVersionId": "1",
                    "displayName": info.get("displayName", "tuned-model"), "createTime": rfc3339(info["created"])}
        dedicated = (info.get("deployConfig") or {}).get("dedicatedResources")
        if dedicated:
            deployed["dedicatedResources"] = dedicated
        return 200, {**out, "deployedModels": [deployed], "trafficSplit": {deployed["id"]: 100}}

    def _done_operation(self, project, location, endpoint_id, metadata_type: str, response_type: str) -> dict:
        """A long-running operation that is done at once (undeploy and delete take no time here).

        Its types are of the API version the request came in on (aiplatform's Endpoint speaks v1).
        """
        version = next((r.path.split("/")[1] for r in reversed(self.requests) if endpoint_id in r.path), "v1")
        package = "google.cloud.aiplatform." + ("v1beta1" if version == "v1beta1" else "v1")
        op = f"projects/{project}/locations/{location}/operations/{self._new_id()}"
        self.operations[op] = {"endpoint": None, "model": None, "done_at": self.now(), "created": self.now(),
                               "metadata_type": metadata_type, "package": package,
                               "response": {"@type": "type.googleapis.com/" + response_type.format(package)}}
        return self._operation(op)

    def _check_not_deploying(self, name: str, info: dict) -> None:
        if not info.get("error") and self.now() < info.get("ready", 0):
            raise ApiError(400, f"Endpoint {name} has an operation in progress: a model is being deployed to it.",
                           "FAILED_PRECONDITION")

    def _undeploy_model(self, project, location, endpoint_id, *, query, body, project_id):
        name, info = self._endpoint(project, location, endpoint_id)
        self._check_not_deploying(name, info)
        deployed = body.get("deployedModelId")
        if not self._serving(info) or deployed != info["model"].rsplit("/", 1)[1]:
            raise ApiError(400, f"Model {deployed} is not deployed on endpoint {name}.", "FAILED_PRECONDITION")
        info["undeployed"] = True
        return 200, self._done_operation(project, location, endpoint_id, "UndeployModelOperationMetadata",
                                         "{}.UndeployModelResponse")

    def _delete_endpoint(self, project, location, endpoint_id, *, query, body, project_id):
        name, info = self._endpoint(project, location, endpoint_id)
        self._check_not_deploying(name, info)
        if info.get("kind") == "open" and self._serving(info):
            raise ApiError(400, f"Endpoint {name} still has deployed models; undeploy them first.",
                           "FAILED_PRECONDITION")
        del self.endpoints[name]
        return 200, self._done_operation(project, location, endpoint_id, "DeleteOperationMetadata",
                                         "google.protobuf.Empty")

    def _dedicated_only(self, name: str, info: dict, dedicated_host: bool) -> None:
        """Refuse a prediction on the wrong host: a dedicated endpoint's on the shared one, and the reverse."""
        if info.get("dedicated") and not dedicated_host:
            # The service's answer, as users recorded it (a README on serving a movielens model on Vertex AI).
            raise ApiError(400, "This endpoint is a dedicated endpoint via CloudESF and cannot be accessed through "
                                "the Vertex AI API. Please access the endpoint using its dedicated dns name "
                                f"'{self.dedicated_dns}'", "FAILED_PRECONDITION")
        if dedicated_host and not (info.get("dedicated") and self.now() >= info["dns_at"]):
            raise ApiError(404, f"The requested URL /v1/{name}:predict was not found on this server.", "NOT_FOUND")

    def _predict(self, project, location, endpoint_id, *, query, body, project_id, dedicated_host=False):
        """``:predict`` as Model Garden's vLLM container answers it: a ``prompt`` instance, or a chat request.

        An instance with ``"@requestFormat": "chatCompletions"`` holds an OpenAI chat request; its messages go
        through the model's chat template (:func:`chat_template`) and the prediction is the chat completion
        (GoogleCloudPlatform/vertex-ai-samples, model_garden_pytorch_qwq_deployment.ipynb:
        ``response.predictions["choices"][0]["message"]["content"]``). Stricter than the service: a ``prompt`` that
        frames a conversation by hand (``User: ...`` / ``Assistant:`` lines) is refused, since a tuned chat model
        must see its own template.
        """
        name, info = self._endpoint(project, location, endpoint_id)
        self._dedicated_only(name, info, dedicated_host)
        if not self._serving(info):
            raise ApiError(400, f"Endpoint {name} does not have any deployed model.", "FAILED_PRECONDITION")
        instances = body.get("instances")
        if not isinstance(instances, list) or not instances:
            raise ApiError(400, "instances must be a non-empty list.")
        model = info["model"]
        answer = {"deployedModelId": model.rsplit("/", 1)[1], "model": model,
                  "modelDisplayName": info.get("displayName", ""), "modelVersionId": "1"}  # fmt: skip
        if any(isinstance(inst, dict) and "@requestFormat" in inst for inst in instances):
            if len(instances) != 1 or instances[0].get("@requestFormat") != "chatCompletions":
                raise ApiError(400, 'A chat request is one instance with "@requestFormat": "chatCompletions".')
            request = {k: v for k, v in instances[0].items() if k != "@requestFormat"}
            return 200, {**answer, "predictions": self._chat_completion(request)}
        predictions = []
        for k, inst in enumerate(instances):
            if not isinstance(inst, dict) or not isinstance(inst.get("prompt"), str):
                raise ApiError(400, f"instances[{k}].prompt is required and must be a string.")
            if re.search(r"(?m)^(System|User|Assistant|Human):", inst["prompt"]):
                raise ApiError(400, f"instances[{k}].prompt frames a conversation by hand (User:/Assistant: lines); "
                                    "this fake's chat models take messages with \"@requestFormat\": "
                                    "\"chatCompletions\", framed by their own chat template.")
            text = reply_to(inst["prompt"], int(inst["max_tokens"]) if inst.get("max_tokens") else None)
            predictions.append(text if inst.get("raw_response") else f"Prompt:\n{inst['prompt']}\nOutput:\n{text}")
        return 200, {**answer, "predictions": predictions}

    def _chat_completion(self, request: dict) -> dict:
        """The chat completion a deployed model gives an OpenAI chat request: :func:`chat_reply` to its messages."""
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") for m in messages):
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects.")
        known = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stream",
                 "model", "stop", "n"}
        unknown = sorted(set(request) - known)
        if unknown:
            raise ApiError(400, f"Unknown field {unknown[0]!r} in the chat request.")
        limit = request.get("max_tokens") or request.get("max_completion_tokens")
        text = chat_reply(messages, int(limit) if limit else None)
        n_in, n_out = len(chat_template(messages).split()), len(text.split())
        return {"id": f"chatcmpl-{self._new_id()}", "object": "chat.completion", "created": int(time.time()),
                "model": request.get("model", ""),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}

    def _generate_base(self, project, location, model, verb, *, query, body, project_id):
        """A Gemini model before tuning: :func:`base_reply_to` through the same generateContent shapes."""
        return self._generate(project, location, None, verb, query=query, body=body, project_id=project_id,
                              base=model)

    def _generate(self, project, location, endpoint_id, verb, *, query, body, project_id, base=None):
        if base is None:
            name, info = self._endpoint(project, location, endpoint_id)
        else:
            info = {"model": f"publishers/google/models/{base}"}
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise ApiError(400, "contents must not be empty.")
        prompt = " ".join(_texts([c for c in contents if c.get("role", "user") == "user"][-1:]))
        limit = (body.get("generationConfig") or {}).get("maxOutputTokens")
        text = (reply_to if base is None else lambda p, n: base_reply_to(base, p, n))(prompt, int(limit) if limit
                                                                                        else None)
        n_in, n_out = len(prompt.split()), len(text.split())
        usage = {"promptTokenCount": n_in, "candidatesTokenCount": n_out, "totalTokenCount": n_in + n_out}

        def chunk(part: str, last: bool) -> dict:
            cand = {"content": {"role": "model", "parts": [{"text": part}]}, "index": 0}
            if last:
                cand["finishReason"] = "STOP"
            return {"candidates": [cand], "usageMetadata": usage, "modelVersion": info["model"],
                    "createTime": rfc3339(time.time()), "responseId": hashlib.sha1(prompt.encode()).hexdigest()[:16]}

        if verb == "generateContent":
            return 200, chunk(text, True)
        words = text.split(" ")
        pieces = [" ".join(words[i:i + 4]) + (" " if i + 4 < len(words) else "") for i in range(0, len(words), 4)]
        return 200, [chunk(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]

    def _chat(self, project, location, endpoint_id, *, query, body, project_id):
        if endpoint_id != "openapi":
            self._dedicated_only(*self._endpoint(project, location, endpoint_id), False)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list.")
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        prompt = " ".join(_texts(users[-1].get("content"))) if users else ""
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        text = reply_to(prompt, int(limit) if limit else None)
        ident, created, model = f"chatcmpl-{self._new_id()}", int(time.time()), body.get("model", "")
        if body.get("stream"):
            events = [{"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": word + " "},
                                    "finish_reason": None}]} for word in text.split()]  # fmt: skip
            events.append({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            return 200, [*events, "[DONE]"]
        n_in, n_out = len(prompt.split()), len(text.split())
        return 200, {"id": ident, "object": "chat.completion", "created": created, "model": model,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                               "total_tokens": n_in + n_out}}  # fmt: skip


    # ------------------------------------------------------------------ tuned models
    def _get_model(self, project, location, model_id, version=None, *, query, body, project_id):
        """A tuned model (Gemini, or an open model the service registered), labelled with its base model."""
        now = self.now()
        job = next((j for j in self.jobs.values() if j.id == model_id and j.status(now)[0] in SUCCEEDED_STATES), None)
        if job is None:
            raise ApiError(404, f"Model projects/{project}/locations/{location}/models/{model_id} not found.",
                           "NOT_FOUND")
        return 200, {"name": f"projects/{project}/locations/{location}/models/{model_id}",
                     "displayName": job.body.get("tunedModelDisplayName") or model_id, "versionId": "1",
                     "labels": {"google-vertex-llm-tuning-base-model-id": re.sub(r"[^a-z0-9_-]", "-", job.base_model),
                                "google-vertex-llm-tuning-job-id": job.id}}  # fmt: skip

    # ------------------------------------------------------------------ batch prediction
    def _create_batch(self, project, location, *, query, body, project_id):
        model = body.get("model") or ""
        m = re.fullmatch(r"projects/[^/]+/locations/[^/]+/models/([^/@]+)(@\d+)?", model)
        tuned = m and any(j.id == m.group(1) and j.is_gemini for j in self.jobs.values())
        if not (tuned or re.fullmatch(r"publishers/google/models/gemini-[\w.-]+", model)):
            raise ApiError(400, f"Model {model or '(none)'} does not support batch prediction.")
        source = body.get("inputConfig") or {}
        uris = (source.get("gcsSource") or {}).get("uris") or []
        if source.get("instancesFormat") != "jsonl" or len(uris) != 1:
            raise ApiError(400, "input_config must name one JSONL file in Cloud Storage.")
        data = self._load_dataset(uris[0], "input_config.gcs_source.uris", True)
        dest = ((body.get("outputConfig") or {}).get("gcsDestination") or {}).get("outputUriPrefix")
        if not (dest or "").startswith("gs://"):
            raise ApiError(400, "output_config.gcs_destination.output_uri_prefix must be a gs:// folder.")
        name = f"projects/{project}/locations/{location}/batchPredictionJobs/{self._new_id()}"
        self.batches[name] = {"body": json.loads(json.dumps(body)), "records": data.records, "created": self.now(),
                              "written": None}  # fmt: skip
        return 200, self._render_batch(name)

    def _render_batch(self, name: str) -> dict:
        info, now = self.batches[name], self.now()
        phase = int((now - info["created"]) / self.step_seconds) if self.step_seconds > 0 else 2
        state = ("JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED")[min(phase, 2)]
        out = {**info["body"], "name": name, "state": state, "createTime": rfc3339(info["created"]),
               "updateTime": rfc3339(now)}  # fmt: skip
        if state == "JOB_STATE_SUCCEEDED":
            if info["written"] is None:
                folder = f"{info['body']['outputConfig']['gcsDestination']['outputUriPrefix'].rstrip('/')}" \
                         f"/prediction-model-{name.rsplit('/', 1)[1]}"
                lines = []
                base = re.fullmatch(r"publishers/google/models/(gemini-[\w.-]+)", info["body"].get("model") or "")
                for rec in info["records"]:
                    request = rec.get("request") or {}
                    prompt = " ".join(_texts([c for c in request.get("contents") or []
                                              if isinstance(c, dict) and c.get("role", "user") == "user"][-1:]))
                    # The same model answers as it does online (generateContent), to the same request.
                    limit = (request.get("generationConfig") or {}).get("maxOutputTokens")
                    limit = int(limit) if limit else None
                    text = base_reply_to(base.group(1), prompt, limit) if base else reply_to(prompt, limit)
                    answer = {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                              "finishReason": "STOP"}]}  # fmt: skip
                    lines.append(json.dumps({"status": "", "request": request, "response": answer}))
                self.storage.write(f"{folder}/predictions.jsonl", ("\n".join(lines) + "\n").encode())
                info["written"] = (folder, info["created"] + 2 * self.step_seconds)
            out.update(endTime=rfc3339(info["written"][1]), outputInfo={"gcsOutputDirectory": info["written"][0]},
                       completionStats={"successfulCount": str(len(info["records"])), "failedCount": "0"})
        return out

    def _get_batch(self, project, location, batch_id, *, query, body, project_id):
        name = f"projects/{project}/locations/{location}/batchPredictionJobs/{batch_id}"
        if name not in self.batches:
            raise ApiError(404, f"BatchPredictionJob {name} not found.")
        return 200, self._render_batch(name)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' sessions expect
    fake: FakeVertex

    def log_message(self, *args):
        pass

    def _answer(self, method: str) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            try:
                body = json.loads(raw) if raw.strip() else None
            except json.JSONDecodeError:
                self.fake.requests.append(Recorded(method, parsed.path, query, None, headers))
                raise ApiError(400, "Invalid JSON payload received.") from None
            status, payload = self.fake.handle(method, parsed.path, query, body, headers)
        except ApiError as e:
            status, payload = e.code, e.body()
        except _Dropped:  # no answer: the client sees the connection closed under it
            self.close_connection = True
            return
        except Exception as e:  # a bug in the fake shows as a 500 naming it
            status, payload = 500, ApiError(500, f"fake Vertex AI failed: {e!r}").body()
        if isinstance(payload, list):  # server-sent events
            self.send_response(status)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for event in payload:
                data = event if isinstance(event, str) else json.dumps(event)
                self.wfile.write(f"data: {data}\r\n\r\n".encode())
            self.close_connection = True
            return
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._answer("GET")

    def do_POST(self):
        self._answer("POST")

    def do_DELETE(self):
        self._answer("DELETE")

    def do_PATCH(self):
        self._answer("PATCH")


# ====================================================================== the seeds' calls, written by hand


#: Small datasets the tests put into the storage emulator: chat examples and distillation prompts.
CHAT = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(20)]  # fmt: skip
PROMPTS = [{"prompt": f"Explain why {i} is {'even' if i % 2 == 0 else 'odd'}."} for i in range(12)]
TEACHER = "qwen/qwen3-next-80b-a3b-thinking-maas"


def hand_written_bodies(fake: FakeVertex, *, train_uri: str, validation_uri: str, output_uri: str,
                        custom_base_model: str, epochs: int = 3, learning_rate_multiplier: float = 1.0,
                        ) -> dict[str, dict]:  # fmt: skip
    """The request bodies google-genai sends for the three seed calls written by hand against ``fake``.

    Keys: ``llama_sft`` (Llama 3.1 8B, full tuning from a custom checkpoint),
    ``qwen_distillation`` (Qwen3 4B taught by Qwen3 Next 80B Thinking) and
    ``gemini_sft`` (Gemini 2.5 Flash, adapter size four). The datasets must exist in
    the storage emulator. Each call creates a job in the fake.
    """
    from google.genai import types

    client = fake.genai_client()
    validation = types.TuningValidationDataset(gcs_uri=validation_uri)
    calls = {
        "llama_sft": dict(base_model="meta/llama3_1@llama-3.1-8b", config=types.CreateTuningJobConfig(
            tuning_mode="TUNING_MODE_FULL", custom_base_model=custom_base_model, epoch_count=epochs,
            validation_dataset=validation, output_uri=output_uri)),
        "qwen_distillation": dict(base_model="qwen/qwen3@qwen3-4b", config=types.CreateTuningJobConfig(
            method="DISTILLATION", base_teacher_model="qwen/qwen3-next-80b-a3b-thinking-maas", epoch_count=epochs,
            validation_dataset=validation, output_uri=output_uri)),
        "gemini_sft": dict(base_model="gemini-2.5-flash", config=types.CreateTuningJobConfig(
            epoch_count=epochs, adapter_size="ADAPTER_SIZE_FOUR", learning_rate_multiplier=learning_rate_multiplier,
            validation_dataset=validation)),
    }  # fmt: skip
    bodies = {}
    for key, kwargs in calls.items():
        client.tunings.tune(training_dataset=types.TuningDataset(gcs_uri=train_uri), **kwargs)
        bodies[key] = fake.bodies()[-1]
    return bodies
