"""Reliability battery: fuzzed adapter files, fuzzed requests (Python API and HTTP server), corrupt caches.

    logo-edge check [--quick] [--out DIR] [--model GGUF --adapters DIR]
    python -m logo_edge.battery [--quick] [--out DIR]

Every part is bounded in count and time and prints its figures; the run ends with one table
(tried / typed errors / accepted / crashed / hung / memory / 5xx) and exits 1 if any must-be-zero
figure is not zero. Failing inputs are saved under --out (default: a temporary directory, kept when
something failed).

1. adapters: mutated GGUF LoRA files (hypothesis: truncation, flipped bytes in every section, wrong
   types and dtypes, absurd shapes, offsets and counts, duplicate names, NaN data...) made from the
   pool's own adapters, fed to Engine.add_adapter in a child process per batch; a file Python accepts
   is also loaded into llama.cpp (a 1-token completion with it alone). Crash = the child died; hang =
   no answer within the per-file limit; memory = the child's peak RSS grew by more than 256 MiB on one
   file; untyped = an exception other than LogoEdgeError; late = Python accepted a file llama.cpp refused.
2. api: Engine.create_completion / create_chat_completion / route with fuzzed arguments (child process):
   each call returns, or raises LogoEdgeError, or ValueError/TypeError naming the argument at fault.
   server: a live `logo-edge serve` on the same model gets fuzzed JSON bodies; every answer must be
   2xx/4xx, and after every batch the server must still answer /health and a normal request.
3. cache: the calibration cache, truncated, flipped, replaced, or missing its hash, is rebuilt, never used.
4. kills (logo_edge/battery_kills.py): an adapter conversion and a calibration cache write, SIGKILLed at random
   moments, leave the old file or the complete new one, never a partial file (partial must be 0).
5. soak (logo_edge/battery_soak.py; only with `--parts soak`): 10,000 Engine requests and 2,000 server
   requests over 120 adapters with an LRU budget of ~12: no error, flat RSS, handles alive == LRU.

The model: --model/--adapters; else, in a source checkout, the tests' tiny model (tests/tiny.py,
built once and cached); else the default model and the shipped pool.

Tests: tests/battery/ runs the quick subset in the normal suite (markers `battery` and `slow`);
the full run: `pytest -m battery --battery-full tests/battery` (or LOGO_EDGE_BATTERY=full).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import math
import os
import queue
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

MEMORY_LIMIT_MB = 256  # peak RSS growth on one input above this = memory blown
U64 = [0, 1, 2, 3, 7, 31, 32, 63, 64, 65, 255, 4096, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 10**12,
       2**62, 2**63 - 1, 2**63, 2**64 - 1]
U32 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 30, 31, 39, 40, 255, 2**16, 2**31, 2**32 - 1]
F32 = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e38, 3.4e38, 1e-45, 65504.0, 1e30]


@dataclass
class Figures:
    """One part's counts; `fail` lists (what, detail, saved file) for everything that must not happen."""

    part: str
    counts: Counter = field(default_factory=Counter)
    fail: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bad(self) -> int:
        return sum(self.counts[k] for k in ("crashed", "hung", "memory", "untyped", "late", "5xx", "restarts",
                                            "broken", "used_corrupt", "partial", "errors", "leak", "unrecovered"))


# ---------------------------------------------------------------- target


def target(model: str | None = None, adapters: str | None = None) -> tuple[Path, Path]:
    """(base model GGUF, directory of GGUF adapters) the battery runs on."""
    from . import defaults

    if model:
        if not adapters:
            raise SystemExit("--model needs --adapters (a directory of GGUF adapters made for it)")
        return Path(model), Path(adapters)
    tiny_py = defaults.REPO_ROOT / "tests" / "tiny.py"
    if tiny_py.exists():
        import importlib.util

        if str(tiny_py.parent) not in sys.path:  # tiny.py imports its neighbours (peft_tools)
            sys.path.insert(0, str(tiny_py.parent))
        spec = importlib.util.spec_from_file_location("tiny", tiny_py)
        tiny = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tiny)
        d = tiny.build(progress=lambda m: print(f"[battery] {m}", file=sys.stderr))
        return d / "tiny-f32.gguf", d / "gguf"
    return defaults.default_model_path(), Path(adapters) if adapters else defaults.shipped_pool()


# ---------------------------------------------------------------- child processes


def _run_child(kind: str, spec: dict, first_s: float, each_s: float, figures: Figures, out: Path) -> dict | None:
    """Run a worker child; stream its JSON lines into `figures`. Returns the child's last 'current'
    input when it died or hung (and counts it), else None."""
    cmd = [sys.executable, "-m", "logo_edge.battery", "--worker", kind, json.dumps(spec)]
    log = open(out / f"{kind}-{spec['batch']}.log", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    current, limit = None, first_s
    while True:
        try:
            line = lines.get(timeout=limit)
        except queue.Empty:
            proc.kill()
            proc.wait()
            figures.counts["hung"] += 1
            figures.fail.append(("hung", json.dumps(current)[:300], _save_current(out, spec, "hang")))
            log.close()
            return current
        if line is None:
            break
        if not line.startswith('{"event"'):
            continue  # something else printed on stdout
        msg = json.loads(line)
        limit = each_s
        if msg["event"] == "current":
            current = msg
        elif msg["event"] == "outcome":
            figures.counts["tried"] += 1
            figures.counts[msg["outcome"]] += 1
            for k, v in msg.get("extra", {}).items():
                figures.counts[k] += v
        elif msg["event"] == "failure":
            figures.fail.append((msg["what"], msg["detail"], msg.get("file")))
        elif msg["event"] == "note":
            figures.notes.append(msg["text"])
    rc = proc.wait()
    log.close()
    if rc != 0:
        figures.counts["crashed"] += 1
        figures.fail.append(("crashed", f"exit status {rc}; last input {json.dumps(current)[:300]}",
                             _save_current(out, spec, "crash")))
        return current or {}
    return None


def _save_current(out: Path, spec: dict, what: str) -> str | None:
    cur = Path(spec["work"]) / "current.gguf"
    if cur.exists():
        dest = out / "failures" / f"{what}-{hashlib.sha256(cur.read_bytes()).hexdigest()[:10]}.gguf"
        dest.parent.mkdir(exist_ok=True)
        shutil.copy(cur, dest)
        return str(dest)
    return None


def _emit(**msg) -> None:
    sys.stdout.write(json.dumps(msg, default=repr) + "\n")
    sys.stdout.flush()


class _Hang(BaseException):
    """Raised by the per-input alarm (a BaseException, so no `except Exception` swallows it)."""


def _alarm(seconds: int):
    def on_alarm(*_):
        raise _Hang(f"no result within {seconds} s")
    signal.signal(signal.SIGALRM, on_alarm)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _quiet_llama() -> None:
    """llama.cpp logs every adapter it loads: keep the worker's stderr short."""
    os.environ.setdefault("LLAMA_LOG_LEVEL", "error")


# ---------------------------------------------------------------- 1. adapter files


def _layout(data: bytes) -> dict:
    """Byte ranges of a GGUF file's sections and the offsets of its tensor-info fields (for mutations)."""
    import tempfile as tf

    from gguf import GGUFReader

    with tf.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        r = GGUFReader(f.name)
        kvs = []
        for name, fl in r.fields.items():
            if name.startswith("GGUF."):
                continue
            # key length (8) + key + type (4) + value
            type_off = fl.offset + 8 + len(name.encode())
            kvs.append({"key": name, "off": fl.offset, "type_off": type_off, "val_off": type_off + 4,
                        "type": int(fl.types[0])})
        tensors = []
        for t in r.tensors:
            o = t.field.offset
            nlen = len(t.name.encode())
            nd_off = o + 8 + nlen
            nd = len(t.shape)
            tensors.append({"name_off": o + 8, "name_len": nlen, "ndims_off": nd_off, "dims_off": nd_off + 4,
                            "ndims": nd, "type_off": nd_off + 4 + 8 * nd, "offset_off": nd_off + 8 + 8 * nd})
        tinfo_start = r.tensors[0].field.offset if r.tensors else r.data_offset
        return {"size": len(data), "kv": kvs, "tensors": tensors, "tinfo": (tinfo_start, r.data_offset),
                "kvsec": (24, tinfo_start), "data": (r.data_offset, len(data))}


def mutation_strategy(n_seeds: int):
    """A hypothesis strategy of (seed index, [operations]); integers shrink towards the smallest change."""
    from hypothesis import strategies as st

    i = st.integers(0, 2**31)
    ops = st.one_of(
        st.tuples(st.just("truncate"), i),
        st.tuples(st.just("flip"), st.sampled_from(["header", "kvsec", "tinfo", "data"]), i,
                  st.integers(1, 255), st.integers(1, 8)),
        st.tuples(st.just("count"), st.sampled_from([8, 16]), st.sampled_from(U64) | st.integers(0, 2**64 - 1)),
        st.tuples(st.just("version"), st.sampled_from([0, 1, 2, 4, 0x00030000, 0x03000000, 2**32 - 1])),
        st.tuples(st.just("kv_type"), i, st.sampled_from(U32)),
        st.tuples(st.just("kv_len"), i, st.sampled_from(["key", "value"]), st.sampled_from(U64)),
        st.tuples(st.just("kv_value"), i, st.sampled_from(U64)),
        st.tuples(st.just("alpha"), st.sampled_from(F32) | st.floats(width=32)),
        st.tuples(st.just("dtype"), i, st.sampled_from(U32) | st.integers(0, 2**32 - 1)),
        st.tuples(st.just("ndims"), i, st.sampled_from([0, 1, 3, 4, 5, 8, 2**32 - 1])),
        st.tuples(st.just("dim"), i, st.integers(0, 3), st.sampled_from(U64) | st.integers(0, 2**64 - 1)),
        st.tuples(st.just("offset"), i, st.sampled_from(U64) | st.integers(-64, 64)),
        st.tuples(st.just("dup_name"), i, i),
        st.tuples(st.just("bad_utf8"), st.sampled_from(["key", "tensor"]), i, st.sampled_from([0x80, 0xC0, 0xFF])),
        st.tuples(st.just("data_value"), i, st.sampled_from(F32)),
        st.tuples(st.just("data_bytes"), i, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("insert"), i, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), i, st.integers(1, 16)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("transpose"), i),
    )
    return st.tuples(st.integers(0, n_seeds - 1), st.lists(ops, min_size=1, max_size=3))


def mutate(data: bytes, lay: dict, ops) -> bytes:
    """Apply operations (from mutation_strategy) to a seed file's bytes; offsets come from the seed's layout
    (a later operation may see a file an earlier one already shifted: that is part of the fuzzing)."""
    b = bytearray(data)

    def put(off, fmt, v):
        size = struct.calcsize(fmt)
        if 0 <= off and off + size <= len(b):
            b[off:off + size] = struct.pack(fmt, v)

    kvs, ts = lay["kv"], lay["tensors"]
    for op in ops:
        kind, args = op[0], op[1:]
        if kind == "truncate":
            del b[args[0] % max(1, len(b)):]
        elif kind == "flip":
            sec, pos, x, n = args
            lo, hi = (0, 24) if sec == "header" else lay[sec]
            if hi > lo:
                p = lo + pos % (hi - lo)
                for k in range(p, min(p + n, len(b))):
                    b[k] ^= x
        elif kind == "count":
            put(args[0], "<Q", args[1])
        elif kind == "version":
            put(4, "<I", args[0])
        elif kind == "kv_type" and kvs:
            put(kvs[args[0] % len(kvs)]["type_off"], "<I", args[1])
        elif kind == "kv_len" and kvs:
            kv = kvs[args[0] % len(kvs)]
            if args[1] == "key":
                put(kv["off"], "<Q", args[2])
            elif kv["type"] == 8:  # a string value: its length
                put(kv["val_off"], "<Q", args[2])
            elif kv["type"] == 9:  # an array: its length
                put(kv["val_off"] + 4, "<Q", args[2])
        elif kind == "kv_value" and kvs:
            kv = kvs[args[0] % len(kvs)]
            put(kv["val_off"], "<Q", args[1])
        elif kind == "alpha":
            for kv in kvs:
                if kv["key"] == "adapter.lora.alpha":
                    put(kv["val_off"], "<f", args[0])
        elif kind in ("dtype", "ndims", "dim", "offset", "dup_name", "transpose") and ts:
            t = ts[args[0] % len(ts)]
            if kind == "dtype":
                put(t["type_off"], "<I", args[1])
            elif kind == "ndims":
                put(t["ndims_off"], "<I", args[1])
            elif kind == "dim":
                put(t["dims_off"] + 8 * (args[1] % t["ndims"]), "<Q", args[2])
            elif kind == "offset":
                v = args[1]
                if -64 <= v <= 64:  # a small shift of the stored offset
                    cur = struct.unpack_from("<Q", b, t["offset_off"])[0] if t["offset_off"] + 8 <= len(b) else 0
                    v = max(0, cur + v)
                put(t["offset_off"], "<Q", v)
            elif kind == "dup_name":
                src = ts[args[1] % len(ts)]
                n = min(src["name_len"], t["name_len"])
                if src["name_off"] + n <= len(b) and t["name_off"] + n <= len(b):
                    b[t["name_off"]:t["name_off"] + n] = b[src["name_off"]:src["name_off"] + n]
            elif kind == "transpose" and t["ndims"] == 2 and t["dims_off"] + 16 <= len(b):
                b[t["dims_off"]:t["dims_off"] + 16] = b[t["dims_off"] + 8:t["dims_off"] + 16] + \
                    b[t["dims_off"]:t["dims_off"] + 8]
        elif kind == "bad_utf8":
            where, pos, x = args
            if where == "key" and kvs:
                kv = kvs[pos % len(kvs)]
                put(kv["off"] + 8, "<B", x)
            elif where == "tensor" and ts:
                put(ts[pos % len(ts)]["name_off"], "<B", x)
        elif kind == "data_value":
            lo, hi = lay["data"]
            if hi - lo >= 4:
                put(lo + (args[0] % ((hi - lo) // 4)) * 4, "<f", args[1])
        elif kind == "data_bytes":
            lo, hi = lay["data"]
            if hi > lo:
                p = lo + args[0] % (hi - lo)
                chunk = args[1][: max(0, len(b) - p)]
                b[p:p + len(chunk)] = chunk
        elif kind == "insert":
            p = args[0] % (len(b) + 1)
            b[p:p] = args[1]
        elif kind == "delete" and b:
            p = args[0] % len(b)
            del b[p:p + args[1]]
        elif kind == "append":
            b += args[0]
    return bytes(b)


def _adapter_worker(spec: dict) -> None:
    """Child: hypothesis over mutations of the seeds; every input's outcome as a JSON line on stdout."""
    _quiet_llama()
    warnings.simplefilter("ignore")
    from hypothesis import HealthCheck, Phase, given, seed, settings

    from .engine import Engine
    from .errors import AdapterError, LogoEdgeError

    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    current = work / "current.gguf"
    seeds = [(p.name, p.read_bytes()) for p in sorted(Path(spec["seeds"]).glob("*.gguf"))]
    layouts = [_layout(d) for _, d in seeds]
    eng = Engine(spec["model"], None, n_ctx=128, n_batch=64, kv_type="f32", flash_attn=False)
    _alarm(spec["per_file_s"])
    last: dict = {}

    def attempt(seed_i: int, ops) -> str:
        data = mutate(seeds[seed_i][1], layouts[seed_i], ops)
        current.write_bytes(data)
        _emit(event="current", seed=seeds[seed_i][0], ops=ops, size=len(data))
        peak = _peak_mb()
        signal.alarm(spec["per_file_s"])
        try:
            try:
                eng.add_adapter(current, name="fuzzed")
            except LogoEdgeError as e:
                outcome, detail = "typed", str(e)
                if str(current) not in detail:
                    outcome = "unnamed"  # typed, but the message does not name the file
            else:
                try:  # Python accepted it: llama.cpp must load and run it too
                    eng.create_completion("Hello", adapters={"fuzzed": 1.0}, max_tokens=1)
                    outcome, detail = "accepted", ""
                except AdapterError as e:
                    outcome, detail = "late", str(e)
                finally:
                    eng.remove_adapter("fuzzed")
        except _Hang as e:
            outcome, detail = "hung", str(e)
        except Exception as e:
            outcome, detail = "untyped", f"{type(e).__name__}: {e}"
        finally:
            signal.alarm(0)
        grew = _peak_mb() - peak
        if grew > MEMORY_LIMIT_MB:
            outcome, detail = "memory", f"peak RSS grew by {grew:.0f} MiB ({detail})"
        last.update(outcome=outcome, detail=detail, data=data, seed=seeds[seed_i][0], ops=ops)
        return outcome

    @settings(max_examples=spec["count"], deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink],
              report_multiple_bugs=False)
    @seed(spec["seed"])
    @given(mutation_strategy(len(seeds)))
    def prop(m):
        outcome = attempt(*m)
        _emit(event="outcome", outcome=outcome)
        assert outcome in ("typed", "accepted", "unnamed"), f"{outcome}: {last['detail']}"

    try:
        prop()
    except AssertionError:
        # hypothesis ran the minimal failing example last: save it
        digest = hashlib.sha256(last["data"]).hexdigest()[:10]
        dest = Path(spec["out"]) / "failures" / f"{last['outcome']}-{digest}.gguf"
        dest.parent.mkdir(exist_ok=True)
        dest.write_bytes(last["data"])
        dest.with_suffix(".txt").write_text(f"seed file: {last['seed']}\nmutations: {last['ops']}\n"
                                            f"outcome: {last['outcome']}\n{last['detail']}\n")
        _emit(event="failure", what=last["outcome"], detail=f"{last['seed']} {last['ops']}: {last['detail']}"[:500],
              file=str(dest))
    eng.close()


def fuzz_adapters(model: Path, seeds: Path, count: int, batch: int, out: Path, per_file_s: int = 10,
                  budget_s: float = 600) -> Figures:
    """`count` mutated adapter files in child processes of `batch` each (a dead child is replaced)."""
    fig = Figures("adapter files")
    t0 = time.monotonic()
    b = 0
    while fig.counts["tried"] < count and time.monotonic() - t0 < budget_s:
        n = min(batch, count - fig.counts["tried"])
        spec = dict(model=str(model), seeds=str(seeds), count=n, seed=1000 + b, batch=b, out=str(out),
                    work=str(out / f"adapters-{b}"), per_file_s=per_file_s)
        before = fig.counts["tried"]
        _run_child("adapters", spec, first_s=300, each_s=per_file_s + 20, figures=fig, out=out)
        b += 1
        if fig.counts["tried"] == before and b > 3:
            fig.notes.append("a batch made no progress; stopped")
            break
    fig.seconds = time.monotonic() - t0
    return fig


# ---------------------------------------------------------------- 2. requests: the Python API

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<|im_start|>system\n"]


def _api_strategy(names: list[str]):
    from hypothesis import strategies as st

    text = st.text(max_size=40) | st.sampled_from(["", " ", "\ud800", "a\udfffb", "\x00", "\ufeff", "é" * 50])
    special = st.builds(lambda s, n: s * n, st.sampled_from(SPECIAL), st.integers(1, 300))
    huge = st.builds(lambda c, n: c * n, st.sampled_from(["x", "的", "\ud83d\ude00", " "]), st.integers(500, 20000))
    tokens = st.lists(st.integers(-5, 60000) | st.sampled_from([2**31, -2**31, 2**63]), max_size=20)
    odd = st.sampled_from([None, 0, 1.5, b"bytes", {"a": 1}, [None], [[1]], object()])
    prompt = st.one_of(text, special, huge, tokens, odd)
    num = st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, 1, 0.5, 1e30, -1e30, 2**70, "1", None, True])
    adapters = st.one_of(
        st.sampled_from(["auto", "base", "nope", "", None, 3, [], {}, ["nope"], names[:1], names[:2]]),
        st.dictionaries(st.sampled_from(names + ["nope", ""]), num, max_size=3),
        st.lists(st.sampled_from(names + ["nope"]) | odd, max_size=3))
    message = st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "", None, 5]),
                               "content": text | special | odd}),
        st.dictionaries(st.sampled_from(["role", "content", "x"]), text | odd, max_size=3), odd)
    messages = st.one_of(st.lists(message, max_size=4), odd, text)
    kw = st.fixed_dictionaries({}, optional={
        "adapters": adapters,
        "max_tokens": st.sampled_from([0, -1, 1, 2, 10**9, 2**63, "5", 1.5, None, True, math.nan]),
        "temperature": num, "top_p": num, "top_k": st.sampled_from([-1, 0, 5, 10**12, "5", None, 1.5]),
        "seed": st.sampled_from([-1, 0, 2**70, "s", None, 1.5]),
        "stop": st.one_of(text, st.lists(text | odd, max_size=3), odd),
        "stream": st.booleans(),
        "k": st.sampled_from([0, -1, 1, 2, 10**9, 1.5, "3", None, math.nan, True]),
        "signal": st.sampled_from(["norm", "entropy", "nope", "", None, 1]),
        "calibration": st.sampled_from(["raw", "ratio", "zscore", "minmax", None]),
        "merge": st.sampled_from(["mixture", "packed", "fusion", "nope", None]),
        "prefill": st.sampled_from(["exact", "probe-cache", "nope"]),
        "probe_input": st.sampled_from(["residual", "normed", "nope"]),
        "keep": st.sampled_from([0, 0.5, 1, 2, -1, math.nan, "x"]),
        "bogus": st.just(1),
    })
    return st.one_of(st.tuples(st.just("create_completion"), prompt, kw),
                     st.tuples(st.just("create_chat_completion"), messages, kw),
                     st.tuples(st.just("route"), prompt | messages, kw))


GENERATION_ONLY = {"adapters", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream"}


def _api_worker(spec: dict) -> None:
    _quiet_llama()
    warnings.simplefilter("ignore")
    from hypothesis import HealthCheck, Phase, given, seed, settings

    from .engine import Engine
    from .errors import LogoEdgeError

    eng = Engine(spec["model"], spec["adapters"], n_ctx=256, n_batch=64, kv_type="f32", flash_attn=False)
    names = eng.pool.names
    _alarm(spec["per_call_s"])
    n = [0]
    seen: set = set()

    def healthy() -> bool:
        try:
            out = eng.create_completion("Hello there", max_tokens=2)
            return bool(out["choices"])
        except Exception as e:
            _emit(event="note", text=f"engine unusable after a fuzzed call: {type(e).__name__}: {e}")
            return False

    @settings(max_examples=spec["count"], deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate])
    @seed(spec["seed"])
    @given(_api_strategy(names))
    def prop(call):
        method, first, kw = call
        if method == "route":
            kw = {k: v for k, v in kw.items() if k not in GENERATION_ONLY}
        _emit(event="current", call=[method, repr(first)[:200], repr(kw)[:300]])
        peak = _peak_mb()
        signal.alarm(spec["per_call_s"])
        extra = {}
        try:
            res = getattr(eng, method)(first, **kw)
            if kw.get("stream") and method != "route":
                res = list(res)
            outcome = "ok"
        except _Hang:
            outcome = "hung"
        except LogoEdgeError:
            outcome = "typed"
        except (ValueError, TypeError) as e:
            msg = str(e)
            named = any(k in msg for k in kw) or any(w in msg for w in ("prompt", "messages", "message", "content",
                                                                        "role", "token", "argument"))
            outcome = "typed" if named else "unnamed"
            if not named:
                extra["unnamed"] = 0
                sig = (type(e).__name__, msg[:40])
                if sig not in seen:
                    seen.add(sig)
                    _emit(event="note", text=f"{type(e).__name__} not naming the argument: {msg[:160]!r} "
                                             f"from {method}({repr(first)[:80]}, **{repr(kw)[:160]})")
        except Exception as e:
            outcome = "untyped"
            sig = (type(e).__name__, str(e)[:40])
            if sig not in seen:
                seen.add(sig)
                _emit(event="failure", what="untyped", detail=f"{type(e).__name__}: {str(e)[:200]} from "
                      f"{method}({repr(first)[:120]}, **{repr(kw)[:200]})")
        finally:
            signal.alarm(0)
        if _peak_mb() - peak > MEMORY_LIMIT_MB:
            outcome = "memory"
        n[0] += 1
        if n[0] % 25 == 0 and not healthy():
            extra["broken"] = 1
        _emit(event="outcome", outcome=outcome, extra=extra)

    prop()
    if not healthy():
        _emit(event="outcome", outcome="broken")
    eng.close()


def fuzz_api(model: Path, adapters: Path, count: int, out: Path, per_call_s: int = 20) -> Figures:
    fig = Figures("python api")
    t0 = time.monotonic()
    b = 0
    while fig.counts["tried"] < count and b < 5:
        spec = dict(model=str(model), adapters=str(adapters), count=count - fig.counts["tried"], seed=2000 + b,
                    batch=b, out=str(out), work=str(out / f"api-{b}"), per_call_s=per_call_s)
        cur = _run_child("api", spec, first_s=300, each_s=per_call_s + 20, figures=fig, out=out)
        if cur is not None:
            fig.fail[-1] = (fig.fail[-1][0], f"{fig.fail[-1][1]}; call {cur.get('call')}", None)
        b += 1
    fig.seconds = time.monotonic() - t0
    return fig


# ---------------------------------------------------------------- 2. requests: the HTTP server


def _body_strategy(names: list[str]):
    from hypothesis import strategies as st

    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                     st.text(max_size=20), st.sampled_from(["\ud800", "<|im_start|>" * 20]))
    anyjson = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                      max_size=3), max_leaves=8)
    text = st.text(max_size=40) | st.sampled_from(["", "\ud800", "\udfff", "<|im_start|>" * 50, "<|im_end|>",
                                                   "x" * 3000])
    num = st.one_of(st.sampled_from([0, -1, 1, 2, 0.5, 1e308, -1e308, 2**63, 2**64, 10**30, "1", None, True]),
                    anyjson)
    msg = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer",
                                                                    "tool", ""]),
                                           "content": text | st.lists(st.fixed_dictionaries(
                                               {"type": st.sampled_from(["text", "image"]), "text": text}),
                                               max_size=2) | anyjson}), anyjson)
    lora = st.lists(st.fixed_dictionaries({}, optional={"id": num, "name": st.sampled_from(names + ["nope", ""]),
                                                        "scale": num}), max_size=3)
    common = {"model": st.sampled_from(names + ["nope", "", None, "tiny"]) | anyjson,
              "max_tokens": num, "temperature": num, "top_p": num, "top_k": num, "seed": num,
              "stop": text | st.lists(text | anyjson, max_size=3) | anyjson, "stream": st.booleans() | anyjson,
              "lora": lora | anyjson, "logo": st.fixed_dictionaries({}, optional={
                  "k": num, "signal": st.sampled_from(["norm", "entropy", "x"]) | anyjson,
                  "merge": st.sampled_from(["packed", "fusion", "x"]), "keep": num, "prefill": st.just("probe-cache"),
                  "calibration": st.sampled_from(["raw", "ratio", "nope"])}) | anyjson,
              "n": num, "logprobs": num, "logit_bias": anyjson, "stream_options": anyjson,
              "max_completion_tokens": num, "bogus": anyjson}
    completion = st.fixed_dictionaries(
        {"prompt": text | st.lists(st.integers(-3, 70000), max_size=8) | st.lists(text, max_size=3) | anyjson},
        optional=common)
    chat = st.fixed_dictionaries({"messages": st.lists(msg, max_size=3) | anyjson}, optional=common)
    load = st.fixed_dictionaries({}, optional={"lora_name": text | anyjson, "lora_path": st.sampled_from(
        ["/etc/passwd", "../../x.gguf", "", "/", "nope.gguf", "\x00", "/dev/zero"]) | text | anyjson})
    as_bytes = st.builds(lambda v: json.dumps(v).encode(), st.one_of(completion, chat))
    raw = st.one_of(st.binary(max_size=200), st.sampled_from([b"", b"{", b"null", b"[]", b'{"prompt": "\xff\xfe"}',
                                                             b'{"prompt": "a"' + b" " * 70000 + b"}",
                                                             b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                                                             ]))
    return st.one_of(
        st.tuples(st.just("/v1/completions"), as_bytes | st.builds(lambda v: json.dumps(v).encode(), completion)),
        st.tuples(st.just("/v1/chat/completions"), st.builds(lambda v: json.dumps(v).encode(), chat) | raw),
        st.tuples(st.just("/v1/completions"), raw),
        st.tuples(st.just("/v1/load_lora_adapter"), st.builds(lambda v: json.dumps(v).encode(), load)),
    )


def _request(url: str, method: str, path: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request(method, path, body=body, headers={"Content-Type": "application/json"} if body is not None else {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def fuzz_server(model: Path, adapters: Path, count: int, batch: int, out: Path, per_request_s: int = 60) -> Figures:
    """`count` fuzzed bodies to a live server, checked after each `batch` (health and a normal request)."""
    from hypothesis import HealthCheck, Phase, given, seed, settings

    from .serve.process import child_server, free_port

    fig = Figures("http server")
    t0 = time.monotonic()
    names = sorted(p.stem for p in adapters.glob("*.gguf"))
    bodies_dir = out / "server"
    bodies_dir.mkdir(exist_ok=True)
    seen: set = set()

    def start(stack):
        port = free_port()
        cmd = [sys.executable, "-m", "logo_edge.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--model", str(model), "--adapters", str(adapters), "--adapter-dir", str(adapters),
               "--n-ctx", "256", "--max-tokens-limit", "32", "--max-body-kb", "64", "--model-name", "tiny"]
        env = {**os.environ, "LLAMA_LOG_LEVEL": "error"}
        url, proc, log = stack.enter_context(child_server(f"server-{fig.counts['restarts']}", cmd, port, env,
                                                          bodies_dir))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the server exited before answering:\n" + log.read_text()[-2000:])
            try:
                if _request(url, "GET", "/health", timeout=2)[0] == 200:
                    return url, proc
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not answer /health within 300 s")

    def check(url, proc) -> bool:
        if proc.poll() is not None:
            return False
        try:
            ok = _request(url, "GET", "/health", timeout=30)[0] == 200
            normal = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()
            return ok and _request(url, "POST", "/v1/completions", normal, timeout=60)[0] == 200
        except OSError:
            return False

    from contextlib import ExitStack

    stack = ExitStack()
    try:
        url, proc = start(stack)
        state = {"url": url, "proc": proc, "n": 0}

        @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.generate])
        @seed(3000)
        @given(_body_strategy(names))
        def prop(req):
            path, body = req
            fig.counts["tried"] += 1
            try:
                status, resp = _request(state["url"], "POST", path, body, timeout=per_request_s)
            except TimeoutError:
                status, resp = "timeout", b""
            except OSError as e:
                status, resp = f"no answer ({type(e).__name__})", b""
            if status == "timeout":
                fig.counts["hung"] += 1
            elif isinstance(status, str):
                fig.counts["5xx"] += 1
            else:
                fig.counts[f"{status // 100}xx"] += 1
                if 400 <= status < 500:
                    fig.counts[str(status)] += 1
            if isinstance(status, str) or status >= 500:
                sig = (path, status, resp[:60])
                if sig not in seen:
                    seen.add(sig)
                    f = bodies_dir / f"body-{status}-{hashlib.sha256(body).hexdigest()[:10]}.json"
                    f.write_bytes(body)
                    fig.fail.append((f"HTTP {status}", f"POST {path} {body[:200]!r} -> {resp[:300]!r}", str(f)))
            state["n"] += 1
            if state["n"] % batch == 0 and not check(state["url"], state["proc"]):
                fig.counts["restarts"] += 1
                fig.fail.append(("restarts", f"server failed its check after {state['n']} requests", None))
                state["url"], state["proc"] = start(stack)

        prop()
        if not check(state["url"], state["proc"]):
            fig.counts["restarts"] += 1
            fig.fail.append(("restarts", "server failed its final check", None))
    finally:
        stack.close()
    fig.seconds = time.monotonic() - t0
    return fig


# ---------------------------------------------------------------- 3. calibration cache


@contextlib.contextmanager
def restored_env(name: str):
    """Whatever the block does to os.environ[name], it is as before afterwards."""
    saved = os.environ.get(name)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def check_cache(out: Path) -> Figures:
    """Corrupt a calibration cache file in several ways; each must be detected, rebuilt and never used."""
    import numpy as np

    from . import calibration

    fig = Figures("calibration cache")
    t0 = time.monotonic()
    model = out / "cache-model.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    n = len(calibration.calibration_prompts())
    rng = np.random.default_rng(0)
    good = rng.normal(size=(n, 2, 8)).astype(np.float32)
    calls = [0]

    def probe(_p):
        calls[0] += 1
        return good[calls[0] - 1]

    def corruptions(p: Path):
        data = p.read_bytes()
        h = calibration._hash_path(p)
        yield "truncated", lambda: p.write_bytes(data[: len(data) // 2])
        yield "empty", lambda: p.write_bytes(b"")
        yield "flipped data byte", lambda: p.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
        yield "flipped header byte", lambda: p.write_bytes(data[:20] + bytes([data[20] ^ 8]) + data[21:])
        yield "other array", lambda: np.save(p, np.ones((n, 2, 8), np.float32))
        yield "hash removed", lambda: h.unlink()
        yield "hash tampered", lambda: h.write_text("0" * 64)
        yield "pickle", lambda: p.write_bytes(b"\x80\x04K\x01.")

    with restored_env("LOGO_EDGE_CACHE"):
        os.environ["LOGO_EDGE_CACHE"] = str(out / "cache")
        first = calibration.calibration_states(model, [0, 1], "attn_q", "residual", probe)
        path = calibration.states_path(model, [0, 1], "attn_q", "residual")
        for what, corrupt in corruptions(path):
            fig.counts["tried"] += 1
            corrupt()
            calls[0] = 0
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                got = calibration.calibration_states(model, [0, 1], "attn_q", "residual", probe)
            warned = any(issubclass(x.category, calibration.CacheWarning) for x in w)
            if calls[0] != n or not np.array_equal(got, first):
                fig.counts["used_corrupt"] += 1
                fig.fail.append(("used_corrupt", f"{what}: the corrupt cache was used", None))
            elif not warned:
                fig.counts["silent"] += 1
                fig.notes.append(f"{what}: rebuilt without a message")
            else:
                fig.counts["rebuilt"] += 1
            calls[0] = 0
            again = calibration.calibration_states(model, [0, 1], "attn_q", "residual", probe)
            if calls[0] != 0 or not np.array_equal(again, first):
                fig.counts["used_corrupt"] += 1
                fig.fail.append(("used_corrupt", f"{what}: the rebuilt cache is not reused", None))
        leftovers = [p.name for p in path.parent.iterdir() if ".part" in p.name]
        if leftovers:
            fig.notes.append(f"temporary files left: {leftovers}")
            fig.counts["used_corrupt"] += 1
    fig.seconds = time.monotonic() - t0
    return fig


# ---------------------------------------------------------------- the whole battery

PLANS = {  # part -> (count, batch) ; quick fits ~2 minutes, full ~20 on 2 cores
    "quick": dict(adapters=(150, 150), api=50, server=(50, 25), kills=12, soak=(300, 30)),
    "full": dict(adapters=(2400, 400), api=400, server=(400, 50), kills=50, soak=(10000, 2000)),
}


def run(quick: bool = False, out: Path | None = None, model: str | None = None, adapters: str | None = None,
        parts: tuple[str, ...] = ("adapters", "api", "server", "cache", "kills"), print_fn=print) -> list[Figures]:
    plan = PLANS["quick" if quick else "full"]
    keep = out is not None
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="logo-edge-check-"))
    out.mkdir(parents=True, exist_ok=True)
    model_path, adapter_dir = target(model, adapters)
    print_fn(f"battery ({'quick' if quick else 'full'}) on {model_path.name} with {adapter_dir}; output in {out}")
    figs = []
    if "cache" in parts:
        figs.append(check_cache(out))
        print_fn(_line(figs[-1]))
    if "adapters" in parts:
        n, b = plan["adapters"]
        figs.append(fuzz_adapters(model_path, adapter_dir, n, b, out))
        print_fn(_line(figs[-1]))
    if "api" in parts:
        figs.append(fuzz_api(model_path, adapter_dir, plan["api"], out))
        print_fn(_line(figs[-1]))
    if "server" in parts:
        n, b = plan["server"]
        figs.append(fuzz_server(model_path, adapter_dir, n, b, out))
        print_fn(_line(figs[-1]))
    if "kills" in parts:  # logo_edge/battery_kills.py: writers killed at random moments
        from .battery_kills import run_kills

        for f in run_kills(model_path, adapter_dir, plan["kills"], out):
            figs.append(f)
            print_fn(_line(f))
    if "soak" in parts:  # logo_edge/battery_soak.py: opt-in (--parts soak), minutes in the full run
        from .battery_soak import run_soak

        for f in run_soak(model_path, *plan["soak"], quick, out):
            figs.append(f)
            print_fn(_line(f))
    print_fn(table(figs))
    if not keep and not any(f.bad for f in figs):
        shutil.rmtree(out, ignore_errors=True)
    return figs


def _line(f: Figures) -> str:
    return f"[{f.part}] {f.seconds:.0f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(f.counts.items()))


COLUMNS = [("tried", "tried"), ("typed", "typed err"), ("accepted", "accepted/ok"), ("crashed", "crashed"),
           ("hung", "hung"), ("memory", "memory"), ("untyped", "untyped"), ("late", "late"), ("5xx", "5xx"),
           ("restarts", "restarts")]


def table(figs: list[Figures]) -> str:
    head = f"{'part':<18}" + "".join(f"{h:>12}" for _, h in COLUMNS) + f"{'time s':>9}"
    rows = [head, "-" * len(head)]
    for f in figs:
        c = f.counts
        vals = {"typed": c["typed"] + c["unnamed"] + c["4xx"] + c["rebuilt"] + c["silent"],
                "accepted": c["accepted"] + c["ok"] + c["2xx"]}
        rows.append(f"{f.part:<18}" + "".join(f"{vals.get(k, c[k]):>12}" for k, _ in COLUMNS) + f"{f.seconds:>9.0f}")
    for f in figs:
        extra = {k: v for k, v in sorted(f.counts.items()) if k.isdigit() or k in (
            "unnamed", "silent", "broken", "used_corrupt", "rebuilt", "partial", "errors", "leak", "old_left",
            "new_left", "absent", "temp_left", "finished", "handles_alive", "lru_len", "rss_start_mb", "rss_end_mb")}
        if extra:
            rows.append(f"  {f.part}: " + ", ".join(f"{k}: {v}" for k, v in extra.items()))
        for what, detail, file in f.fail:
            rows.append(f"  FAIL {f.part}: {what}: {detail}" + (f" [{file}]" if file else ""))
        for note in f.notes[:12]:
            rows.append(f"  note {f.part}: {note}")
    bad = sum(f.bad for f in figs)
    rows.append("OK: every must-be-zero figure is zero" if not bad else f"FAILED: {bad} must-be-zero events")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="logo_edge.battery", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the quick subset (about 2 minutes)")
    p.add_argument("--out", help="keep inputs, logs and failing files here")
    p.add_argument("--model", help="base GGUF (default: the tests' tiny model in a checkout, else the default)")
    p.add_argument("--adapters", help="directory of GGUF adapters for --model (the seeds and the pool)")
    p.add_argument("--parts", nargs="+", default=["cache", "adapters", "api", "server", "kills"],
                   choices=["cache", "adapters", "api", "server", "kills", "soak"],
                   help="soak (battery_soak.py, ~10 min in the full run) runs only when named")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, spec = args.worker
        {"adapters": _adapter_worker, "api": _api_worker}[kind](json.loads(spec))
        return 0
    figs = run(args.quick, args.out, args.model, args.adapters, tuple(args.parts))
    return 1 if any(f.bad for f in figs) else 0


if __name__ == "__main__":
    sys.exit(main())
