"""The pool sweep of `logo-edge bench`: start-up, adding one adapter, routing time and memory against N.

Random q,v rank-8 adapters of the model's real shapes (bench.random_pool), N of them per pool directory
(symlinks, so each N has its own index). For every N, in fresh processes:

    cold    the pool's first start: its index is removed, every file is read, validated and folded
    warm    the next start: the index is mapped; then routing on two prompts (the default shortlist and,
            for comparison, every adapter's window), memory, and adding one more adapter (validation
            timed apart) then removing it

Start-up times are the pool's alone (`pool.add_many` on an engine already loaded); the model's load,
the same at every N, is printed on the N=0 row. RSS is measured after start-up and after routing; its
growth over N=0 is what the pool costs.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

MB = 2**20


def sweep_dirs(paths: list[Path], sizes: list[int]) -> dict[int, Path]:
    """A directory of symlinks to the first N adapters, per N (beside the adapters, made once)."""
    out = {}
    base = paths[0].parent
    for n in sizes:
        d = base.with_name(f"{base.name}-n{n}")
        d.mkdir(exist_ok=True)
        for p in paths[:n]:
            link = d / p.name
            if not link.exists():
                link.symlink_to(p)
        for extra in d.glob("*.gguf"):
            if extra.name not in {p.name for p in paths[:n]}:
                extra.unlink()
        out[n] = d
    return out


def pool_worker(spec: dict) -> dict:
    """One start of an engine over spec["pool"] (None: no pool), measured; see the module docstring."""
    from .bench import _route_times, peak_rss_mb, rss_mb
    from .engine import Engine
    from .gguf_files import read_lora

    t0 = time.perf_counter()
    eng = Engine(Path(spec["model"]), None, n_ctx=spec["n_ctx"], n_threads=spec["threads"], flash_attn=False)
    out = {"model_s": time.perf_counter() - t0, "rss0_mb": rss_mb()}
    if spec["pool"] is None:
        for toks in spec["prompts"]:
            _route_times(eng, toks)
        out.update(rss_mb=rss_mb(), rss_after_mb=rss_mb(), peak_mb=peak_rss_mb())
        eng.close()
        return out
    if spec["cold"]:
        shutil.rmtree(_index_root(eng, spec["pool"]), ignore_errors=True)
    t = time.perf_counter()
    eng.pool.add_many(spec["pool"])
    out.update(startup_s=time.perf_counter() - t, rss_mb=rss_mb(), bank_mb=eng.pool.bank.nbytes / MB,
               target_mb=int(eng.pool.bank.leads.sum()) * eng.pool.bank.d_in * 4 / MB)  # stage one's rows
    if spec["cold"]:  # what calibrating one adapter costs (its statistics over the generic prompts' states)
        out["calibrate_ms"] = statistics.median(a.calibrate_s for a in eng.pool.adapters) * 1e3
        eng.close()
        return out
    times = {0: [], 1: []}
    shortlisted = eng.routing
    for exact in (0, 1):  # the default route first: its memory is measured before the exact one maps all
        eng.routing = replace(shortlisted, shortlist=0) if exact else shortlisted
        for rep in range(spec["repeats"] + 1):
            for toks in spec["prompts"]:
                t = _route_times(eng, toks)
                if rep:
                    times[exact].append(t)
        if not exact:
            out["rss_after_mb"] = rss_mb()
    eng.routing = shortlisted
    probe, route, routing = (statistics.median(x) * 1e3 for x in zip(*times[0]))
    out.update(probe_ms=probe, route_ms=route, routing_ms=routing,
               exact_ms=statistics.median(t[2] for t in times[1]) * 1e3, rss_exact_mb=rss_mb())
    new = Path(spec["extra"])
    t = time.perf_counter()
    read_lora(new, eng.model.info)  # what validation alone costs (every tensor read and checked)
    out["validate_ms"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    eng.add_adapter(new, "bench-extra")
    out["add_ms"] = (time.perf_counter() - t) * 1e3
    eng.remove_adapter("bench-extra")
    out["peak_mb"] = peak_rss_mb()
    eng.close()
    return out


def _index_root(eng, pool_dir: str) -> Path:
    from .pool_index import index_key, index_root

    pool = eng.pool
    return index_root(index_key(eng.model.path, pool.blocks, pool.target_module, pool.query_rows, [Path(pool_dir)],
                                pool.probe_modules, pool.sv_power))


def sweep_pool(model_path: Path, sizes: list[int], prompts: list[list[int]], threads: int, repeats: int) -> dict:
    from .bench import _log, call_worker, random_pool
    from .engine import RouteConfig

    paths = random_pool(model_path, max(sizes) + 1, "qv")
    extra, paths = paths[-1], paths[:-1]
    dirs = sweep_dirs(paths, sorted(sizes))
    common = dict(model=str(model_path), threads=threads, n_ctx=max(len(p) for p in prompts) + 64, prompts=prompts,
                  repeats=repeats, shortlist=RouteConfig().shortlist, extra=str(extra))
    res: dict[int, dict] = {0: call_worker("logo_edge.bench", dict(common, kind="pool", pool=None, cold=False))}
    for n in sorted(sizes):
        _log(f"pool sweep: N={n}, cold start then warm start, each in a fresh process")
        cold = call_worker("logo_edge.bench", dict(common, kind="pool", pool=str(dirs[n]), cold=True))
        warm = call_worker("logo_edge.bench", dict(common, kind="pool", pool=str(dirs[n]), cold=False))
        res[n] = {**warm, "cold_s": cold.get("startup_s", float("nan")), "calibrate_ms": cold.get("calibrate_ms"),
                  "error": cold.get("error") or warm.get("error")}
        res[n]["files_mb"] = sum(p.stat().st_size for p in paths[:n]) / MB
    _print(res, prompts)
    return res


def _print(res: dict, prompts) -> None:
    print(f"\npool size sweep (random q,v rank-8 f16 adapters; fresh processes; routing on prompts of "
          f"{', '.join(str(len(p)) for p in prompts)} tokens; model load {res[0].get('model_s', float('nan')):.2f} s, "
          "the same at every N)")
    print(f"{'N':>5} {'cold s':>7} {'warm s':>7} {'add ms':>7} {'valid. ms':>9} {'probe ms':>8} {'route ms':>8} "
          f"{'exact ms':>8} {'+RSS MB':>7} {'+exact':>6} {'bank MB':>7} {'read MB':>7} {'files MB':>8}")
    rss0 = res[0].get("rss_after_mb", float("nan"))
    for n, r in res.items():
        if r.get("error"):
            print(f"{n:>5} {r['error']}")
            continue
        if n == 0:
            print(f"{0:>5} {'':>7} {'':>7} {'':>7} {'':>9} {'':>8} {'':>8} {'':>8} {0.0:7.1f}")
            continue
        print(f"{n:>5} {r['cold_s']:7.2f} {r['startup_s']:7.3f} {r['add_ms']:7.1f} {r['validate_ms']:9.1f} "
              f"{r['probe_ms']:8.1f} {r['routing_ms']:8.2f} {r['exact_ms']:8.2f} {r['rss_after_mb'] - rss0:7.1f} "
              f"{r['rss_exact_mb'] - rss0:6.1f} "
              f"{r['bank_mb']:7.1f} {r['target_mb']:7.1f} {r['files_mb']:8.1f}")
    calib = [r["calibrate_ms"] for n, r in res.items() if n and r.get("calibrate_ms") is not None]
    if calib:
        print(f"  calibration: {statistics.median(calib):.2f} ms per adapter (median; its signal statistics over the "
              "generic prompts' cached states, part of a cold start)")
    print("  cold/warm = the pool's start-up (first: indexing every file; next: mapping the index); add = "
          "Engine.add_adapter of one more file, of which valid. = reading and checking its tensors; route = "
          "eng.route() minus the probe with the default shortlist, exact = every adapter's whole window; +RSS = "
          "after the default routes, over the engine with no pool (+exact: after the exact ones too, which map "
          "the whole bank); bank = the mapped probe bank, read = its float32 target "
          "block's leading rows (a stack's top directions, a copy), what stage one reads per request")


def targets(res: dict) -> list[tuple[str, float, str, float]]:
    n = max(res)
    r = res[n]
    if n == 0 or r.get("error"):
        return []
    return [(f"pool start-up s (warm), N={n}", r["startup_s"], "<=", 1.0),
            (f"add one adapter ms minus validation, N={n}", r["add_ms"] - r["validate_ms"], "<=", 50),
            (f"routing ms per request, N={n}", r["routing_ms"], "<=", 5),
            (f"RSS MB over the engine with no pool, N={n}", r["rss_after_mb"] - res[0]["rss_after_mb"], "<=", 100)]
