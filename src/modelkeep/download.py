"""Downloading a checkpoint: resumable, bounded in time, hash-checked, never half-visible.

Bytes go to ``<destination>.partial``; a dropped connection is resumed with an HTTP Range request
(also by a later call), every connection has a timeout, and the finished file is checked against
the sha256 prefix its name carries before it is renamed into place. A wrong hash removes the
partial file and raises IntegrityError, so nothing damaged is ever kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Callable, Iterator

from modelkeep import errors, hashing

DEFAULT_TIMEOUT = 30.0  # seconds to connect, and seconds without a byte while reading
DEFAULT_RETRIES = 4
CHUNK_BYTES = 256 * 1024  # bytes a dropped connection can cost: a partly read chunk is lost
PARTIAL_SUFFIX = ".partial"


@dataclasses.dataclass(frozen=True)
class Downloaded:
    path: str
    sha256: str
    size: int


class _Incomplete(Exception):
    """The server closed the response before its announced length."""


@contextlib.contextmanager
def _progress_bar(enabled: bool, label: str) -> Iterator[Callable[[int | None, int], None]]:
    """``update(total, completed)``; a rich bar on an interactive stderr, silent otherwise."""
    from modelkeep import progress

    if not enabled:
        yield lambda total, completed: None
        return
    with progress.byte_bar(label, None) as shown:
        if shown is None:
            yield lambda total, completed: None
        else:
            bar, task = shown
            yield lambda total, completed: bar.update(task, total=total, completed=completed)


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/200"
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def _attempt(session: object, url: str, partial: str, timeout: float, update: Callable[[int | None, int], None]) -> None:
    """One request: resume ``partial`` from its size, or start it over when the server must."""
    import requests

    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"} if have else {"Accept-Encoding": "identity"}
    with session.get(url, headers=headers, stream=True, timeout=(timeout, timeout)) as response:  # type: ignore[attr-defined]
        if response.status_code == 416 and have:  # asked past the end: the partial file is stale
            os.unlink(partial)
            raise _Incomplete("range not satisfiable; starting over")
        if response.status_code == 206 and _content_range_start(response.headers.get("Content-Range")) == have:
            mode = "ab"
        elif response.status_code == 200:
            mode, have = "wb", 0
        else:
            try:
                response.raise_for_status()
            except requests.HTTPError as e:
                raise errors.StorageError(
                    f"download failed: HTTP {response.status_code} {response.reason}",
                    path=url,
                    fix="check the weights name, the network, or MODELKEEP_WEIGHTS_MIRROR",
                ) from e
            raise errors.StorageError(
                f"download failed: unexpected HTTP {response.status_code}", path=url, fix="try again"
            )
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        done = have
        update(total, done)
        with open(partial, mode) as stream:
            for chunk in response.iter_content(CHUNK_BYTES):
                stream.write(chunk)
                done += len(chunk)
                update(total, done)
            stream.flush()
            os.fsync(stream.fileno())
        if total is not None and done != total:
            raise _Incomplete(f"got {done} of {total} bytes")


def download(
    url: str,
    destination: str | os.PathLike[str],
    *,
    hash_prefix: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    backoff: float = 0.5,
    progress: bool = True,
) -> Downloaded:
    """Fetch ``url`` to ``destination``: resumed across dropped connections, hash-checked.

    ``timeout`` bounds connecting and every wait for bytes; after ``retries`` failed attempts
    (waiting ``backoff`` seconds, doubling) a StorageError says so and the partial file stays for
    a later call to resume. A sha256 that does not start with ``hash_prefix`` is an IntegrityError,
    and then neither the partial nor the destination file exists.
    """
    import requests

    destination = os.fspath(destination)
    partial = destination + PARTIAL_SUFFIX
    failures = 0
    label = os.path.basename(destination)
    with requests.Session() as session, _progress_bar(progress, label) as update:
        while True:
            try:
                _attempt(session, url, partial, timeout, update)
                break
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _Incomplete) as e:
                failures += 1
                if failures > retries:
                    kind = "timed out" if isinstance(e, requests.Timeout) else "kept failing"
                    raise errors.StorageError(
                        f"download {kind} after {failures} attempts ({type(e).__name__}: {e})",
                        path=url,
                        fix="check the network and try again (the download resumes where it stopped)",
                    ) from e
                time.sleep(backoff * 2 ** (failures - 1))
            except requests.RequestException as e:
                raise errors.StorageError(
                    f"download failed: {type(e).__name__}: {e}", path=url, fix="check the URL"
                ) from e
            except OSError as e:  # after the requests errors above, which are OSErrors too
                if isinstance(e, errors.ModelkeepError):
                    raise
                raise errors.storage_error(e, partial, "writing the download") from e
    with errors.map_os_errors(partial, "reading the download"):
        digest = hashing.file_sha256(partial)
    if hash_prefix and not digest.startswith(hash_prefix):
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise errors.IntegrityError(
            f"downloaded file's sha256 {digest[:16]}... does not start with {hash_prefix!r}",
            path=url,
            fix="the server sent other bytes (a proxy page, a changed file); nothing was kept, try "
            "again or check MODELKEEP_WEIGHTS_MIRROR",
        )
    with errors.map_os_errors(destination, "moving the download into place"):
        os.replace(partial, destination)
        size = os.path.getsize(destination)
    return Downloaded(destination, digest, size)
