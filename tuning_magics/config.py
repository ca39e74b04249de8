"""One settings object for the whole extension.

Values come from, in rising order of precedence: built-in defaults, a
``[tool.tuning_magics]`` table in the nearest ``pyproject.toml`` (searched
from the working directory upwards), the environment variables
``GOOGLE_CLOUD_PROJECT``, ``GOOGLE_CLOUD_LOCATION``,
``TUNING_MAGICS_STAGING_BUCKET``, ``TUNING_MAGICS_BACKEND`` and
``TUNING_MAGICS_API_ENDPOINT``, and finally what the user sets in the session
(``%tuning_config``, ``%config TuningMagics.<name> = ...`` or
``tuning_magics.settings.update(...)``).

``backend`` is ``"auto"`` unless set to a registered backend's name: then
the model decides where it can (``local/*`` models run locally, Gemini on
Vertex AI), and open models run on Vertex AI where a project is configured,
else on the local engine (see :func:`tuning_magics.backends.choose`).

``pyproject.toml`` is parsed once and again only when the file changes. A file
that cannot be read is reported, in one line naming it, when a setting is read;
features that read no setting (local jobs, datasets) are not held up by it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import UserError

_ENV = {
    "project": "GOOGLE_CLOUD_PROJECT",
    "location": "GOOGLE_CLOUD_LOCATION",
    "staging_bucket": "TUNING_MAGICS_STAGING_BUCKET",
    "backend": "TUNING_MAGICS_BACKEND",
    "api_endpoint": "TUNING_MAGICS_API_ENDPOINT",
}


@dataclass
class _Values:
    project: str | None = None
    location: str = "us-central1"
    staging_bucket: str | None = None
    backend: str = "auto"
    api_endpoint: str | None = None
    #: A google-auth Credentials object; set in the session only (never read from a file or the environment).
    credentials: object = None
    #: "true": every job is logged to MLflow when ``job.wait()`` sees it end (``tuning_magics.log_to_mlflow``).
    mlflow: str = "false"


def _find_pyproject(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _read_pyproject(start: Path) -> tuple[dict, Path | None]:
    path = _find_pyproject(start)
    if path is None:
        return {}, None
    try:
        stat = path.stat()
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc}); fix its permissions or remove it") from None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _PYPROJECT_CACHE:
        _PYPROJECT_CACHE.clear()  # one file is in use at a time; a changed file replaces its entry
        _PYPROJECT_CACHE[key] = _parse_pyproject(path)
    table = _PYPROJECT_CACHE[key]
    if isinstance(table, UserError):
        raise table
    return table, path


#: (path, mtime, size) -> the [tool.tuning_magics] table, or the UserError the file gave.
_PYPROJECT_CACHE: dict[tuple, dict | UserError] = {}


def _parse_pyproject(path: Path) -> dict | UserError:
    import tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return UserError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc}); fix or remove it")
    except tomllib.TOMLDecodeError as exc:
        return UserError(f"{path}: not valid TOML ({exc}); fix the syntax to read [tool.tuning_magics] from it")
    table = data.get("tool", {}).get("tuning_magics", {})
    if not isinstance(table, dict):
        return UserError(f"{path}: [tool.tuning_magics] must be a table of settings; fix the TOML")
    names = {f.name for f in fields(_Values)}
    table = {k.replace("-", "_"): v for k, v in table.items()}
    unknown = sorted(set(table) - names)
    if unknown:
        return UserError(
            f"{path}: unknown key {unknown[0]!r} in [tool.tuning_magics]; known keys: {', '.join(sorted(names))}"
        )
    return table


def check(name: str, value):
    """``value`` for the setting ``name`` in its plain form, or a one-line UserError naming the setting."""
    if name == "credentials":
        # Duck-typed, so google-auth is not imported to check: every google-auth Credentials has these.
        if not (hasattr(value, "before_request") and hasattr(value, "refresh")):
            raise UserError(
                "credentials must be a google-auth Credentials object (e.g. from google.auth.default() or "
                "service_account.Credentials.from_service_account_file(...)), set in the session",
                field="credentials",
            )
        return value
    if name == "mlflow" and isinstance(value, bool):  # pyproject.toml's `mlflow = true`
        return "true" if value else "false"
    if not isinstance(value, str):
        hint = ' ("true" or "false")' if name == "mlflow" else ""
        raise UserError(f"{name} must be text{hint}, not {value!r}", field=name)
    value = value.strip()
    if name == "mlflow":
        if value.lower() not in ("true", "false"):
            raise UserError(f'mlflow must be "true" or "false", not {value!r}', field="mlflow")
        return value.lower()
    if name == "backend":
        from .backends import check_name

        return check_name(value)
    if name == "project" and not _PROJECT.fullmatch(value):
        raise UserError(f"project must be a Google Cloud project id such as 'my-project', not {value!r}",
                        field="project")
    if name == "location" and not _LOCATION.fullmatch(value):
        raise UserError(f"location must be a Google Cloud region such as 'us-central1' (or 'global'), not {value!r}",
                        field="location")
    if name == "staging_bucket":
        from .gcs_uri import is_gcs, split_folder_or_object

        if not is_gcs(value):
            raise UserError(f"staging_bucket must be a gs:// URI such as gs://my-bucket/tuning, not {value!r}",
                            field="staging_bucket")
        try:
            split_folder_or_object(value, need_object=False)
        except UserError as exc:
            raise UserError(f"staging_bucket: {exc}", field="staging_bucket") from None
    if name == "api_endpoint":
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise UserError(f"api_endpoint must be a URL such as https://us-central1-aiplatform.googleapis.com, "
                            f"not {value!r}", field="api_endpoint")
    return value


#: A project id or number, domain-scoped ones (example.com:my-project) too: one word, no path.
_PROJECT = re.compile(r"[A-Za-z0-9.:_-]+")
#: Regions (us-central1, europe-west4, ...) and the global location.
_LOCATION = re.compile(r"global|[a-z]+-[a-z]+\d+")


@dataclass
class Settings:
    """Project, location, staging bucket, backend and API endpoint, resolved from all sources."""

    _session: dict = field(default_factory=dict)
    _start: Path | None = None

    def _layers(self) -> tuple[dict, dict, dict]:
        pyproject, _ = _read_pyproject(self._start or Path.cwd())
        # A blank variable (`export GOOGLE_CLOUD_PROJECT=`) is no value: it does not count as a project.
        env = {name: os.environ[var] for name, var in _ENV.items() if os.environ.get(var, "").strip()}
        return pyproject, env, self._session

    def _resolve(self) -> tuple[_Values, dict]:
        values = _Values()
        sources = {f.name: "default" for f in fields(_Values)}
        for label, layer in zip(("pyproject.toml", "environment", "session"), self._layers()):
            for name, value in layer.items():
                setattr(values, name, check(name, value))
                sources[name] = label
        return values, sources

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in {f.name for f in fields(_Values)}:
            raise AttributeError(name)
        values, _ = self._resolve()
        return getattr(values, name)

    def update(self, **values) -> None:
        """Set session values; ``None`` removes a session value so lower layers show again."""
        names = {f.name for f in fields(_Values)}
        for name, value in values.items():
            if name not in names:
                raise UserError(
                    f"unknown setting {name!r}; known settings: {', '.join(sorted(names))}", field=name
                )
        for name, value in values.items():
            if value is None or (isinstance(value, str) and not value.strip()):
                self._session.pop(name, None)
            else:
                self._session[name] = check(name, value)

    def reset(self) -> None:
        """Forget every value set in this session."""
        self._session.clear()

    def as_dict(self) -> dict:
        """Every setting with its resolved value."""
        values, _ = self._resolve()
        return {f.name: getattr(values, f.name) for f in fields(_Values)}

    def describe(self) -> str:
        """A small table of each setting, its value and where it came from."""
        values, sources = self._resolve()
        rows = []
        for f in fields(_Values):
            value = getattr(values, f.name)
            if f.name == "credentials":  # never the object itself: its repr could hold a token
                value = type(value).__name__ if value is not None else "application default"
            rows.append(f"{f.name:<15} {value if value is not None else '-':<40} {sources[f.name]}")
        return "\n".join(rows)

    def __setattr__(self, name, value):
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            self.update(**{name: value})


settings = Settings()
