"""The rules of ``gs://BUCKET/OBJECT`` names, written once for storage, settings and the backends.

No Cloud Storage client here: checking a name needs none.
"""

from __future__ import annotations

from .errors import UserError

SCHEME = "gs://"


def is_gcs(uri) -> bool:
    """True when ``uri`` is a ``gs://`` URI (a string), False for local paths."""
    return isinstance(uri, str) and uri.startswith(SCHEME)


def split_gcs(uri: str) -> tuple[str, str]:
    """Split ``gs://BUCKET/OBJECT`` into ``(BUCKET, OBJECT)``; both must be present."""
    return split_folder_or_object(uri, need_object=True)


def split_folder_or_object(uri: str, *, need_object: bool) -> tuple[str, str]:
    """``(BUCKET, PATH)`` of a gs:// URI; ``PATH`` may be empty or a folder unless ``need_object``."""
    if not is_gcs(uri):
        raise UserError(f"{uri!r} is not a Cloud Storage URI; write it as gs://BUCKET/PATH")
    bucket, _, name = uri[len(SCHEME) :].partition("/")
    problem = None
    if not bucket:
        problem = "the bucket name is missing"
    elif not _valid_bucket(bucket):
        problem = f"{bucket!r} is not a valid bucket name (lowercase letters, digits, '-', '_', '.')"
    elif need_object and (not name or name.endswith("/")):
        problem = "the object name is missing"
    if problem:
        raise UserError(f"{uri!r} is not a valid Cloud Storage URI: {problem}; write it as gs://BUCKET/PATH/FILE")
    return bucket, name


def _valid_bucket(name: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")
    return 3 <= len(name) <= 222 and set(name) <= allowed and name[0].isalnum() and name[-1].isalnum()
