import ctypes
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny():
    """Directory with hf/ (tiny random llama), tiny-f32.gguf, peft/<name>/ and gguf/<name>.gguf."""
    import tiny as tiny_mod

    return tiny_mod.build(progress=lambda m: print(f"[fixture] {m}", file=sys.stderr))


@pytest.fixture(scope="session")
def tiny_engine(tiny):
    from logo_edge.engine import Engine

    with pytest.warns(UserWarning, match="od_only"):
        eng = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=512, n_batch=64, kv_type="f32", flash_attn=False)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def hf_tiny(tiny):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM.from_pretrained(tiny / "hf", torch_dtype=torch.float32).eval()


class _InitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@pytest.fixture
def ggml():
    """ggml's own C API (libggml-base, beside libllama; graph compute from libggml-cpu) and a 16 MiB ggml context
    to build tensors and graphs in."""
    from logo_edge import _lib

    lib = _lib._ggml_base
    P, i64, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    sigs = {"ggml_init": (P, [_InitParams]), "ggml_free": (None, [P]),
            "ggml_new_tensor_2d": (P, [P, ctypes.c_int, i64, i64]), "ggml_add": (P, [P, P, P]),
            "ggml_add_inplace": (P, [P, P, P]), "ggml_mul_mat": (P, [P, P, P]),
            "ggml_mul": (P, [P, P, P]), "ggml_rms_norm": (P, [P, P, ctypes.c_float]),
            "ggml_norm": (P, [P, P, ctypes.c_float]), "ggml_scale": (P, [P, P, ctypes.c_float]),
            "ggml_view_2d": (P, [P, P, i64, i64, sz, sz]), "ggml_transpose": (P, [P, P]),
            "ggml_set_name": (P, [P, ctypes.c_char_p]), "ggml_set_input": (None, [P]),
            "ggml_get_data": (P, [P]), "ggml_nbytes": (sz, [P]), "ggml_type_size": (sz, [ctypes.c_int]),
            "ggml_row_size": (sz, [ctypes.c_int, i64]), "ggml_n_dims": (ctypes.c_int, [P]),
            "ggml_is_transposed": (ctypes.c_bool, [P]), "ggml_op_desc": (ctypes.c_char_p, [P]),
            "ggml_new_graph": (P, [P]), "ggml_build_forward_expand": (None, [P, P])}
    for name, (res, args) in sigs.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
    if _lib._ggml_cpu is not None:
        _lib._ggml_cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
        _lib._ggml_cpu.ggml_graph_compute_with_ctx.argtypes = [P, P, ctypes.c_int]
    ctx = lib.ggml_init(_InitParams(16 << 20, None, False))
    assert ctx
    yield lib, ctx
    lib.ggml_free(ctx)
