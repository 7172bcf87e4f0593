"""Scores of the candidate mixtures on the unseen tasks (answers-unseen-*.json), and margin rules."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from analyze import boot
from study import load_probes

HERE = Path(__file__).resolve().parent


def margin(p: dict, k: int = 4) -> float:
    r = p["ranked"]
    return r[0][1] - r[min(k, len(r)) - 1][1]


if __name__ == "__main__":
    ans = {}
    for f in HERE.glob("answers-unseen-*.json"):
        ans |= json.loads(f.read_text())
    methods = sorted({k.rsplit("/", 1)[1] for k in ans})
    probes = [p for p in load_probes() if p["group"] == "unseen"]
    key = lambda p, m: f"{p['task']}/{p['split']}/{p['index']}/{m}"  # noqa: E731
    for split in ("val", "test"):
        print(split)
        for m in methods:
            by: dict[str, list[float]] = {}
            for p in probes:
                if p["split"] == split and key(p, m) in ans:
                    by.setdefault(p["task"], []).append(ans[key(p, m)])
            if by:
                lo = boot([np.array(v) for v in by.values()])
                print(f"  {m:12s} n={sum(map(len, by.values())):3d} {100 * lo[0]:5.1f} "
                      f"[{100 * lo[1]:.1f}, {100 * lo[2]:.1f}]  "
                      + " ".join(f"{t[:8]} {100 * np.mean(v):5.1f}" for t, v in by.items()))
    for split in ("val", "test", "both"):  # paired: the same prompts under each mixture and the routed one
        for m in methods:
            if m == "routed":
                continue
            by = {}
            for p in probes:
                if split in ("both", p["split"]):
                    by.setdefault(p["task"], []).append(ans[key(p, m)] - ans[key(p, "routed")])
            d = boot([np.array(v) for v in by.values()])
            print(f"paired {split:4s} {m:12s} - routed: {100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]")
    # margin rules: route when margin >= tau, else the broad method
    inpool_val = [p for p in load_probes() if p["group"] == "in-pool" and p["split"] == "val"]
    for k in (2, 4):
        by: dict[str, list[float]] = {}
        for p in inpool_val:
            by.setdefault(p["task"], []).append(margin(p, k))
        for alpha in (0.05, 0.1, 0.2):
            tau = min(np.sort(v)[int(alpha * len(v))] for v in by.values())
            pooled = np.sort([x for v in by.values() for x in v])[int(alpha * len(inpool_val))]
            for name, t in (("per-task", tau), ("pooled", pooled)):
                for m in methods:
                    if m == "routed":
                        continue
                    for split in ("val", "test"):
                        sc: dict[str, list[float]] = {}
                        for p in probes:
                            if p["split"] == split and key(p, m) in ans and key(p, "routed") in ans:
                                use = m if margin(p, k) < t else "routed"
                                sc.setdefault(p["task"], []).append(ans[key(p, use)])
                        if sc:
                            fb = np.mean([margin(p, k) < t for p in probes if p["split"] == split])
                            lo = boot([np.array(v) for v in sc.values()])
                            print(f"margin1-{k} {name} {alpha:.2f} tau {t:.2f} -> {m:12s} {split}: fallback unseen "
                                  f"{100 * fb:.0f} %, score {100 * lo[0]:.1f} [{100 * lo[1]:.1f}, {100 * lo[2]:.1f}]")
