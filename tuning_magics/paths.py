"""Where tuning_magics keeps its files: ``$TUNING_MAGICS_HOME`` or the user's data folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def data_home() -> Path:
    """The folder for jobs, built-in models and datasets written without an explicit path.

    ``$TUNING_MAGICS_HOME`` when set, else the platform's user data folder. Always an
    absolute path (the registry is opened by a file URI, which must be): a relative
    ``$TUNING_MAGICS_HOME`` is taken from the current folder the first time it is read,
    and written back as absolute, so a later ``%cd`` and the worker processes find the
    same folder.
    """
    env = os.environ.get("TUNING_MAGICS_HOME")
    if env:
        path = os.path.abspath(os.path.expanduser(env))
        if path != env:
            os.environ["TUNING_MAGICS_HOME"] = path
        return Path(path)
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "tuning_magics"
