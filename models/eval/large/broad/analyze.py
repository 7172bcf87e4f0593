"""Numbers from probes-*.json (study.py): best calibrated score by group, the per-task budget thresholds, and
top-1 under per-module-type score offsets chosen on validation."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from study import load_probes

HERE = Path(__file__).resolve().parent


def boot(per_task: list[np.ndarray], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    m = float(np.mean([v.mean() for v in per_task]))
    bs = [np.mean([v[rng.integers(0, len(v), len(v))].mean() for v in per_task]) for _ in range(n)]
    return m, float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))


def top1(ps, offsets: dict[str, float], kind: dict[str, str]) -> dict[str, np.ndarray]:
    by: dict[str, list[float]] = {}
    for p in ps:
        best = max(p["ranked"], key=lambda r: r[1] + offsets.get(kind[r[0]], 0.0))[0]
        by.setdefault(p["task"], []).append(float(best == p["task"]))
    return {t: np.array(v) for t, v in by.items()}


if __name__ == "__main__":
    probes = load_probes()
    kind = json.loads((HERE / "kinds.json").read_text())  # adapter -> what it is scored over
    g = lambda grp, split: [p for p in probes if p["group"] == grp and p["split"] == split]  # noqa: E731
    for grp in ("in-pool", "unseen"):
        for split in ("val", "test"):
            b = np.array([p["ranked"][0][1] for p in g(grp, split)])
            print(f"{grp:8s} {split:4s} n={len(b)} best z median {np.median(b):.2f} p5 {np.percentile(b, 5):.2f} "
                  f"p95 {np.percentile(b, 95):.2f}")
    # per-task 5 % budget threshold on in-pool validation
    by: dict[str, list[float]] = {}
    for p in g("in-pool", "val"):
        by.setdefault(p["task"], []).append(p["ranked"][0][1])
    for alpha in (0.05, 0.10, 0.2):
        t = min(np.sort(v)[int(alpha * len(v))] for v in by.values())
        fb = {grp: np.mean([p["ranked"][0][1] < t for p in g(grp, "test")]) for grp in ("in-pool", "unseen")}
        print(f"per-task {alpha:.2f}: min_score {t:.2f}; test fallback in-pool {100 * fb['in-pool']:.1f} %, "
              f"unseen {100 * fb['unseen']:.1f} %")
    kinds = sorted(set(kind.values()))
    base = {s: top1(g("in-pool", s), {}, kind) for s in ("val", "test")}
    print("top-1 no offset: val %.1f test %.1f" % (100 * boot(list(base["val"].values()))[0],
                                                 100 * boot(list(base["test"].values()))[0]))
    for k in kinds:
        own = [t for t in base["test"] if kind.get(t) == k]
        print(f"  {k:24s} {len(own):2d} test top-1 {100 * np.mean([base['test'][t].mean() for t in own]):.1f}")
    # coordinate search over offsets of the kinds that lack the probe target, on validation
    grid = np.arange(-1.0, 3.01, 0.25)
    off = {k: 0.0 for k in kinds}
    for _ in range(2):
        for k in kinds:
            if k in ("attn_q", "attn_q+attn_k+attn_v", "attn_q+attn_v"):
                continue
            scores = []
            for d in grid:
                o = off | {k: float(d)}
                scores.append(np.mean([v.mean() for v in top1(g("in-pool", "val"), o, kind).values()]))
            off[k] = float(grid[int(np.argmax(scores))])
    print("offsets chosen on validation:", off)
    for s in ("val", "test"):
        r = top1(g("in-pool", s), off, kind)
        print(f"  {s}: top-1 {100 * boot(list(r.values()))[0]:.1f} [{100 * boot(list(r.values()))[1]:.1f}, "
              f"{100 * boot(list(r.values()))[2]:.1f}]")
        for k in kinds:
            own = [t for t in r if kind.get(t) == k]
            print(f"    {k:24s} {100 * np.mean([r[t].mean() for t in own]):.1f}")
    sys.exit(0)
