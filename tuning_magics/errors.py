"""The one exception type for mistakes a user can fix.

A :class:`UserError` carries a one-line message that names the option, row or
field at fault and says what to do. The magics print it without a traceback;
plain Python callers get an ordinary exception with the same text.
"""

from __future__ import annotations

import re


class UserError(ValueError):
    """A mistake in the user's input, with a one-line message that says how to fix it."""

    def __init__(self, message: str, *, field: str | None = None, line: int | None = None):
        super().__init__(message)
        self.field = field
        self.line = line

    def __str__(self) -> str:
        return self.args[0]


#: What each optional part of the package needs, and the extra that installs it. Each module's
#: distribution is its name with "-" for "." and "_" (google.genai: google-genai), which is how
#: require_extra finds the floor pyproject.toml declares for it.
EXTRAS = {
    # psutil tells a live worker from a dead one; filelock guards the job queue.
    "local": ("torch", "transformers", "tokenizers", "peft", "trl", "safetensors", "psutil", "filelock"),
    "vertex": ("google.genai", "google.cloud.storage", "google_crc32c"),
    # GGUF files for llama.cpp and Ollama: the writer, and llama.cpp itself to verify them.
    "export": ("gguf", "llama_cpp"),
}


class MissingExtra(UserError):
    """A feature needs packages of an optional extra that are not installed, or older than it needs.

    The message says what to run.
    """


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

    ``modules`` defaults to everything the extra installs. A package older than
    the floor this package declares for it (pyproject.toml, read back from the
    installed metadata) is named too, with the ``pip install -U`` to run: the
    modules' own packages, or with no ``modules`` every package of the extra.
    Only looks the modules and versions up, without importing anything, so the
    check is cheap.
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
    _require_floors(extra, modules)


#: (extra, modules) whose installed versions were found new enough: a version does not change under a session.
_NEW_ENOUGH: set = set()


def _require_floors(extra: str, modules: tuple) -> None:
    """Raise :class:`MissingExtra` when an installed package of ``extra`` is older than its declared floor."""
    if (extra, modules) in _NEW_ENOUGH:
        return
    import importlib.metadata

    floors = declared_floors(extra)
    if modules:
        wanted = {_distribution(m) for m in modules}
        floors = {dist: floor for dist, floor in floors.items() if dist in wanted}
    old = []
    for dist, floor in floors.items():
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # not installed: its import says so where it is needed
            continue
        if _older(installed, floor):
            old.append((dist, installed, floor))
    if old:
        names = " and ".join(f"{dist} {installed}" for dist, installed, _ in old)
        pins = " ".join(f'"{dist}>={floor}"' for dist, _, floor in old)
        raise MissingExtra(f"{names} {'is' if len(old) == 1 else 'are'} older than tuning_magics[{extra}] needs: "
                           f"pip install -U {pins}, then restart the kernel", field=extra)
    _NEW_ENOUGH.add((extra, modules))


def declared_floors(extra: str) -> dict[str, str]:
    """``{distribution: lowest version}`` of ``extra`` as the installed tuning_magics declares them (``>=``).

    Empty when tuning_magics runs from a source folder that pip did not install.
    """
    import importlib.metadata

    try:
        requirements = importlib.metadata.requires("tuning_magics") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    floors = {}
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if not re.search(rf"""extra\s*==\s*["']{re.escape(extra)}["']""", marker):
            continue
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        floor = re.search(r">=\s*(\d+(?:\.\d+)*)", spec)
        if name and floor:
            floors[_distribution(name.group(1))] = floor.group(1)
    return floors


def _distribution(name: str) -> str:
    """A module's or distribution's name in the normalized form of distribution names (google.genai: google-genai)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _older(installed: str, floor: str) -> bool:
    """Whether the release numbers of ``installed`` come before ``floor``'s (2.9 before 2.11; 2.13.0+cpu is 2.13.0)."""
    def release(version: str) -> list[int]:
        found = re.match(r"\d+(?:\.\d+)*", version.strip())
        return [int(part) for part in found.group().split(".")] if found else []

    mine, needed = release(installed), release(floor)
    width = max(len(mine), len(needed))
    return mine + [0] * (width - len(mine)) < needed + [0] * (width - len(needed))
