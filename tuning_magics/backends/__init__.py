"""The backend seam: the contract every backend answers, and the registry that finds them by name.

A backend runs tuning jobs somewhere: the embedded local engine
(``local``) or Vertex AI's managed tuning (``vertex``). The rest of the
package knows backends only through this module: ``api.tune()`` asks
:func:`choose` which backend tunes a model and hands it one checked
:class:`~tuning_magics.jobs.TuneRequest`; ``get_job()`` asks :func:`owner`
whose job a name is; ``list_jobs()`` asks every backend in :func:`listed`.

The registry is a table from name to ``"module:Class"``, imported only when
the backend is first used, so ``import tuning_magics`` stays fast. Other
packages add backends through the entry-point group ``tuning_magics.backends``::

    # pyproject.toml of a package that brings a backend
    [project.entry-points."tuning_magics.backends"]
    mycloud = "mycloud_tuning:MyCloudBackend"

A backend subclasses :class:`Backend`; the README's "Writing a backend" has a
complete example, and ``tests/test_backend_contract.py`` is the one test suite
every backend passes.
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..errors import UserError

#: The entry-point group other packages register backends in.
ENTRY_POINT_GROUP = "tuning_magics.backends"

#: The built-in backends: name -> "module:Class", imported when first used.
BUILTIN = {
    "local": "tuning_magics.backends.local.backend:LocalBackend",
    "vertex": "tuning_magics.backends.vertex.backend:VertexBackend",
}
#: The backend a job name nobody else recognises belongs to (it also finds jobs by display name).
HOME = "local"


@dataclass(frozen=True)
class Source:
    """Where a tuning job starts when ``base_model`` is a tuned model or a job (continued tuning).

    ``base_model`` is the catalog id it descends from; ``pre_tuned_model`` (a
    service's tuned-model resource) or ``custom_base_model`` (a folder of
    weights) is where training starts.
    """

    base_model: str
    pre_tuned_model: str | None = None
    custom_base_model: str | None = None
    #: The backend that continues it.
    backend: str = ""


class Backend(ABC):
    """What a backend answers. Subclasses set ``name`` and ``title`` and implement the abstract methods.

    Every method that can fail because of the user's input raises a one-line
    :class:`~tuning_magics.errors.UserError` naming the option and the fix.
    """

    #: The registry name (``backend="..."`` in ``tune()``, ``job.backend``).
    name: str = ""
    #: How the user knows it: "the local engine", "Vertex AI".
    title: str = ""

    # -- here or not ------------------------------------------------------------------
    def unavailable(self) -> str | None:
        """None when this backend can run here, else one line saying why, with the fix (an install hint)."""
        return None

    def lists_jobs(self) -> bool:
        """Whether ``list_jobs()`` without ``backend=`` asks this backend (e.g. only where a project is set)."""
        return self.unavailable() is None

    # -- models and options -------------------------------------------------------------
    @abstractmethod
    def refusal(self, model) -> UserError | None:
        """None when this backend tunes ``model`` (a :class:`~tuning_magics.catalog.Model`), else the one-line error."""

    def can_tune(self, model) -> bool:
        return self.refusal(model) is None

    def prefers(self, model) -> bool:
        """Whether this backend is the natural home of ``model`` when several could tune it (settings decide ties)."""
        return False

    def passed_over(self, model) -> str | None:
        """Why ``auto`` sends ``model`` elsewhere though this backend can tune it (with the fix), or None.

        :func:`choice` says it when the model then falls to the home backend, so
        the switch is never silent (Vertex AI: no Cloud project is set).
        """
        return None

    def engine_options(self) -> dict:
        """The options beyond ``tune()``'s parameters this backend takes: name -> its rule (see :mod:`~tuning_magics.params`)."""
        return {}

    def source(self, tuned) -> Source | None:
        """Where a job starts that continues ``tuned`` (a Job or a tuned model's name), or None when not ours."""
        return None

    def answerer(self, source: str, label: str, *, batch_size: int = 16):
        """What answers evaluation prompts as the model ``source`` (a catalog id or a model folder): an
        :class:`~tuning_magics.evaluation.Answerer`; a one-line UserError where this backend cannot."""
        raise UserError(f"the {self.name} backend cannot evaluate {source} by name; evaluate its job "
                        "(job.evaluate()) or an endpoint (tm.evaluate(endpoint, data))", field="model")

    def judge_service(self, model: str | None):
        """A service that grades answers (``Judge("<backend>:<model>")``): ``grade(kind, template, values)``
        returning verdicts, ``pointwise_template`` / ``pairwise_template``, ``autorater`` and ``ctx.project``
        (see :mod:`tuning_magics.backends.vertex.judge`); a one-line UserError where this backend has none."""
        raise UserError(f"the {self.name} backend has no judge service; give a judge with chat() or an "
                        "OpenAI-compatible URL", field="judge")

    # -- requests ------------------------------------------------------------------------
    def check(self, request) -> None:
        """Every check :meth:`submit` makes that needs no upload and no job: one UserError for the first mistake."""
        self.dry_run(request)

    @abstractmethod
    def dry_run(self, request):
        """What :meth:`submit` would send, as a :class:`~tuning_magics.jobs.DryRun`; nothing is written or sent."""

    @abstractmethod
    def submit(self, request):
        """Check and submit ``request``; returns its :class:`~tuning_magics.jobs.Job` at once."""

    # -- jobs ------------------------------------------------------------------------------
    def owns(self, name: str) -> bool:
        """Whether ``name`` has the shape of this backend's job names."""
        return False

    @abstractmethod
    def get(self, name: str):
        """The job named ``name`` (one line when there is none)."""

    @abstractmethod
    def find(self, limit: int | None = None, *, states=None, model: str | None = None) -> list:
        """Jobs newest first, at most ``limit`` of those that pass the filters (see :func:`keep`)."""

    def cancel(self, name: str):
        """Ask the job ``name`` to stop; returns the job."""
        return self.get(name).cancel()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# -- filters every backend's find() applies -----------------------------------------------------


def keep(jobs, limit: int | None = None, *, states=None, model: str | None = None) -> list:
    """``jobs`` that are in one of ``states`` and whose base model contains ``model`` (any case), at most ``limit``."""
    out = []
    needle = model.strip().lower() if model else None
    for job in jobs:
        if states is not None and job.state not in states:
            continue
        if needle is not None:
            config = job.config or {}
            text = " ".join(str(config.get(k) or "") for k in ("base_model", "custom_base_model")).lower()
            if needle not in text:
                continue
        out.append(job)
        if limit is not None and len(out) >= limit:
            break
    return out


# -- the registry ---------------------------------------------------------------------------------

_LOCK = threading.Lock()
_LOADED: dict[str, Backend] = {}
_TABLE: dict[str, object] | None = None  # name -> "module:Class" or an EntryPoint


def _table() -> dict[str, object]:
    """Built-in backends, then those other packages register (a built-in name cannot be taken)."""
    global _TABLE
    with _LOCK:
        if _TABLE is None:
            from importlib.metadata import entry_points

            table: dict[str, object] = dict(BUILTIN)
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                table.setdefault(ep.name, ep)
            _TABLE = table
        return _TABLE


def refresh() -> None:
    """Look for registered backends again (after installing a package that brings one)."""
    global _TABLE
    with _LOCK:
        _TABLE = None
        _LOADED.clear()


def names() -> list[str]:
    """Every backend's name, the built-in ones first."""
    return list(_table())


def check_name(name, *, auto: bool = True) -> str:
    """``name`` as a registry name (any case), or one line listing the names there are (``auto`` where allowed)."""
    known = names()
    text = str(name).strip().lower() if isinstance(name, str) else None
    if text in known or (auto and text == "auto"):
        return text
    listed = ", ".join((["auto"] if auto else []) + known)
    raise UserError(f"backend must be one of {listed}, not {name!r}", field="backend")


def get(name: str) -> Backend:
    """The backend called ``name``, imported on first use."""
    name = check_name(name, auto=False)
    with _LOCK:
        found = _LOADED.get(name)
    if found is not None:
        return found
    target = _table()[name]
    try:
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            cls = getattr(importlib.import_module(module), attr)
        else:
            cls = target.load()
    except Exception as exc:  # a broken third-party package: one line naming it
        raise UserError(f"backend {name!r} could not be loaded ({type(exc).__name__}: {exc}); reinstall the "
                        "package that provides it", field="backend") from None
    backend = cls() if isinstance(cls, type) else cls
    if not isinstance(backend, Backend):
        raise UserError(f"backend {name!r} is not a tuning_magics.backends.Backend; fix the package that "
                        "registers it", field="backend")
    backend.name = name
    with _LOCK:
        return _LOADED.setdefault(name, backend)


def all_backends() -> list[Backend]:
    """Every registered backend (loaded), the built-in ones first; one that fails to load is left out."""
    out = []
    for name in names():
        try:
            out.append(get(name))
        except UserError:
            continue
    return out


def choose(model, requested: str | None = None, setting=None) -> Backend:
    """The backend that tunes ``model`` (see :func:`choice`)."""
    return choice(model, requested, setting)[0]


def choice(model, requested: str | None = None, setting=None) -> tuple[Backend, str | None]:
    """The backend that tunes ``model``, and a note when it got the model only because another could not here.

    An explicit ``requested`` backend wins, and a model it cannot tune is one
    line. Otherwise a model only one backend can tune goes there, whatever the
    settings say (``local/*`` models to the local engine, Gemini to Vertex AI);
    for the others ``setting()`` (the ``backend`` setting, read only then, so a
    broken ``pyproject.toml`` never holds up a built-in model) names the backend,
    and where it says ``auto`` a backend that ``prefers`` the model wins (Vertex
    AI where a Cloud project is set), else the home backend: then the note says
    which backend passed the model over, why, and the fix (:meth:`Backend.passed_over`).
    """
    if requested is not None and check_name(requested) != "auto":
        backend = get(requested)
        refused = backend.refusal(model)
        if refused is not None:
            raise refused
        return backend, None
    able = [b for b in all_backends() if b.can_tune(model)]
    if not able:
        raise UserError(f"no backend here tunes {model.id}; catalog.table() lists the models there are",
                        field="base_model")
    if len(able) == 1:
        return able[0], None
    wanted = check_name(setting()) if setting is not None else "auto"
    for backend in able:
        if backend.name == wanted:
            return backend, None
    for backend in able:
        if backend.prefers(model):
            return backend, None
    chosen = next((b for b in able if b.name == HOME), able[0])
    for other in able:
        why = other.passed_over(model) if other is not chosen else None
        if why:
            return chosen, (f"{model.id} runs on {chosen.title}, not {other.title}: {why}; "
                            f"backend='{chosen.name}' keeps it there without this note")
    return chosen, None


def owner(name: str) -> Backend:
    """The backend whose job ``name`` is: the first that recognises its shape, else the home backend."""
    for backend in all_backends():
        if backend.name != HOME and backend.owns(name):
            return backend
    return get(HOME)


def source(tuned) -> Source:
    """Where a job that continues ``tuned`` (a Job, or a tuned model's resource name) starts."""
    job_backend = getattr(tuned, "backend", None)
    found = get(job_backend).source(tuned) if job_backend else source_or_none(tuned)
    if found is not None:
        return found
    raise UserError(f"base_model {tuned!r} is neither a catalog model nor a tuned model a backend can continue; "
                    "catalog.table() lists the models", field="base_model")


def source_or_none(name: str) -> Source | None:
    """:func:`source` for a name that may be a tuned model's, or None when no backend recognises it."""
    for backend in all_backends():
        found = backend.source(name)
        if found is not None:
            return found
    return None


def listed(requested: str | None = None) -> list[Backend]:
    """The backends ``list_jobs()`` asks: the one named, else every one that lists jobs here."""
    if requested is not None and check_name(requested) != "auto":
        return [get(requested)]
    return [b for b in all_backends() if b.lists_jobs()]


def engine_options() -> dict:
    """Every backend's engine options (name -> rule), for the magics' "did you mean"."""
    out: dict = {}
    for backend in all_backends():
        try:
            out.update({k: v for k, v in backend.engine_options().items() if k not in out})
        except UserError:
            continue
    return out
