"""Decoding the opcodes of numbers, strings and bytes, with every declared size checked against
the bytes that remain before anything is read or allocated."""

from __future__ import annotations

import codecs
import struct
from typing import Any


class ScalarOps:
    """Primitive readers and the scalar opcodes of ``vm.Machine`` (a mixin: it uses the
    machine's ``data``, ``pos``, ``stack``, ``limits``, ``error`` and ``_push``)."""

    data: Any
    pos: int
    stack: list[Any]
    limits: Any

    def error(self, what: str, fix: str | None = None) -> Exception:  # provided by the machine
        raise NotImplementedError

    def _push(self, value: Any) -> None:  # provided by the machine
        raise NotImplementedError

    # ---------------------------------------------------------------------------- primitives

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.error(f"an opcode needs {n} bytes but the pickle ends first")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return bytes(chunk)

    def _u8(self) -> int:
        return self._take(1)[0]

    def _u16(self) -> int:
        return int.from_bytes(self._take(2), "little")

    def _u32(self) -> int:
        return int.from_bytes(self._take(4), "little")

    def _i32(self) -> int:
        return int.from_bytes(self._take(4), "little", signed=True)

    def _u64(self) -> int:
        return int.from_bytes(self._take(8), "little")

    def _line(self) -> bytes:
        end = self.data.find(b"\n", self.pos, self.pos + self.limits.max_line + 1)
        if end < 0:
            raise self.error("a text opcode's line has no end or is too long")
        line = bytes(self.data[self.pos : end])
        self.pos = end + 1
        return line


    # numbers
    def op_int(self) -> None:
        line = self._line()
        if line == b"00":
            self._push(False)
        elif line == b"01":
            self._push(True)
        else:
            self._push(self._text_int(line))

    def op_long(self) -> None:
        line = self._line()
        if line.endswith(b"L"):
            line = line[:-1]
        self._push(self._text_int(line))

    def _text_int(self, line: bytes) -> int:
        if len(line) > self.limits.max_int_bytes * 5 // 2 + 2:
            raise self.error("an integer has too many digits")
        return int(line)

    def op_binint(self) -> None:
        self._push(self._i32())

    def op_binint1(self) -> None:
        self._push(self._u8())

    def op_binint2(self) -> None:
        self._push(self._u16())

    def op_long1(self) -> None:
        self._push(int.from_bytes(self._take(self._u8()), "little", signed=True))

    def op_long4(self) -> None:
        size = self._i32()
        if size < 0 or size > self.limits.max_int_bytes:
            raise self.error(f"a LONG4 of {size} bytes is out of bounds")
        self._push(int.from_bytes(self._take(size), "little", signed=True))

    def op_float(self) -> None:
        line = self._line()
        if len(line) > 400:
            raise self.error("a float has too many characters")
        self._push(float(line))

    def op_binfloat(self) -> None:
        self._push(struct.unpack(">d", self._take(8))[0])

    def op_none(self) -> None:
        self.stack.append(None)

    def op_newtrue(self) -> None:
        self.stack.append(True)

    def op_newfalse(self) -> None:
        self.stack.append(False)

    # strings
    def _string(self, raw: bytes) -> Any:
        """A Python 2 byte string, as pickle's ``encoding=`` says: ``"bytes"`` keeps it as bytes,
        another codec decodes it strictly. The default, utf-8, keeps what is not UTF-8 as bytes
        (numpy's Python 2 buffers) where pickle and torch would fail."""
        encoding = getattr(self.policy, "encoding", "utf-8")
        if encoding == "bytes":
            return raw
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            if encoding.lower().replace("-", "") in ("utf8",):
                return raw  # Python 2 byte strings that are not text stay bytes
            raise self.error(f"a Python 2 string is not {encoding} text",
                             fix="pass encoding='latin1' (or 'bytes' to keep such strings as bytes)")

    def op_string(self) -> None:
        line = self._line()
        if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b'"', b"'"):
            raise self.error("a STRING opcode's argument is not quoted")
        self._push(self._string(codecs.escape_decode(line[1:-1])[0]))

    def op_binstring(self) -> None:
        size = self._i32()
        self._push(self._string(self._take(size)))

    def op_short_binstring(self) -> None:
        self._push(self._string(self._take(self._u8())))

    def op_binbytes(self) -> None:
        self._push(self._take(self._u32()))

    def op_short_binbytes(self) -> None:
        self._push(self._take(self._u8()))

    def op_binbytes8(self) -> None:
        self._push(self._take(self._u64()))

    def op_bytearray8(self) -> None:
        self._push(bytearray(self._take(self._u64())))

    def op_unicode(self) -> None:
        self._push(self._line().decode("raw-unicode-escape"))

    def op_binunicode(self) -> None:
        self._push(self._take(self._u32()).decode("utf-8", "surrogatepass"))

    def op_short_binunicode(self) -> None:
        self._push(self._take(self._u8()).decode("utf-8", "surrogatepass"))

    def op_binunicode8(self) -> None:
        self._push(self._take(self._u64()).decode("utf-8", "surrogatepass"))

    def op_next_buffer(self) -> None:
        raise self.error(
            "the pickle refers to an out-of-band buffer that files cannot carry",
            fix="re-save the file with torch.save",
        )

    def op_readonly_buffer(self) -> None:
        top = self.stack[-1]
        if isinstance(top, bytearray):
            self.stack[-1] = bytes(top)
        elif not isinstance(top, bytes):
            raise self.error("READONLY_BUFFER needs a bytes-like value")

