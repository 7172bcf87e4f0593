"""CPU paths that differ between machines: the AMX fix in the compiled code, the repack path, the fallback.

The machine running the suite may lack AMX, so the AMX fix is checked where it lives, in the
machine code GCC emits for an AMX CPU (-march=sapphirerapids compiles anywhere), and the engine's
fallback is proven by making the self-check's child fail on purpose.
"""

import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from logo_edge.native import build

MMQ = "ggml/src/ggml-cpu/amx/mmq.cpp"


def _compile_amx(tree, tmp_path):
    """Object code of the AMX matmul for a Sapphire Rapids CPU, from `tree`; its disassembly."""
    obj = tmp_path / "mmq.o"
    src = tree / "ggml" / "src"
    cmd = ["g++", "-std=c++17", "-O3", "-march=sapphirerapids", "-DNDEBUG", "-I", str(tree / "ggml" / "include"),
           "-I", str(src), "-I", str(src / "ggml-cpu"), "-c", str(tree / MMQ), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"this g++ cannot compile for Sapphire Rapids: {res.stderr[-300:]}")
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(obj)], capture_output=True, text=True,
                          check=True).stdout


def _tile_config_stored(asm: str) -> bool:
    """Whether the code stores the tile rows and column sizes into the config that ldtilecfg loads.

    tile_config_t: palette (byte 0), start_row (1), reserved (2-15), colsb[16] (16-47), rows[16] (48-63).
    The bug: only the zeroing and palette_id = 1 reach memory before ldtilecfg."""
    lines = asm.splitlines()
    found = False
    for i, line in enumerate(lines):
        m = re.search(r"ldtilecfg\s+(0x[0-9a-f]+|)\(%rsp\)", line)
        if not m:
            continue
        found = True
        base = int(m.group(1) or "0", 16)
        stores = [int(s or "0", 16) for s in re.findall(r",(0x[0-9a-f]+|)\(%rsp\)\s*$", "\n".join(lines[i - 40:i]),
                                                         flags=re.M)]
        colsb = any(base + 16 <= s < base + 48 for s in stores)
        rows = any(base + 48 <= s < base + 64 for s in stores)
        if not (colsb and rows):
            return False
    assert found, "no ldtilecfg in the AMX object code: the test no longer looks at the right code"
    return True


@pytest.mark.slow
def test_amx_tile_config_survives_the_compiler(tmp_path):
    """With the patch, the compiled AMX kernel fills the tile configuration before loading it."""
    if shutil.which("objdump") is None or shutil.which("g++") is None:
        pytest.skip("needs g++ and objdump")
    pristine = build.source_tree()
    tree = tmp_path / "tree"
    shutil.copytree(pristine / "ggml", tree / "ggml")
    amx_patch = next(p for p in build.PATCHES if "amx" in p.name)
    build.check_patch(tree, amx_patch)
    subprocess.run(["patch", "-p1", "-s", "-i", str(amx_patch)], cwd=tree, check=True)
    assert _tile_config_stored(_compile_amx(tree, tmp_path))
    gcc = subprocess.run(["g++", "-dumpversion"], capture_output=True, text=True).stdout.strip()
    if gcc.split(".")[0] == "12":  # the compiler of the crash: the detector must see the bug unpatched
        assert not _tile_config_stored(_compile_amx(pristine, tmp_path))


# ---- the repack path (extra buffer types on AVX2/AVX-512/ARM) and the self-check


@pytest.fixture(scope="module")
def tiny_q8(tiny, tmp_path_factory):
    """The tiny model as Q8_0 (llama.cpp's converter): a type the CPU repack path takes."""
    from logo_edge.convert.base import convert_base

    out = tmp_path_factory.mktemp("q8") / "tiny-q8_0.gguf"
    return convert_base(tiny / "hf", out, "q8_0")


def _run(model_path, extra_bufts, prompt="one two three four five six seven eight nine ten eleven twelve"):
    from logo_edge.llm import Context, ContextConfig, Model

    model = Model(model_path, extra_bufts=extra_bufts)
    ctx = Context(model, ContextConfig(n_ctx=128, n_batch=64))
    try:
        toks = model.tokenize(prompt)
        ctx.decode(toks, 0)
        rows = [ctx.logits()]
        for i in range(4):
            ctx.decode([int(np.argmax(rows[-1]))], len(toks) + i, "decode")
            rows.append(ctx.logits())
        return np.stack(rows)
    finally:
        ctx.close()
        model.close()


@pytest.mark.slow
def test_repack_path_computes_what_the_plain_path_does(tiny_q8):
    fast, safe = _run(tiny_q8, True), _run(tiny_q8, False)
    assert np.isfinite(fast).all()
    assert (fast.argmax(1) == safe.argmax(1)).all()
    for a, b in zip(fast, safe):
        assert np.corrcoef(a, b)[0, 1] > 0.999


@pytest.mark.slow
def test_selfcheck_passes_a_working_fast_path(tiny_q8, tmp_path, monkeypatch):
    from logo_edge import selfcheck

    monkeypatch.setenv(selfcheck.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(selfcheck.FORCE_ENV, raising=False)
    v = selfcheck.verdict(tiny_q8)
    assert v.extra_bufts, v.reason
    assert "agree" in v.reason and len(list(tmp_path.glob("*.json"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("fault, said", [("crash", "SIGSEGV"), ("wrong", "disagrees")])
def test_engine_falls_back_when_the_fast_path_fails(tiny, tmp_path, monkeypatch, fault, said):
    """A child that dies (or computes wrong logits) turns the fast path off; the engine still answers."""
    from logo_edge import selfcheck
    from logo_edge.engine import Engine

    monkeypatch.setenv(selfcheck.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(selfcheck.FAULT_ENV, fault)
    monkeypatch.delenv(selfcheck.FORCE_ENV, raising=False)
    adapters = [tiny / "gguf" / "qv_r8.gguf", tiny / "gguf" / "all7_r4.gguf"]
    with pytest.warns(RuntimeWarning, match=rf"(?s)failed a self-check with tiny-f32.gguf.*{said}.*turned off"):
        eng = Engine(tiny / "tiny-f32.gguf", adapters, n_ctx=256, routing=None)
    with eng:
        assert eng.model.extra_bufts is False
        out = eng.create_completion("hello there, how are", max_tokens=4, k=1)
        assert out["usage"]["completion_tokens"] > 0 and out["routing"]["adapters"]
    # the verdict is cached per library, CPU and model: the next engine neither asks nor warns
    monkeypatch.setenv(selfcheck.FAULT_ENV, "hang")  # a child now would hang the test
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with Engine(tiny / "tiny-f32.gguf", n_ctx=64) as eng2:
            assert eng2.model.extra_bufts is False


@pytest.mark.slow
def test_a_hanging_child_counts_as_a_failure(tiny, monkeypatch):
    from logo_edge import selfcheck

    monkeypatch.setenv(selfcheck.FAULT_ENV, "hang")
    ok, reason = selfcheck.run_child(tiny / "tiny-f32.gguf", timeout_s=5)
    assert not ok and "hung" in reason


def test_forced_choice_skips_the_check(tmp_path, monkeypatch):
    from logo_edge import selfcheck

    monkeypatch.setenv(selfcheck.FORCE_ENV, "0")
    assert selfcheck.use_extra_bufts(tmp_path / "not-even-a-model.gguf") is False
    monkeypatch.setenv(selfcheck.FORCE_ENV, "1")
    assert selfcheck.use_extra_bufts(tmp_path / "not-even-a-model.gguf") is True


def test_native_build_key_holds_the_cpu(monkeypatch):
    key = build.build_key("cpu", [])
    monkeypatch.setattr(build, "cpu_features", lambda: "some other cpu")
    assert build.build_key("cpu", []) != key  # a native build from another CPU is not reused
    portable = build.build_key("cpu", ["-DGGML_NATIVE=OFF"])
    monkeypatch.setattr(build, "cpu_features", lambda: "yet another cpu")
    assert build.build_key("cpu", ["-DGGML_NATIVE=OFF"]) == portable


# ---- the fused LoRA node on ARM: ggml's CPU backend cross-compiled for aarch64 and run under qemu

ARM_TOOLS = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64")


def _arm_ggml(arch: str, openmp: bool):
    """libggml-base.a and libggml-cpu.a of the patched tree for aarch64 (`-DGGML_CPU_ARM_ARCH=arch`), built once
    into the cache (about a minute on 2 cores) and keyed by the patches."""
    key = f"ggml-aarch64-{arch.replace('+', '_')}-{'omp' if openmp else 'threadpool'}-{build.patches_digest()[:12]}"
    out = build.cache_root() / "cross" / key
    libs = [out / "libggml-cpu.a", out / "libggml-base.a"]
    with build.cache_lock(key):
        if all(p.exists() for p in libs):
            return out
        work = out.with_name(out.name + ".work")
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(build.source_tree(), work / "tree", symlinks=True)
        build.apply_patches(work / "tree")
        flags = ["-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                 "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc", "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
                 "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF",
                 f"-DGGML_CPU_ARM_ARCH={arch}", f"-DGGML_OPENMP={'ON' if openmp else 'OFF'}",
                 "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF"]
        for cmd in (["cmake", "-S", str(work / "tree"), "-B", str(work / "b"), *flags],
                    ["cmake", "--build", str(work / "b"), "--target", "ggml-cpu", "-j", str(os.cpu_count() or 2)]):
            res = subprocess.run(cmd, capture_output=True, text=True)
            assert res.returncode == 0, \
                f"{' '.join(cmd[:3])} failed for aarch64 ({arch}):\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(work / "tree" / "ggml" / "include", tmp / "include")
        for p in libs:
            shutil.copy2(work / "b" / "ggml" / "src" / p.name, tmp / p.name)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        shutil.rmtree(work, ignore_errors=True)
    return out


def _run_arm(exe, fusion: bool, cpu: str) -> list[dict]:
    env = dict(os.environ, GGML_CPU_DISABLE_LORA_FUSION="0" if fusion else "1")
    res = subprocess.run(["qemu-aarch64", "-cpu", cpu, str(exe)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, f"the aarch64 program failed under qemu ({res.returncode}):\n{res.stderr[-2000:]}"
    return [json.loads(line) for line in res.stdout.splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("arch, openmp, cpu", [
    ("armv8.2-a+fp16+dotprod", False, "max,sve=off"),  # NEON with f16 arithmetic, ggml's own threadpool (as macOS)
    ("armv8.2-a+sve", True, "max"),                    # SVE kernels, OpenMP threads (as a Graviton under Linux)
])
def test_fused_lora_node_on_arm(arch, openmp, cpu, tmp_path):
    """The patch compiles for aarch64, and there the fused node computes res + s B (A x) for f32 adapters on 1-3
    threads as llama.cpp's own unfused graph and a float64 reference do; f16 weights and several tokens are left to
    the unfused way (ARM's mul_mat rounds f16 products otherwise than the node would)."""
    missing = [t for t in ARM_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian: g++-aarch64-linux-gnu qemu-user; .ci/run installs them)")
    ggml = _arm_ggml(arch, openmp)
    obj, exe = tmp_path / "lora_graph.o", tmp_path / "lora_graph"
    src = Path(__file__).with_name("native") / "lora_graph.c"
    subprocess.run(["aarch64-linux-gnu-gcc", "-O2", "-std=c11", "-Wall", "-Werror", "-I", str(ggml / "include"),
                    "-c", str(src), "-o", str(obj)], check=True)
    subprocess.run(["aarch64-linux-gnu-g++", "-static", *(["-fopenmp"] if openmp else []), str(obj),
                    str(ggml / "libggml-cpu.a"), str(ggml / "libggml-base.a"), "-lpthread", "-lm", "-o", str(exe)],
                   check=True, capture_output=True)
    fused, unfused = _run_arm(exe, True, cpu), _run_arm(exe, False, cpu)
    assert len(fused) == len(unfused) == 18
    for on, off in zip(fused, unfused):
        case = {k: on[k] for k in ("a", "b", "r", "scale", "n_tok", "threads")}
        assert on["rc"] == off["rc"] == 0, case
        f32 = on["a"] == on["b"] == "f32"
        assert on["fused"] == (1 if f32 and on["n_tok"] == 1 else 0), case
        assert off["fused"] == 0, case
        # f32: to rounding; f16: the weights' values are exact, the products are rounded as ARM's kernels round
        tol = 1e-5 if f32 else 1e-3
        assert on["err"] <= tol * max(1.0, on["mag"]), case
        np.testing.assert_allclose(on["out"], off["out"], rtol=1e-5, atol=1e-5 * max(1.0, on["mag"]), err_msg=str(case))
