"""Fuzz the restricted pickle reader and the torch.save containers around it.

Each input is tried three ways: as a bare pickle stream, wrapped as the ``data.pkl`` of a torch
zip archive, and through the state-dict finder. Only a value or a ``FormatError`` (which includes
``UnsafeContentError``) may come out; anything else, a hang or a memory blow-up is a bug.

    python -m fuzz.pickle_reader [atheris/libFuzzer flags, e.g. -max_total_time=600 corpus_dir]
"""

from __future__ import annotations

import io
import os
import pickle  # seeds only: the harness writes pickles, the reader under test never unpickles
import sys
import tempfile
import zipfile
from collections import OrderedDict

import atheris
import torch  # imported before instrumentation: only modelkeep's own code is instrumented

with atheris.instrument_imports(include=["modelkeep"]):
    from modelkeep import errors, legacy
    from modelkeep.options import ReadOptions

SCRATCH = os.path.join(tempfile.gettempdir(), f"modelkeep-fuzz-pickle-{os.getpid()}")


def seeds() -> list[bytes]:
    """torch.save outputs and plain pickles of the structures users save, in several protocols."""
    found = []
    state = OrderedDict(w=torch.arange(6, dtype=torch.float32).reshape(2, 3), b=torch.zeros(2))
    checkpoint = {"epoch": 3, "loss": 0.25, "model": state, "names": ["a", "b"], "t": (1, 2.0)}
    for protocol in (0, 2, 4, 5):
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer, pickle_protocol=protocol, _use_new_zipfile_serialization=False)
        found.append(buffer.getvalue())
        found.append(pickle.dumps({"a": [1, 2.5, "x", b"y", None, True], "b": {1, 2}}, protocol=protocol))
    zipped = io.BytesIO()
    torch.save(state, zipped)
    with zipfile.ZipFile(io.BytesIO(zipped.getvalue())) as archive:
        found.append(archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl"))))
    return found


def _as_zip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/data/0", b"\0" * 64)
    return buffer.getvalue()


def _try(data: bytes, suffix: str, reader) -> None:
    path = SCRATCH + suffix
    with open(path, "wb") as stream:
        stream.write(data)
    try:
        reader(path)
    except errors.FormatError:
        pass


def test_one_input(data: bytes) -> None:
    _try(data, ".pt", lambda p: legacy.read(p, options=ReadOptions(on_unknown="placeholder")))
    _try(_as_zip(data), ".zip.pt", lambda p: legacy.read(p))
    _try(_as_zip(data), ".zip.pt", legacy.read_state_dict)


def main(argv: list[str]) -> None:
    corpus = [arg for arg in argv[1:] if not arg.startswith("-")]
    for folder in corpus:
        os.makedirs(folder, exist_ok=True)
        for index, seed in enumerate(seeds()):
            with open(os.path.join(folder, f"seed-{index}"), "wb") as stream:
                stream.write(seed)
    torch.set_num_threads(1)
    atheris.Setup(argv, test_one_input)
    try:
        atheris.Fuzz()
    finally:
        for suffix in (".pt", ".zip.pt"):
            if os.path.exists(SCRATCH + suffix):
                os.unlink(SCRATCH + suffix)


if __name__ == "__main__":
    main(sys.argv)
