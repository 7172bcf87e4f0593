"""The native patch and the ctypes layer: the patch applies, the struct mirror fits, the callback disarms."""

import ctypes
import os
import subprocess
import sys

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


def test_missing_library_says_what_to_run(tmp_path):
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", "import logo_edge._lib"], env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert "patched libllama was not found" in res.stderr and "logo-edge build" in res.stderr
