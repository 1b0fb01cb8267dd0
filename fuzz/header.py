"""Fuzz the safetensors header parser and the tensor reader behind it.

Any input may only ever produce a valid file or a ``FormatError``; every other exception is a bug
and atheris reports it with the input that caused it (turn each into a regression test in
tests/test_format_adversarial.py).

    python -m fuzz.header [atheris/libFuzzer flags, e.g. -max_total_time=600 corpus_dir]
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

import atheris
import torch  # imported before instrumentation: only modelkeep's own code is instrumented

with atheris.instrument_imports(include=["modelkeep"]):
    from modelkeep import errors, format
    from modelkeep.io import tensors as tensor_io

SCRATCH = os.path.join(tempfile.gettempdir(), f"modelkeep-fuzz-{os.getpid()}.safetensors")


def seeds() -> list[bytes]:
    """Small valid files, so mutation starts from deep inside the format."""
    tensors = [
        format.PlannedTensor("a", "F32", (2, 3)),
        format.PlannedTensor("b", "BF16", (0,)),
        format.PlannedTensor("c", "I64", ()),
    ]
    header = format.encode_header(tensors, {"modelkeep.kind": '"weights"'})
    return [header + bytes(range(256))[: sum(t.nbytes for t in tensors)]]


def test_one_input(data: bytes) -> None:
    try:
        header = format.read_header(io.BytesIO(data), path="<fuzz>", file_size=len(data))
        if header.data_bytes > 1 << 20:
            return
        with open(SCRATCH, "wb") as stream:
            stream.write(data)
        tensors = tensor_io.read_tensors(SCRATCH, list(header.entries.values()), threads=1)
        for entry in header.entries.values():
            if tuple(tensors[entry.name].shape) != entry.shape:
                raise RuntimeError(f"shape lost for {entry.name}")
        header.aliases
    except errors.FormatError:
        pass


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
        if os.path.exists(SCRATCH):
            os.unlink(SCRATCH)


if __name__ == "__main__":
    main(sys.argv)
