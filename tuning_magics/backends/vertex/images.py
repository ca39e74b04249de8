"""Images in a dataset bound for Vertex AI: local and inline images become Cloud Storage objects.

The service reads images from Cloud Storage (or inline base64). Rows may name
image files on this machine (a path in ``image_url.url`` or ``file_data.file_uri``),
``dataset(df, images="path")`` reads local image files into the rows as
``data:`` URIs, and users write base64 images into JSONL by hand. Before
submission each such image is uploaded to the staging bucket under its
content's name (one object per distinct image, never replaced) and the row
refers to it by its ``gs://`` URI instead, in the record's own format:
``image_url.url`` for chat rows, ``file_data`` for GenerateContent rows. A
dataset of inline images would be large and upload every copy again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

import orjson

from ...datasets.formats import IMAGE_MIME_TYPES
from ...datasets.validate import is_local_image
from ...errors import UserError

_EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp"}


def stage_images(jsonl: Path, scratch: Path, prefix: str, name_of) -> dict[str, str]:
    """Rewrite ``jsonl`` in place so local and inline images refer to ``gs://`` objects under ``prefix``.

    ``name_of(local_file, prefix)`` gives an image file's content-addressed URI.
    Returns ``{local image file: gs:// URI}``, the files to upload (empty when
    the dataset has no such image; the file is then left untouched).
    """
    images: dict[str, str] = {}
    out_lines = []
    changed = False
    with open(jsonl, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                out_lines.append(raw)
                continue
            record = orjson.loads(raw)
            if _rewrite(record, lambda source: _staged(source, scratch, prefix, name_of, images, number)):
                changed = True
                out_lines.append(orjson.dumps(record) + b"\n")
            else:
                out_lines.append(raw if raw.endswith(b"\n") else raw + b"\n")
    if changed:
        from ... import storage

        with storage.atomic_writer(jsonl, overwrite=True) as fh:
            fh.writelines(out_lines)
    return images


def _staged(source, scratch: Path, prefix: str, name_of, images: dict, line: int) -> str:
    """The gs:// URI for an image: ``("file", path)`` as it is, ``("inline", mime, base64)`` written out once."""
    if source[0] == "file":
        path = str(Path(source[1]).expanduser().resolve())
        if path not in images:
            images[path] = name_of(path, prefix)
        return images[path]
    _, mime, data = source
    try:
        content = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"line {line}: an inline image is not valid base64; fix or remove it", line=line) from None
    # The same picture in many rows is written (and later uploaded) once.
    path = scratch / "images" / f"{hashlib.sha256(content).hexdigest()}{_EXTENSIONS.get(mime, '')}"
    if str(path) not in images:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        images[str(path)] = name_of(str(path), prefix)
    return images[str(path)]


def _rewrite(record, stage) -> bool:
    """Replace each local or inline image of ``record`` (any format) by ``stage(source) -> gs:// URI``."""
    changed = False
    for message in record.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            holder = part.get("image_url")
            url = holder.get("url") if isinstance(holder, dict) else holder
            source = _source(url)
            if source:
                uri = stage(source)
                if isinstance(holder, dict):
                    holder["url"] = uri
                else:
                    part["image_url"] = uri
                changed = True
    turns = list(record.get("contents") or [])
    system = record.get("systemInstruction") or record.get("system_instruction")
    if isinstance(system, dict):
        turns.append(system)
    for turn in turns:
        for part in (turn.get("parts") or []) if isinstance(turn, dict) else []:
            if not isinstance(part, dict):
                continue
            for inline_key, file_key, mime_key, uri_key in (("inline_data", "file_data", "mime_type", "file_uri"),
                                                            ("inlineData", "fileData", "mimeType", "fileUri")):
                blob = part.get(inline_key)
                if isinstance(blob, dict) and blob.get("data"):
                    mime = blob.get(mime_key) or blob.get("mime_type") or blob.get("mimeType") or "image/png"
                    uri = stage(("inline", mime, blob["data"]))
                    del part[inline_key]
                    part[file_key] = {mime_key: mime, uri_key: uri}
                    changed = True
                linked = part.get(file_key)
                if isinstance(linked, dict) and is_local_image(str(linked.get(uri_key) or "")):
                    linked[uri_key] = stage(("file", linked[uri_key]))
                    changed = True
    return changed


def _source(url):
    """What an image URL asks to stage: ``("inline", mime, base64)``, ``("file", path)``, or None (already remote)."""
    if not isinstance(url, str):
        return None
    if is_local_image(url):
        return ("file", url)
    inline = _data_uri(url)
    return ("inline", *inline) if inline else None


def _data_uri(url) -> tuple[str, str] | None:
    """(mime type, base64 data) of an image ``data:`` URI, else None."""
    if not isinstance(url, str) or not url.startswith("data:"):
        return None
    header, _, data = url.partition(",")
    mime = header[5:].split(";", 1)[0]
    if ";base64" not in header or mime not in IMAGE_MIME_TYPES:
        return None
    return mime, data
