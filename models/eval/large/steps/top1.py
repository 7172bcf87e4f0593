"""Top-1 of the default router over a pool directory: every in-pool task's first --n test prompts probed and routed
once (the engine's own routing, shortlist included); prints each task's top-1 and what its prompts went to, and
writes the ranked firsts to --out. Run in shards of one thread each and merge with --merge."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from logo_edge import Engine
from logo_edge.tasks import TASKS, splits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "broad"))
from study import ranked  # noqa: E402  (the broad study's probe-and-rank, shared)


def probe(pool: Path, n: int, shard: tuple[int, int], threads: int) -> list[dict]:
    eng = Engine(adapters=str(pool), n_ctx=1024, n_threads=threads)
    todo = [(t, i, ex.prompt) for t in eng.pool.names if t in TASKS
            for i, ex in enumerate(splits(TASKS[t])["test"][:n])][shard[0]::shard[1]]
    got, t0 = [], time.time()
    for j, (task, i, prompt) in enumerate(todo):
        if j % 50 == 0:
            print(f"\rprobed {j}/{len(todo)}, {time.time() - t0:.0f} s", end="", file=sys.stderr)
        routing, order = ranked(eng, prompt)
        got.append(dict(task=task, index=i, first=[routing.names[k] for k in order[:3]]))
    print(file=sys.stderr)
    return got


def bootstrap(hits: dict[str, list[int]], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the pooled hit rate, prompts resampled within each task."""
    rng = np.random.default_rng(seed)
    arrs = [np.asarray(h, float) for h in hits.values()]
    total = sum(len(a) for a in arrs)
    draws = [sum(rng.choice(a, len(a)).sum() for a in arrs) / total for _ in range(n)]
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def report(rows: list[dict], focus: list[str]) -> None:
    hits: dict[str, list[int]] = {}
    went: dict[str, Counter] = {}
    for r in rows:
        hits.setdefault(r["task"], []).append(int(r["first"][0] == r["task"]))
        went.setdefault(r["task"], Counter())[r["first"][0]] += 1
    allh = [h for v in hits.values() for h in v]
    lo, hi = bootstrap(hits)
    print(f"top-1 over {len(hits)} tasks, {len(allh)} test prompts: {100 * np.mean(allh):.1f} "
          f"[{100 * lo:.1f}, {100 * hi:.1f}]")
    rest = {t: h for t, h in hits.items() if t not in focus}
    lo, hi = bootstrap(rest)
    print(f"  the {len(rest)} tasks outside the retrained ones: "
          f"{100 * np.mean([h for v in rest.values() for h in v]):.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
    stolen = Counter(r["first"][0] for r in rows if r["task"] not in focus and r["first"][0] in focus)
    print(f"  their prompts ranked first for a retrained adapter: {sum(stolen.values())} {dict(stolen)}")
    for t in focus:
        if t in hits:
            print(f"  {t:16s} {100 * np.mean(hits[t]):5.1f}  first: {dict(went[t].most_common(3))}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pool", type=Path, required=True)
    ap.add_argument("--n", type=int, default=25)
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--merge", type=Path, nargs="+", help="report over these shard files")
    ap.add_argument("--focus", nargs="+", default=[])
    a = ap.parse_args()
    if a.merge:
        report([r for f in a.merge for r in json.loads(f.read_text())], a.focus)
        return 0
    k, n = map(int, a.shard.split("/"))
    a.out.write_text(json.dumps(probe(a.pool, a.n, (k, n), a.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
