"""Raw norm signals (every adapter, the whole window, no shortlist) of the in-pool prompts and of the calibration
prompts, for calibration variants in numpy (calib.py)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
from study import HERE, engine

from logo_edge.router import one_blas_thread
from logo_edge.tasks import TASKS, splits


def raw_signals(eng, h: np.ndarray) -> np.ndarray:
    pool = eng.pool
    h, h_other = pool.split_states(np.asarray(h))
    with one_blas_thread():
        raw = pool._bank.signals(h, "norm")
        if len(pool.other_bank):
            raw = pool.merge(raw, pool.other_bank.norms(h_other))
    return np.asarray(raw, np.float64)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=25)
    ap.add_argument("--shard", default="0/1")
    a = ap.parse_args()
    k, m = map(int, a.shard.split("/"))
    eng = engine(1)
    cfg = dataclasses.replace(eng.routing, shortlist=0)
    pool = eng.pool
    if k == 0:
        st = pool.calibration_states(cfg.probe_input)
        other = pool._other_states_for(cfg.probe_input) if len(pool.other_bank) else None
        cal = np.stack([raw_signals(eng, st[i] if other is None else np.concatenate([st[i], other[i]]))
                        for i in range(len(st))])
        np.save(HERE / "raw-calibration.npy", cal)
        mean, sd = pool.stats(cfg.probe_input, "norm")
        np.save(HERE / "raw-stats.npy", np.stack([mean, sd]))
    todo = [(t, s, i, ex.prompt) for s in ("val", "test") for t in pool.names if t in TASKS
            for i, ex in enumerate(splits(TASKS[t])[s][:a.n])][k::m]
    rows, meta, t0 = [], [], time.time()
    for j, (t, s, i, prompt) in enumerate(todo):
        if j % 50 == 0:
            print(f"\rprobed {j}/{len(todo)}, {time.time() - t0:.0f} s", end="", file=sys.stderr)
        tokens = eng.tokenize(eng.format_chat([{"role": "user", "content": prompt}]))
        rows.append(raw_signals(eng, eng.probe(tokens, cfg.probe_input)))
        meta.append(f"{t}/{s}/{i}")
    np.save(HERE / f"raw-{k}.npy", np.stack(rows))
    (HERE / f"raw-{k}.txt").write_text("\n".join(meta) + "\n")
    (HERE / "raw-names.txt").write_text("\n".join(pool.names) + "\n")
