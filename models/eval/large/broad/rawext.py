"""Raw norm signals of the large pool's adapters on the task-like calibration prompts (extcal.json)."""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np
from raw import raw_signals
from study import HERE, engine

if __name__ == "__main__":
    k, m = map(int, sys.argv[1].split("/"))
    eng = engine(1)
    cfg = dataclasses.replace(eng.routing, shortlist=0)
    todo = json.loads((HERE / "extcal.json").read_text())[k::m]
    rows, t0 = [], time.time()
    for j, p in enumerate(todo):
        if j % 50 == 0:
            print(f"\rprobed {j}/{len(todo)}, {time.time() - t0:.0f} s", end="", file=sys.stderr)
        tokens = eng.tokenize(eng.format_chat([{"role": "user", "content": p["prompt"]}]))
        rows.append(raw_signals(eng, eng.probe(tokens, cfg.probe_input)))
    np.save(HERE / f"raw-ext-{k}.npy", np.stack(rows))
