"""`logo-edge bench`: speed side by side in one run, on the same prompts, with ratios to plain llama.cpp.

Rows, per (prompt tokens, generated tokens):
  1. llama-cpp-python's Llama, base model
  2. llama-cpp-python's Llama with the same k adapters set by hand (llama_set_adapters_lora)
  3. logo-edge routed (probe -> top-k -> mixture -> prefill -> decode), exact mode
Every row is timed the same way, from outside: time to first token, decode tok/s after it, total.
"""

from __future__ import annotations

import ctypes
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from . import defaults


def _random_pool(model_path: Path, n: int, rank: int, out: Path, seed: int = 0) -> list[Path]:
    """Random adapters of the model's real shapes on q, k, v, o (for when no pool is given)."""
    from .gguf_files import BaseInfo, write_lora

    info = BaseInfo.read(model_path)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        pairs = {}
        for b in range(info.n_layer):
            for m in ("attn_q", "attn_k", "attn_v", "attn_output"):
                n_in, n_out = info.shapes[f"blk.{b}.{m}.weight"][:2]
                pairs[f"blk.{b}.{m}.weight"] = (rng.normal(0, 0.02, (rank, n_in)), rng.normal(0, 0.02, (n_out, rank)))
        paths.append(write_lora(out / f"rand{i:04d}.gguf", info.arch, 2 * rank, pairs, "f16", name=f"rand{i:04d}"))
    return paths


def _timed(stream, text_of) -> tuple[float, float, int]:
    """(time to first token, decode tok/s after the first, total) of one streamed request."""
    t0 = time.perf_counter()
    first = None
    n = 0
    for chunk in stream:
        if text_of(chunk):
            n += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    tok_s = (n - 1) / (end - first) if n > 1 and end > first else 0.0
    return first - t0, tok_s, end - t0


def _prompt_of(n_tokens: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = ["river", "market", "proof", "energy", "garden", "letter", "signal", "theory", "harbor", "number"]
    return "Summarize: " + " ".join(rng.choice(words, size=max(1, n_tokens - 4)))


def add_args(p) -> None:
    """The `logo-edge bench` arguments (the CLI calls this)."""
    p.add_argument("--model")
    p.add_argument("--adapters", nargs="+")
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[64, 256])
    p.add_argument("--gen-tokens", type=int, nargs="+", default=[32, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="one short configuration (for tests)")


def run_bench(args) -> int:
    from ._lib import llama_cpp
    from .engine import Engine

    model_path = Path(args.model) if args.model else defaults.default_model_path()
    tmp = tempfile.TemporaryDirectory(prefix="logo-edge-bench-")
    if args.adapters:
        adapters = args.adapters
    elif defaults.default_pool():
        adapters = sorted(defaults.default_pool().glob("*.gguf"))
    else:
        adapters = _random_pool(model_path, 10, 8, Path(tmp.name))
    cases = [(64, 32)] if args.quick else [(p, g) for p in args.prompt_tokens for g in args.gen_tokens]
    n_ctx = max(p + g for p, g in cases) + 64
    threads = args.threads
    print(f"model {model_path.name}, {len(adapters) if not isinstance(adapters, str) else adapters} adapters, "
          f"k={args.k}, repeats={args.repeats}, threads={threads or 'all'}")

    eng = Engine(model_path, adapters, n_ctx=n_ctx, n_threads=threads, routing=None)
    eng.routing = type(eng.routing)(k=args.k)
    llm = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    handles = []

    # llama.cpp adapters belong to a model: load them on the plain Llama's model for rows 2
    from .llm import LoraHandle

    def plain_handle(path):
        ptr = llama_cpp.llama_adapter_lora_init(llm._model.model, str(path).encode())
        handles.append(LoraHandle(ptr, eng.model))
        return ptr

    rows: dict[str, list[tuple[float, float, float]]] = {}
    print(f"{'case':<12} {'row':<34} {'TTFT ms':>9} {'decode tok/s':>13} {'total ms':>10} {'x total':>8} "
          f"{'x tok/s':>8}")
    for p_tok, g_tok in cases:
        for rep in range(args.repeats + 1):  # first repeat warms up, not counted
            prompt = eng.format_chat([{"role": "user", "content": _prompt_of(p_tok, rep)}])
            rec = eng.route(prompt)
            names = [a.name for a in rec.selected]
            weights = [a.weight for a in rec.selected]
            ptrs = [plain_handle(eng.pool.adapters[eng.pool.index(n)].path) for n in names]

            def run_plain(with_adapters: bool):
                n = len(ptrs) if with_adapters else 0
                arr = (llama_cpp.llama_adapter_lora_p_ctypes * max(1, n))(*ptrs[:n])
                sc = (ctypes.c_float * max(1, n))(*weights[:n])
                llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr if n else None, n, sc if n else None)
                llm.reset()
                return _timed(llm.create_completion(prompt, max_tokens=g_tok, temperature=0.0, stream=True,
                                                    seed=0), lambda c: c["choices"][0]["text"] or True)

            def run_routed():
                eng.ctx.cache_truncate(0)
                eng._cache = []
                return _timed(eng.create_completion(prompt, max_tokens=g_tok, stream=True),
                              lambda c: c["choices"][0]["finish_reason"] is None)

            results = {"1 llama-cpp-python base": run_plain(False),
                       f"2 llama-cpp-python + {len(ptrs)} adapters": run_plain(True),
                       "3 logo-edge routed (exact)": run_routed()}
            for h in handles:
                h.free()
            handles.clear()
            if rep == 0:
                continue
            for k, v in results.items():
                rows.setdefault(f"{p_tok}/{g_tok}|{k}", []).append(v)
        base = None
        for key in [k for k in rows if k.startswith(f"{p_tok}/{g_tok}|")]:
            ttft, tps, tot = (statistics.median(x[i] for x in rows[key]) for i in range(3))
            base = base or (ttft, tps, tot)
            print(f"{p_tok}p/{g_tok}g{'':<5} {key.split('|')[1]:<34} {ttft * 1e3:9.1f} {tps:13.1f} {tot * 1e3:10.1f} "
                  f"{tot / base[2]:8.3f} {tps / base[1] if base[1] else 0:8.3f}")
        r2 = statistics.median(x[1] for x in rows[[k for k in rows if k.startswith(f'{p_tok}/{g_tok}|2')][0]])
        r3 = statistics.median(x[1] for x in rows[[k for k in rows if k.startswith(f'{p_tok}/{g_tok}|3')][0]])
        print(f"{'':<13}decode tok/s, logo-edge routed / llama-cpp-python same adapters: {r3 / r2:.3f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (whole process)")
    eng.close()
    tmp.cleanup()
    return 0
