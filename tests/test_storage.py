"""tuning_magics.storage: local atomic writes, and gs:// through the real
google-cloud-storage client against a gcp-storage-emulator started by the tests."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import tempfile
from pathlib import Path

import pytest

from tuning_magics import storage
from tuning_magics.errors import UserError

EXISTS_TAIL = "already exists; pass overwrite=True (--overwrite) or choose another path"
EXISTS_RE = re.escape(EXISTS_TAIL)


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Route tempfile's spool files into a folder the test can inspect."""
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    return spool


def _ls(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- URIs


def test_is_gcs_and_split() -> None:
    assert storage.is_gcs("gs://b-1/a/b.jsonl")
    assert not storage.is_gcs("data/gs://x") and not storage.is_gcs(Path("gs://x"))
    assert storage.split_gcs("gs://my-bucket/a/b c.jsonl") == ("my-bucket", "a/b c.jsonl")


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("gs://", "the bucket name is missing"),
        ("gs:///x.jsonl", "the bucket name is missing"),
        ("gs://bucket", "the object name is missing"),
        ("gs://bucket/", "the object name is missing"),
        ("gs://bucket/folder/", "the object name is missing"),
        ("gs://My_Bucket/x", "'My_Bucket' is not a valid bucket name"),
    ],
)
def test_malformed_uri_message(uri: str, problem: str) -> None:
    with pytest.raises(UserError) as info:
        storage.split_gcs(uri)
    message = str(info.value)
    assert message.startswith(f"{uri!r} is not a valid Cloud Storage URI: {problem}")
    assert message.endswith("write it as gs://BUCKET/PATH/FILE") and "\n" not in message


def test_malformed_uri_rejected_before_any_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    with pytest.raises(UserError, match="bucket name is missing"):
        storage.atomic_writer("gs:///x.jsonl").__enter__()


# ---------------------------------------------------------------- local writes


def test_local_atomic_write_creates_parents(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out.jsonl"
    with storage.atomic_writer(out) as f:
        f.write(b'{"x": 1}\n')
        assert not out.exists()  # nothing visible until the block ends
    assert out.read_bytes() == b'{"x": 1}\n'
    assert _ls(out.parent) == ["out.jsonl"]
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_local_refuses_existing_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("out.jsonl").write_bytes(b"precious")
    with pytest.raises(UserError) as info, storage.atomic_writer("out.jsonl"):
        pytest.fail("the block must not run")
    assert str(info.value) == f"out.jsonl {EXISTS_TAIL}"
    assert Path("out.jsonl").read_bytes() == b"precious"
    assert _ls(tmp_path) == ["out.jsonl", "spool"]


def test_local_final_move_does_not_clobber_a_file_created_meanwhile(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(UserError, match=EXISTS_RE), storage.atomic_writer(out) as f:
        f.write(b"mine")
        out.write_bytes(b"someone else's")
    assert out.read_bytes() == b"someone else's"
    assert _ls(tmp_path) == ["out.jsonl", "spool"]


def test_local_exception_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError), storage.atomic_writer(out) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert _ls(tmp_path) == ["spool"]


def test_local_exception_keeps_the_old_file_even_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), storage.atomic_writer(out, overwrite=True) as f:
        f.write(b"half")
        raise KeyboardInterrupt
    assert out.read_bytes() == b"old"
    assert _ls(tmp_path) == ["out.jsonl", "spool"]


def test_local_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"old")
    with storage.atomic_writer(out, overwrite=True) as f:
        f.write(b"new")
        f.close()  # closing inside the block is allowed
    assert out.read_bytes() == b"new"
    assert _ls(tmp_path) == ["out.jsonl", "spool"]


def test_local_folder_as_destination(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is a folder; give a file path"):
        storage.atomic_writer(tmp_path, overwrite=True).__enter__()


# ---------------------------------------------------------------- local reads


def test_local_readers(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for name in ("d/a.jsonl", "d/b.jsonl", "d/sub/c.jsonl", "d2/x.jsonl"):
        storage.upload_file(_make(tmp_path / "src", name.encode()), tmp_path / name)
    a = tmp_path / "d" / "a.jsonl"
    assert storage.exists(a) and not storage.exists(tmp_path / "nope")
    assert storage.read_bytes(a) == b"d/a.jsonl" and storage.size(a) == 9
    with storage.open_read(str(a)) as f:
        assert f.read() == b"d/a.jsonl"
    with storage.local_copy(a) as path:
        assert path == a
    names = [os.path.relpath(p, tmp_path) for p in storage.list_uris(tmp_path / "d")]
    assert names == ["d/a.jsonl", "d/b.jsonl", "d/sub/c.jsonl"]
    assert len(storage.list_uris(str(tmp_path / "d"))) == 3
    assert len(storage.list_uris(tmp_path / "d2")) == 1 and len(storage.list_uris(str(tmp_path / "d/a"))) == 1
    assert storage.download_file(a, tmp_path / "copy.jsonl").read_bytes() == b"d/a.jsonl"


def _make(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("call", [storage.read_bytes, storage.size, storage.open_read])
def test_local_missing_file_message(call, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^missing\.jsonl not found; check the path$"):
        call("missing.jsonl")


# ---------------------------------------------------------------- gs:// against the emulator


@pytest.fixture
def gcs_requests(gcs_emulator):
    """(method, url, status) of every HTTP request the module's client makes during the test."""
    seen: list[tuple[str, str, int]] = []
    hooks = storage.gcs_client()._http.hooks["response"]

    def record(response, *args, **kwargs):
        seen.append((response.request.method, response.request.url, response.status_code))

    hooks.append(record)
    yield seen
    hooks.remove(record)


def _uploads(seen: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [r for r in seen if "/upload/storage/v1/" in r[1]]


def test_gcs_write_and_read_back_multi_chunk(gcs_emulator, gcs_requests, private_tempdir: Path) -> None:
    data = os.urandom(2 * storage.CHUNK_SIZE + 12345)
    uri = gcs_emulator.uri("big.jsonl")
    with storage.atomic_writer(uri) as f:
        for start in range(0, len(data), 1 << 20):
            f.write(data[start : start + (1 << 20)])
        assert not storage.exists(uri)
    uploads = _uploads(gcs_requests)
    assert "uploadType=resumable" in uploads[0][1] and "ifGenerationMatch=0" in uploads[0][1]
    assert [status for _, _, status in uploads[1:]] == [308, 308, 200]  # three chunks

    blob = gcs_emulator.client().bucket(gcs_emulator.bucket).get_blob(storage.split_gcs(uri)[1])
    assert blob.content_type == "application/jsonl"
    assert blob.md5_hash == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert storage.read_bytes(uri) == data and storage.size(uri) == len(data)
    with storage.open_read(uri) as f:
        assert f.read() == data
    with storage.local_copy(uri) as path:
        assert path.name == "big.jsonl" and path.read_bytes() == data
    assert not path.exists()
    assert _ls(private_tempdir) == []  # spool and downloads cleaned up


def test_gcs_small_file_is_also_resumable(gcs_emulator, gcs_requests) -> None:
    uri = gcs_emulator.uri()
    with storage.atomic_writer(uri) as f:
        f.write(b'{"a": 1}\n')
    assert "uploadType=resumable" in _uploads(gcs_requests)[0][1]
    assert storage.read_bytes(uri) == b'{"a": 1}\n'


def test_gcs_refuses_existing_object_up_front(gcs_emulator, gcs_requests) -> None:
    uri = gcs_emulator.uri("out.jsonl")
    with storage.atomic_writer(uri) as f:
        f.write(b"original")
    gcs_requests.clear()
    with pytest.raises(UserError) as info, storage.atomic_writer(uri):
        pytest.fail("the block must not run")
    assert str(info.value) == f"{uri} {EXISTS_TAIL}"
    assert _uploads(gcs_requests) == []
    assert storage.read_bytes(uri) == b"original"


def test_gcs_overwrite_is_conditional_on_the_generation_seen(gcs_emulator, gcs_requests) -> None:
    uri = gcs_emulator.uri()
    with storage.atomic_writer(uri) as f:
        f.write(b"v1")
    generation = gcs_emulator.client().bucket(gcs_emulator.bucket).get_blob(storage.split_gcs(uri)[1]).generation
    with storage.atomic_writer(uri, overwrite=True) as f:
        f.write(b"v2")
    assert f"ifGenerationMatch={generation}" in _uploads(gcs_requests)[-2][1]
    assert storage.read_bytes(uri) == b"v2"


def test_gcs_exception_in_block_uploads_nothing(gcs_emulator, gcs_requests, private_tempdir: Path) -> None:
    uri = gcs_emulator.uri()
    with pytest.raises(RuntimeError), storage.atomic_writer(uri) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert not storage.exists(uri) and _uploads(gcs_requests) == []
    assert _ls(private_tempdir) == []


def test_gcs_upload_and_download_file(gcs_emulator, tmp_path: Path) -> None:
    src = _make(tmp_path / "train.jsonl", b'{"q": "a"}\n' * 1000)
    uri = gcs_emulator.uri("train.jsonl")
    storage.upload_file(src, uri)
    with pytest.raises(UserError, match=EXISTS_RE):
        storage.upload_file(src, uri)
    assert storage.list_uris(uri.rsplit("/", 1)[0] + "/") == [uri]
    out = storage.download_file(uri, tmp_path / "back" / "train.jsonl")
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(UserError, match=EXISTS_RE):
        storage.download_file(uri, out)


def test_gcs_list_uris(gcs_emulator, tmp_path: Path) -> None:
    base = gcs_emulator.uri("")  # gs://bucket/<unique>/
    source = _make(tmp_path / "f", b"x")
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl"):
        storage.upload_file(source, base + name)
    assert storage.list_uris(base) == [base + "a.jsonl", base + "b.jsonl", base + "sub/c.jsonl"]
    assert storage.list_uris(base + "s") == [base + "sub/c.jsonl"]
    assert storage.list_uris(base + "zzz") == []


def test_gcs_verification_compares_the_stored_checksums(gcs_emulator) -> None:
    """_verify_upload reads the object's crc32c/md5 back; on a mismatch it deletes and raises."""
    uri = gcs_emulator.uri()
    blob = gcs_emulator.client().bucket(gcs_emulator.bucket).blob(storage.split_gcs(uri)[1])
    blob.upload_from_string(b"stored bytes")
    good = storage._Digests(blob.crc32c, blob.md5_hash)
    storage._verify_upload(blob, good, uri)  # matching: no error, object kept
    assert storage.exists(uri)
    for wrong in (storage._Digests("AAAAAA==", good.md5), storage._Digests(good.crc32c, "AAAAAAAAAAAAAAAAAAAAAA==")):
        blob.upload_from_string(b"stored bytes")
        with pytest.raises(UserError, match=r"corrupted \((crc32c|md5) mismatch\) and was deleted; run again$"):
            storage._verify_upload(blob, wrong, uri)
        assert not storage.exists(uri)


def test_gcs_server_refuses_bytes_that_differ_from_the_local_checksum(
    gcs_emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The checksums computed locally travel with the upload and the server checks them."""
    lying = storage._Digests(storage._b64(b"\0\0\0\0"), storage._b64(hashlib.md5(b"other").digest()))
    monkeypatch.setattr(storage, "_digest_file", lambda path: lying)
    uri = gcs_emulator.uri()
    with pytest.raises(UserError) as info:
        storage.upload_file(_make(tmp_path / "f.jsonl", b"data"), uri)
    assert re.fullmatch(
        rf"Cloud Storage refused the request for {uri}: Provided CRC32C \"AAAAAA==\" doesn't match .*", str(info.value)
    )
    assert not storage.exists(uri)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("crc32c", "was corrupted in transit; run again"),  # caught by the client's own check
        ("md5_hash", r"was corrupted \(md5 mismatch\); run again"),  # caught by storage._download
    ],
)
def test_gcs_download_detects_checksum_mismatch(gcs_emulator, tmp_path: Path, field: str, message: str) -> None:
    """Content that does not match the object's stored checksum is refused, and no file is left.

    The emulator (unlike Cloud Storage) lets a PATCH change ``crc32c`` and
    ``md5Hash``, which is how the mismatch is produced here.
    """
    uri = gcs_emulator.uri()
    storage.upload_file(_make(tmp_path / "f.jsonl", b"data"), uri)
    blob = gcs_emulator.client().bucket(gcs_emulator.bucket).get_blob(storage.split_gcs(uri)[1])
    setattr(blob, field, base64.b64encode(b"\0" * (4 if field == "crc32c" else 16)).decode())
    blob.patch()
    for call in (storage.read_bytes, storage.open_read, lambda u: storage.download_file(u, tmp_path / "out.jsonl")):
        with pytest.raises(UserError, match=f"^the (transfer|download) of {uri} {message}$"):
            call(uri)
    assert _ls(tmp_path) == ["f.jsonl", "spool"]


@pytest.mark.parametrize("call", [storage.read_bytes, storage.size, storage.open_read])
def test_gcs_missing_object_message(call, gcs_emulator) -> None:
    uri = gcs_emulator.uri("nope.jsonl")
    with pytest.raises(UserError) as info:
        call(uri)
    assert str(info.value) == f"{uri} not found; check the bucket and object name"
    assert storage.exists(uri) is False


def test_gcs_missing_object_download_leaves_no_file(gcs_emulator, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        storage.download_file(gcs_emulator.uri(), tmp_path / "out.jsonl")
    assert _ls(tmp_path) == ["spool"]


def test_gcs_missing_bucket_on_write(gcs_emulator) -> None:
    missing = r"^bucket 'no-such-bucket' not found \(writing gs://no-such-bucket/x"
    with pytest.raises(UserError, match=missing), storage.atomic_writer("gs://no-such-bucket/x.jsonl") as f:
        f.write(b"x")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("NotFound", "gs://b/x.jsonl not found; check the bucket and object name"),
        ("PreconditionFailed", f"gs://b/x.jsonl {EXISTS_TAIL}"),
        ("Forbidden", "permission denied for gs://b/x.jsonl; ask for a Storage role"),
        ("Unauthorized", "no Google Cloud credentials found; run `gcloud auth application-default login`"),
        ("InternalServerError", "Cloud Storage refused the request for gs://b/x.jsonl: boom"),
    ],
)
def test_gcs_error_mapping(error: str, message: str) -> None:
    """What Cloud Storage answers that the emulator never does (412, 403, 401) maps to one line."""
    from google.api_core import exceptions as api

    uri = "gs://b/x.jsonl"
    with pytest.raises(UserError) as info, storage._gcs_errors(uri, conflict=f"{uri} {EXISTS_TAIL}"):
        raise getattr(api, error)("boom")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# ---------------------------------------------------------------- client


def test_gcs_client_uses_emulator_without_credentials(gcs_emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    from google.auth.credentials import AnonymousCredentials

    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    client = storage.gcs_client()
    assert isinstance(client._credentials, AnonymousCredentials) and client.project == "local"
    assert storage.gcs_client() is client and storage.gcs_client("p").project == "p"


def test_gcs_client_without_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    metadata = pytest.importorskip("google.auth.compute_engine._metadata")
    if not hasattr(metadata, "_NO_GCE_CHECK"):
        pytest.skip("google-auth changed how the metadata-server probe is disabled")
    # No key file, an empty gcloud config, no metadata-server probe, and a guard
    # that refuses any connection off this machine.
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setattr(metadata, "_NO_GCE_CHECK", True)
    real_connect = socket.socket.connect

    def loopback_only(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test refused a connection to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setattr(storage, "_CLIENTS", {})  # no client made before this test
    with pytest.raises(UserError) as info:
        storage.gcs_client()
    assert "gcloud auth application-default login" in str(info.value)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(info.value)


# ---------------------------------------------------------------- unreachable servers


def test_nothing_listening_fails_at_once_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError) as info:
        storage.read_bytes("gs://some-bucket/train.jsonl")
    message = str(info.value)
    assert f"cannot reach the Cloud Storage emulator at http://127.0.0.1:{port}" in message
    assert "connection was refused" in message and "unset STORAGE_EMULATOR_HOST" in message
    assert "\n" not in message


def test_a_server_that_never_answers_fails_after_the_bounded_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "READ_TIMEOUT", 0.5)
    monkeypatch.setattr(storage, "RETRY_SECONDS", 1.5)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(UserError) as info:
            storage.exists("gs://some-bucket/train.jsonl")
    assert "no answer in time" in str(info.value) and "\n" not in str(info.value)


def test_the_cli_says_why_and_exits_2_when_storage_is_unreachable(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from tuning_magics.cli import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    assert main(["validate", "gs://some-bucket/train.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuning-magics: error: cannot reach") and "\n" not in err


def test_cloud_storage_acts_as_the_same_identity_as_vertex_ai(monkeypatch):
    """Uploads use the credentials and project of the settings, as the tuning calls do, not just ADC."""
    pytest.importorskip("google.cloud.storage")
    from google.oauth2.credentials import Credentials

    import tuning_magics as tm

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    creds = Credentials(token="static")
    tm.settings.update(credentials=creds, project="settings-project")
    try:
        client = storage.gcs_client()
        assert client._credentials is creds and client.project == "settings-project"
        other = Credentials(token="other")
        tm.settings.update(credentials=other)
        assert storage.gcs_client()._credentials is other
    finally:
        tm.settings.update(credentials=None, project=None)
