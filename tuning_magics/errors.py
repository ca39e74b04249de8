"""The one exception type for mistakes a user can fix.

A :class:`UserError` carries a one-line message that names the option, row or
field at fault and says what to do. The magics print it without a traceback;
plain Python callers get an ordinary exception with the same text.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input, with a one-line message that says how to fix it."""

    def __init__(self, message: str, *, field: str | None = None, line: int | None = None):
        super().__init__(message)
        self.field = field
        self.line = line

    def __str__(self) -> str:
        return self.args[0]


#: What each optional part of the package needs, and the extra that installs it.
EXTRAS = {
    # psutil tells a live worker from a dead one; filelock guards the job queue.
    "local": ("torch", "transformers", "tokenizers", "peft", "safetensors", "psutil", "filelock"),
    "vertex": ("google.genai", "google.cloud.storage", "google_crc32c"),
}


class MissingExtra(UserError):
    """A feature needs packages of an optional extra that is not installed; the message says what to run."""


def missing_extra(exc: ImportError) -> MissingExtra | None:
    """The :class:`MissingExtra` for an ImportError of a package an extra installs, else None."""
    name = getattr(exc, "name", None) or ""
    for extra, modules in EXTRAS.items():
        for module in modules:
            if name and (module == name or module.startswith(name + ".") or name.startswith(module + ".")):
                return MissingExtra(f"this needs {module}, which is not installed: pip install "
                                    f"\"tuning_magics[{extra}]\"", field=extra)
    return None


def require_extra(extra: str, *modules: str) -> None:
    """Raise :class:`MissingExtra` naming ``pip install "tuning_magics[extra]"`` when a module is missing.

    ``modules`` defaults to everything the extra installs. Only looks the
    modules up, without importing them, so the check is cheap.
    """
    import importlib.util

    for name in modules or EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
            found = False
        if not found:
            raise MissingExtra(
                f"this needs {name}, which is not installed: pip install \"tuning_magics[{extra}]\"",
                field=extra,
            )
