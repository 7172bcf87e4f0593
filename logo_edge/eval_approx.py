"""What the routing approximations cost on real adapters: float16 window storage and the shortlist.

`logo-edge eval --approx` probes held-out test prompts of every task of a pool once each and routes them
(default signal, k and calibration) four ways from the same probe states:

    exact     the window stored in float32 and every adapter's whole window read (the reference)
    shipped   the engine as it runs on this pool (its index's storage, the default shortlist: on a pool
              of at most 256 files and 32 adapters, the exact route)
    float16   the earlier window blocks stored in float16, as a pool of over 256 files stores them
    m = ...   the shortlist forced below the pool size (the target block ranks all, the window is read for
              the best m): what the shortlist costs on a pool larger than it

and reports, with bootstrap 95 % intervals, the top-1 hit rate (the prompt's own task adapter ranked
first) and the agreement with the exact route (same first adapter; same top-k set). Writes approx.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .pool import AdapterPool
from .router import LEAD_NORM, TARGET_NORM, RouterConfig, route_signals, shortlist_norms
from .tasks import TASKS, splits


def _interval(x: np.ndarray, rng: np.random.Generator, n: int = 2000) -> tuple[float, float, float]:
    """Mean and bootstrap 95 % interval of 0/1 outcomes."""
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    means = rng.choice(x, size=(n, len(x)), replace=True).mean(axis=1)
    return float(x.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def approx_report(eng, n_route: int, out_dir: Path, shortlists=(5, 3, 2), seed: int = 0) -> dict:
    cfg = eng.routing
    pool = eng.pool
    exact = AdapterPool(eng.model, pool.target_block, pool.target_module, probe_blocks=len(pool.blocks),
                        window_dtype=np.float32)
    exact.add_many([a.path for a in pool.adapters])
    half = AdapterPool(eng.model, pool.target_block, pool.target_module, probe_blocks=len(pool.blocks),
                       window_dtype=np.float16)
    half.add_many([a.path for a in pool.adapters])
    eng.calibrate(cfg.probe_input)
    if cfg.calibration != "raw":
        eng.calibrate(cfg.probe_input, exact)
        eng.calibrate(cfg.probe_input, half)
    tasks = [t for t in pool.names if t in TASKS]
    rc = RouterConfig(cfg.signal, cfg.k, cfg.calibration)

    def stats(p, signal):
        return p.stats(cfg.probe_input, signal) if cfg.calibration != "raw" else None

    modes = ["exact", "shipped", "float16"] + [f"m = {m}" for m in shortlists if m < len(pool.bank)]
    top1 = {m: [] for m in modes}
    same1 = {m: [] for m in modes}
    same_set = {m: [] for m in modes}
    t0 = time.time()
    data = [(t, ex) for t in tasks for ex in splits(TASKS[t])["test"][:n_route]]
    for i, (task, ex) in enumerate(data):
        if i % 25 == 0:
            print(f"\r[eval --approx] {i}/{len(data)} prompts, {time.time() - t0:.0f} s", end="", file=sys.stderr)
        tokens = eng.tokenize(eng.format_chat([{"role": "user", "content": ex.prompt}]))
        h = eng.probe(tokens, cfg.probe_input)
        own = pool.names.index(task)
        routes = {name: route_signals(p.bank.signals(h, cfg.signal), p.names, rc, p.unprobeable, stats(p, cfg.signal))
                  for name, p in (("exact", exact), ("float16", half))}
        routes["shipped"] = eng.route_state(h)[0]  # the same probe states: only the storage and route differ
        for m in shortlists:
            if f"m = {m}" in modes:
                raw, considered = shortlist_norms(pool.bank, h, m, cfg.calibration, stats(pool, TARGET_NORM))
                routes[f"m = {m}"] = route_signals(raw, pool.names, rc, pool.unprobeable, stats(pool, LEAD_NORM),
                                                   considered)
        sel = {k: (v if isinstance(v, list) else v.selected) for k, v in routes.items()}
        for m in modes:
            top1[m].append(sel[m][:1] == [own])
            same1[m].append(sel[m][:1] == sel["exact"][:1])
            same_set[m].append(set(sel[m]) == set(sel["exact"]))
    print(file=sys.stderr)
    rng = np.random.default_rng(seed)
    rows = {m: dict(top1=_interval(np.array(top1[m], float), rng), same_first=_interval(np.array(same1[m], float), rng),
                    same_set=_interval(np.array(same_set[m], float), rng)) for m in modes}
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# Routing approximations on `{Path(pool.adapters[0].path).parent}`", "",
             f"{len(pool)} adapters, {len(data)} held-out test prompts ({n_route} per task), signal {cfg.signal}, "
             f"k={cfg.k}, calibration {cfg.calibration}, window of {len(pool.blocks)} blocks; default shortlist "
             f"{cfg.shortlist}. Mean [bootstrap 95 % interval].", "",
             "| route | top-1 hit rate | same first adapter as exact | same top-k set as exact |",
             "|---|---|---|---|"]
    for m, r in rows.items():
        lines.append(f"| {m} | " + " | ".join(f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for v in r.values()) + " |")
    lines += ["", "exact: float32 window, every adapter read; shipped: the engine as it runs on this pool; "
              "float16: the earlier window blocks in float16 (pools of over 256 files), every adapter read; "
              "m = N: the shortlist forced to N adapters (stage one: the target block's calibrated norm), "
              "as the engine stores this pool."]
    (out_dir / "approx.md").write_text("\n".join(lines) + "\n")
    exact.close()
    half.close()
    return {m: {k: v[0] for k, v in r.items()} for m, r in rows.items()}
