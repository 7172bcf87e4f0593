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
