"""A pickle opcode interpreter for protocols 0 to 5 that never imports and never calls.

The machine decodes opcodes and keeps the stack, the marks and the memo. What a global *means*,
what a call *builds*, what a persistent id *refers to* is decided by a ``Policy`` that modelkeep
writes; the machine hands it module and attribute names as plain strings. Nothing the file names
is looked up in a module, and no method of an object the file describes is invoked: lists, dicts
and sets are filled by the machine itself, everything else goes through the policy.

Every resource is bounded by ``Limits``: objects created, memo entries, integer and line sizes,
the cost of hashing a dict key and the number of keys sharing one hash (hash flooding). Deep and
exponentially shared results are refused afterwards by ``graph.check``.
"""

from __future__ import annotations

import codecs
import dataclasses
import struct
from typing import Any, Callable, Protocol

from modelkeep import errors


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on what one file may make the reader do. The defaults fit every honest checkpoint
    seen in practice with wide margins; raise them only for files you trust."""

    max_pickle_bytes: int = 1 << 30  # one pickle stream (data.pkl)
    max_objects: int = 10_000_000  # values created while interpreting
    max_memo: int = 10_000_000  # memo entries
    max_depth: int = 400  # nesting of the result
    max_expanded: int = 50_000_000  # nodes of the result counted as a tree (shared parts repeated)
    max_key_weight: int = 4096  # nodes inside one dict key or set element
    max_same_hash: int = 64  # non-string keys of one container sharing a hash
    max_int_bytes: int = 1024  # LONG1/LONG4 payload; text ints are limited to matching digits
    max_line: int = 1 << 20  # one text-protocol line
    max_name: int = 512  # module or attribute name of a global
    max_ndim: int = 64
    max_nested_archives: int = 2  # torch.save bytes inside a pickle inside ...
    max_inflate_ratio: int = 1100  # deflate cannot exceed ~1032:1
    max_inflated_factor: int = 16  # all inflated entries together, times the archive size
    max_entries: int = 1_000_000  # zip or tar members


DEFAULT_LIMITS = Limits()


class Policy(Protocol):
    """What the machine asks modelkeep's builders; see ``policy.Policy``."""

    def find_global(self, module: str, name: str, pos: int) -> Any: ...
    def computed_global(self, module: Any, name: Any, pos: int) -> Any: ...
    def extension(self, code: int, pos: int) -> Any: ...
    def call(self, func: Any, args: tuple, pos: int) -> Any: ...
    def new(self, cls: Any, args: tuple, kwargs: dict, pos: int) -> Any: ...
    def build(self, obj: Any, state: Any, pos: int) -> None: ...
    def persistent(self, pid: Any, pos: int) -> Any: ...
    def persistent_text(self, pid: str, pos: int) -> Any: ...
    def extend(self, obj: Any, items: list, pos: int) -> None: ...
    def set_items(self, obj: Any, pairs: list, pos: int) -> None: ...


_MARK = object()  # never on the stack; marks live on the metastack
_SAFE_HASH = (str, bytes)  # randomised SipHash: collisions cannot be chosen by the file
_ATOMS = (int, float, complex, bool, type(None), str, bytes)


class Machine:
    """Interprets one pickle stream of ``data`` starting at ``start``; ``run`` returns the value
    and the offset just after its STOP opcode."""

    def __init__(
        self,
        data: bytes,
        policy: Policy,
        *,
        limits: Limits = DEFAULT_LIMITS,
        path: str | None = None,
        item: str | None = None,
    ) -> None:
        self.data = data
        self.policy = policy
        self.limits = limits
        self.path = path
        self.item = item
        self.pos = 0
        self.op_pos = 0
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.created = 0
        self._hash_counts: dict[int, tuple[Any, dict[int, int]]] = {}
        self._dispatch: dict[int, Callable[[], None]] = {
            code: getattr(self, "op_" + name) for code, name in _OPCODES.items()
        }

    # ---------------------------------------------------------------------------- errors

    def error(self, what: str, fix: str | None = None) -> errors.FormatError:
        return errors.FormatError(
            f"{what} (pickle byte {self.op_pos})",
            path=self.path,
            item=self.item,
            fix=fix or "the file is damaged or was crafted; re-download it or re-save it with torch.save",
        )

    # ---------------------------------------------------------------------------- main loop

    def run(self, start: int = 0) -> tuple[Any, int]:
        self.pos = start
        data, dispatch = self.data, self._dispatch
        end = len(data)
        try:
            while True:
                if self.pos >= end:
                    raise self.error("the pickle ends without a STOP opcode")
                self.op_pos = self.pos
                code = data[self.pos]
                self.pos += 1
                if code == 0x2E:  # STOP
                    return self._stop(), self.pos
                handler = dispatch.get(code)
                if handler is None:
                    raise self.error(f"unknown opcode 0x{code:02x}")
                handler()
        except errors.ModelkeepError:
            raise
        except IndexError as e:  # popping an empty stack: malformed opcode sequence
            raise self.error("an opcode found too few values on the stack") from e
        except MemoryError as e:
            raise self.error("ran out of memory while reading the pickle") from e
        except RecursionError as e:
            raise self.error("the pickle is nested too deeply") from e
        except (TypeError, ValueError, OverflowError, UnicodeError, struct.error) as e:
            raise self.error(f"invalid value for an opcode ({type(e).__name__}: {str(e)[:200]})") from e

    def _stop(self) -> Any:
        if self.metastack:
            raise self.error("the pickle stops inside an unclosed MARK")
        if len(self.stack) != 1:
            raise self.error(f"the pickle stops with {len(self.stack)} values on the stack, not 1")
        return self.stack.pop()

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

    def _push(self, value: Any) -> None:
        self.created += 1
        if self.created > self.limits.max_objects:
            raise self.error(
                f"the pickle creates more than {self.limits.max_objects} objects",
                fix="if you trust the file, raise Limits.max_objects",
            )
        self.stack.append(value)

    def _pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise self.error("an opcode needs a MARK but there is none")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _name(self, raw: bytes) -> str:
        if len(raw) > self.limits.max_name:
            raise self.error("a global's name is too long")
        return raw.decode("utf-8")

    # ---------------------------------------------------------------------------- keys

    def check_key(self, container: Any, key: Any) -> None:
        """Refuse keys whose hashing or comparing could be made slow by the file."""
        if type(key) in _SAFE_HASH:
            return
        self._key_weight(key)
        try:
            value = hash(key)
        except TypeError as e:
            raise self.error(f"a {type(key).__name__} cannot be a dict key or set element") from e
        holder = self._hash_counts.get(id(container))
        if holder is None or holder[0] is not container:
            holder = (container, {})
            self._hash_counts[id(container)] = holder
        counts = holder[1]
        counts[value] = counts.get(value, 0) + 1
        if counts[value] > self.limits.max_same_hash:
            raise self.error("too many keys share one hash value (hash flooding)")

    def _key_weight(self, key: Any) -> None:
        budget = self.limits.max_key_weight
        pending = [key]
        while pending:
            value = pending.pop()
            budget -= 1
            if budget < 0:
                raise self.error("a dict key or set element is too large")
            if isinstance(value, (tuple, frozenset)):
                pending.extend(value)

    def _set_item(self, container: Any, key: Any, value: Any) -> None:
        self.check_key(container, key)
        container[key] = value

    # ---------------------------------------------------------------------------- opcodes

    def op_mark(self) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def op_pop(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self._pop_mark()

    def op_pop_mark(self) -> None:
        self._pop_mark()

    def op_dup(self) -> None:
        self.stack.append(self.stack[-1])

    def op_proto(self) -> None:
        version = self._u8()
        if version > 5:
            raise self.error(f"pickle protocol {version} is not supported (0 to 5 are)")

    def op_frame(self) -> None:
        length = self._u64()
        if self.pos + length > len(self.data):
            raise self.error("a FRAME runs past the end of the pickle")

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
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw  # Python 2 byte strings that are not text stay bytes

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

    # containers
    def op_empty_tuple(self) -> None:
        self._push(())

    def op_tuple(self) -> None:
        self._push(tuple(self._pop_mark()))

    def op_tuple1(self) -> None:
        self.stack[-1] = (self.stack[-1],)
        self._count()

    def op_tuple2(self) -> None:
        second = self.stack.pop()
        self.stack[-1] = (self.stack[-1], second)
        self._count()

    def op_tuple3(self) -> None:
        third = self.stack.pop()
        second = self.stack.pop()
        self.stack[-1] = (self.stack[-1], second, third)
        self._count()

    def _count(self) -> None:
        self.created += 1
        if self.created > self.limits.max_objects:
            raise self.error(f"the pickle creates more than {self.limits.max_objects} objects")

    def op_empty_list(self) -> None:
        self._push([])

    def op_list(self) -> None:
        self._push(self._pop_mark())

    def op_append(self) -> None:
        value = self.stack.pop()
        self._extend(self.stack[-1], [value])

    def op_appends(self) -> None:
        items = self._pop_mark()
        self._extend(self.stack[-1], items)

    def _extend(self, target: Any, items: list[Any]) -> None:
        if type(target) is list:
            target.extend(items)
        else:
            self.policy.extend(target, items, self.op_pos)

    def op_empty_dict(self) -> None:
        self._push({})

    def op_dict(self) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            raise self.error("DICT needs key/value pairs")
        result: dict[Any, Any] = {}
        for i in range(0, len(items), 2):
            self._set_item(result, items[i], items[i + 1])
        self._push(result)

    def op_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._set_pairs(self.stack[-1], [key, value])

    def op_setitems(self) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            raise self.error("SETITEMS needs key/value pairs")
        self._set_pairs(self.stack[-1], items)

    def _set_pairs(self, target: Any, items: list[Any]) -> None:
        if isinstance(target, dict):  # only dicts the reader built (plain, ordered, records)
            for i in range(0, len(items), 2):
                self._set_item(target, items[i], items[i + 1])
        else:
            self.policy.set_items(target, items, self.op_pos)

    def op_empty_set(self) -> None:
        self._push(set())

    def op_additems(self) -> None:
        items = self._pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise self.error(f"ADDITEMS needs a set, not a {type(target).__name__}")
        for value in items:
            self.check_key(target, value)
            target.add(value)

    def op_frozenset(self) -> None:
        items = self._pop_mark()
        holder: set[Any] = set()
        for value in items:
            self.check_key(holder, value)
            holder.add(value)
        self._push(frozenset(holder))

    # memo
    def _memo_put(self, index: int) -> None:
        if not self.stack:
            raise self.error("PUT with an empty stack")
        if index not in self.memo and len(self.memo) >= self.limits.max_memo:
            raise self.error(f"the memo grows past {self.limits.max_memo} entries")
        self.memo[index] = self.stack[-1]

    def _memo_get(self, index: int) -> None:
        try:
            self.stack.append(self.memo[index])
        except KeyError:
            raise self.error(f"memo entry {index} is read before it is written") from None

    def op_put(self) -> None:
        self._memo_put(self._memo_index(self._line()))

    def op_binput(self) -> None:
        self._memo_put(self._u8())

    def op_long_binput(self) -> None:
        self._memo_put(self._u32())

    def op_memoize(self) -> None:
        self._memo_put(len(self.memo))

    def op_get(self) -> None:
        self._memo_get(self._memo_index(self._line()))

    def op_binget(self) -> None:
        self._memo_get(self._u8())

    def op_long_binget(self) -> None:
        self._memo_get(self._u32())

    def _memo_index(self, line: bytes) -> int:
        if not line.isdigit() or len(line) > 12:
            raise self.error("a memo index is not a small non-negative integer")
        return int(line)

    # globals and objects: every decision is the policy's
    def op_global(self) -> None:
        module = self._name(self._line())
        name = self._name(self._line())
        self._push(self.policy.find_global(module, name, self.op_pos))

    def op_stack_global(self) -> None:
        name = self.stack.pop()
        module = self.stack.pop()
        if type(module) is str and type(name) is str:
            if len(module) > self.limits.max_name or len(name) > self.limits.max_name:
                raise self.error("a global's name is too long")
            self._push(self.policy.find_global(module, name, self.op_pos))
        else:
            self._push(self.policy.computed_global(module, name, self.op_pos))

    def op_inst(self) -> None:
        module = self._name(self._line())
        name = self._name(self._line())
        args = tuple(self._pop_mark())
        cls = self.policy.find_global(module, name, self.op_pos)
        self._push(self.policy.call(cls, args, self.op_pos))

    def op_obj(self) -> None:
        items = self._pop_mark()
        if not items:
            raise self.error("OBJ needs a class")
        self._push(self.policy.call(items[0], tuple(items[1:]), self.op_pos))

    def op_reduce(self) -> None:
        args = self.stack.pop()
        if type(args) is not tuple:
            raise self.error(f"REDUCE needs a tuple of arguments, not a {type(args).__name__}")
        func = self.stack[-1]
        self.stack[-1] = self.policy.call(func, args, self.op_pos)
        self._count()

    def op_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if type(args) is not tuple:
            raise self.error("NEWOBJ needs a tuple of arguments")
        self._push(self.policy.new(cls, args, {}, self.op_pos))

    def op_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if type(args) is not tuple or type(kwargs) is not dict:
            raise self.error("NEWOBJ_EX needs a tuple and a dict")
        self._push(self.policy.new(cls, args, kwargs, self.op_pos))

    def op_build(self) -> None:
        state = self.stack.pop()
        self.policy.build(self.stack[-1], state, self.op_pos)

    def op_persid(self) -> None:
        line = self._line()
        self._push(self.policy.persistent_text(line.decode("ascii"), self.op_pos))

    def op_binpersid(self) -> None:
        pid = self.stack.pop()
        self._push(self.policy.persistent(pid, self.op_pos))

    def op_ext1(self) -> None:
        self._push(self.policy.extension(self._u8(), self.op_pos))

    def op_ext2(self) -> None:
        self._push(self.policy.extension(self._u16(), self.op_pos))

    def op_ext4(self) -> None:
        self._push(self.policy.extension(self._i32(), self.op_pos))


_OPCODES: dict[int, str] = {
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


_ARGUMENTS: dict[int, Any] = {code: 0 for code in _OPCODES}
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
