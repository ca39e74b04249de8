"""Vertex AI's managed tuning as a :class:`~tuning_magics.backends.Backend`: what the registry finds as ``vertex``."""

from __future__ import annotations

from ...errors import UserError, require_extra
from .. import Backend, Source, keep

class VertexBackend(Backend):
    """Tunes Gemini and open models (Llama, Gemma, Qwen) on Vertex AI, through google-genai."""

    name = "vertex"
    title = "Vertex AI"

    def unavailable(self) -> str | None:
        try:
            require_extra("vertex")
        except UserError as exc:
            return str(exc)
        return None

    def lists_jobs(self) -> bool:
        """Where a Cloud project is configured and the SDKs are installed."""
        return bool(_project()) and self.unavailable() is None

    def refusal(self, model) -> UserError | None:
        if model.provider == "local":
            return UserError(f"base_model {model.id} is built into the local engine; Vertex AI cannot tune it: use "
                             "backend='local' or a catalog model", field="backend")
        return None

    def prefers(self, model) -> bool:
        """Gemini always; open models where a Cloud project is configured (Workbench, Colab Enterprise)."""
        return model.provider == "gemini" or (model.provider == "open" and bool(_project()))

    def passed_over(self, model) -> str | None:
        """An open model stays local only for want of a Cloud project: say so, with the fix."""
        if model.provider == "open" and not _project():
            return ("no Cloud project is set (tuning_magics.settings.update(project='my-project') or "
                    "GOOGLE_CLOUD_PROJECT)")
        return None

    def engine_options(self) -> dict:
        from .submit import SERVICE_OPTIONS

        return dict(SERVICE_OPTIONS)

    def source(self, tuned) -> Source | None:
        """A Vertex AI job's tuned Gemini model, or a ``projects/.../models/...`` name, continues on Vertex AI."""
        if not (getattr(tuned, "backend", None) == self.name
                or (isinstance(tuned, str) and tuned.startswith("projects/") and "/models/" in tuned)):
            return None
        from .submit import tuned_model_source

        pre_tuned, base_model = tuned_model_source(tuned)
        return Source(base_model=base_model, pre_tuned_model=pre_tuned, backend=self.name)

    def judge_service(self, model: str | None):
        """Gemini grading through Vertex AI's Gen AI evaluation service (``Judge("vertex:gemini-2.5-flash")``)."""
        from .judge import EvaluationService

        return EvaluationService(model)

    def dry_run(self, request):
        from . import submit

        return submit.dry_run(request)

    def submit(self, request):
        from . import submit

        return submit.submit(request)

    def owns(self, name: str) -> bool:
        return name.startswith("projects/")  # a resource name: get() says when it is not a tuning job's

    def get(self, name: str):
        from . import jobs

        return jobs.get(name)

    def find(self, limit=None, *, states=None, model=None) -> list:
        from . import jobs

        filtered = states is not None or model is not None
        return keep(jobs.find(limit=None if filtered else limit), limit, states=states, model=model)


def _project() -> str | None:
    """The configured Cloud project, or None (a broken pyproject.toml does not hold up local work)."""
    from ...config import settings

    try:
        return settings.project or None
    except UserError:
        return None
