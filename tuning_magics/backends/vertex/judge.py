"""A judge on Vertex AI's Gen AI evaluation service: Gemini grades answers through ``evaluateInstances``.

``Judge("vertex")`` (the service's own autorater) or ``Judge("vertex:gemini-2.5-flash")`` (that model as the
autorater) sends each example to the service as a pointwise metric (a 1-5 rating against the reference) or a
pairwise one (which of two answers agrees better), the way ``vertexai.evaluation``'s ``PointwiseMetric`` and
``PairwiseMetric`` do, through the same GAPIC client (aiplatform's ``EvaluationServiceClient``, v1beta1, which
takes the autorater's model). The service fills the template's variables itself: ``{question}``,
``{reference}``, ``{answer}`` (``{answer_a}``, ``{answer_b}``) become its ``prompt``, ``reference``,
``response`` (``baseline_model_response``, ``response``).

The default templates follow the structure of the service's own metric prompt templates (instruction,
criteria, rating rubric, evaluation steps, inputs), which its autorater is tuned to answer; they are the
judge's prompts, shown by ``print(judge)`` and replaced with ``pointwise_prompt=`` / ``pairwise_prompt=``.
Replies come back as the words a chat judge gives (``Score: N``, ``Better: A|B|tie``), so the rest of the
evaluation (caching, position swapping, statistics) is the same for every judge.
"""

from __future__ import annotations

import json
import re

from . import client as vc

POINTWISE_TEMPLATE = """# Instruction
You are an expert evaluator. You grade an AI model's answer to a question against the reference answer.
Read the question and the reference first, then rate the answer with the Rating Rubric, following the
Evaluation Steps. Explain your rating step by step, and only choose ratings from the Rating Rubric.

# Evaluation
## Criteria
agreement: The answer agrees with the reference answer in meaning and facts; length and style do not count.

## Rating Rubric
5: the same meaning and facts as the reference
4: nearly the same, with a small slip
3: partly right
2: mostly wrong
1: wrong, empty or off topic

## Evaluation Steps
Step 1: Compare the answer with the reference, fact by fact.
Step 2: Rate it by the rubric and give a short reason.

# User Inputs and AI-generated Response
## User Inputs
### question
{question}

### reference
{reference}

## AI-generated Response
{answer}"""

PAIRWISE_TEMPLATE = """# Instruction
You are an expert evaluator. You compare two AI models' answers (Response A and Response B) to the same question,
given the reference answer. Judge each answer on its own first, then compare them, following the Rating Rubric
and the Evaluation Steps.

# Evaluation
## Criteria
agreement: The answer agrees with the reference answer in meaning and facts; length and style do not count.

## Rating Rubric
A: Response A agrees better with the reference
SAME: both agree as well (or as badly)
B: Response B agrees better with the reference

## Evaluation Steps
Step 1: Compare Response A with the reference.
Step 2: Compare Response B with the reference.
Step 3: Output "A", "SAME" or "B" as the pairwise_choice, and your reasons as the explanation.

# User Inputs and AI-generated Responses
## User Inputs
### question
{question}

### reference
{reference}

## AI-generated Responses
### Response A
{answer_a}

### Response B
{answer_b}"""

#: Our placeholders -> the evaluation service's variables (a pairwise metric's candidate is ``response``).
VARIABLES = {"question": "prompt", "reference": "reference", "answer": "response",
             "answer_a": "baseline_model_response", "answer_b": "response"}
#: The service's pairwise choice (the enum's name or number) -> the words of a chat judge's verdict.
CHOICES = {"BASELINE": "A", "1": "A", "CANDIDATE": "B", "2": "B", "TIE": "tie", "3": "tie"}


def service_template(template: str) -> str:
    """Our template with its placeholders as the service's variables."""
    return re.sub(r"\{(question|reference|answer_a|answer_b|answer)\}", lambda m: "{" + VARIABLES[m.group(1)] + "}",
                  template)


class EvaluationService:
    """Grades through ``evaluateInstances`` in the configured project and location; ``autorater`` names the
    model (a catalog Gemini id or a full resource name), None for the service's default."""

    pointwise_template = POINTWISE_TEMPLATE
    pairwise_template = PAIRWISE_TEMPLATE
    #: About how many tokens the autorater writes per grade (its reasons, step by step).
    reply_tokens = 200

    def __init__(self, autorater: str | None = None):
        self.ctx = vc.context()
        self.autorater = None
        if autorater:
            self.autorater = autorater if autorater.startswith("projects/") else \
                f"{self.ctx.parent}/publishers/google/models/{autorater}"
        self._client = None

    @property
    def billed(self) -> str:
        """Who pays for the grades."""
        return f"Vertex AI project {self.ctx.project}"

    def _service(self):
        if self._client is None:
            from google.api_core.client_options import ClientOptions
            from google.cloud.aiplatform_v1beta1 import EvaluationServiceClient

            from .endpoints import _api_base

            self._client = EvaluationServiceClient(credentials=self.ctx.credentials, transport="rest",
                                                   client_options=ClientOptions(api_endpoint=_api_base(self.ctx)))
        return self._client

    def _request(self, kind: str, template: str, values: dict):
        from google.cloud.aiplatform_v1beta1 import types

        instance = json.dumps({VARIABLES[k]: str(v) for k, v in values.items()}, ensure_ascii=False)
        extra = {}
        if self.autorater:
            extra["autorater_config"] = types.AutoraterConfig(autorater_model=self.autorater, sampling_count=1)
        if kind == "pointwise":
            metric = types.PointwiseMetricInput(
                metric_spec=types.PointwiseMetricSpec(metric_prompt_template=service_template(template)),
                instance=types.PointwiseMetricInstance(json_instance=instance))
            return types.EvaluateInstancesRequest(location=self.ctx.parent, pointwise_metric_input=metric, **extra)
        metric = types.PairwiseMetricInput(
            metric_spec=types.PairwiseMetricSpec(metric_prompt_template=service_template(template),
                                                 candidate_response_field_name="response",
                                                 baseline_response_field_name="baseline_model_response"),
            instance=types.PairwiseMetricInstance(json_instance=instance))
        return types.EvaluateInstancesRequest(location=self.ctx.parent, pairwise_metric_input=metric, **extra)

    def _one(self, kind: str, template: str, values: dict) -> str:
        request = self._request(kind, template, values)
        with vc.api_errors("grade an answer with Vertex AI's evaluation service", self.ctx):
            found = self._service().evaluate_instances(request=request)
        if kind == "pointwise":
            score = found.pointwise_metric_result.score
            return f"Score: {round(score)}" if score is not None and 1 <= score <= 5 else \
                (found.pointwise_metric_result.explanation or "")
        choice = found.pairwise_metric_result.pairwise_choice
        name = getattr(choice, "name", str(choice))
        return f"Better: {CHOICES[name]}" if name in CHOICES else (found.pairwise_metric_result.explanation or "")

    def grade(self, kind: str, template: str, values: list[dict]) -> list[str]:
        """The service's verdicts on ``values`` (each a dict of the template's placeholders), a few at a time, a
        quota's 429 waited out (:func:`~tuning_magics.evaluation.ask_all`)."""
        from ...evaluation import ask_all

        return ask_all(lambda v: self._one(kind, template, v), values, name="vertex-judge")
