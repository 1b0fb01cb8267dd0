"""The digest record and file digests: the one owner of how modelkeep hashes bytes.

Every tensor's bytes are hashed with XXH3-128 (30 GB/s on one core; blake3 measured 4.0 GB/s,
CRC32 3.4) while they stream out, and the digests are kept in the header's ``modelkeep.hashes``
metadata value, ``{"algorithm": "xxh3-128", "tensors": {name: 32 hex digits}}``. Writers encode
that record here and readers (loading, checkpoints, ``inspect``, ``verify``) parse and validate it
here, so a malformed record or an unknown algorithm is the same typed error everywhere.

A whole file's sha256 (torch.hub's file-name convention for downloaded checkpoints) lives here
too. Both use libraries (xxhash, hashlib); nothing is hand-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import xxhash

from modelkeep import errors, format

HASH_ALGORITHM = "xxh3-128"
HASH_HEX_LENGTH = 32
EMPTY_DIGEST = xxhash.xxh3_128_hexdigest(b"")
SHA256_CHUNK_BYTES = 8 * 1024 * 1024  # bytes per read while computing a file's sha256


def new_hasher() -> "xxhash.xxh3_128":
    """A fresh incremental hasher of the record's algorithm (``update`` then ``hexdigest``)."""
    return xxhash.xxh3_128()


# The record's digest (hex) of a bytes-like object, hashed in one call without a copy. The
# library function itself, not a wrapper: the writer calls it once per small tensor.
digest = xxhash.xxh3_128_hexdigest


@dataclasses.dataclass(frozen=True)
class HashRecord:
    """A parsed ``modelkeep.hashes`` value: the algorithm's name and each tensor's hex digest."""

    algorithm: str
    tensors: Mapping[str, str]

    @property
    def known(self) -> bool:
        """Whether this modelkeep can recompute these digests."""
        return self.algorithm == HASH_ALGORITHM


def encode_record(digests: Mapping[str, str]) -> str:
    """The metadata string recording ``digests`` (tensor name -> hex digest).

    Args:
        digests: every hashed tensor's digest, in header order.

    Returns:
        The JSON text stored under ``format.KEY_HASHES``.
    """
    return format.dumps({"algorithm": HASH_ALGORITHM, "tensors": dict(digests)})


def placeholder_record(names: Any) -> str:
    """A record of same-length placeholder digests, to be filled in once the bytes are hashed."""
    placeholder = "0" * HASH_HEX_LENGTH
    return encode_record({name: placeholder for name in names})


def read_record(header: format.Header, *, require_known: bool = True) -> HashRecord | None:
    """The header's digest record, validated; None when the file records no digests.

    Args:
        header: a parsed safetensors header.
        require_known: also refuse an algorithm this modelkeep cannot compute (``inspect`` only
            reports it, so it passes False).

    Returns:
        The record, or None when the header has no ``modelkeep.hashes`` value.

    Raises:
        FormatError: the value is not ``{algorithm: str, tensors: {name: str}}``, or (with
            ``require_known``) its algorithm is not ``HASH_ALGORITHM``.
    """
    record = header.modelkeep_value(format.KEY_HASHES)
    if record is None:
        return None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("algorithm"), str)
        or not isinstance(record.get("tensors"), dict)
        or not all(isinstance(v, str) for v in record["tensors"].values())
    ):
        raise errors.FormatError(
            "hash record must be {algorithm: str, tensors: {name: hex}}",
            path=header.path,
            item=format.KEY_HASHES,
            fix="re-save the file with modelkeep",
        )
    parsed = HashRecord(record["algorithm"], record["tensors"])
    if require_known and not parsed.known:
        raise errors.FormatError(
            f"unknown hash algorithm {parsed.algorithm!r}",
            path=header.path,
            item=format.KEY_HASHES,
            fix=f"this modelkeep verifies {HASH_ALGORITHM}; upgrade modelkeep",
        )
    return parsed


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = SHA256_CHUNK_BYTES) -> str:
    """The sha256 (hex) of a whole file, read in bounded chunks.

    Args:
        path: the file.
        chunk_bytes: bytes per read.

    Returns:
        64 lowercase hex digits.

    Raises:
        OSError: the file cannot be read (callers map it to their own error).
    """
    hasher = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            hasher.update(chunk)
    return hasher.hexdigest()


def fill_digests(
    header: bytes, planned: list[format.PlannedTensor], metadata: dict[str, str], digests: dict[str, str]
) -> bytes:
    """The header with its placeholder digests filled in.

    The placeholders form one JSON string value, so it is spliced in place (encoding a
    20,000-tensor header again costs tens of milliseconds); should that value's encoding
    appear more than once, the header is encoded again instead.
    """
    placeholder = json.dumps(metadata[format.KEY_HASHES], ensure_ascii=False).encode("utf-8")
    metadata[format.KEY_HASHES] = encode_record(digests)
    filled = json.dumps(metadata[format.KEY_HASHES], ensure_ascii=False).encode("utf-8")
    if len(filled) == len(placeholder) and header.count(placeholder) == 1:
        return header.replace(placeholder, filled)
    return format.encode_header(planned, metadata)
