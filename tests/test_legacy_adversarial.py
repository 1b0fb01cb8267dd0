"""Hostile files (``adversarial.write_corpus``) are refused without running code, crashing,
hanging or exhausting memory; the gadgets in them are live (they do run under pickle/torch.load)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelkeep as mk
from modelkeep import errors, legacy
from modelkeep.options import ReadOptions
from modelkeep.legacy import graph, policy, trusted, vm

import adversarial

MEMORY_HEADROOM = 1536 << 20  # address space a child may add after importing torch
CHILD_TIMEOUT = 240


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    marker = str(folder / "MARKER")
    cases = adversarial.write_corpus(str(folder), marker=marker)
    return str(folder), marker, cases


READER = textwrap.dedent(
    """
    import json, os, resource, sys
    import modelkeep as mk
    from modelkeep import errors
    folder = sys.argv[1]
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[2]), size + int(sys.argv[2])))
    for case in json.load(open(os.path.join(folder, "corpus.json"))):
        outcome = {"name": case["name"]}
        def from_bytes(path):  # the same file given as bytes: read in memory, never spooled to disk
            if os.path.isdir(path):  # a sharded folder has no bytes of its own
                return mk.read(path)
            with open(path, "rb") as stream:
                return mk.read(stream.read())

        for label, reader in (("read", mk.read), ("state_dict", mk.load_state_dict), ("bytes", from_bytes)):
            try:
                reader(os.path.join(folder, case["name"]))
                outcome[label] = "accepted"
            except errors.UnsafeContentError as e:
                outcome[label] = "unsafe"
                outcome[label + "_message"] = str(e)[:300]
            except errors.FormatError as e:
                outcome[label] = "format"
                outcome[label + "_message"] = str(e)[:300]
            except BaseException as e:  # anything else is a failure the parent reports
                outcome[label] = "other:" + type(e).__name__ + ":" + str(e)[:300]
        print(json.dumps(outcome), flush=True)
    """
)


def test_corpus_is_refused_in_a_limited_process(corpus):
    folder, marker, cases = corpus
    result = subprocess.run(
        [sys.executable, "-c", READER, folder, str(MEMORY_HEADROOM)],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT,
    )
    outcomes = {o["name"]: o for o in map(json.loads, result.stdout.splitlines())}
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(outcomes) == len(cases), f"the reader stopped after {len(outcomes)} of {len(cases)} files"
    wrong = []
    for case in cases:
        outcome = outcomes[case.name]
        for label in ("read", "state_dict", "bytes"):
            if outcome[label] != case.expect:
                wrong.append(f"{case.name} ({case.family}) {label}: {outcome[label]} {outcome.get(label + '_message', '')}")
    assert not wrong, "\n".join(wrong)
    assert not os.path.exists(marker)


LOADER = textwrap.dedent(
    """
    import json, os, pickle, sys, time
    import torch
    folder, marker = sys.argv[1], sys.argv[2]
    for case in json.load(open(os.path.join(folder, "corpus.json"))):
        if not case["live"]:
            continue
        path = os.path.join(folder, case["name"])
        try:
            if path.endswith(".pkl"):
                with open(path, "rb") as stream:
                    pickle.load(stream)
            else:
                torch.load(path, weights_only=False)
        except BaseException:
            pass
        deadline = time.monotonic() + 5
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.01)  # subprocess-based gadgets finish on their own time
        print(json.dumps({"name": case["name"], "ran": os.path.exists(marker)}), flush=True)
        if os.path.exists(marker):
            os.remove(marker)
    """
)


def test_the_gadgets_are_live(corpus):
    """Proof that the corpus is hostile: pickle.load/torch.load(weights_only=False) of each live
    case creates the marker file (in a separate process, in the corpus folder)."""
    folder, marker, cases = corpus
    live = [case.name for case in cases if case.live]
    assert len(live) >= 60
    result = subprocess.run(
        [sys.executable, "-c", LOADER, folder, marker], capture_output=True, text=True, timeout=CHILD_TIMEOUT, cwd=folder
    )
    ran = {o["name"]: o["ran"] for o in map(json.loads, result.stdout.splitlines())}
    assert sorted(ran) == sorted(live), result.stderr[-2000:]
    assert [name for name, did in ran.items() if not did] == []
    assert not os.path.exists(marker)


def test_corpus_covers_every_family(corpus):
    _, _, cases = corpus
    families = {case.family.split(":")[0] + ":" + case.family.split(":")[1] for case in cases}
    for expected in (
        "gadget:os.system", "gadget:subprocess", "gadget:builtins", "gadget:attribute-chain",
        "gadget:stack-global", "gadget:inst-obj", "gadget:newobj", "gadget:build-setstate",
        "gadget:persistent-id", "gadget:nested-pickle", "gadget:torch-internal", "zip:path-traversal",
        "zip:symlink", "zip:bomb", "zip:duplicate-entry", "zip:bad-crc", "zip:truncated",
        "bomb:deep-nesting", "bomb:exponential", "bomb:memo", "bomb:declared-size", "bomb:hash-flooding",
    ):
        assert expected in families, expected
    containers = {case.name.rsplit(".", 2)[-2] for case in cases if case.name.endswith(".pt") and case.family.startswith("gadget")}
    assert {"zip", "stream"} <= containers


# ------------------------------------------------------------------------------------------
# In-process checks of the machinery


def write_pickle(tmp_path, data: bytes, name: str = "x.pkl") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_every_offending_global_is_listed_with_its_position(tmp_path):
    first = b"cos\nsystem\n(Vtrue\ntR"
    second = b"cbuiltins\neval\n(V1\ntR"
    data = b"(" + first + second + first + b"l."
    path = write_pickle(tmp_path, data)
    with pytest.raises(errors.UnsafeContentError) as caught:
        mk.read(path)
    listed = dict(caught.value.globals)
    assert list(listed) == ["os.system", "builtins.eval"]
    assert listed["os.system"] == ["pickle byte 1", f"pickle byte {1 + len(first) + len(second)}"]
    assert listed["builtins.eval"] == [f"pickle byte {1 + len(first)}"]


def test_placeholders_rescue_tensors_and_stay_inert(tmp_path):
    body = adversarial.checkpoint(
        ("weight", adversarial.tensor()),
        ("payload", adversarial.call(adversarial.g("os", "system"), adversarial.s("touch " + str(tmp_path / "M")))),
    )
    path = str(tmp_path / "mixed.pt")
    adversarial.torch_zip(path, adversarial.p2(body), {"0": struct.pack("<4f", 1, 2, 3, 4)})
    value = mk.read(path, on_unknown="placeholder")
    assert torch.equal(value["weight"], torch.tensor([1.0, 2, 3, 4]))
    payload = value["payload"]
    assert isinstance(payload, legacy.Placeholder) and payload.qualname == "os.system"
    assert payload.args == ("touch " + str(tmp_path / "M"),)
    with pytest.raises(TypeError):
        payload()  # not callable
    assert not (tmp_path / "M").exists()


@pytest.mark.parametrize(
    "limits, data, match",
    [
        (legacy.Limits(max_objects=100), b"(" + b"]" * 120 + b"l.", "more than 100 objects"),
        (legacy.Limits(max_memo=3), b"(" + b"".join(b"Nq" + bytes([k]) for k in range(5)) + b"l.", "memo grows"),
        (legacy.Limits(max_depth=10), b"]" + b"]" * 20 + b"a" * 20 + b".", "nested more than 10"),
        (legacy.Limits(max_expanded=1000), b"]q\x000" + b"(h\x00h\x00h\x00h\x00lq\x000" * 5 + b"(h\x00h\x00h\x00h\x00l.", "unfold"),
        (legacy.Limits(max_same_hash=4), b"}(" + b"".join(adversarial.i((2**61 - 1) * k) + b"N" for k in range(1, 7)) + b"u.", "hash flooding"),
        (legacy.Limits(max_key_weight=8), b"}(" + b"N" * 9 + b"tNs.", "too large"),
    ],
)
def test_limits_are_enforced(tmp_path, limits, data, match):
    path = write_pickle(tmp_path, data)
    with pytest.raises(errors.FormatError, match=match):
        legacy.read(path, options=ReadOptions(limits=limits))


def run_machine(data: bytes) -> object:
    rules = policy.Policy(
        mode=policy.REFS, trust=trusted.Trust(), on_unknown="placeholder", limits=FUZZ_LIMITS, path="fuzz",
    )
    machine = vm.Machine(data, rules, limits=FUZZ_LIMITS, path="fuzz")
    rules.machine = machine
    value, _ = machine.run()
    graph.check(value, limits=FUZZ_LIMITS, path="fuzz", item=None)
    return value


FUZZ_LIMITS = legacy.Limits(max_objects=20_000, max_memo=1000, max_depth=50, max_expanded=100_000)
SEEDS = [
    b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(K\x01K\x02eu.",
    b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x01x\x94\x8c\x01y\x94\x86\x94.",
    b"(lp0\nI1\naI2\naS'x'\np1\na.",
    b"\x80\x02ccollections\nOrderedDict\n)R}(K\x01\x88ub.",
    b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 200))
def test_mutated_pickles_only_raise_format_errors(seed, edits, cut):
    data = bytearray(seed)
    for position, value in edits:
        data[position % len(data)] = value
    data = bytes(data[: max(1, len(data) - cut % 4)])
    try:
        run_machine(data)
    except errors.FormatError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_format_errors(data):
    try:
        run_machine(data)
    except errors.FormatError:
        pass
