"""The probe window on the 78-adapter pool (issue 18, top-1 >= 95 %): the default reads the last 8 blocks; on the
small pools wider windows ranked better (`models/eval/window_study.md`: last 15-30 blocks 97.8 % against 95.9 % on
the mixed pool). One probe pass reads the last 30 blocks of each prompt (the probe runs to the last block for any
window); each window's engine routes the same states cut to its own last W blocks (its own calibration, shortlist
and leading rows, as a request is routed). Validation and test splits, 25 prompts a task.

    for k in 0 1; do python study.py --shard $k/2 & done; wait      # PYTHONPATH=. from this folder
    python study.py --report > report.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from logo_edge import Engine
from logo_edge.tasks import TASKS, splits

HERE = Path(__file__).resolve().parent
POOL = HERE.parents[2] / "pool-large"
WINDOWS = (8, 12, 16, 20, 30)


def engines(threads: int) -> dict[int, Engine]:
    return {w: Engine(adapters=str(POOL), n_ctx=1024, n_threads=threads, probe_blocks=w, pool_index=False)
            for w in WINDOWS}


def cut(h: np.ndarray, n_all: int, w: int) -> np.ndarray:
    """States of the last w blocks from states of the last n_all (the target input's rows, then the other's)."""
    if h.shape[0] == 2 * n_all:
        return np.concatenate([h[n_all - w:n_all], h[2 * n_all - w:]])
    return h[n_all - w:]


def run(shard: tuple[int, int], n: int) -> None:
    engs = engines(1)
    wide = engs[max(WINDOWS)]
    for e in engs.values():
        e.calibrate(e.routing.probe_input)
    todo = [(t, s, i, ex.prompt) for s in ("val", "test") for t in wide.pool.names if t in TASKS
            for i, ex in enumerate(splits(TASKS[t])[s][:n])][shard[0]::shard[1]]
    rows, t0 = [], time.time()
    for j, (task, split, i, prompt) in enumerate(todo):
        if j % 25 == 0:
            print(f"\r{j}/{len(todo)} prompts, {time.time() - t0:.0f} s", end="", file=sys.stderr)
        h = wide.probe(wide.tokenize(wide.format_chat([{"role": "user", "content": prompt}])),
                       wide.routing.probe_input)
        row = {"task": task, "split": split, "i": i}
        for w, e in engs.items():
            r = e.route_state(cut(np.asarray(h), max(WINDOWS), w))[0]
            row[str(w)] = [r.names[k] for k in r.selected]
        rows.append(row)
    (HERE / f"routed-{shard[0]}.json").write_text(json.dumps(rows))
    print(f"\n{len(rows)} prompts in {time.time() - t0:.0f} s", file=sys.stderr)


def report() -> None:
    rows = [r for f in sorted(HERE.glob("routed-*.json")) for r in json.loads(f.read_text())]
    rng = np.random.default_rng(0)
    print("| window (last W blocks) | top-1 val | top-1 test [95 %] | top-3 test |")
    print("|---|---|---|---|")
    for w in WINDOWS:
        cells = []
        for split in ("val", "test"):
            sel = [r for r in rows if r["split"] == split]
            hit = np.array([r[str(w)][0] == r["task"] for r in sel], float)
            tasks = np.array([r["task"] for r in sel])
            boots = []
            groups = [np.flatnonzero(tasks == t) for t in sorted(set(tasks))]
            for _ in range(2000):  # prompts resampled within each task
                boots.append(np.mean(np.concatenate([hit[rng.choice(g, len(g))] for g in groups])))
            lo, hi = np.percentile(boots, [2.5, 97.5])
            cells.append((hit.mean(), lo, hi))
            top3 = np.mean([r["task"] in r[str(w)][:3] for r in sel])
        (v, _, _), (t, lo, hi) = cells
        print(f"| {w} | {100 * v:.1f} | {100 * t:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {100 * top3:.1f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--n", type=int, default=25)
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    if a.report:
        report()
    else:
        run(tuple(map(int, a.shard.split("/"))), a.n)
