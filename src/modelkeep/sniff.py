"""What kind of file is this? One answer from the first bytes, for every reader, on any storage.

A safetensors header length is arbitrary bytes (384 starts with 0x80, like a pickle), so a
plausible length followed by the JSON object's ``{`` is tested before the pickle opcodes. Anything
unrecognised is called ``safetensors``, so that the strict header reader says precisely what is
wrong with it. Kept free of heavy imports: ``import modelkeep`` must stay light.
"""

from __future__ import annotations

import os

from modelkeep import errors, format
from modelkeep.storage import LOCAL, Storage

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
PICKLE_STARTS = frozenset(b"(}])cNILSVFXKJMUTGl")  # first opcodes of protocol 0/1 pickles
HEAD_BYTES = 512
KINDS = ("folder", "index", "safetensors", "zip", "tar", "pickle")


def kind_of_head(head: bytes) -> str | None:
    """``"zip"``, ``"tar"``, ``"safetensors"``, ``"pickle"`` or None for the first bytes of a file."""
    if head[:4] in ZIP_MAGICS:
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= format.MAX_HEADER_BYTES:
        return "safetensors"
    if (head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5) or (head[:1] and head[0] in PICKLE_STARTS):
        return "pickle"
    return None


_LOOKS = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "gzip-compressed data (decompress it first)"),
    (b"\x7fELF", "an executable program"),
    (b"7z\xbc\xaf", "a 7-Zip archive"),
)


def looks_like(head: bytes) -> str | None:
    """What a file that is not a model file seems to be, from its first bytes, for messages:
    ``"a JPEG image"``, ``"an HTML page ..."``, ``"text"``, ...; None when it says nothing."""
    for magic, what in _LOOKS:
        if head.startswith(magic):
            return what
    start = head.lstrip()[:64].lower()
    if start.startswith((b"<!doctype html", b"<html", b"<?xml", b"<")):
        return "an HTML or XML page (a download that returned a web page instead of the file?)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:  # a multi-byte character cut at the end of the head
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return None
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        if text.lstrip().startswith(("git-lfs", "version https://git-lfs")):
            return "a Git LFS pointer (run git lfs pull to fetch the real file)"
        return "text"
    return None


def not_a_model_file(path: str, what: str) -> errors.FormatError:
    """The error for a file that looks like ``what`` (see :func:`looks_like`)."""
    return errors.FormatError(
        f"is not a model file: it looks like {what}",
        path=path,
        fix="name a .safetensors, .pt/.pth/.bin file or a model folder; re-download it if it should be one",
    )


def read_head(path: str, store: Storage = LOCAL) -> bytes:
    """The first :data:`HEAD_BYTES` of ``path`` (fewer when it is shorter)."""
    return store.read_head(path, HEAD_BYTES)


def sniff(path: str | os.PathLike[str], store: Storage = LOCAL) -> str:
    """The kind of ``path``: one of :data:`KINDS`.

    Args:
        path: a file or folder in ``store``.
        store: the storage holding it (local files by default).

    Returns:
        ``"folder"``, ``"index"`` (a ``*.index.json`` of shards), ``"safetensors"``, ``"zip"``,
        ``"tar"`` or ``"pickle"``.

    Raises:
        StorageError: ``path`` does not exist or cannot be read.
        FormatError: the file is plainly something else (an image, a web page, text).
    """
    path = os.fspath(path)
    if store.isdir(path):
        return "folder"
    if path.endswith(".index.json"):
        return "index"
    head = read_head(path, store)
    kind = kind_of_head(head)
    if kind is None:
        what = looks_like(head)
        if what is not None:
            raise not_a_model_file(path, what)
    return kind or "safetensors"
