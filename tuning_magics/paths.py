"""Where tuning_magics keeps its files: ``$TUNING_MAGICS_HOME`` or the user's data folder."""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    """The folder for jobs, built-in models and datasets written without an explicit path."""
    env = os.environ.get("TUNING_MAGICS_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "tuning_magics"
