"""Probe states and LoGo's raw signals of the 78-adapter pool's prompts, for the example-prompt study (README.md).

Every prompt is probed once with the shipped probe (the normed attention input and the FFN input at the window's
8 blocks, the last prompt token): the first 10 training inputs of each pool task (the examples are drawn from
these), the first 25 validation and test prompts of each pool task, 25 + 25 of each unseen BBH-source task, and
the 60 generic calibration prompts. Run from this folder, one process per core:

    for k in 0 1; do PYTHONPATH=../broad python collect.py $k/2 /tmp/st-$k.pkl & done; wait   # ~14 min
"""
from __future__ import annotations

import dataclasses
import pickle
import sys
import time

import numpy as np
from raw import raw_signals
from study import engine

from logo_edge.tasks import TASKS, UNSEEN_TASKS, splits


def prompts(names: list[str]) -> list[tuple[str, str, str, int, str]]:
    todo = []
    for split, n in (("train", 10), ("val", 25), ("test", 25)):
        todo += [("in", t, split, i, ex.prompt) for t in names if t in TASKS
                 for i, ex in enumerate(splits(TASKS[t])[split][:n])]
    for split in ("val", "test"):
        todo += [("unseen", t.name, split, i, ex.prompt) for t in UNSEEN_TASKS
                 for i, ex in enumerate(splits(t)[split][:25])]
    return todo


def main(shard: str, out: str) -> None:
    k, m = map(int, shard.split("/"))
    eng = engine(1)
    cfg = dataclasses.replace(eng.routing, shortlist=0)
    pool = eng.pool
    rows = []
    if k == 0:
        st = pool.calibration_states(cfg.probe_input)
        other = pool._other_states_for(cfg.probe_input) if len(pool.other_bank) else None
        for i in range(len(st)):
            h = st[i] if other is None else np.concatenate([st[i], other[i]])
            rows.append(("cal", "generic", "cal", i, np.asarray(h, np.float32), raw_signals(eng, h)))
    todo, t0 = prompts(pool.names)[k::m], time.time()
    for j, (group, task, split, i, prompt) in enumerate(todo):
        if j % 100 == 0:
            print(f"\rprobed {j}/{len(todo)}, {time.time() - t0:.0f} s", end="", file=sys.stderr, flush=True)
        h = eng.probe(eng.tokenize(eng.format_chat([{"role": "user", "content": prompt}])), cfg.probe_input)
        rows.append((group, task, split, i, np.asarray(h, np.float32), raw_signals(eng, h)))
    with open(out, "wb") as f:
        pickle.dump(dict(names=pool.names, rows=rows), f)
    print(file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
