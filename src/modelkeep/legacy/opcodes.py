"""The pickle opcodes of protocols 0 to 5: their handler names and argument layouts.

``skip`` walks a pickle by argument layout only (no stack, no values), which is how the stream
format finds where each of its consecutive pickles ends without interpreting any of them twice.
"""

from __future__ import annotations

from typing import Any

from modelkeep import errors
from modelkeep.legacy.limits import DEFAULT_LIMITS, Limits

NAMES: dict[int, str] = {
    ord("("): "mark",
    ord("0"): "pop",
    ord("1"): "pop_mark",
    ord("2"): "dup",
    ord("F"): "float",
    ord("I"): "int",
    ord("J"): "binint",
    ord("K"): "binint1",
    ord("L"): "long",
    ord("M"): "binint2",
    ord("N"): "none",
    ord("P"): "persid",
    ord("Q"): "binpersid",
    ord("R"): "reduce",
    ord("S"): "string",
    ord("T"): "binstring",
    ord("U"): "short_binstring",
    ord("V"): "unicode",
    ord("X"): "binunicode",
    ord("a"): "append",
    ord("b"): "build",
    ord("c"): "global",
    ord("d"): "dict",
    ord("}"): "empty_dict",
    ord("e"): "appends",
    ord("g"): "get",
    ord("h"): "binget",
    ord("i"): "inst",
    ord("j"): "long_binget",
    ord("l"): "list",
    ord("]"): "empty_list",
    ord("o"): "obj",
    ord("p"): "put",
    ord("q"): "binput",
    ord("r"): "long_binput",
    ord("s"): "setitem",
    ord("t"): "tuple",
    ord(")"): "empty_tuple",
    ord("u"): "setitems",
    ord("G"): "binfloat",
    0x80: "proto",
    0x81: "newobj",
    0x82: "ext1",
    0x83: "ext2",
    0x84: "ext4",
    0x85: "tuple1",
    0x86: "tuple2",
    0x87: "tuple3",
    0x88: "newtrue",
    0x89: "newfalse",
    0x8A: "long1",
    0x8B: "long4",
    ord("B"): "binbytes",
    ord("C"): "short_binbytes",
    0x8C: "short_binunicode",
    0x8D: "binunicode8",
    0x8E: "binbytes8",
    0x8F: "empty_set",
    0x90: "additems",
    0x91: "frozenset",
    0x92: "newobj_ex",
    0x93: "stack_global",
    0x94: "memoize",
    0x95: "frame",
    0x96: "bytearray8",
    0x97: "next_buffer",
    0x98: "readonly_buffer",
}


def skip(data: bytes, start: int = 0, *, limits: Limits = DEFAULT_LIMITS) -> int:
    """The offset just after the STOP of the pickle at ``start``, found by decoding opcode
    arguments only (no stack, no values): how the stream format finds where its next part starts."""
    pos, end = start, len(data)
    while pos < end:
        code = data[pos]
        pos += 1
        if code == 0x2E:
            return pos
        kind = _ARGUMENTS.get(code)
        if kind is None:
            raise errors.FormatError(f"unknown opcode 0x{code:02x} (pickle byte {pos - 1})")
        if kind == "line":
            newline = data.find(b"\n", pos, pos + limits.max_line + 1)
            if newline < 0:
                break
            pos = newline + 1
        elif kind == "lines":
            for _ in range(2):
                newline = data.find(b"\n", pos, pos + limits.max_line + 1)
                if newline < 0:
                    raise errors.FormatError(f"unterminated line (pickle byte {pos})")
                pos = newline + 1
        elif isinstance(kind, int):
            pos += kind
        else:  # (width of a length prefix, signed)
            width, signed = kind
            if pos + width > end:
                break
            size = int.from_bytes(data[pos : pos + width], "little", signed=signed)
            if size < 0:
                raise errors.FormatError(f"negative length (pickle byte {pos})")
            pos += width + size
    raise errors.FormatError("the pickle ends without a STOP opcode")


_ARGUMENTS: dict[int, Any] = {code: 0 for code in NAMES}
_ARGUMENTS.update(
    {
        ord("F"): "line", ord("I"): "line", ord("L"): "line", ord("P"): "line", ord("S"): "line",
        ord("V"): "line", ord("g"): "line", ord("p"): "line",
        ord("c"): "lines", ord("i"): "lines",
        ord("J"): 4, ord("K"): 1, ord("M"): 2, ord("h"): 1, ord("j"): 4, ord("q"): 1, ord("r"): 4,
        ord("G"): 8, 0x80: 1, 0x82: 1, 0x83: 2, 0x84: 4, 0x95: 8,
        ord("T"): (4, True), ord("U"): (1, False), ord("X"): (4, False), ord("B"): (4, False),
        ord("C"): (1, False), 0x8A: (1, False), 0x8B: (4, True), 0x8C: (1, False),
        0x8D: (8, False), 0x8E: (8, False), 0x96: (8, False),
    }
)

