"""Local paths and ``gs://`` URIs behind one small API.

Every function here takes either a local path (``str`` or :class:`os.PathLike`)
or a Cloud Storage URI ``gs://BUCKET/OBJECT`` and behaves the same way for
both. Mistakes a user can fix (a malformed URI, a missing object, a file that
already exists, missing credentials) raise :class:`~tuning_magics.errors.UserError`
with a one-line message that names the path and says what to do.

Guarantees
----------
* **Nothing half-written.** :func:`atomic_writer` writes local files to a
  temporary file in the destination folder, flushes and fsyncs it, then moves it
  into place in one step. ``gs://`` writes are spooled to a local temporary file
  and uploaded only when the ``with`` block finishes without an exception; a
  Cloud Storage object only becomes visible once the whole upload succeeded.
  An exception inside the block removes the temporary file and leaves the
  destination as it was. :func:`atomic_writers` does the same for several
  files that belong together: all of them change, or none does.
* **Nothing lost.** Without ``overwrite=True`` an existing destination is
  refused up front, before anything is written, and again at the final step:
  locally with a hard link (which never replaces a file created meanwhile),
  on Cloud Storage with the precondition ``ifGenerationMatch=0``. With
  ``overwrite=True`` the upload is conditional on the generation seen up front,
  so a concurrent writer's object is not silently replaced either.
* **Verified transfers.** Uploads send the CRC32C and MD5 of the local bytes
  with the object metadata (the server refuses a mismatch), the client checks
  the CRC32C of what was sent, and the stored object's checksums are read back
  and compared; a corrupted object is deleted. Downloads compare the bytes
  received with the object's CRC32C (and MD5 where the object has one).
* **Resumable uploads.** ``gs://`` uploads use the resumable protocol in
  :data:`CHUNK_SIZE` pieces, so a dropped connection retries a chunk rather than
  the whole file (:func:`upload_content_addressed` sends a file of at most one
  chunk in a single request). Every request, each chunk included, is retried
  for at most :data:`RETRY_SECONDS`. An upload whose last answer was lost is
  judged by what was stored: a new object with exactly the local bytes is a
  finished upload, not a conflict.
* **Content-addressed uploads.** :func:`upload_content_addressed` names an
  object after the SHA-256 of its bytes, so the same data is uploaded once and
  an existing object is reused, never replaced.

``google-cloud-storage`` is imported only when a ``gs://`` URI is used. All
clients come from :func:`gcs_client`, which honours ``STORAGE_EMULATOR_HOST``
(a local emulator, no credentials needed).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import mimetypes
import os
import threading
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

from .errors import UserError, require_extra
from .gcs_uri import SCHEME as _SCHEME, is_gcs, split_folder_or_object, split_gcs

if TYPE_CHECKING:
    from google.cloud.storage import Blob, Client

PathOrUri = str | os.PathLike[str]

#: Seconds to wait for a connection, and for each answer, before a request counts as failed.
#: Metadata requests (is there an object, its checksums, a listing) answer in well under a
#: second; transfers of a chunk or a whole object get longer.
CONNECT_TIMEOUT, READ_TIMEOUT, TRANSFER_TIMEOUT = 5.0, 10.0, 120.0
#: Seconds a request that failed transiently (503, a dropped connection, no answer) is retried for
#: in all (a resumable upload's chunk: counted from the server's last reported progress). A server
#: that refuses the connection or a name that does not resolve is not retried.
RETRY_SECONDS = 20.0
#: Resumable upload chunk size; Cloud Storage requires a multiple of 256 KiB.
CHUNK_SIZE = 8 * 1024 * 1024
_BLOCK = 1024 * 1024
_CREDENTIALS_HELP = (
    "no Google Cloud credentials found; run `gcloud auth application-default login` "
    "or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file"
)


def _exists_message(display: str) -> str:
    return f"{display} already exists; pass overwrite=True (--overwrite) or choose another path"


# ---------------------------------------------------------------- paths the user gives

#: How Python and pandas write a missing value as text: a path segment spelled so was a variable left unset.
UNSET_SPELLINGS = frozenset({"None", "nan", "NaN", "<NA>", "NaT"})


def check_path(name: str, value, *, kind: str = "a local path or a gs:// URI") -> str:
    """``value``, a path or gs:// URI the user gave as option ``name``, as text; else a one-line UserError.

    IPython writes a variable's value into a magic's line for ``{VAR}``, so an unset one turns
    ``{BUCKET}/train.jsonl`` into ``None/train.jsonl`` (``data//train.jsonl`` or ``gs:///train.jsonl``
    for an empty one). A segment that is the text of a missing value (None, nan, <NA>, NaT), or empty
    inside the path, is refused here rather than made into a folder. Every option that names where to
    write comes through here: dataset()'s out and validation_out, tune()'s output_uri.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{name} must be {kind}, not {value!r}", field=name)
    gcs = is_gcs(value)
    body = value[len(_SCHEME):] if gcs else value
    segments = body.replace(os.sep, "/").replace(os.altsep or "/", "/").split("/")
    for i, segment in enumerate(segments):
        where = "starts with" if i == 0 else "has a segment"
        if segment.strip() in UNSET_SPELLINGS:
            raise UserError(f"{name} {value!r} {where} {segment.strip()!r}: is the variable in {{...}} unset? "
                            "set it, or give a path", field=name)
        # Empty: inside the path, or a gs:// URI's bucket; a local path may start or end with a separator.
        if not segment.strip() and (0 < i < len(segments) - 1 or (i == 0 and gcs)):
            raise UserError(f"{name} {value!r} has an empty segment: is the variable in {{...}} empty? "
                            "set it, or give a path", field=name)
    return value


# ---------------------------------------------------------------- client and errors


def gcs_client(project: str | None = None) -> Client:
    """The one place a Cloud Storage client is made (cached per project, credentials and environment).

    With ``STORAGE_EMULATOR_HOST`` set, the client talks to that emulator with
    anonymous credentials. Otherwise it acts as the same identity as the Vertex
    AI calls: the credentials given with ``tuning_magics.settings.update(credentials=...)``,
    else Application Default Credentials (a :class:`UserError` when there are none),
    billed to the configured project.
    """
    credentials = None
    try:
        from .config import settings

        credentials = settings.credentials
        project = project or settings.project
    except UserError:
        pass  # a broken pyproject.toml is reported where settings matter; storage falls back to the environment
    emulator = os.environ.get("STORAGE_EMULATOR_HOST") or None
    key = (project or os.environ.get("GOOGLE_CLOUD_PROJECT") or None, emulator,
           os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"), None if emulator else id(credentials))
    with _CLIENTS_LOCK:
        entry = _CLIENTS.get(key)
        if entry is None:
            if len(_CLIENTS) >= 8:
                _CLIENTS.pop(next(iter(_CLIENTS)))
            # The credentials are kept with their client, so the id() in the key stays theirs.
            entry = _CLIENTS[key] = (_client(key[0], emulator, None if emulator else credentials), credentials)
        return entry[0]


_CLIENTS: dict = {}
_CLIENTS_LOCK = threading.Lock()


def _client(project: str | None, emulator_host: str | None, credentials) -> Client:
    require_extra("vertex", "google.cloud.storage", "google_crc32c")
    from google.cloud import storage

    if emulator_host:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or "local", credentials=AnonymousCredentials())
    from google.auth.exceptions import DefaultCredentialsError

    try:
        return storage.Client(project=project, credentials=credentials)
    except DefaultCredentialsError as exc:
        raise UserError(_CREDENTIALS_HELP) from exc


def _unreachable(exc: BaseException) -> bool:
    """True for failures no retry can fix: nothing listens at the address, or the host name is unknown."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConnectionRefusedError):
            return True
        text = str(exc)
        if "Connection refused" in text or "Failed to resolve" in text or "Name or service not known" in text:
            return True
        exc = exc.__cause__ or exc.__context__ or next(
            (a for a in getattr(exc, "args", ()) if isinstance(a, BaseException)), None)
    return False


def _call_options(*, transfer: bool = False) -> dict:
    """``timeout`` and ``retry`` for every Cloud Storage call: bounded, so a dead server fails in seconds.

    ``transfer`` is for calls that move an object's bytes (longer read timeout).
    """
    from google.api_core.retry import Retry
    from google.cloud.storage.retry import _should_retry

    retry = Retry(predicate=lambda exc: _should_retry(exc) and not _unreachable(exc), initial=0.5, maximum=8.0,
                  multiplier=2.0, timeout=RETRY_SECONDS)
    return {"timeout": (CONNECT_TIMEOUT, TRANSFER_TIMEOUT if transfer else READ_TIMEOUT), "retry": retry}


def _endpoint() -> str:
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    return f"the Cloud Storage emulator at {host} (STORAGE_EMULATOR_HOST)" if host else "Cloud Storage"


@contextlib.contextmanager
def _gcs_errors(uri: str, *, missing: str | None = None, conflict: str | None = None) -> Iterator[None]:
    """Turn Cloud Storage failures into one-line :class:`UserError` messages."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth
    from requests.exceptions import ConnectionError as RequestsConnectionError

    try:
        yield
    except UserError:
        raise
    except api.NotFound as exc:
        raise UserError(missing or f"{uri} not found; check the bucket and object name") from exc
    except api.PreconditionFailed as exc:
        raise UserError(conflict or f"{uri} changed while it was being written; run again") from exc
    except (api.Unauthorized, auth.DefaultCredentialsError, auth.RefreshError) as exc:
        raise UserError(_CREDENTIALS_HELP) from exc
    except api.Forbidden as exc:
        raise UserError(
            f"permission denied for {uri}; ask for a Storage role on the bucket (e.g. roles/storage.objectAdmin) "
            "or use another bucket"
        ) from exc
    except _data_corruption() as exc:
        raise UserError(f"the transfer of {uri} was corrupted in transit; run again") from exc
    except api.GoogleAPICallError as exc:
        raise UserError(f"Cloud Storage refused the request for {uri}: {_reason(exc)}") from exc
    except (RequestsConnectionError, api.RetryError, ConnectionError, TimeoutError) as exc:
        cause = getattr(exc, "cause", None) or exc
        why = "the connection was refused" if _unreachable(cause) else "no answer in time"
        fix = "start it or unset STORAGE_EMULATOR_HOST" if os.environ.get("STORAGE_EMULATOR_HOST") \
            else "check the network connection and run again"
        raise UserError(f"cannot reach {_endpoint()} for {uri} ({why}); {fix}") from exc


def _reason(exc: Exception) -> str:
    """The server's own message, on one line (media requests otherwise include the URL and body)."""
    try:
        text = exc.response.json()["error"]["message"]  # type: ignore[attr-defined]
    except Exception:
        text = getattr(exc, "message", None) or str(exc)
    return " ".join(str(text).split())[:300]


def _data_corruption() -> type[Exception]:
    try:
        from google.cloud.storage.exceptions import DataCorruption
    except ImportError:  # google-cloud-storage < 3
        from google.resumable_media import DataCorruption
    return DataCorruption


def _blob(uri: str) -> Blob:
    bucket, name = split_gcs(uri)
    return gcs_client().bucket(bucket).blob(name)


def _existing_blob(uri: str) -> Blob:
    """The object's current metadata (generation, checksums), or a UserError if missing."""
    blob = _blob(uri)
    with _gcs_errors(uri):
        found = blob.bucket.get_blob(blob.name, **_call_options())
    if found is None:
        raise UserError(f"{uri} not found; check the bucket and object name")
    return found


# ---------------------------------------------------------------- checksums


@dataclass(frozen=True)
class _Digests:
    """Checksums base64-encoded the way Cloud Storage reports them, and the SHA-256 (hex) that names content."""

    crc32c: str
    md5: str
    sha256: str = ""


def _digest_stream(stream: IO[bytes]) -> _Digests:
    """All checksums of the stream's bytes, in one pass."""
    import google_crc32c

    crc = google_crc32c.Checksum()
    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    for block in iter(lambda: stream.read(_BLOCK), b""):
        crc.update(block)
        md5.update(block)
        sha.update(block)
    return _Digests(_b64(crc.digest()), _b64(md5.digest()), sha.hexdigest())


def _digest_file(path: PathOrUri) -> _Digests:
    with open(path, "rb") as stream:
        return _digest_stream(stream)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _mismatches(blob: Blob, local: _Digests) -> list[str]:
    """Names of the checksums where ``blob`` and ``local`` differ.

    A checksum the object lacks (composite objects have no MD5) is skipped;
    an object with neither cannot be verified and counts as a mismatch.
    """
    if blob.crc32c is None and blob.md5_hash is None:
        return ["crc32c (missing)"]
    pairs = (("crc32c", blob.crc32c, local.crc32c), ("md5", blob.md5_hash, local.md5))
    return [name for name, remote, mine in pairs if remote is not None and remote != mine]


def _verify_upload(blob: Blob, local: _Digests, uri: str) -> None:
    """Read back the stored object's checksums; delete it and raise if they differ."""
    with _gcs_errors(uri):
        blob.reload(**_call_options())  # the generation we just wrote: ``blob.generation`` is pinned
        bad = _mismatches(blob, local)
        if bad:
            blob.delete(if_generation_match=blob.generation, **_call_options())
    if bad:
        raise UserError(f"the upload to {uri} was corrupted ({', '.join(bad)} mismatch) and was deleted; run again")


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_writer(
    uri: PathOrUri, *, overwrite: bool = False, content_type: str = "application/jsonl"
) -> Iterator[BinaryIO]:
    """Context manager yielding a binary file; the destination appears only if the block succeeds.

    Refuses an existing destination unless ``overwrite`` (checked before
    anything is written, and again atomically at the end). ``content_type``
    applies to ``gs://`` objects.
    """
    with atomic_writers([uri], overwrite=overwrite, content_type=content_type) as (stream,):
        yield stream


@contextlib.contextmanager
def atomic_writers(
    uris: list[PathOrUri], *, overwrite: bool = False, content_type: str = "application/jsonl"
) -> Iterator[list[BinaryIO]]:
    """:func:`atomic_writer` for several destinations at once: all of them change, or none does.

    Every destination is checked before the block runs. Only when the block
    succeeded are the files moved into place (uploaded, for ``gs://``), one after
    another; the old content of each is kept aside until the last one is in
    place, and put back if a later one fails.
    """
    with contextlib.ExitStack() as stack:
        staged = [stack.enter_context(_GcsStaged(str(u), overwrite, content_type) if is_gcs(u)
                                      else _LocalStaged(u, overwrite)) for u in uris]
        yield [s.stream for s in staged]
        for s in staged:
            s.finish()
        done: list[_LocalStaged | _GcsStaged] = []
        try:
            for i, s in enumerate(staged):
                s.commit(keep_old=i < len(staged) - 1)
                done.append(s)
        except BaseException:
            for s in reversed(done):
                with contextlib.suppress(Exception):  # should putting one back fail, its old copy stays aside
                    s.rollback()
            raise


class _LocalStaged:
    """One local destination of :func:`atomic_writers`: a temporary file beside it until the commit."""

    def __init__(self, uri: PathOrUri, overwrite: bool):
        self.path, self.display, self.overwrite = Path(uri).expanduser(), os.fspath(uri), overwrite
        self.backup: Path | None = None
        if self.path.is_dir():
            raise UserError(f"{self.display} is a folder; give a file path")
        if not overwrite and os.path.lexists(self.path):
            raise UserError(_exists_message(self.display))
        with _os_errors(self.display, "write"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp, self.stream = _create_temp(self.path)

    def __enter__(self) -> _LocalStaged:
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()
        self.tmp.unlink(missing_ok=True)
        if self.backup is not None:
            self.backup.unlink(missing_ok=True)

    def finish(self) -> None:
        self.stream.close()
        _fsync_file(self.tmp)

    def commit(self, keep_old: bool) -> None:
        with _os_errors(self.display, "write"):
            if keep_old and self.overwrite and os.path.isfile(self.path):
                self.backup = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.old")
                try:
                    os.link(self.path, self.backup)
                except OSError:  # no hard links on this filesystem
                    shutil.copy2(self.path, self.backup)
            _commit(self.tmp, self.path, self.overwrite, self.display)

    def rollback(self) -> None:
        backup, self.backup = self.backup, None
        if backup is not None:
            os.replace(backup, self.path)
        else:
            self.path.unlink(missing_ok=True)
        fsync_dir(self.path.parent)


def _create_temp(path: Path) -> tuple[Path, BinaryIO]:
    # os.open with mode 0o666 honours the umask, unlike mkstemp's 0o600.
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return tmp, os.fdopen(fd, "w+b")


def _fsync_file(path: Path) -> None:
    # Reopened rather than fsync'd through the caller's stream, which the block may have closed.
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path, overwrite: bool, display: str) -> None:
    """Move the finished temp file into place; never replaces a file unless ``overwrite``."""
    if overwrite:
        os.replace(tmp, path)
    elif not link_into_place(tmp, path):
        raise UserError(_exists_message(display))
    fsync_dir(path.parent)


def link_into_place(tmp: Path, path: Path) -> bool:
    """Give the finished file ``tmp`` the name ``path`` too, unless ``path`` exists: then False, and it stays.

    The caller removes ``tmp`` afterwards.
    """
    try:
        os.link(tmp, path)  # fails if ``path`` appeared meanwhile
    except FileExistsError:
        return False
    except OSError:
        # No hard links on this filesystem: check-then-rename, a tiny race window.
        if os.path.lexists(path):
            return False
        os.replace(tmp, path)
    return True


def fsync_tree(folder: PathOrUri) -> None:
    """Flush every file under a local ``folder``, and the folders themselves, to disk.

    Used before a whole folder (a checkpoint, a built model) is renamed into place.
    """
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX only; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: Names starting with this are the unfinished work of :func:`atomic_folder`; readers skip them.
TEMP_PREFIX = ".tmp-"


def _swap_names(target: Path) -> tuple[Path, Path]:
    """Where :func:`atomic_folder` keeps the finished new copy and the old one while it swaps them."""
    return (target.with_name(f"{TEMP_PREFIX}new-{target.name}"),
            target.with_name(f"{TEMP_PREFIX}old-{target.name}"))


@contextlib.contextmanager
def atomic_folder(target: PathOrUri, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside local ``target``; when the block succeeds it becomes ``target``.

    An exception in the block removes the temporary folder and leaves ``target``
    as it was. A new ``target`` appears in one rename. No portable call replaces
    a non-empty folder, so replacing takes three renames; a crash between them is
    settled by :func:`recover_folder`, which readers call: the finished new copy
    wins, else the old one comes back. With ``replace=False`` an existing
    ``target`` (a concurrent writer's) is kept and the new copy dropped.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise  # not "target exists": a real failure (the parent vanished, ...)
            if replace:
                _swap(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap(tmp: Path, target: Path) -> None:
    new, old = _swap_names(target)
    for leftover in (new, old):  # a crash's leftovers that recover_folder left (target was there)
        shutil.rmtree(leftover, ignore_errors=True)
    os.rename(tmp, new)  # the new copy is complete, under a name recovery knows
    try:
        os.rename(target, old)  # until the next rename, recover_folder puts ``new`` in place
    except PermissionError as exc:
        # Windows refuses to rename a folder while a file in it is open (a model loaded from it).
        shutil.rmtree(new, ignore_errors=True)
        raise UserError(f"cannot replace {target}: permission denied (on Windows: a file in it is open, e.g. a model "
                        "loaded from it by job.chat() or deploy()); the old copy is kept: stop what holds it "
                        "(endpoint.stop(), or restart the kernel that loaded it) and try again") from exc
    try:
        os.rename(new, target)
    except FileNotFoundError:
        if not target.is_dir():
            raise  # a reader's recover_folder did the last rename for us otherwise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(target: PathOrUri) -> bool:
    """Settle a replacement of ``target`` by :func:`atomic_folder` that a crash cut short; True if ``target`` exists.

    Safe to call at any time, from any process, even while a writer works.
    """
    target = Path(target)
    new, old = _swap_names(target)
    if not target.exists():
        for copy in (new, old):  # the finished new copy wins; else the old one comes back
            try:
                os.rename(copy, target)
                break
            except OSError:
                continue  # not there, or another process settled it first
    if target.exists() and old.exists() and not new.exists():
        shutil.rmtree(old, ignore_errors=True)  # the swap finished; only the removal of the old copy was cut
    return target.exists()


def remove_stale_temp(folder: PathOrUri) -> int:
    """In local ``folder``: settle interrupted replacements, then delete what unfinished writers left; how many.

    Only for a folder no writer is working in (a job's own folder when it starts).
    """
    root = Path(folder)
    if not root.is_dir():
        return 0
    for child in list(root.iterdir()):
        for role in ("new-", "old-"):
            if child.name.startswith(TEMP_PREFIX + role):
                recover_folder(root / child.name[len(TEMP_PREFIX + role):])
    removed = 0
    for child in list(root.iterdir()):
        if child.name.startswith(TEMP_PREFIX):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def _os_errors(display: str, verb: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as exc:
        raise UserError(f"{display} not found; check the path") from exc
    except IsADirectoryError as exc:
        raise UserError(f"{display} is a folder; give a file path") from exc
    except PermissionError as exc:
        raise UserError(f"cannot {verb} {display}: permission denied; choose another path") from exc
    except OSError as exc:
        raise UserError(f"cannot {verb} {display}: {exc.strerror or exc}; choose another path") from exc


class _GcsStaged:
    """One ``gs://`` destination of :func:`atomic_writers`: a local spool file until the upload."""

    def __init__(self, uri: str, overwrite: bool, content_type: str):
        self.uri, self.overwrite, self.content_type = uri, overwrite, content_type
        self.generation = _write_precondition(uri, overwrite)
        self.backup: Blob | None = None
        self.blob: Blob | None = None
        fd, spool = tempfile.mkstemp(prefix="tuning_magics-", suffix=".upload")
        self.spool, self.stream = Path(spool), os.fdopen(fd, "wb")

    def __enter__(self) -> _GcsStaged:
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()
        self.spool.unlink(missing_ok=True)
        if self.backup is not None:
            with contextlib.suppress(Exception):  # a stray copy costs less than a failed commit
                self.backup.delete(**_call_options())

    def finish(self) -> None:
        self.stream.close()

    def commit(self, keep_old: bool) -> None:
        if keep_old and self.generation:
            # A server-side copy of the object as it was, beside it.
            old = _blob(self.uri)
            folder, _, name = old.name.rpartition("/")
            aside = f"{folder}/" * bool(folder) + f".{name}.{secrets.token_hex(4)}.old"
            with _gcs_errors(self.uri):
                self.backup = old.bucket.copy_blob(old, old.bucket, aside, source_generation=self.generation,
                                                   if_generation_match=0, **_call_options())
        self.blob = _upload(self.spool, self.uri, self.generation, self.content_type,
                            conflict=None if self.overwrite else _exists_message(self.uri))

    def rollback(self) -> None:
        backup, self.backup, blob = self.backup, None, self.blob
        with _gcs_errors(self.uri):
            if backup is not None:
                blob.bucket.copy_blob(backup, blob.bucket, blob.name, if_generation_match=blob.generation,
                                      **_call_options())
                backup.delete(**_call_options())
            else:
                blob.delete(if_generation_match=blob.generation, **_call_options())


def _write_precondition(uri: str, overwrite: bool) -> int:
    """Check the destination up front; the generation the upload must find (0: none)."""
    blob = _blob(uri)
    with _gcs_errors(uri):
        existing = blob.bucket.get_blob(blob.name, **_call_options())
    if existing is None:
        return 0
    if not overwrite:
        raise UserError(_exists_message(uri))
    return int(existing.generation)


def _upload(source: Path, uri: str, generation: int, content_type: str, *, conflict: str | None,
            local: _Digests | None = None, one_request: bool = False) -> Blob:
    """Upload a local file to ``uri``, conditional on ``generation``; the stored object, verified.

    ``conflict`` is the message when the precondition fails because another
    object is there. ``local``: the file's digests, if already known. With
    ``one_request`` a file of at most :data:`CHUNK_SIZE` goes in one multipart
    request (else, and for larger files, the resumable protocol in chunks).

    The outcome is judged by what is stored: when the upload fails (the
    precondition, a retried last request whose first answer was lost, retries
    running out) but the object now under ``uri`` is a new generation with
    exactly the local bytes, the upload took place and counts as done.
    """
    local = local or _digest_file(source)
    blob = _blob(uri)
    blob.chunk_size = CHUNK_SIZE
    # Sent with the metadata: the server refuses the object if the bytes differ.
    blob.crc32c, blob.md5_hash = local.crc32c, local.md5
    missing = f"bucket {blob.bucket.name!r} not found (writing {uri}); create it or choose another bucket"
    length = source.stat().st_size
    try:
        with open(source, "rb") as stream, _gcs_errors(uri, missing=missing, conflict=conflict):
            if one_request and length <= min(CHUNK_SIZE, 8 * 1024 * 1024):  # the client's multipart limit
                blob.upload_from_file(
                    stream, size=length, content_type=content_type, if_generation_match=generation,
                    checksum="crc32c", **_call_options(transfer=True),
                )
            else:
                _resumable_upload(blob, stream, length, content_type, generation)
    except UserError:
        stored = _landed(blob, local, generation)
        if stored is None:
            raise
        return stored
    _verify_upload(blob, local, uri)
    return blob


#: Answers after which a resumable upload asks the server how far it got and goes on from there.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def _resumable_upload(blob: Blob, stream: BinaryIO, length: int, content_type: str, generation: int) -> None:
    """Upload ``stream`` (``length`` bytes) to ``blob`` with the resumable protocol, in :data:`CHUNK_SIZE` pieces.

    After a failed chunk (no answer, a dropped connection, 429 or 5xx) the
    server is asked how many bytes it has kept and the upload goes on from
    there: resending the same chunk is refused by a server that kept part or
    all of it (the answer was lost). Each chunk gets :data:`RETRY_SECONDS`;
    the budget starts again whenever the server reports progress.
    """
    import time

    import requests
    from google.api_core import exceptions as api
    from google.api_core.retry import exponential_sleep_generator

    options = _call_options(transfer=True)
    url = blob.create_resumable_upload_session(content_type=content_type, size=length, checksum=None,
                                               if_generation_match=generation, **options)
    session, timeout = blob.client._http, options["timeout"]
    offset, ask = 0, False  # ask: send no data, only ask how far the server got
    while True:
        deadline, waits = time.monotonic() + RETRY_SECONDS, exponential_sleep_generator(0.5, 8.0, 2.0)
        while True:
            failure: Exception
            try:
                stream.seek(offset)
                chunk = b"" if ask else stream.read(CHUNK_SIZE)
                where = f"{offset}-{offset + len(chunk) - 1}" if chunk else "*"
                answer = session.put(url, data=chunk, headers={"Content-Range": f"bytes {where}/{length}"},
                                     timeout=timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if _unreachable(exc):
                    raise
                failure = exc
            else:
                if answer.status_code in (200, 201):
                    return
                if answer.status_code == 308:  # "resume incomplete": Range says what the server has
                    kept = answer.headers.get("Range", "")
                    offset = int(kept.rpartition("-")[2]) + 1 if kept else 0
                    ask = False
                    break
                if answer.status_code not in _TRANSIENT_STATUS:
                    raise api.from_http_response(answer)
                failure = api.from_http_response(answer)
            ask = True
            wait = next(waits)
            if time.monotonic() + wait > deadline:
                raise api.RetryError(f"no progress uploading to {blob.name} for {RETRY_SECONDS:g} s", failure)
            time.sleep(wait)


def _landed(blob: Blob, local: _Digests, generation: int) -> Blob | None:
    """The object under ``blob``'s name if it is a generation other than ``generation`` holding the local bytes.

    After a failed upload: the request may have been carried out although its
    answer never came (a retry then finds the precondition failing, or the
    finished upload session gone), or another writer stored the same bytes.
    """
    with contextlib.suppress(Exception):  # no answer now either: the upload's own error stands
        # One attempt: the upload already spent the retry budget when the server is gone.
        found = blob.bucket.get_blob(blob.name, **{**_call_options(), "retry": None})
        if found is not None and int(found.generation) != generation and not _mismatches(found, local):
            return found
    return None


def upload_file(
    local_path: PathOrUri, uri: PathOrUri, *, overwrite: bool = False, content_type: str | None = None
) -> None:
    """Copy a local file to ``uri`` (``gs://`` or local), atomically and checksum-verified.

    ``content_type`` defaults to one guessed from the file name.
    """
    if is_gcs(local_path):
        raise UserError(f"{local_path} is not a local file; upload_file copies a local file to a path or gs:// URI")
    source, display = Path(local_path).expanduser(), os.fspath(local_path)
    if not source.is_file():
        raise UserError(f"{display} not found; check the path")
    if not is_gcs(uri):
        with open_read(source) as src, atomic_writer(uri, overwrite=overwrite) as dst:
            shutil.copyfileobj(src, dst, _BLOCK)
        return
    uri = str(uri)
    generation = _write_precondition(uri, overwrite)
    _upload(source, uri, generation, content_type or _guess_type(source.name),
            conflict=None if overwrite else _exists_message(uri))


def content_uri(local_path: PathOrUri, prefix_uri: PathOrUri, *, suffix: str | None = None) -> str:
    """The name :func:`upload_content_addressed` gives ``local_path`` under ``prefix_uri``, without uploading."""
    return _content_address(local_path, prefix_uri, suffix)[3]


def _content_address(local_path: PathOrUri, prefix_uri: PathOrUri, suffix: str | None):
    """(source path, its display, its digests, the content-addressed URI or local path under ``prefix_uri``)."""
    if is_gcs(local_path):
        raise UserError(f"{local_path} is not a local file; only a local file is named after its content")
    source, display = Path(local_path).expanduser(), os.fspath(local_path)
    if not source.is_file():
        raise UserError(f"{display} not found; check the path")
    with _os_errors(display, "read"):
        local = _digest_file(source)
    suffix = source.suffix.lower() if suffix is None else suffix
    name = f"sha256-{local.sha256}{suffix}"
    if not is_gcs(prefix_uri):
        return source, display, local, str(Path(prefix_uri).expanduser() / name)
    bucket, folder = split_folder_or_object(str(prefix_uri), need_object=False)
    folder = folder.strip("/")
    return source, display, local, f"{_SCHEME}{bucket}/{folder}/{name}" if folder else f"{_SCHEME}{bucket}/{name}"


def upload_content_addressed(local_path: PathOrUri, prefix_uri: PathOrUri, *, suffix: str | None = None,
                             content_type: str | None = None) -> str:
    """Copy a local file to ``<prefix_uri>/sha256-<hex><suffix>``, named after its content; returns the URI.

    ``<hex>`` is the full SHA-256 of the file's bytes (64 hex digits) and
    ``suffix`` defaults to the file's own extension (``.jsonl``, ``.png``), which
    keeps the type recognisable. The original file name is left out on purpose:
    the same bytes under two names (a dataset saved twice, an image referenced
    from several folders) get one object and are uploaded once, and a user's
    name needs no escaping. The full digest, not a prefix of it, so that a name
    is never shared by two different contents.

    * Nothing is uploaded when the object already exists with the same
      checksums (CRC32C and MD5 compared with the local bytes).
    * An existing object is never replaced: the upload is conditional on there
      being no object (``ifGenerationMatch=0``). When another writer stored the
      same bytes first, that object is the result. An object of that name with
      other content is reported (delete it and run again), never overwritten.
    * Small files (up to :data:`CHUNK_SIZE`) go in one request, larger ones in
      resumable chunks; every request is retried for at most :data:`RETRY_SECONDS`.
    * The result is a complete object whose checksums were compared with the
      local file's, or a :class:`UserError` naming the object, with nothing
      stored under its name by this call.

    ``prefix_uri`` may also be a local folder: the file is copied there under
    the same name, with the same rules.
    """
    source, display, local, uri = _content_address(local_path, prefix_uri, suffix)
    if not is_gcs(prefix_uri):
        return _copy_content_addressed(source, Path(uri), local)
    other = (f"{uri} already exists with other content than {display} although it is named after its SHA-256; "
             f"delete it (gcloud storage rm {uri}) and run again")
    blob = _blob(uri)
    with _gcs_errors(uri):
        existing = blob.bucket.get_blob(blob.name, **_call_options())
    if existing is not None:
        if _mismatches(existing, local):
            raise UserError(other)
        return uri
    _upload(source, uri, 0, content_type or _guess_type(source.name), conflict=other, local=local, one_request=True)
    return uri


def _copy_content_addressed(source: Path, target: Path, local: _Digests) -> str:
    """:func:`upload_content_addressed` into a local folder."""
    display = os.fspath(target)
    for _attempt in range(2):
        if os.path.lexists(target):
            with _os_errors(display, "read"):
                same = target.is_file() and _digest_file(target).sha256 == local.sha256
            if not same:
                raise UserError(f"{display} already exists with other content than {source} although it is named "
                                "after its SHA-256; delete it and run again")
            return str(target)
        try:
            with open_read(source) as src, atomic_writer(target) as dst:
                shutil.copyfileobj(src, dst, _BLOCK)
            return str(target)
        except UserError:
            if not os.path.lexists(target):
                raise
            # another writer was first: its copy is checked above
    return str(target)


def _guess_type(name: str) -> str:
    if name.endswith(".jsonl"):
        return "application/jsonl"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def remove(uri: PathOrUri) -> None:
    """Delete the file or object if it exists (used to undo a partly written set of files)."""
    if not is_gcs(uri):
        Path(uri).expanduser().unlink(missing_ok=True)
        return
    uri = str(uri)
    with _gcs_errors(uri):
        blob = _blob(uri)
        if blob.exists(**_call_options()):
            blob.delete(**_call_options())


# ---------------------------------------------------------------- reading


def exists(uri: PathOrUri) -> bool:
    """True when the file or object exists."""
    if not is_gcs(uri):
        return Path(uri).expanduser().exists()
    uri = str(uri)
    with _gcs_errors(uri):
        return _blob(uri).exists(**_call_options())


def bucket_exists(uri: str) -> bool:
    """Whether the bucket of the gs:// URI ``uri`` exists (and this identity may see it): one read, nothing made."""
    bucket, _ = split_folder_or_object(str(uri), need_object=False)
    with _gcs_errors(f"gs://{bucket}"):
        return gcs_client().lookup_bucket(bucket, **_call_options()) is not None


def size(uri: PathOrUri) -> int:
    """Size in bytes of the file or object."""
    if not is_gcs(uri):
        display = os.fspath(uri)
        with _os_errors(display, "read"):
            return Path(uri).expanduser().stat().st_size
    return int(_existing_blob(str(uri)).size)


def open_read(uri: PathOrUri) -> BinaryIO:
    """Open the file or object for binary reading; close it when done.

    A ``gs://`` object is downloaded into an anonymous temporary file and its
    checksums verified before the stream is returned.
    """
    if not is_gcs(uri):
        display = os.fspath(uri)
        with _os_errors(display, "read"):
            return open(Path(uri).expanduser(), "rb")
    stream = tempfile.TemporaryFile()  # noqa: SIM115 - returned to the caller, who closes it
    try:
        _download(str(uri), stream)
    except BaseException:
        stream.close()
        raise
    stream.seek(0)
    return stream  # type: ignore[return-value]


def read_bytes(uri: PathOrUri) -> bytes:
    """The whole content of the file or object (``gs://``: checksum-verified)."""
    if not is_gcs(uri):
        with open_read(uri) as stream:
            return stream.read()
    import io

    buffer = io.BytesIO()
    _download(str(uri), buffer)
    return buffer.getvalue()


def download_file(uri: PathOrUri, local_path: PathOrUri, *, overwrite: bool = False) -> Path:
    """Copy ``uri`` to ``local_path`` atomically (``gs://``: checksum-verified); returns the path."""
    with atomic_writer(local_path, overwrite=overwrite) as stream:
        if is_gcs(uri):
            _download(str(uri), stream)
        else:
            with open_read(uri) as src:
                shutil.copyfileobj(src, stream, _BLOCK)
    return Path(local_path).expanduser()


@contextlib.contextmanager
def local_copy(uri: PathOrUri) -> Iterator[Path]:
    """A local path with the content of ``uri``, for code that needs a real file.

    Local paths are yielded as they are; ``gs://`` objects are downloaded to a
    temporary folder that is removed on exit.
    """
    if not is_gcs(uri):
        path = Path(uri).expanduser()
        if not path.is_file():
            raise UserError(f"{os.fspath(uri)} not found; check the path")
        yield path
        return
    uri = str(uri)
    folder = Path(tempfile.mkdtemp(prefix="tuning_magics-"))
    try:
        yield download_file(uri, folder / Path(split_gcs(uri)[1]).name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def list_uris(prefix: PathOrUri) -> list[str]:
    """Sorted files or objects whose path starts with ``prefix`` (a folder lists everything under it)."""
    return sorted(list_sizes(prefix))


def list_sizes(prefix: PathOrUri) -> dict[str, int]:
    """The files or objects whose path starts with ``prefix`` (a folder: everything under it), each with its size in
    bytes, read from one listing."""
    if is_gcs(prefix):
        prefix = str(prefix)
        bucket, name = split_folder_or_object(prefix, need_object=False)
        missing = f"bucket {bucket!r} not found (listing {prefix}); check the bucket name"
        with _gcs_errors(prefix, missing=missing):
            blobs = gcs_client().list_blobs(bucket, prefix=name or None, **_call_options())
            return {f"{_SCHEME}{bucket}/{b.name}": int(b.size or 0) for b in blobs if not b.name.endswith("/")}
    path = Path(prefix).expanduser()
    if path.is_dir():
        tops = [path]
    elif path.parent.is_dir():
        tops = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
    else:
        return {}
    files = (f for top in tops for f in ([top] if top.is_file() else top.rglob("*")))
    return {str(f): f.stat().st_size for f in files if f.is_file()}


def _download(uri: str, stream: IO[bytes]) -> None:
    """Write the object into ``stream`` (seekable, empty) and verify its checksums."""
    blob = _existing_blob(uri)  # pins the generation: content and checksums match
    with _gcs_errors(uri):
        blob.download_to_file(stream, checksum="auto", **_call_options(transfer=True))
    stream.seek(0)
    bad = _mismatches(blob, _digest_stream(stream))
    if bad:
        raise UserError(f"the download of {uri} was corrupted ({', '.join(bad)} mismatch); run again")
