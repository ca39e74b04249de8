"""The embedded local engine as a :class:`~tuning_magics.backends.Backend`: what the registry finds as ``local``."""

from __future__ import annotations

from ...errors import UserError, require_extra
from .. import Backend, Source, keep


class LocalBackend(Backend):
    """Fine-tunes on this machine: built-in ``local/tiny-*`` models, open models, folders of weights."""

    name = "local"
    title = "the local engine"

    def unavailable(self) -> str | None:
        try:
            require_extra("local")
        except UserError as exc:
            return str(exc)
        return None

    def lists_jobs(self) -> bool:
        return True  # its jobs are files on this machine: listed even without the engine's packages

    def refusal(self, model) -> UserError | None:
        if model.provider == "gemini":
            return UserError(f"base_model {model.id} is tuned only by Vertex AI; use backend='vertex', or an open "
                             "or local/tiny-* model with the local engine", field="base_model")
        return None

    def prefers(self, model) -> bool:
        return model.provider == "local"

    def engine_options(self) -> dict:
        from .trainer import engine_option_rules

        return engine_option_rules()

    def answerer(self, source: str, label: str, *, batch_size: int = 16):
        """The model loaded on this machine, answering in batches (``LocalChatModel.replies``)."""
        require_extra("local")
        from .answer import LocalAnswerer

        return LocalAnswerer(label, source, batch_size=batch_size)

    def source(self, tuned) -> Source | None:
        """A local job continues from its ``final`` model, as ``custom_base_model`` over the same base model."""
        if getattr(tuned, "backend", None) != self.name:
            return None
        final = tuned.tuned_model
        if not final:
            raise UserError(f"job {tuned.id} has no final model to continue from ({tuned.state}); wait for it to "
                            "succeed (job.wait()), or pass custom_base_model=<a checkpoint folder>",
                            field="base_model")
        return Source(base_model=tuned.config.get("base_model"), custom_base_model=final, backend=self.name)

    def rebuild_registry(self, *job_folders):
        """List again the jobs the registry lacks, from their folders (see ``tuning_magics.rebuild_registry``)."""
        from . import registry

        return registry.rebuild(*job_folders)

    def dry_run(self, request):
        from . import submit

        return submit.dry_run(request)

    def submit(self, request):
        from . import submit

        return submit.submit(request)

    def owns(self, name: str) -> bool:
        return "/" not in name  # job ids and display names; resource names belong to the cloud backends

    def get(self, name: str):
        from . import jobs

        return jobs.get(name)

    def find(self, limit=None, *, states=None, model=None) -> list:
        from . import jobs

        filtered = states is not None or model is not None
        return keep(jobs.find(limit=None if filtered else limit), limit, states=states, model=model)

