"""The fused one-token LoRA (native/llama-lora-fused-decode.patch) against llama.cpp's own unfused graph.

A decoded token's LoRA products, res + s B (A x), run as one node of the CPU backend instead of
mul_mat, mul_mat, [scale,] add. The reference is the same library with the fusion switched off
(GGML_CPU_DISABLE_LORA_FUSION=1, read once per process, so each side runs in a child process): the same
tokens, the same logits to float32 rounding, on f32 and f16 adapters, packed (scale 1, no scale node)
and per adapter (a scale node each), on 1, 2 and 3 threads (the rows of A x shared out unevenly).
The count of fused products proves the fusion ran on one side and not on the other; the PEFT reference
tests (test_reference.py) check the same decode against PyTorch.
"""

import ctypes
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

WEIGHTS = {"qv_r8": 0.6, "all7_r4": 0.3, "rs_r16": 0.1}
N_TOKENS = 6

CHILD = r"""
import json, sys
import numpy as np
from logo_edge import _lib
from logo_edge.engine import Engine, SamplingConfig

model, adapter_dir, weights, n_tokens, out = sys.argv[1:6]
weights, n_tokens = json.loads(weights), int(n_tokens)
result = {}
for threads in (1, 2, 3):
    with Engine(model, adapter_dir, n_ctx=256, n_batch=64, n_threads=threads, kv_type="f32", flash_attn=False,
                routing=None) as eng:
        for merge in ("packed", "mixture"):
            # a prompt's prefill fuses only what runs on its last row (the last block, after llama.cpp drops
            # the other rows): counted on one prompt, then each decoded token's share on another
            before = _lib.lora_fused_nodes()
            list(eng.stream(eng.tokenize("Alpha: a prompt prefilled alone"), weights,
                            SamplingConfig(max_tokens=1), merge=merge))
            prefill = _lib.lora_fused_nodes() - before
            before = _lib.lora_fused_nodes()
            steps = list(eng.stream(eng.tokenize("Omega: the fused product gives the same answer"), weights,
                                    SamplingConfig(max_tokens=n_tokens, ignore_eos=True), merge=merge))
            rec = steps[-1][2]
            result[f"{merge}-{threads}"] = {
                "text": "".join(s[0] for s in steps), "tokens": rec.timings.completion_tokens,
                "prefill": prefill, "fused": _lib.lora_fused_nodes() - before - prefill,
                "logits": eng.ctx.logits().tolist()}
    with Engine(model, adapter_dir, n_ctx=256, n_batch=64, n_threads=2, kv_type="f32", flash_attn=False,
                routing=None) as eng:
        list(eng.stream(eng.tokenize("Omega: the fused product gives the same answer"), "base",
                        SamplingConfig(max_tokens=n_tokens, ignore_eos=True)))
        result["base"] = {"logits": eng.ctx.logits().tolist()}
json.dump(result, open(out, "w"))
"""


def _adapted_weights(path) -> set[str]:
    from gguf import GGUFReader

    return {t.name.removesuffix(".lora_a") for t in GGUFReader(path).tensors if t.name.endswith(".lora_a")}


@pytest.fixture(scope="module")
def adapter_sets(tiny, tmp_path_factory):
    """The tiny adapters in f32 (as built) and converted again in f16."""
    from logo_edge.convert.lora import convert_lora

    f16 = tmp_path_factory.mktemp("f16")
    for name in WEIGHTS:
        convert_lora(tiny / "peft" / name, tiny / "hf", f16 / f"{name}.gguf", "f16", name=name)
    f32 = tmp_path_factory.mktemp("f32")
    for name in WEIGHTS:
        os.link(tiny / "gguf" / f"{name}.gguf", f32 / f"{name}.gguf")
    return {"f32": f32, "f16": f16}


def _run(tiny, adapters, tmp_path, fused: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GGML_CPU_DISABLE")}
    if not fused:
        env["GGML_CPU_DISABLE_LORA_FUSION"] = "1"
    out = tmp_path / f"{adapters.name}-{fused}.json"
    subprocess.run([sys.executable, "-c", CHILD, str(tiny / "tiny-f32.gguf"), str(adapters), json.dumps(WEIGHTS),
                    str(N_TOKENS), str(out)], env=env, check=True, timeout=600)
    return json.loads(out.read_text())


def test_fused_decode_matches_the_unfused_graph(tiny, adapter_sets, tmp_path):
    from logo_edge import _lib

    assert _lib.lora_fused_nodes() is not None, "the library lacks llama-lora-fused-decode.patch"
    runs = {(dtype, fused): _run(tiny, adapter_sets[dtype], tmp_path, fused)
            for dtype in adapter_sets for fused in (True, False)}
    for dtype, adapters in adapter_sets.items():
        fused, plain = runs[dtype, True], runs[dtype, False]
        per_adapter = [_adapted_weights(adapters / f"{n}.gguf") for n in WEIGHTS]
        expect = {"packed": len(set().union(*per_adapter)), "mixture": sum(len(w) for w in per_adapter)}
        if dtype == "f16" and platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
            expect = {"packed": 0, "mixture": 0}  # f16 weights are fused on x86 only (the patch says why)
        base = np.array(fused.pop("base")["logits"])
        plain.pop("base")
        for key, f in fused.items():
            p = plain[key]
            # the adapters move these logits far more than the tolerances below: a fused node that dropped
            # the product, or its scale, could not pass
            assert np.abs(np.array(p["logits"]) - base).max() > 0.05, key
            decodes = f["tokens"] - 1  # the first token comes from the prompt's prefill
            assert f["tokens"] == N_TOKENS and f["fused"] == expect[key.split("-")[0]] * decodes, (key, f["fused"])
            assert p["fused"] + p["prefill"] == 0, key
            assert f["text"] == p["text"], (dtype, key)
            diff = np.abs(np.array(f["logits"]) - np.array(p["logits"])).max()
            if dtype == "f32":
                assert diff < 1e-4, (key, diff)  # float32 rounding in another order
            else:
                # f16 weights take A x rounded to f16 (both ways); float32 rounding in another order can land a
                # value of A x on the other side of an f16 rounding step. That moves the logits far less than
                # storing the adapters in f16 instead of f32 does
                f16_cost = np.abs(np.array(p["logits"]) - np.array(runs["f32", False][key]["logits"])).max()
                assert diff < 0.2 * f16_cost, (key, diff, f16_cost)
        # every thread count computes the same function (1 thread: no sharing; 3: uneven shares of A x), to the
        # bounds above: the prompt's prefill is unfused, and llama.cpp's own kernels on 1 thread take other tiles
        # (measured unfused, f16 per adapter: 7e-4 between 1 and 2 threads, which the f16 rounding of A x amplifies)
        for merge in ("packed", "mixture"):
            for threads in (1, 3):
                diff = np.abs(np.array(fused[f"{merge}-{threads}"]["logits"]) -
                              np.array(fused[f"{merge}-2"]["logits"])).max()
                f16_cost = np.abs(np.array(runs["f16", False][f"{merge}-2"]["logits"]) -
                                  np.array(runs["f32", False][f"{merge}-2"]["logits"])).max()
                bound = 1e-4 if dtype == "f32" else 0.2 * f16_cost
                assert diff < bound, (dtype, merge, threads, diff, bound)


def test_base_model_decode_fuses_nothing(tiny_engine):
    from logo_edge import _lib
    from logo_edge.engine import SamplingConfig

    before = _lib.lora_fused_nodes()
    assert before is not None, "the library lacks llama-lora-fused-decode.patch"
    list(tiny_engine.stream(tiny_engine.tokenize("no adapters here"), "base",
                            SamplingConfig(max_tokens=4, ignore_eos=True)))
    assert _lib.lora_fused_nodes() == before


# ---- the fused node on graphs built here (ggml's C API): shapes, types and orders llama.cpp's graphs do not show

def _f16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float64)


@pytest.mark.parametrize("a_type, b_type, r, scale, order, inplace, n_tok", [
    ("f32", "f32", 11, None, "res+u", False, 1),   # a rank with a scalar tail, no scale node
    ("f32", "f16", 24, 0.37, "u+res", False, 1),   # f16 B (t rounded to f16), a scale node, the add's other order
    ("f16", "f32", 32, 1.7, "res+u", True, 1),     # f16 A (x rounded to f16), the output written over res
    ("f32", "f32", 16, None, "res+u", False, 3),   # three tokens: never fused, still right
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_node_computes_the_lora_product(ggml, a_type, b_type, r, scale, order, inplace, n_tok, threads):
    from logo_edge import _lib

    if "f16" in (a_type, b_type) and platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        pytest.skip("f16 weights are fused on x86 only")
    base, ctx = ggml
    cpu = _lib._ggml_cpu
    types = {"f32": (0, np.float32), "f16": (1, np.float16)}
    d_in, d_out = 40, 23
    rng = np.random.default_rng(r + threads)
    vals = {"A": rng.normal(size=(r, d_in)), "B": rng.normal(size=(d_out, r)), "x": rng.normal(size=(n_tok, d_in)),
            "res": rng.normal(size=(n_tok, d_out))}

    def tensor(name, typ, rows, cols):
        t = base.ggml_new_tensor_2d(ctx, types[typ][0], cols, rows)
        data = np.ascontiguousarray(vals[name], types[typ][1])
        ctypes.memmove(base.ggml_get_data(t), data.ctypes.data, data.nbytes)
        return t

    A, B = tensor("A", a_type, r, d_in), tensor("B", b_type, d_out, r)
    x, res = tensor("x", "f32", n_tok, d_in), tensor("res", "f32", n_tok, d_out)
    u = base.ggml_mul_mat(ctx, B, base.ggml_mul_mat(ctx, A, x))
    if scale is not None:
        u = base.ggml_scale(ctx, u, scale)
    add = base.ggml_add_inplace if inplace else base.ggml_add
    out = add(ctx, res, u) if order == "res+u" else add(ctx, u, res)
    graph = base.ggml_new_graph(ctx)
    base.ggml_build_forward_expand(graph, out)
    before = _lib.lora_fused_nodes()
    assert cpu.ggml_graph_compute_with_ctx(ctx, graph, threads) == 0
    fused = _lib.lora_fused_nodes() - before
    got = np.ctypeslib.as_array(ctypes.cast(base.ggml_get_data(out), ctypes.POINTER(ctypes.c_float)),
                                shape=(n_tok, d_out)).astype(np.float64)
    # the reference in float64, with the roundings mul_mat applies: x to f16 for an f16 A, A x to f16 for an f16 B
    a = _f16(vals["A"]) if a_type == "f16" else vals["A"].astype(np.float32)
    b = _f16(vals["B"]) if b_type == "f16" else vals["B"].astype(np.float32)
    xs = _f16(vals["x"]) if a_type == "f16" else vals["x"].astype(np.float32).astype(np.float64)
    t = xs @ a.T.astype(np.float64)
    if b_type == "f16":
        t = _f16(t.astype(np.float32))
    ref = vals["res"].astype(np.float32) + (t @ b.T.astype(np.float64)) * (1.0 if scale is None else scale)
    assert fused == (1 if n_tok == 1 else 0)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
