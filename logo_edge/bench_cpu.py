"""The bench's CPU-path section: llama.cpp's extra buffer types (AMX, weight repacking) on vs off.

Both settings load the same model in one process and run the same tokens, interleaved: a prefill of
the prompt and a decode of a fixed continuation (the safe path's greedy answer, fed to both so each
decodes exactly the same tokens). The fast path is measured only where the self-check found it safe.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np


def _prefill_decode(model, tokens: list[int], gen: list[int], n_ctx: int, threads: int) -> tuple[float, float]:
    """(prefill s, decode tok/s) for `tokens` then `gen` fed one at a time."""
    from .llm import Context, ContextConfig

    ctx = Context(model, ContextConfig(n_ctx=n_ctx, n_batch=512, n_threads=threads, flash_attn=False))
    try:
        t0 = time.perf_counter()
        ctx.decode(tokens, 0)
        t1 = time.perf_counter()
        for i, tok in enumerate(gen):
            ctx.decode([tok], len(tokens) + i, "decode")
        t2 = time.perf_counter()
    finally:
        ctx.close()
    return t1 - t0, len(gen) / (t2 - t1)


def _greedy(model, tokens: list[int], n: int, n_ctx: int, threads: int) -> list[int]:
    from .llm import Context, ContextConfig

    ctx = Context(model, ContextConfig(n_ctx=n_ctx, n_batch=512, n_threads=threads))
    try:
        ctx.decode(tokens, 0)
        out = []
        for i in range(n):
            out.append(int(np.argmax(ctx.logits())))
            ctx.decode([out[-1]], len(tokens) + i, "decode")
        return out
    finally:
        ctx.close()


def cpu_paths_section(model_path: Path, n_prompt: int, gen: int, threads: int, repeats: int) -> dict:
    """Print and return prefill and decode with extra buffer types on and off (same tokens, interleaved)."""
    from .bench import WORDS
    from .llm import Model
    from .selfcheck import cpu_summary, verdict

    v = verdict(model_path)
    print(f"\nCPU weight layouts (llama.cpp extra buffer types: AMX, repacking); CPU: {cpu_summary()}")
    off = Model(model_path, extra_bufts=False)
    models = {"off": off}
    if v.extra_bufts:
        models["on"] = Model(model_path, extra_bufts=True)
    else:
        print(f"  fast path OFF on this CPU (self-check: {v.reason}); only the safe path is measured")
    words = np.random.default_rng(0).choice(WORDS, size=2 * n_prompt)
    prompt = off.tokenize("Summarize: " + " ".join(words))[:n_prompt]
    n_ctx = len(prompt) + gen + 16
    try:
        cont = _greedy(off, prompt, gen, n_ctx, threads)
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
        for rep in range(repeats + 1):  # the first round warms up
            for k, m in models.items():
                r = _prefill_decode(m, prompt, cont, n_ctx, threads)
                if rep:
                    res[k].append(r)
        out = {}
        for k, m in models.items():
            pre = statistics.median(r[0] for r in res[k])
            dec = statistics.median(r[1] for r in res[k])
            bufs = ", ".join(f"{n} {mb:.0f} MiB" for n, mb in sorted(m.buffers.items())) or "?"
            out[k] = {"prefill_ms": pre * 1e3, "decode_tok_s": dec, "buffers": m.buffers}
            print(f"  extra buffer types {k:<3}: prefill {len(prompt)} tokens {pre * 1e3:7.1f} ms, decode {gen} "
                  f"tokens {dec:6.1f} tok/s   (weights in: {bufs})")
        if "on" in out:
            engaged = [n for n in models["on"].buffers if n not in off.buffers]
            print(f"  on / off: prefill {out['off']['prefill_ms'] / out['on']['prefill_ms']:.2f}x faster, decode "
                  f"{out['on']['decode_tok_s'] / out['off']['decode_tok_s']:.2f}x; "
                  + (f"fast layouts in use: {', '.join(engaged)}" if engaged else
                     "no extra buffer type applies to this model on this CPU (the two rows are the same path)"))
        return out
    finally:
        for m in models.values():
            m.close()


# ---- the fused one-token LoRA (native/llama-lora-fused-decode.patch) on vs off

FUSION_ROWS = ("base", "packed", "mixture")


def _fusion_child(model: str, adapters: list[str], k: int, threads: int, repeats: int, gen: int) -> dict:
    """In a process of its own (GGML_CPU_DISABLE_LORA_FUSION is read once): decode tok/s of the base model and of
    a routed k-adapter mixture, packed and per adapter, the same `gen` tokens each (end of generation
    ignored), interleaved; and the LoRA products fused per decoded token."""
    from . import _lib
    from .engine import Engine, SamplingConfig

    with Engine(model, adapters, n_ctx=512, n_threads=threads, flash_attn=False) as eng:
        prompt = eng.tokenize("Classify the sentiment of this review: the plot was thin, but the acting kept me "
                              "watching until the very end, and I would see it again.")
        mix = {a.name: a.weight for a in eng.route(prompt, k=k).selected}
        sampling = SamplingConfig(max_tokens=gen, ignore_eos=True)
        rates: dict[str, list[float]] = {r: [] for r in FUSION_ROWS}
        fused = {}
        for rep in range(repeats + 1):  # the first round warms up (and builds the packed adapter)
            for row in FUSION_ROWS:
                before = _lib.lora_fused_nodes() or 0
                steps = list(eng.stream(prompt, "base" if row == "base" else mix, sampling,
                                        **({} if row == "base" else {"merge": row})))
                fused[row] = ((_lib.lora_fused_nodes() or 0) - before) / gen
                if rep:
                    rates[row].append(steps[-1][2].timings.decode_tok_s)
    return {"mixture": mix, "tok_s": {r: statistics.median(v) for r, v in rates.items()}, "fused": fused}


def lora_fusion_section(model_path: Path, adapters, k: int, threads: int, repeats: int, gen: int) -> dict:
    """Print and return decode with the fused one-token LoRA on and off, each in a fresh process."""
    import json
    import os
    import subprocess
    import sys

    print(f"\nLoRA on a decoded token as one CPU node (native/llama-lora-fused-decode.patch) on vs off "
          f"(GGML_CPU_DISABLE_LORA_FUSION=1); k={k}, {gen} tokens decoded, median of {repeats}, a process each")
    code = ("import json, sys; from logo_edge.bench_cpu import _fusion_child; "
            "print(json.dumps(_fusion_child(*json.loads(sys.argv[1]))))")
    arg = json.dumps([str(model_path), [str(a) for a in adapters], k, threads, repeats, gen])
    out = {}
    for setting in ("on", "off"):
        env = {n: v for n, v in os.environ.items() if not n.startswith("GGML_CPU_DISABLE")}
        if setting == "off":
            env["GGML_CPU_DISABLE_LORA_FUSION"] = "1"
        res = subprocess.run([sys.executable, "-c", code, arg], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"  fusion {setting}: the child failed: {res.stderr.strip()[-300:]}")
            continue
        r = out[setting] = json.loads(res.stdout.strip().splitlines()[-1])
        base = r["tok_s"]["base"]
        print(f"  fusion {setting:<3}: base {base:6.1f} tok/s; " + "; ".join(
            f"{row} {r['tok_s'][row]:6.1f} tok/s = {r['tok_s'][row] / base:.3f} of base "
            f"({r['fused'][row]:.0f} fused products a token)" for row in FUSION_ROWS[1:]))
    if len(out) == 2:
        print("  on / off, each over its own base row: " + "; ".join(
            f"{row} {out['on']['tok_s'][row] / out['on']['tok_s']['base']:.3f} vs "
            f"{out['off']['tok_s'][row] / out['off']['tok_s']['base']:.3f}" for row in FUSION_ROWS[1:])
            + f"  (mixture: {', '.join(f'{n} {w:.2f}' for n, w in out['on']['mixture'].items())})")
    return out
