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

import struct
from typing import Any, Callable, Protocol

from modelkeep import errors
from modelkeep.legacy.limits import DEFAULT_LIMITS, Limits
from modelkeep.legacy.opcodes import NAMES, skip
from modelkeep.legacy.scalars import ScalarOps

__all__ = ["DEFAULT_LIMITS", "Limits", "Machine", "Policy", "skip"]




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


class Machine(ScalarOps):
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
            code: getattr(self, "op_" + name) for code, name in NAMES.items()
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
