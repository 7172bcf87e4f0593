"""Battery part "soak": many routed and hand-mixed requests over a pool larger than the adapter LRU budget.

A pool of POOL_SIZE random adapters of the model's real shapes (varied ranks and modules, written with
gguf_files.write_lora into a temporary directory) is served with a budget (max_loaded_mb) of about
BUDGET_ADAPTERS adapters, so adapters are loaded into llama.cpp and freed all the time: requests rotate
hand-picked mixtures {name: w} (1-3 adapters) across the whole pool, and every fourth one is routed.

1. engine: N requests through Engine.create_completion in this process; RSS (VmRSS) sampled along the
   way. At the end the adapters holding a llama.cpp handle must be exactly those in the LRU
   (len(pool._loaded)) and fit the budget.
2. server: a `logo-edge serve --max-loaded-mb` child on the same pool gets N HTTP requests (the same mix,
   via `lora` and routed); its RSS is read from /proc/<pid>/status.

Leak criterion: the least-squares slope of RSS over the second half of the run (warm-up excluded), in
MB per 1,000 requests, must stay below SLOPE_LIMIT_MB (full run: 1 MB / 1,000 requests); the quick run
has too few requests for a tight figure and uses QUICK_SLOPE_LIMIT_MB. Figures: tried (requests),
errors (must be 0), leak (must be 0), rss start/end, slope, handles alive vs LRU.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .battery import Figures

POOL_SIZE = 120
BUDGET_ADAPTERS = 12  # the LRU budget holds about this many adapters
SLOPE_LIMIT_MB = 1.0  # MB per 1,000 requests over the second half (full run)
MIN_JUDGED = 200  # requests before an RSS slope means anything
QUICK_SLOPE_LIMIT_MB = 100.0  # a few hundred requests: warm-up noise dominates; only a gross leak fails
MODULE_SETS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
PROMPTS = ["Hello", "Write a short poem about rivers.", "What is 2 + 3?", "Translate 'cat' into French.",
           "Summarize: the quick brown fox jumps over the lazy dog.", "def add(a, b):"]


def make_pool(model: Path, d: Path, n: int = POOL_SIZE, seed: int = 0) -> list[Path]:
    """n random adapters for `model` (ranks 2-16, 1-4 modules always including attn_q) in `d`."""
    from .gguf_files import BaseInfo, write_lora

    info = BaseInfo.read(model)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        rank = int(rng.choice([2, 4, 8, 16]))
        extra = list(rng.choice(MODULE_SETS[1:], size=int(rng.integers(0, 4)), replace=False))
        pairs = {}
        for b in range(info.n_layer):
            for m in ["attn_q", *extra]:
                key = f"blk.{b}.{m}.weight"
                if key not in info.shapes:
                    continue
                n_in, n_out = info.shapes[key][:2]
                pairs[key] = (rng.standard_normal((rank, n_in), np.float32) * 0.05,
                              rng.standard_normal((n_out, rank), np.float32) * 0.05)
        p = d / f"soak{i:03d}.gguf"
        write_lora(p, info.arch, 2 * rank, pairs, "f32", name=p.stem)
        paths.append(p)
    return paths


def _choice(i: int, names: list[str], rng: random.Random):
    """Request i's adapters: every fourth routed ("auto"), else 1-3 adapters rotating over the pool."""
    if i % 4 == 3:
        return "auto"
    k = 1 + i % 3
    start = (i * 7) % len(names)
    return {names[(start + j * 13) % len(names)]: round(rng.uniform(0.2, 1.0), 2) for j in range(k)}


def _slope(xs: list[int], ys: list[float]) -> float:
    """MB per 1,000 requests over the second half of the samples."""
    h = len(xs) // 2
    x, y = np.array(xs[h:], float), np.array(ys[h:], float)
    if len(x) < 3 or np.ptp(x) == 0:
        return 0.0
    return float(np.polyfit(x, y, 1)[0] * 1000)


def _status_mb(pid: int | str, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _leak_check(fig: Figures, xs, ys, limit: float) -> None:
    slope = _slope(xs, ys)
    fig.counts["rss_start_mb"] = round(ys[0])
    fig.counts["rss_end_mb"] = round(ys[-1])
    fig.notes.append(f"RSS {ys[0]:.1f} -> {ys[-1]:.1f} MB (half-way {ys[len(ys) // 2]:.1f}); slope over the second "
                     f"half {slope:+.3f} MB / 1,000 requests (limit {limit:g})")
    fig.extra["slope_mb_per_1k"] = slope
    if xs[-1] < MIN_JUDGED:  # a slope over a few dozen requests is warm-up (allocator, caches), not a leak
        fig.notes.append(f"slope not judged: {xs[-1]:.0f} requests < {MIN_JUDGED}")
        return
    if slope > limit:
        fig.counts["leak"] += 1
        fig.fail.append(("leak", f"RSS grows {slope:+.3f} MB / 1,000 requests over the second half", None))


def soak_engine(model: Path, pool_dir: Path, n: int, quick: bool, seed: int = 0) -> Figures:
    from .bench import rss_mb
    from .engine import Engine

    fig = Figures("soak: engine")
    fig.extra = {}
    t0 = time.monotonic()
    rng = random.Random(seed)
    eng = Engine(model, pool_dir, n_ctx=256, n_batch=64, kv_type="f32", flash_attn=False, max_loaded_mb=1024)
    try:
        pool = eng.pool
        per = float(np.median([a.nbytes for a in pool.adapters]))
        pool.max_loaded_bytes = int(BUDGET_ADAPTERS * per)  # the budget, as Engine(max_loaded_mb=...) sets it
        names = pool.names
        fig.notes.append(f"{len(names)} adapters, budget {pool.max_loaded_bytes / 2**20:.3f} MB "
                         f"(~{BUDGET_ADAPTERS} adapters of {per / 1024:.0f} KiB)")
        every = max(1, n // 100)
        xs, ys, used = [], [], set()
        for i in range(n):
            choice = _choice(i, names, rng)
            if isinstance(choice, dict):
                used.update(choice)
            try:
                eng.create_completion(PROMPTS[i % len(PROMPTS)], adapters=choice, max_tokens=2)
                fig.counts["ok"] += 1
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                fig.counts["errors"] += 1
                if len(fig.fail) < 10:
                    fig.fail.append(("errors", f"request {i} {choice}: {type(e).__name__}: {e}"[:300], None))
            fig.counts["tried"] += 1
            if i % every == 0 or i == n - 1:
                xs.append(i)
                ys.append(rss_mb())
        alive = sum(a.handle is not None for a in pool.adapters)
        fig.counts["handles_alive"] = alive
        fig.counts["lru_len"] = len(pool._loaded)
        fig.counts["adapters_used"] = len(used)
        fig.notes.append(f"handles alive {alive}, LRU {len(pool._loaded)}, loaded "
                         f"{pool.loaded_bytes / 2**20:.3f} MB of {pool.max_loaded_bytes / 2**20:.3f} MB; "
                         f"{len(used)} adapters used by hand")
        if alive != len(pool._loaded) or pool.loaded_bytes > pool.max_loaded_bytes or len(used) <= BUDGET_ADAPTERS:
            fig.counts["leak"] += 1
            fig.fail.append(("leak", f"handles alive {alive} vs LRU {len(pool._loaded)}, loaded "
                             f"{pool.loaded_bytes} B of budget {pool.max_loaded_bytes} B", None))
        _leak_check(fig, xs, ys, QUICK_SLOPE_LIMIT_MB if quick else SLOPE_LIMIT_MB)
    finally:
        eng.close()
    fig.seconds = time.monotonic() - t0
    return fig


def soak_server(model: Path, pool_dir: Path, n: int, quick: bool, out: Path, seed: int = 0) -> Figures:
    from .battery import _request
    from .gguf_files import BaseInfo, read_lora
    from .serve.process import child_server, free_port

    fig = Figures("soak: server")
    fig.extra = {}
    t0 = time.monotonic()
    rng = random.Random(seed + 1)
    paths = sorted(pool_dir.glob("*.gguf"))
    names = [p.stem for p in paths]
    info = BaseInfo.read(model)
    per = float(np.median([read_lora(p, info).nbytes for p in paths[:20]]))
    budget_mb = BUDGET_ADAPTERS * per / 2**20
    port = free_port()
    cmd = [sys.executable, "-m", "logo_edge.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(model), "--adapters", str(pool_dir), "--n-ctx", "256", "--max-tokens-limit", "8",
           "--model-name", "tiny", "--max-loaded-mb", f"{budget_mb:.4f}"]
    env = {**os.environ, "LLAMA_LOG_LEVEL": "error"}
    with child_server("soak-server", cmd, port, env, out) as (url, proc, log):
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError("the soak server exited before answering:\n" + log.read_text()[-2000:])
            try:
                if _request(url, "GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the soak server did not answer /health within 300 s")
            time.sleep(0.2)
        fig.notes.append(f"{len(names)} adapters, --max-loaded-mb {budget_mb:.4f}; server ready after "
                         f"{time.monotonic() - t0:.0f} s")
        t1 = time.monotonic()
        every = max(1, n // 100)
        xs, ys = [], []
        for i in range(n):
            choice = _choice(i, names, rng)
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 2}
            if isinstance(choice, dict):
                body["lora"] = [{"name": k, "scale": v} for k, v in choice.items()]
            fig.counts["tried"] += 1
            try:
                status, resp = _request(url, "POST", "/v1/completions", json.dumps(body).encode(), timeout=60)
            except OSError as e:
                status, resp = f"no answer ({type(e).__name__})", b""
            if status == 200:
                fig.counts["ok"] += 1
            else:
                fig.counts["errors"] += 1
                if len(fig.fail) < 10:
                    fig.fail.append(("errors", f"request {i}: {status} {resp[:200]!r}", None))
            if i % every == 0 or i == n - 1:
                xs.append(i)
                ys.append(_status_mb(proc.pid))
        fig.notes.append(f"{n} requests in {time.monotonic() - t1:.0f} s")
        _leak_check(fig, xs, ys, QUICK_SLOPE_LIMIT_MB if quick else SLOPE_LIMIT_MB)
        if proc.poll() is not None:
            fig.counts["crashed"] += 1
            fig.fail.append(("crashed", f"the server exited with {proc.returncode}", str(log)))
    fig.seconds = time.monotonic() - t0
    return fig


def run_soak(model: Path, n_engine: int, n_server: int, quick: bool, out: Path) -> list[Figures]:
    pool_dir = out / "soak-pool"
    shutil.rmtree(pool_dir, ignore_errors=True)
    make_pool(model, pool_dir)
    figs = [soak_engine(model, pool_dir, n_engine, quick)]
    if n_server:
        figs.append(soak_server(model, pool_dir, n_server, quick, out))
    return figs
