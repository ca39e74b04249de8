"""The connection to Vertex AI: project, location, credentials, the SDK clients, and API errors in one line.

:func:`context` reads the one settings object: the project
(``GOOGLE_CLOUD_PROJECT``), the location, the staging bucket, an API endpoint
(``TUNING_MAGICS_API_ENDPOINT``, for a private endpoint or a local fake of the
API) and the credentials: Application Default Credentials unless
``tuning_magics.settings.update(credentials=...)`` gave a google-auth
``Credentials`` object. :func:`genai_client` builds google-genai's client on it.

Every error the service or the network gives goes through :func:`api_errors`,
which turns it into one :class:`~tuning_magics.errors.UserError` naming the
project, region or bucket and what to do, with any token taken out.
"""

from __future__ import annotations

import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

from ...errors import UserError, require_extra

CLOUD_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
#: Seconds an API call may take before it is given up (the service answers in well under that).
API_TIMEOUT = 60
_ADC_FIX = "run `gcloud auth application-default login`, or pass tuning_magics.settings.update(credentials=...)"


@dataclass(frozen=True)
class Context:
    """Where and as whom Vertex AI is called."""

    project: str
    location: str
    credentials: object
    api_endpoint: str | None = None
    staging_bucket: str | None = None

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.location}"


def context(*, credentials: bool = True, resource: str | None = None) -> Context:
    """The current project, location, endpoint and staging bucket, and (unless ``credentials=False``) credentials.

    A ``resource`` name (``projects/P/locations/L/...``) gives its own project and location.
    """
    require_extra("vertex")
    from ...config import settings

    parts = (resource or "").split("/")
    named = len(parts) >= 4 and parts[0] == "projects" and parts[2] == "locations"
    project = parts[1] if named else settings.project
    location = parts[3] if named else settings.location
    creds = settings.credentials
    if not project and creds is None and credentials:
        creds, project = default_credentials(None), _ADC.get("project")  # gcloud's or the VM's project
    if not project:
        raise UserError("Vertex AI needs a Cloud project: set GOOGLE_CLOUD_PROJECT, or "
                        "tuning_magics.settings.update(project='my-project')", field="project")
    if credentials and creds is None:
        creds = default_credentials(project)
    return Context(project, location, creds, settings.api_endpoint, settings.staging_bucket)


_ADC_LOCK = threading.Lock()
_ADC: dict = {}


def staging_folder(ctx: Context, why: str) -> str:
    """The staging bucket's folder (no trailing slash); a one-line UserError saying how to set it when unset."""
    if not ctx.staging_bucket:
        raise UserError(f"staging_bucket: Vertex AI needs a Cloud Storage folder for {why}; set "
                        "TUNING_MAGICS_STAGING_BUCKET=gs://my-bucket/tuning or "
                        "tuning_magics.settings.update(staging_bucket='gs://my-bucket/tuning')",
                        field="staging_bucket")
    return ctx.staging_bucket.rstrip("/")


def default_credentials(project: str | None):
    """Application Default Credentials (found once per session); a one-line UserError when there are none."""
    with _ADC_LOCK:
        if "credentials" not in _ADC:
            import google.auth
            from google.auth.exceptions import DefaultCredentialsError

            try:
                _ADC["credentials"], _ADC["project"] = google.auth.default(scopes=[CLOUD_SCOPE])
            except DefaultCredentialsError:
                where = f" for project {project}" if project else ""
                raise UserError(f"no Google Cloud credentials found{where}: {_ADC_FIX}", field="credentials") from None
        return _ADC["credentials"]


_CLIENTS: dict = {}
_CLIENTS_LOCK = threading.Lock()


def genai_client(ctx: Context):
    """google-genai's client for Vertex AI in ``ctx`` (one per project, location, endpoint and credentials)."""
    key = (ctx.project, ctx.location, ctx.api_endpoint, id(ctx.credentials))
    with _CLIENTS_LOCK:
        entry = _CLIENTS.get(key)
        if entry is None:
            from google import genai
            from google.genai import types

            # Our own display says what the SDK's notice would: the job is submitted and watched.
            warnings.filterwarnings("ignore", message="The SDK's tuning implementation is experimental")
            http = types.HttpOptions(timeout=API_TIMEOUT * 1000)
            if ctx.api_endpoint:
                http = types.HttpOptions(base_url=ctx.api_endpoint, timeout=API_TIMEOUT * 1000)
            client = genai.Client(vertexai=True, project=ctx.project, location=ctx.location,
                                  credentials=ctx.credentials, http_options=http)
            if len(_CLIENTS) >= 8:  # a few projects and regions at a time; the oldest goes
                _CLIENTS.pop(next(iter(_CLIENTS)))
            # The credentials stay referenced with their client, so id() in the key stays theirs.
            entry = _CLIENTS[key] = (client, ctx.credentials)
        return entry[0]


_QUIET_LOCK = threading.Lock()
_QUIET = {"depth": 0, "saved": None}


@contextmanager
def sdk_quiet():
    """Keep google-genai from displaying its console-link buttons in the notebook on each call.

    Our job display shows the job itself; the SDK's buttons would add an output
    (loading fonts from the web) every time a job is polled or submitted. Calls
    from several threads overlap freely: the SDK's switch is turned off while
    any of them runs and put back when the last ends (only the switch is
    locked, never the network call).
    """
    try:
        from google.genai.tunings import _IpythonUtils
    except ImportError:  # a version without the buttons
        yield
        return
    with _QUIET_LOCK:
        if _QUIET["depth"] == 0:
            _QUIET["saved"] = _IpythonUtils.__dict__.get("is_ipython_available")
            _IpythonUtils.is_ipython_available = staticmethod(lambda: False)
        _QUIET["depth"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET["depth"] -= 1
            if _QUIET["depth"] == 0 and _QUIET["saved"] is not None:
                _IpythonUtils.is_ipython_available = _QUIET["saved"]


# -- errors ----------------------------------------------------------------------------

_TOKEN_PATTERNS = (
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"ya29\.[A-Za-z0-9._-]+"),
    re.compile(r"(?i)(access_token|refresh_token|id_token|client_secret)([\"':= ]+)[A-Za-z0-9._~+/=-]+"),
)


def redact(text: str, credentials=None) -> str:
    """``text`` with anything that looks like a token, and the credentials' own token, taken out."""
    text = str(text)
    token = getattr(credentials, "token", None)
    if isinstance(token, str) and len(token) >= 4:
        text = text.replace(token, "[token]")
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) + m.group(2) + "[token]") if m.re.groups else "[token]", text)
    return text


def first_sentence(message: str) -> str:
    """The first sentence of a message, on one line, without its full stop (at most 300 characters)."""
    message = " ".join(str(message or "").split())
    cut = re.search(r"(?<=[.!?])\s", message)
    return (message[: cut.start()] if cut else message)[:300].rstrip(".")


def api_disabled(message) -> bool:
    """Whether a 403's message says the API is not enabled in the project (SERVICE_DISABLED), not a missing role."""
    return bool(re.search(r"has not been used|is disabled|SERVICE_DISABLED|not enabled", str(message)))


def describe_error(code, status: str | None, message: str, ctx: Context, action: str) -> str:
    """One line for an error the API answered ``action`` with, naming the project or region and the fix."""
    status = (status or "").upper()
    text = first_sentence(message)
    where = f"project {ctx.project}, {ctx.location}"
    if code == 401 or status == "UNAUTHENTICATED":
        return f"Vertex AI refused the credentials to {action} in project {ctx.project}: {_ADC_FIX}"
    if code == 403 and api_disabled(message):
        return (f"the Vertex AI API is not enabled in project {ctx.project}: enable it with `gcloud services "
                f"enable aiplatform.googleapis.com --project {ctx.project}`, wait a minute, and try again")
    if code == 403 or status == "PERMISSION_DENIED":
        return (f"permission denied to {action} in {where} ({text}); ask for the Vertex AI User role "
                "(roles/aiplatform.user) and access to the bucket")
    if code == 404 or status == "NOT_FOUND":
        return f"not found: could not {action} in {where} ({text}); check the name and the location"
    if code == 429 or status == "RESOURCE_EXHAUSTED":
        return (f"quota exceeded in {where} to {action} ({text}); wait for running jobs to end, or ask for "
                "more tuning quota in the console's Quotas page")
    if code == 400 or status in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"):
        return f"Vertex AI rejected the request to {action} in {where}: {text}"
    return f"Vertex AI answered {code} {status} to {action} in {where}: {text}".replace("  ", " ")


@contextmanager
def api_errors(action: str, ctx: Context):
    """Turn what google-genai, google-auth, google-api-core or the network raise into one UserError.

    The error's ``transient`` says, in a few words, when asking again may work
    (see :func:`transient`); it is None otherwise.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - every SDK error becomes one line; anything else goes on as it is
        problem = _one_line(exc, action, ctx)
        if problem is None:
            raise
        error = UserError(redact(problem, ctx.credentials))
        error.transient = transient(exc)
        raise error from None


#: Answers worth asking again for: google-genai's own list (``_RETRY_HTTP_STATUS_CODES`` in its
#: _api_client.py, after Cloud Storage's retry strategy): 408, 429, 500, 502, 503 and 504.
TRANSIENT_CODES = frozenset({408, 429, 500, 502, 503, 504})


def transient(exc: BaseException) -> str | None:
    """A few words on ``exc`` when asking again may work (a 429 or 5xx, a dropped connection, a time-out), else None."""
    code = status = None
    try:
        from google.genai import errors as genai_errors

        if isinstance(exc, genai_errors.APIError):
            code, status = exc.code, exc.status
    except ImportError:
        pass
    try:
        from google.api_core import exceptions as core_errors

        if isinstance(exc, core_errors.GoogleAPICallError):
            code, status = exc.code, getattr(getattr(exc, "grpc_status_code", None), "name", None)
    except ImportError:
        pass
    if code is not None:
        return f"Vertex AI answered {code} {status or ''}".rstrip() if code in TRANSIENT_CODES else None
    import httpx
    import requests
    from google.auth import exceptions as auth_errors

    if isinstance(exc, (httpx.TransportError, requests.ConnectionError, requests.Timeout, ConnectionError,
                        TimeoutError, auth_errors.TransportError)):
        return f"the connection to Vertex AI failed ({type(exc).__name__})"
    return None


def _one_line(exc: BaseException, action: str, ctx: Context) -> str | None:
    from google.auth import exceptions as auth_errors

    if isinstance(exc, auth_errors.DefaultCredentialsError):
        return f"no Google Cloud credentials found for project {ctx.project}: {_ADC_FIX}"
    if isinstance(exc, auth_errors.RefreshError):
        return f"the Google Cloud credentials could not be refreshed to {action} ({first_sentence(exc)}): {_ADC_FIX}"
    if isinstance(exc, ValueError) and type(exc).__module__.startswith(("pydantic", "google.genai")):
        return f"google-genai refused the request to {action}: {first_sentence(exc)}"
    if isinstance(exc, auth_errors.TransportError):
        return f"cannot reach Google's sign-in service to {action} ({first_sentence(exc)}); check the network"
    try:
        from google.genai import errors as genai_errors

        if isinstance(exc, genai_errors.APIError):
            return describe_error(exc.code, exc.status, exc.message or str(exc), ctx, action)
    except ImportError:
        pass
    try:
        from google.api_core import exceptions as core_errors

        if isinstance(exc, core_errors.GoogleAPICallError):
            status = getattr(getattr(exc, "grpc_status_code", None), "name", None)
            return describe_error(exc.code, status, exc.message, ctx, action)
    except ImportError:
        pass
    import httpx
    import requests

    if isinstance(exc, (httpx.TransportError, requests.ConnectionError, requests.Timeout, ConnectionError,
                        TimeoutError)):
        endpoint = ctx.api_endpoint or f"{ctx.location}-aiplatform.googleapis.com"
        return f"cannot reach Vertex AI at {endpoint} to {action} ({type(exc).__name__}); check the network"
    return None
