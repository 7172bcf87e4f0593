"""`logo-edge bench` pack-cost section: what a packed mixture costs to build and what it saves, per recipe.

For each recipe (random adapters of the model's real shapes: modules, rank, k of them mixed with equal weights)
one engine measures, side by side:
  build cold   a new mixture's packed adapter built from files not read before (read, pack, write, load)
  build warm   a new mixture (other weights) of adapters already read: pack, write, load
  prefill      TTFT of a 64-token prompt under the mixture (per-adapter scales) and packed (built already), base
  decode       tok/s of `gen` tokens (end-of-generation masked) for base, mixture and packed
and what merge="auto" picks for the mixture (engine.PACK_MAX_BYTES). Medians over `repeats` after a warm-up.
"""

from __future__ import annotations

import statistics
import time

from .bench import _log, fit_prompt, random_pool, timed

RECIPES = (("qkvo", 8, 3), ("qkvo", 8, 20), ("all7", 64, 3))  # (modules, rank, k)
QUICK_RECIPES = (("qv", 8, 3),)


def pack_section(model_path, threads: int, repeats: int, gen: int, recipes=RECIPES) -> dict:
    from .engine import Engine

    print(f"\npack cost: random adapters mixed with equal weights; a 64-token prompt, {gen} tokens generated; "
          f"{threads} threads; median of {repeats}")
    print(f"{'modules':>7} {'rank':>4} {'k':>3} {'MB':>6} {'build cold ms':>13} {'warm ms':>8} "
          f"{'TTFT base/mix/packed ms':>24} {'decode base/mix/packed tok/s':>29} {'x base mix':>10} "
          f"{'packed':>6} {'auto':>7}")
    out = {}
    for modules, rank, k in recipes:
        paths = random_pool(model_path, k, modules, rank)
        eng = Engine(model_path, paths, n_ctx=512, n_threads=threads, flash_attn=False, max_loaded_mb=4096,
                     pool_index=False)
        try:
            idx = list(range(k))
            mix = {eng.pool.names[i]: 1.0 / k for i in idx}
            tokens = fit_prompt(eng, 64, seed=0)
            cold, warm = [], []
            got = {m: [] for m in ("base", "mixture", "packed")}
            for rep in range(repeats + 1):
                eng._lora_files.clear()
                for h in eng._merged.values():
                    h.free()
                eng._merged.clear()
                eng._merged_bytes.clear()
                t0 = time.perf_counter()
                eng._merged_handle(idx, [1.0 / k] * k, "packed")
                t1 = time.perf_counter()
                eng._merged_handle(idx, [1.0 / k + 1e-3] + [1.0 / k] * (k - 1), "packed")
                t2 = time.perf_counter()
                for m in got:
                    eng.forget_prompts()
                    s = timed(eng.create_completion(tokens, adapters="base" if m == "base" else mix, merge=m
                                                    if m != "base" else "mixture", max_tokens=gen, stream=True,
                                                    ignore_eos=True))
                    if rep:
                        got[m].append(s)
                if rep:
                    cold.append(t1 - t0)
                    warm.append(t2 - t1)
            med = {m: (statistics.median(s.ttft for s in v), statistics.median(s.tok_s for s in v))
                   for m, v in got.items()}
            mb = sum(a.nbytes for a in eng.pool.adapters) / 2**20
            row = dict(mb=mb, build_cold_ms=1e3 * statistics.median(cold), build_warm_ms=1e3 * statistics.median(warm),
                       ttft_ms={m: 1e3 * v[0] for m, v in med.items()}, tok_s={m: v[1] for m, v in med.items()},
                       auto=eng._merge_for(idx))
            out[(modules, rank, k)] = row
            base = med["base"][1]
            ttft = "/".join(f"{v:.0f}" for v in row["ttft_ms"].values())
            tok_s = "/".join(f"{v:.1f}" for v in row["tok_s"].values())
            print(f"{modules:>7} {rank:>4} {k:>3} {mb:6.1f} {row['build_cold_ms']:13.1f} {row['build_warm_ms']:8.1f} "
                  f"{ttft:>24} {tok_s:>29} {med['mixture'][1] / base:10.3f} {med['packed'][1] / base:6.3f} "
                  f"{row['auto']:>7}")
            _log(f"pack cost: {modules} rank {rank} k={k} done")
        finally:
            eng.close()
    print("build: a new mixture's packed adapter (cold: its files read first); x base: decode tok/s over the "
          "base model's; auto: what merge='auto' (the default) applies to this mixture")
    return out
