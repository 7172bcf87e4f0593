"""llama.cpp's RPC backend under the engine: Engine(rpc=[...]) places the model across two ggml-rpc-server
processes on loopback; the probe and the mixture work unchanged, so routing records and greedy answers equal
the local engine's. The engine runs in a child process: the GGML_RPC=ON libllama is chosen when the library
loads (LOGO_EDGE_RPC=1), and this test process has the default one loaded."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PROMPTS = ["the river and the market", "proof of energy", "Write SQL for the oldest users."]
CHILD = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    from logo_edge.engine import Engine
    model, adapters, endpoints, prompts = json.loads(sys.argv[1])
    eng = Engine(model, adapters, n_ctx=256, kv_type="f32", flash_attn=False, rpc=endpoints)
    out = {"buffers": eng.model.buffers, "answers": []}
    for p in prompts:
        eng.forget_prompts()
        r = eng.create_completion(p, max_tokens=12)
        out["answers"].append([r["choices"][0]["text"], [a["weight"] for a in r["routing"]["adapters"]],
                               [a["signal"] for a in r["routing"]["adapters"]]])
    eng.forget_prompts()
    r = eng.create_completion(prompts[0], max_tokens=12, adapters={"qv_r8": 0.6, "rs_r16": 0.4})
    out["manual"] = r["choices"][0]["text"]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    """Two ggml-rpc-server processes on free loopback ports (built from the pinned tree, cached)."""
    from live_server import rpc_servers
    from logo_edge.native.build import RPC_FLAGS, build, build_tools

    build("cpu", RPC_FLAGS)  # the libllama variant the child loads
    with rpc_servers(build_tools() / "ggml-rpc-server", 2, tmp_path_factory.mktemp("rpc")) as endpoints:
        yield endpoints


def test_engine_over_two_rpc_servers_equals_the_local_engine(tiny, endpoints):
    from logo_edge.engine import Engine

    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    env["LOGO_EDGE_RPC"] = "1"
    spec = json.dumps([str(tiny / "tiny-f32.gguf"), str(tiny / "gguf"), endpoints, PROMPTS])
    r = subprocess.run([sys.executable, "-c", CHILD, spec], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert any("RPC" in str(b) for b in got["buffers"]), got["buffers"]  # the weights sit on the rpc-servers
    with pytest.warns(UserWarning, match="od_only"):
        eng = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=256, kv_type="f32", flash_attn=False)
    try:
        for p, (text, weights, signals) in zip(PROMPTS, got["answers"]):
            eng.forget_prompts()
            ref = eng.create_completion(p, max_tokens=12)
            assert text == ref["choices"][0]["text"], p
            np.testing.assert_allclose(weights, [a["weight"] for a in ref["routing"]["adapters"]], rtol=1e-4,
                                       atol=1e-6)
            nan = [np.nan if x is None else x for x in signals]
            want = [np.nan if a["signal"] is None else a["signal"] for a in ref["routing"]["adapters"]]
            np.testing.assert_allclose(nan, want, rtol=1e-4, equal_nan=True)
        eng.forget_prompts()
        manual = eng.create_completion(PROMPTS[0], max_tokens=12, adapters={"qv_r8": 0.6, "rs_r16": 0.4})
        assert got["manual"] == manual["choices"][0]["text"]
    finally:
        eng.close()


def test_the_cli_routes_over_rpc_servers(tiny, endpoints):
    """`logo-edge route --rpc A,B` loads the RPC build itself (before the engine is imported) and routes as the
    local engine does."""
    from logo_edge.engine import Engine

    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "LOGO_EDGE_RPC")}
    cmd = [sys.executable, "-m", "logo_edge.cli", "route", PROMPTS[2], "--model", str(tiny / "tiny-f32.gguf"),
           "--adapters", str(tiny / "gguf"), "--n-ctx", "256", "--rpc", ",".join(endpoints), "--json"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # without --rpc's build: an error
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    with pytest.warns(UserWarning, match="od_only"):
        eng = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=256)
    try:
        want = eng.route(eng.format_chat([{"role": "user", "content": PROMPTS[2]}])).to_dict()
    finally:
        eng.close()
    assert [a["rank"] for a in got["adapters"]] == [a["rank"] for a in want["adapters"]]
    np.testing.assert_allclose([a["weight"] for a in got["adapters"]], [a["weight"] for a in want["adapters"]],
                               rtol=1e-4, atol=1e-6)


def test_rpc_without_the_rpc_build_says_what_to_do(tiny):
    """The default libllama (this process) has no RPC backend: a clear error naming the build and the switch."""
    from logo_edge._lib import LIB_DIR
    from logo_edge.engine import Engine
    from logo_edge.errors import NativeLibraryError
    from logo_edge.native.build import RPC_FLAGS, lib_dir

    if LIB_DIR == lib_dir("cpu", RPC_FLAGS):
        pytest.skip("this process loaded the RPC build")
    with pytest.raises(NativeLibraryError, match="GGML_RPC=ON.*LOGO_EDGE_RPC=1"):
        Engine(tiny / "tiny-f32.gguf", rpc=["127.0.0.1:1"])
