"""What kind of file is this? One answer from the first bytes, for every reader, on any storage.

A safetensors header length is arbitrary bytes (384 starts with 0x80, like a pickle), so a
plausible length followed by the JSON object's ``{`` is tested before the pickle opcodes. Anything
unrecognised is called ``safetensors``, so that the strict header reader says precisely what is
wrong with it. Kept free of heavy imports: ``import modelkeep`` must stay light.
"""

from __future__ import annotations

import os

from modelkeep import format
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
    """
    path = os.fspath(path)
    if store.isdir(path):
        return "folder"
    if path.endswith(".index.json"):
        return "index"
    return kind_of_head(read_head(path, store)) or "safetensors"
