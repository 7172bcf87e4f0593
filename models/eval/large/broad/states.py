"""Probe states (the target input's window, float16) of the in-pool prompts, in raw.py's order, for
tie-breaking experiments (not kept in the repository: 36 MB)."""
from __future__ import annotations

import sys
import time

import numpy as np
from study import engine

from logo_edge.tasks import TASKS, splits

if __name__ == "__main__":
    k, m = map(int, sys.argv[1].split("/"))
    out = sys.argv[2]
    eng = engine(1)
    pool = eng.pool
    todo = [(t, s, i, ex.prompt) for s in ("val", "test") for t in pool.names if t in TASKS
            for i, ex in enumerate(splits(TASKS[t])[s][:25])][k::m]
    rows, t0 = [], time.time()
    for j, (_, _, _, prompt) in enumerate(todo):
        if j % 50 == 0:
            print(f"\rprobed {j}/{len(todo)}, {time.time() - t0:.0f} s", end="", file=sys.stderr)
        tokens = eng.tokenize(eng.format_chat([{"role": "user", "content": prompt}]))
        h, _ = pool.split_states(np.asarray(eng.probe(tokens, eng.routing.probe_input)))
        rows.append(h.astype(np.float16))
    np.save(f"{out}/states-{k}.npy", np.stack(rows))
