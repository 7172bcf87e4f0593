"""The native patch and the ctypes layer: the patch applies, the struct mirror fits, the callback disarms."""

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from logo_edge.native import build


def test_patch_applies_cleanly_to_the_pinned_tree():
    for patch in build.PATCHES:  # raises BuildError naming the patch, with patch's output, if not
        build.check_patch(build.source_tree(), patch)


def test_patch_failure_is_reported(tmp_path):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "llama.h").write_text("// not llama.cpp\n")
    with pytest.raises(build.BuildError, match="does not apply"):
        build.check_patch(tmp_path, build.PATCHES[0])


def test_build_is_cached_by_key():
    d = build.build()  # the library the session already uses: returns at once
    assert (d / "libllama.so").exists() or (d / "libllama.dylib").exists()
    assert build.build_key("cpu", []) != build.build_key("cuda", [])
    assert build.build_key("cpu", []) != build.build_key("cpu", ["-DGGML_NATIVE=OFF"])


def test_struct_mirror_matches_the_library():
    from logo_edge import _lib

    assert ctypes.sizeof(_lib.GGMLTensor) + _lib.GGML_OBJECT_SIZE == _lib.ggml_tensor_overhead()


def test_struct_mirror_reads_every_field_as_the_library_does(ggml):
    """Every field the probe reads (type, ne, nb, op, src, name, data), and the others, against ggml's own
    accessors on tensors ggml made: an independent check of each offset, not just the struct's size."""
    from logo_edge import _lib

    lib, ctx = ggml
    T = _lib.GGMLTensor.from_address
    a = lib.ggml_new_tensor_2d(ctx, 0, 64, 5)  # f32
    b = lib.ggml_new_tensor_2d(ctx, 0, 64, 5)
    q = lib.ggml_new_tensor_2d(ctx, 8, 64, 3)  # q8_0: blocks of 32, a row is not ne0 * type size
    c = lib.ggml_add(ctx, a, b)
    lib.ggml_set_name(c, b"sum-0")
    lib.ggml_set_input(a)
    for t, typ, ne in ((a, 0, (64, 5)), (q, 8, (64, 3))):
        m = T(t)
        assert m.type == typ and tuple(m.ne) == (*ne, 1, 1) and lib.ggml_n_dims(t) == 2
        assert m.nb[0] == lib.ggml_type_size(typ) and m.nb[1] == lib.ggml_row_size(typ, ne[0])
        assert m.nb[3] * m.ne[3] == lib.ggml_nbytes(t)
        assert m.data == lib.ggml_get_data(t) and m.data  # allocated in the ggml context
    assert T(q).nb[1] != 64 * T(q).nb[0]  # the q8_0 case tells nb[1] from ne0 * nb[0]
    m = T(c)
    assert m.op == _lib.GGML_OP_ADD and lib.ggml_op_desc(c) == b"ADD"  # the library reads op itself
    assert (m.src[0], m.src[1], m.src[2]) == (a, b, None)
    assert m.name == b"sum-0" == ctypes.string_at(_lib.ggml_get_name(c))
    assert T(a).flags & 1 and not T(b).flags & 1  # GGML_TENSOR_FLAG_INPUT
    v = lib.ggml_view_2d(ctx, a, 32, 2, T(a).nb[1], 8)
    assert (T(v).view_src, T(v).view_offs, T(v).data) == (a, 8, T(a).data + 8)
    tr = lib.ggml_transpose(ctx, a)
    assert lib.ggml_is_transposed(tr) and (T(tr).nb[0], T(tr).nb[1]) == (T(a).nb[1], T(a).nb[0])
    s = lib.ggml_scale(ctx, a, 0.25)
    assert ctypes.cast(T(s).op_params, ctypes.POINTER(ctypes.c_float))[0] == 0.25
    for op, name in ((_lib.GGML_OP_ADD, b"ADD"), (_lib.GGML_OP_MUL, b"MUL"), (_lib.GGML_OP_NORM, b"NORM"),
                     (_lib.GGML_OP_RMS_NORM, b"RMS_NORM"), (_lib.GGML_OP_COUNT - 1, b"GLU")):
        assert _lib.ggml_op_name(op) == name  # the enum values the probe checks, and the table's end


def test_norm_input_is_read_through_the_norm_only(ggml):
    """attn_norm-0 = MUL(RMS_NORM or NORM(x), w) hands back x; any other graph is a ProbeError, never a
    wrong tensor read silently."""
    from logo_edge import _lib
    from logo_edge.errors import ProbeError
    from logo_edge.llm import _norm_input

    lib, ctx = ggml
    T = _lib.GGMLTensor.from_address
    x = lib.ggml_new_tensor_2d(ctx, 0, 16, 3)
    w = lib.ggml_new_tensor_2d(ctx, 0, 16, 1)
    for norm in (lib.ggml_rms_norm, lib.ggml_norm):
        attn_norm = lib.ggml_mul(ctx, norm(ctx, x, 1e-6), w)
        lib.ggml_set_name(attn_norm, b"attn_norm-0")
        assert _norm_input(T(attn_norm)) == x
    for other, found in ((lib.ggml_mul(ctx, lib.ggml_scale(ctx, x, 2.0), w), r"MUL\(SCALE"),
                         (lib.ggml_add(ctx, lib.ggml_rms_norm(ctx, x, 1e-6), w), r"ADD\(RMS_NORM"),
                         (lib.ggml_mul(ctx, x, w), r"MUL\(NONE")):
        lib.ggml_set_name(other, b"attn_norm-0")
        with pytest.raises(ProbeError, match=found + r".*another norm graph.*probe_input='normed'"):
            _norm_input(T(other))


def test_probe_callback_stops_and_reports_an_unknown_graph():
    """The callback never lets an exception escape into ctypes: it stops the graph and run() raises it."""
    from types import SimpleNamespace

    from logo_edge import _lib
    from logo_edge.errors import ProbeError
    from logo_edge.llm import ProbeCapture

    x = _lib.GGMLTensor(op=_lib.GGML_OP_ADD, name=b"inp_embd")  # a fake graph: attn_norm-0 = MUL(ADD(...))
    norm_in = _lib.GGMLTensor(op=_lib.GGML_OP_ADD, name=b"norm-0")
    norm_in.src[0] = ctypes.addressof(x)
    attn_norm = _lib.GGMLTensor(op=_lib.GGML_OP_MUL, name=b"attn_norm-0")
    attn_norm.src[0] = ctypes.addressof(norm_in)
    ctx = SimpleNamespace(model=SimpleNamespace(n_layer=2, n_embd=4))
    cap = ProbeCapture(ctx, [0, 1], "attn_q", "residual")
    addr = ctypes.addressof(attn_norm)
    assert cap._callback(addr, True, None) is True  # asked for it
    assert cap._callback(addr, False, None) is False  # stop: the graph is not the one the probe reads
    with pytest.raises(ProbeError, match=r"attn_norm-0 = MUL\(RMS_NORM or NORM\(x\), weight\).*MUL\(ADD"):
        raise cap._error


@pytest.mark.slow
def test_callback_sees_named_tensors_and_is_disarmed_after_the_probe(tiny):
    from logo_edge import _lib
    from logo_edge.llm import Context, ContextConfig, Model, ProbeCapture

    model = Model(tiny / "tiny-f32.gguf")
    ctx = Context(model, ContextConfig(n_ctx=64))
    cap = ProbeCapture(ctx, 2, "attn_q", "normed", stop_early=False)
    calls, names = [], []
    inner = cap._callback

    def spy(t, ask, ud):
        tensor = _lib.GGMLTensor.from_address(t)
        # the mirror's fields agree with the library's accessors
        assert tensor.name == ctypes.string_at(_lib.ggml_get_name(t))
        assert int(np.prod(tensor.ne[:4])) == _lib.ggml_nelements(t)
        calls.append(ask)
        names.append(tensor.name)
        return inner(t, ask, ud)

    cap._cb = _lib.EvalCallback(spy)
    h = cap.run(model.tokenize("hello world"))
    assert h.shape == (model.n_embd,) and np.isfinite(h).all()
    assert b"attn_norm-2" in names and b"l_out-3" in names  # no early stop: the whole graph ran
    n = len(calls)
    ctx.decode(model.tokenize("and now a plain decode"), 0)  # the callback must not run any more
    assert len(calls) == n
    early = ProbeCapture(ctx, 1, "attn_q", "normed")  # stop_early: nothing after the target runs
    seen = []
    early_inner = early._callback
    early._cb = _lib.EvalCallback(lambda t, a, u: (seen.append(_lib.GGMLTensor.from_address(t).name),
                                                   early_inner(t, a, u))[1])
    np.testing.assert_array_equal(early.run(model.tokenize("hello world")),
                                  ProbeCapture(ctx, 1, "attn_q", "normed", stop_early=False).run(
                                      model.tokenize("hello world")))
    assert b"l_out-2" not in seen
    # the nodes asked about are the nodes that ran; a CPU graph is one split, so it stops at the target
    assert cap.nodes_asked == calls.count(True) and early.nodes_asked == len(seen) - 1 < cap.nodes_asked / 2


def _seq_rm_refusing_partial(monkeypatch):
    """Make llama_memory_seq_rm behave as for a recurrent model: a partial removal returns false."""
    from logo_edge._lib import llama_cpp

    real = llama_cpp.llama_memory_seq_rm
    monkeypatch.setattr(llama_cpp, "llama_memory_seq_rm", lambda mem, s, p0, p1: p0 <= 0 and real(mem, s, p0, p1))


@pytest.mark.slow
def test_cache_truncate_says_what_it_kept(tiny, monkeypatch):
    from logo_edge.errors import NativeCallError
    from logo_edge.llm import Context, ContextConfig, Model, ProbeCapture

    model = Model(tiny / "tiny-f32.gguf")
    ctx = Context(model, ContextConfig(n_ctx=64, kv_type="f32"))
    tokens = model.tokenize("the cache keeps a prefix of this prompt")
    ctx.decode(tokens, 0)
    assert ctx.cache_truncate(4) == 4 and ctx.cache_len() == 4
    want = ProbeCapture(ctx, 1, "attn_q", "residual").run(tokens)
    _seq_rm_refusing_partial(monkeypatch)
    ctx.decode(tokens, 0)
    with pytest.raises(NativeCallError, match=r"llama_memory_seq_rm returned False: this model.*cannot drop the cached "
                                              r"positions >= 4.*whole sequence was cleared.*reset_ok=True"):
        ctx.cache_truncate(4)
    assert ctx.cache_len() == 0  # cleared, not half-truncated: usable
    ctx.decode(tokens, 0)
    assert ctx.cache_truncate(4, reset_ok=True) == 0 and ctx.cache_len() == 0
    assert ctx.cache_truncate(0) == 0
    cap = ProbeCapture(ctx, 1, "attn_q", "residual")
    ctx.decode(tokens[:-1], 0)
    np.testing.assert_array_equal(cap.run(tokens, keep_cache=True, n_keep=len(tokens) - 1), want)
    assert cap.n_reused == 0  # the probe decoded everything again instead of reading a wrong prefix


@pytest.mark.slow
def test_failed_adapter_set_names_the_code_and_sets_again(tiny, monkeypatch):
    from logo_edge._lib import llama_cpp
    from logo_edge.errors import AdapterError
    from logo_edge.llm import Context, ContextConfig, Model

    model = Model(tiny / "tiny-f32.gguf")
    ctx = Context(model, ContextConfig(n_ctx=64))
    h = model.load_lora(tiny / "gguf" / "qv_r8.gguf")
    real = llama_cpp.llama_set_adapters_lora
    monkeypatch.setattr(llama_cpp, "llama_set_adapters_lora", lambda *a: -1)
    with pytest.raises(AdapterError, match=r"llama_set_adapters_lora returned -1: .*did not set the mixture of 1"):
        ctx.set_adapters([h], [1.0])
    assert h.key in ctx.adapter_keys  # may be set: not to be freed
    monkeypatch.setattr(llama_cpp, "llama_set_adapters_lora", real)
    assert ctx.set_adapters([h], [1.0])  # not taken for already set: llama.cpp is called again
    assert ctx.adapter_keys == {h.key}
    ctx.close()
    h.free()


@pytest.mark.slow
def test_probe_on_an_unknown_norm_graph_raises_and_leaves_the_context_usable(tiny, monkeypatch):
    from logo_edge import _lib, llm
    from logo_edge.errors import ProbeError
    from logo_edge.llm import Context, ContextConfig, Model, ProbeCapture

    model = Model(tiny / "tiny-f32.gguf")
    ctx = Context(model, ContextConfig(n_ctx=64))
    tokens = model.tokenize("hello world")
    monkeypatch.setattr(llm, "_NORM_OPS", (_lib.GGML_OP_NORM,))  # the tiny llama's RMS_NORM is now unknown
    with pytest.raises(ProbeError, match=r"attn_norm-0 = MUL.*has MUL\(RMS_NORM"):
        ProbeCapture(ctx, [0, 1], "attn_q", "residual").run(tokens, keep_cache=True)
    assert ctx.cache_len() == 0
    h = ProbeCapture(ctx, [1, 2], "attn_q", "residual").run(tokens)  # blocks >= 1 never read through the norm
    assert h.shape == (2, model.n_embd) and np.isfinite(h).all()


def test_missing_library_says_what_to_run(tmp_path):
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", "import logo_edge._lib"], env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert "patched libllama was not found" in res.stderr and "logo-edge build" in res.stderr


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_each_native_library_is_loaded_once():
    """libllama, libggml, libggml-base and libggml-cpu are each mapped from one file: a second copy opened by another
    name (the cache holds file copies, not symlinks) has its own globals, and what it is asked is not what ran."""
    code = r"""
import re
import logo_edge._lib
from logo_edge import Engine  # the engine's imports open nothing more
files = {m.group(1) for m in map(re.compile(r"(/\S*/lib(?:ggml|llama)\S*)").search, open("/proc/self/maps")) if m}
print("\n".join(sorted(files)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    stems = [Path(f).name.split(".")[0] for f in out]
    assert sorted(set(stems)) == ["libggml", "libggml-base", "libggml-cpu", "libllama"], out
    assert len(stems) == len(set(stems)), f"a library is loaded twice: {out}"
