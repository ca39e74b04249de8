"""Uploads to Cloud Storage under faults: dropped and reset connections, lost answers, 429/5xx,
answers slower than the client's timeout, resets in the middle of an upload body. Each upload
ends as a complete object whose bytes equal the source, or as a one-line UserError with nothing
under the object's name; attempts and wall time stay bounded. Plus content-addressed uploads:
the same bytes are uploaded once and an existing object is never replaced.

The faults come from the ``gcs_faults`` proxy (tests/gcs_proxy.py) in front of the emulator.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from tuning_magics import storage
from tuning_magics.errors import UserError

CHUNK = 256 * 1024  # the smallest chunk Cloud Storage allows
SMALL = 10_000  # one multipart request
LARGE = 2 * CHUNK + 12_345  # resumable: three chunks
TIMEOUT = 0.5  # the client's read timeout in these tests
RETRY = 2.0  # the retry budget per request in these tests


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunks, short timeouts and a short retry budget, so faults cost fractions of a second."""
    monkeypatch.setattr(storage, "CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(storage, "CONNECT_TIMEOUT", 1.0)
    monkeypatch.setattr(storage, "READ_TIMEOUT", TIMEOUT)
    monkeypatch.setattr(storage, "TRANSFER_TIMEOUT", TIMEOUT)
    monkeypatch.setattr(storage, "RETRY_SECONDS", RETRY)


@pytest.fixture
def direct(gcs_emulator_server):
    """The emulator's bucket, reached without the proxy: to look at what is really stored."""
    return gcs_emulator_server.client().bucket(gcs_emulator_server.bucket)


def _source(tmp_path: Path, size: int, name: str = "train.jsonl") -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


def _name(uri: str) -> str:
    return storage.split_gcs(uri)[1]


def _expected_uri(prefix: str, data: bytes, suffix: str = ".jsonl") -> str:
    return f"{prefix}/sha256-{hashlib.sha256(data).hexdigest()}{suffix}"


def _assert_stored(direct, uri: str, data: bytes) -> None:
    blob = direct.get_blob(_name(uri))
    assert blob is not None, f"{uri} is missing"
    assert blob.download_as_bytes() == data


def _assert_clean_failure(direct, err: UserError, uri: str) -> None:
    message = str(err)
    assert "\n" not in message and uri in message
    assert direct.get_blob(_name(uri)) is None, f"{uri} exists after a failed upload"


def _upload_kinds(size: int) -> tuple[str, ...]:
    return ("multipart",) if size <= CHUNK else ("initiate", "chunk")


# ---------------------------------------------------------------- one fault: the retry absorbs it

TRANSIENT = [
    pytest.param("drop", id="dropped-connection"),
    pytest.param("reset", id="connection-reset"),
    pytest.param("reset_mid_body", id="reset-mid-body"),
    pytest.param("lose_response", id="answer-lost"),
    pytest.param(503, id="503"),
    pytest.param(429, id="429"),
    pytest.param(500, id="500"),
    pytest.param("delay", id="slower-than-timeout"),
]
TARGETS = [  # (file size, which request the fault hits)
    pytest.param(SMALL, "multipart", 0, id="small"),
    pytest.param(LARGE, "initiate", 0, id="large-start"),
    pytest.param(LARGE, "chunk", 0, id="large-first-chunk"),
    pytest.param(LARGE, "chunk", 1, id="large-middle-chunk"),
    pytest.param(LARGE, "final", 0, id="large-last-chunk"),
]


@pytest.mark.parametrize(("size", "match", "skip"), TARGETS)
@pytest.mark.parametrize("fault", TRANSIENT)
def test_a_transient_fault_is_retried_and_the_object_is_complete(
    gcs_faults, direct, tmp_path: Path, fault, size: int, match: str, skip: int
) -> None:
    path, data = _source(tmp_path, size)
    prefix = gcs_faults.uri("").rstrip("/")
    gcs_faults.inject(fault, match=match, skip=skip, seconds=3 * TIMEOUT)
    started = time.monotonic()
    uri = storage.upload_content_addressed(path, prefix)
    elapsed = time.monotonic() - started
    assert uri == _expected_uri(prefix, data)
    assert [s.fault for s in gcs_faults.faults] == [fault]  # the fault did happen, once
    _assert_stored(direct, uri, data)
    kinds = {s.kind for s in gcs_faults.requests("upload")}
    assert kinds <= set(_upload_kinds(size)), kinds  # small files: one request; large: resumable
    # One fault costs at most two requests more: the resumable protocol asks how far the server got, then resends.
    chunks = -(-size // CHUNK)
    assert gcs_faults.count("upload") <= (1 if size <= CHUNK else 1 + chunks) + 2
    assert elapsed < 3 * TIMEOUT + 2.0


# ---------------------------------------------------------------- a fault that persists: a clean, bounded failure

PERSISTENT = [
    pytest.param("drop", id="dropped-connection"),
    pytest.param("reset_mid_body", id="reset-mid-body"),
    pytest.param(503, id="503"),
    pytest.param("delay", id="slower-than-timeout"),
]


@pytest.mark.parametrize(("size", "match", "skip"), [
    pytest.param(SMALL, "multipart", 0, id="small"),
    pytest.param(LARGE, "chunk", 1, id="large-after-first-chunk"),
    pytest.param(LARGE, "final", 0, id="large-last-chunk"),
])
@pytest.mark.parametrize("fault", PERSISTENT)
def test_a_persistent_fault_fails_in_one_line_within_the_retry_budget(
    gcs_faults, direct, tmp_path: Path, fault, size: int, match: str, skip: int
) -> None:
    path, data = _source(tmp_path, size)
    prefix = gcs_faults.uri("").rstrip("/")
    uri = _expected_uri(prefix, data)
    gcs_faults.inject(fault, match=match, skip=skip, times=1000, seconds=30.0)
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        storage.upload_content_addressed(path, prefix)
    elapsed = time.monotonic() - started
    _assert_clean_failure(direct, info.value, uri)
    assert "run again" in str(info.value) or "cannot reach" in str(info.value)
    attempts = len(gcs_faults.faults)
    assert 2 <= attempts <= 12, attempts  # retried, and not without end
    # The budget is per request: the last attempt may start just before it runs out.
    assert elapsed < RETRY + 2 * TIMEOUT + 1.5, elapsed


def test_a_server_that_always_answers_503_fails_at_the_first_request(gcs_faults, tmp_path: Path) -> None:
    path, _ = _source(tmp_path, SMALL)
    gcs_faults.inject(503, times=1000)
    started = time.monotonic()
    with pytest.raises(UserError, match="Cloud Storage emulator at .*503|Service Unavailable|cannot reach"):
        storage.upload_content_addressed(path, gcs_faults.uri("").rstrip("/"))
    assert time.monotonic() - started < RETRY + 2 * TIMEOUT + 1.5
    assert gcs_faults.count("upload") == 0  # it never got as far as uploading


# ---------------------------------------------------------------- answers lost after the server acted


@pytest.mark.parametrize("size", [pytest.param(SMALL, id="small"), pytest.param(LARGE, id="large")])
def test_an_upload_whose_answer_was_lost_is_done_not_a_conflict(gcs_faults, direct, tmp_path: Path, size) -> None:
    """The server stored the object but the answer never came; the retry meets ifGenerationMatch=0
    (412) or a finished upload session (404): the stored object is ours, checked by checksum."""
    path, data = _source(tmp_path, size)
    prefix = gcs_faults.uri("").rstrip("/")
    gcs_faults.inject("lose_response", match="final")
    uri = storage.upload_content_addressed(path, prefix)
    _assert_stored(direct, uri, data)
    assert [s.status for s in gcs_faults.requests("final")][-1] in (404, 412)  # what the retry met


def test_upload_file_whose_answer_was_lost_is_not_reported_as_existing(gcs_faults, direct, tmp_path: Path) -> None:
    path, data = _source(tmp_path, LARGE)
    uri = gcs_faults.uri("train.jsonl")
    gcs_faults.inject("lose_response", match="final")
    storage.upload_file(path, uri)
    _assert_stored(direct, uri, data)


# ---------------------------------------------------------------- content addressing


def test_the_same_bytes_are_uploaded_once(gcs_faults, direct, tmp_path: Path) -> None:
    path, data = _source(tmp_path, SMALL)
    copy = tmp_path / "copy-with-another-name.jsonl"
    copy.write_bytes(data)
    prefix = gcs_faults.uri("").rstrip("/")
    first = storage.upload_content_addressed(path, prefix)
    assert gcs_faults.count("upload") == 1
    generation = direct.get_blob(_name(first)).generation
    assert storage.upload_content_addressed(path, prefix) == first
    assert storage.upload_content_addressed(copy, prefix + "/") == first  # name and trailing slash do not matter
    assert gcs_faults.count("upload") == 1  # no second upload
    assert direct.get_blob(_name(first)).generation == generation


def test_different_bytes_get_different_names(gcs_faults, direct, tmp_path: Path) -> None:
    prefix = gcs_faults.uri("").rstrip("/")
    a, data_a = _source(tmp_path, SMALL, "a.jsonl")
    b = tmp_path / "b.jsonl"
    b.write_bytes(data_a[:-1] + bytes([data_a[-1] ^ 1]))  # one bit differs
    uri_a, uri_b = storage.upload_content_addressed(a, prefix), storage.upload_content_addressed(b, prefix)
    assert uri_a != uri_b
    assert uri_a == _expected_uri(prefix, data_a) and uri_b == _expected_uri(prefix, b.read_bytes())
    _assert_stored(direct, uri_a, data_a)
    _assert_stored(direct, uri_b, b.read_bytes())
    assert gcs_faults.count("upload") == 2


def test_suffix_and_content_type(gcs_faults, direct, tmp_path: Path) -> None:
    image, data = _source(tmp_path, SMALL, "Cat.PNG")
    prefix = gcs_faults.uri("").rstrip("/")
    uri = storage.upload_content_addressed(image, prefix)
    assert uri == _expected_uri(prefix, data, ".png")
    assert direct.get_blob(_name(uri)).content_type == "image/png"
    assert storage.upload_content_addressed(image, prefix, suffix="") == _expected_uri(prefix, data, "")


def test_an_existing_object_with_other_content_is_never_replaced(gcs_faults, direct, tmp_path: Path) -> None:
    path, data = _source(tmp_path, SMALL)
    prefix = gcs_faults.uri("").rstrip("/")
    uri = _expected_uri(prefix, data)
    direct.blob(_name(uri)).upload_from_string(b"something else")
    generation = direct.get_blob(_name(uri)).generation
    with pytest.raises(UserError) as info:
        storage.upload_content_addressed(path, prefix)
    message = str(info.value)
    assert message.startswith(f"{uri} already exists with other content") and "delete it" in message
    assert "\n" not in message
    assert gcs_faults.count("upload") == 0
    blob = direct.get_blob(_name(uri))
    assert blob.generation == generation and blob.download_as_bytes() == b"something else"


@pytest.mark.parametrize("size", [pytest.param(SMALL, id="small"), pytest.param(LARGE, id="large")])
@pytest.mark.parametrize("theirs_same", [True, False], ids=["same-bytes", "other-bytes"])
def test_a_writer_that_gets_there_first_is_never_overwritten(
    gcs_faults, direct, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, theirs_same: bool
) -> None:
    """Another writer creates the object between the existence check and the upload."""
    path, data = _source(tmp_path, size)
    prefix = gcs_faults.uri("").rstrip("/")
    uri = _expected_uri(prefix, data)
    theirs = data if theirs_same else b"another writer's bytes"
    upload = storage._upload

    def racing(*args, **kwargs):
        direct.blob(_name(uri)).upload_from_string(theirs)
        return upload(*args, **kwargs)

    monkeypatch.setattr(storage, "_upload", racing)
    generation = None
    if theirs_same:
        assert storage.upload_content_addressed(path, prefix) == uri
    else:
        with pytest.raises(UserError, match="already exists with other content"):
            storage.upload_content_addressed(path, prefix)
    assert 412 in [s.status for s in gcs_faults.requests("upload")]  # the precondition refused our write
    blob = direct.get_blob(_name(uri))
    generation = blob.generation
    assert blob.download_as_bytes() == theirs
    assert direct.get_blob(_name(uri)).generation == generation


def test_a_missing_bucket_is_one_line(gcs_faults, tmp_path: Path) -> None:
    path, _ = _source(tmp_path, SMALL)
    with pytest.raises(UserError, match=r"^bucket 'no-such-bucket' not found \(writing gs://no-such-bucket/"):
        storage.upload_content_addressed(path, "gs://no-such-bucket/staging")


def test_a_local_folder_works_the_same_way(tmp_path: Path) -> None:
    path, data = _source(tmp_path, SMALL)
    out = tmp_path / "staging"
    first = storage.upload_content_addressed(path, out)
    assert first == str(out / f"sha256-{hashlib.sha256(data).hexdigest()}.jsonl")
    assert Path(first).read_bytes() == data
    mtime = Path(first).stat().st_mtime_ns
    assert storage.upload_content_addressed(path, out) == first and Path(first).stat().st_mtime_ns == mtime
    Path(first).write_bytes(b"tampered")
    with pytest.raises(UserError, match="already exists with other content"):
        storage.upload_content_addressed(path, out)
    assert Path(first).read_bytes() == b"tampered"
