"""Is this kernel ready for Vertex AI? :func:`check_setup`, the first cell of the Vertex AI tutorials.

It looks at what a tuning job needs, reading only (nothing is created, uploaded,
submitted or billed), in the order a new user meets them, and stops at the first
that is missing with one :class:`~tuning_magics.errors.UserError` line that names
it, says what to do and links the Google Cloud page that shows how:

1. the ``[vertex]`` extra (google-genai, google-cloud-storage), new enough;
2. a Cloud project, as the settings have it (without one, ``tune()`` sends open
   models to the local engine and ``%dataset --out {BUCKET}/...`` has no bucket);
3. a staging bucket (the Cloud Storage folder for datasets and tuned models);
4. credentials (the session's, else Application Default Credentials);
5. Vertex AI answers: the Vertex AI API (aiplatform.googleapis.com) is enabled
   and this identity may list tuning jobs (one ``tunings.list`` call for one job;
   roles/aiplatform.user holds that and what tuning needs);
6. the staging bucket exists (one read of the bucket; the Cloud Storage API is
   enabled). An identity that may write objects but not read the bucket itself
   (roles/storage.objectAdmin alone) cannot tell: that is a note, not a stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from ... import storage
from ...errors import UserError, require_extra
from . import client as vc

#: Where each missing piece is explained (Google Cloud documentation).
DOCS = {
    "project": "https://cloud.google.com/vertex-ai/docs/start/cloud-environment",
    "staging_bucket": "https://cloud.google.com/storage/docs/creating-buckets",
    "credentials": "https://cloud.google.com/docs/authentication/provide-credentials-adc",
    "vertex_api": "https://cloud.google.com/vertex-ai/docs/start/cloud-environment",
    "vertex_role": "https://cloud.google.com/vertex-ai/docs/general/access-control",
    "storage_api": "https://cloud.google.com/service-usage/docs/enable-disable",
    "storage_role": "https://cloud.google.com/storage/docs/access-control/iam-roles",
}


@dataclass(frozen=True)
class Setup:
    """What :func:`check_setup` found: where jobs run, as whom, and anything it could not check (``notes``)."""

    project: str
    location: str
    staging_bucket: str
    identity: str
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"ready for Vertex AI: project {self.project}, location {self.location}",
                 f"  staging bucket  {self.staging_bucket}",
                 f"  credentials     {self.identity}",
                 "  Vertex AI API   enabled; tuning jobs can be listed (submitting needs roles/aiplatform.user)"]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))


def check_setup() -> Setup:
    """Check, reading only, that Vertex AI jobs can run from here; the first thing missing is one line.

    Looks at the ``[vertex]`` extra, the project, the staging bucket, the
    credentials, the Vertex AI API and role (one call that lists a tuning job)
    and the staging bucket's existence, in that order. Each missing piece is a
    :class:`~tuning_magics.errors.UserError` that names it, says what to do and
    links the page that shows how. Returns a :class:`Setup` that shows what was
    found.
    """
    require_extra("vertex")
    from ...config import settings

    project = settings.project
    if not project:
        raise _missing("no Cloud project is set: tuning_magics.settings.update(project='my-project') or "
                       "GOOGLE_CLOUD_PROJECT=my-project (without one, open models tune on the local engine)",
                       "project")
    staging = settings.staging_bucket
    if not staging:
        raise _missing("no staging bucket is set for the datasets and tuned models: tuning_magics.settings.update("
                       "staging_bucket='gs://my-bucket/tuning') or TUNING_MAGICS_STAGING_BUCKET=gs://my-bucket/tuning",
                       "staging_bucket")
    try:
        ctx = vc.context()  # the session's credentials, else Application Default Credentials
    except UserError as exc:
        raise _missing(str(exc), "credentials") from None
    _check_vertex(ctx)
    notes = _check_bucket(ctx, staging.rstrip("/"))
    return Setup(ctx.project, ctx.location, staging.rstrip("/"), _identity(ctx.credentials), tuple(notes))


#: The setting or option each missing piece is about (the UserError's ``field``).
_FIELDS = {"vertex_api": "project", "vertex_role": "credentials", "storage_api": "project"}


def _missing(message: str, what: str) -> UserError:
    """One line: what is missing and what to do, then the page that explains it (``what``: a key of :data:`DOCS`)."""
    return UserError(f"{message} (how: {DOCS[what]})", field=_FIELDS.get(what, what))


def _check_vertex(ctx: vc.Context) -> None:
    """One read of Vertex AI (a page of one tuning job): the API is enabled and this identity may list jobs."""
    action = "list tuning jobs"
    try:
        with vc.sdk_quiet():
            vc.genai_client(ctx).tunings.list(config={"page_size": 1})
    except Exception as exc:  # noqa: BLE001 - every failure is one line, with the page that explains it
        what = _vertex_trouble(exc)
        try:
            with vc.api_errors(action, ctx):
                raise
        except UserError as err:
            if what is None:
                raise
            raise _missing(str(err), what) from None


def _vertex_trouble(exc: BaseException) -> str | None:
    """Which piece an error of the Vertex AI call says is missing (a key of :data:`DOCS`), or None."""
    from google.auth import exceptions as auth_errors

    if isinstance(exc, (auth_errors.DefaultCredentialsError, auth_errors.RefreshError)):
        return "credentials"
    code = getattr(exc, "code", None)
    if code == 401:
        return "credentials"
    if code == 403:
        return "vertex_api" if vc.api_disabled(getattr(exc, "message", None) or exc) else "vertex_role"
    return None


def _check_bucket(ctx: vc.Context, staging: str) -> list[str]:
    """That the staging bucket exists (one read); notes for what could not be seen."""
    from google.api_core import exceptions as api

    bucket = storage.split_folder_or_object(staging, need_object=False)[0]
    try:
        found = storage.bucket_exists(staging)
    except UserError as exc:
        cause = exc.__cause__
        if not isinstance(cause, api.Forbidden):
            raise
        if vc.api_disabled(getattr(cause, "message", None) or cause):
            raise _missing(f"the Cloud Storage API is not enabled in project {ctx.project}: `gcloud services enable "
                           f"storage.googleapis.com --project {ctx.project}`", "storage_api") from None
        return [f"gs://{bucket} was not checked: this identity may not read the bucket itself; datasets and tuned "
                f"models need roles/storage.objectAdmin on it ({DOCS['storage_role']})"]
    if not found:
        raise _missing(f"staging_bucket: the bucket gs://{bucket} does not exist (or this identity cannot see it): "
                       f"`gcloud storage buckets create gs://{bucket} --location={ctx.location}`, or name another",
                       "staging_bucket")
    return []


def _identity(credentials) -> str:
    """Who the credentials act as: a service account's e-mail, a user's account, else their kind."""
    for attribute in ("service_account_email", "account"):
        value = getattr(credentials, attribute, None)
        if isinstance(value, str) and "@" in value:
            return value
    return f"{type(credentials).__module__}.{type(credentials).__name__}"
