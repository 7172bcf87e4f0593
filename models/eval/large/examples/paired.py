"""The examples router against the earlier runs on the same examples (README.md): paired, bootstrap over examples
within each task (2,000 resamples), mean over tasks. Examples are matched by task and position in the task's test
split (the runs ordered tasks differently, so their idx differ).

    python paired.py        # eval/results.csv against ../lead-rows (LoGo), ../in-pool (oracle), ../unseen
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NEW = ("eval/results.csv", "examples k=3")
REFS = {"LoGo default": ("../lead-rows/results.csv", "LoGo-norm k=3 [zscore]"),
        "oracle": ("../in-pool/results.csv", "oracle"),
        "uniform": ("../unseen/results.csv", "uniform"), "base": ("../unseen/results.csv", "base")}


def scores(path: str, method: str, group: str) -> dict[str, np.ndarray]:
    by: dict[str, dict[int, float]] = defaultdict(dict)
    for r in csv.DictReader(open(HERE / path)):
        if r["method"] == method and r["group"] == group:
            by[r["task"]][int(r["idx"])] = float(r["score"])
    return {t: np.array([v[i] for i in sorted(v)]) for t, v in by.items()}


def paired(a: dict, b: dict, ratio: bool = False, n: int = 2000) -> tuple[float, float, float]:
    tasks = sorted(set(a) & set(b))
    rng = np.random.default_rng(0)

    def stat(idx):
        x = np.mean([a[t][idx[t]].mean() for t in tasks])
        y = np.mean([b[t][idx[t]].mean() for t in tasks])
        return x / y if ratio else x - y

    point = stat({t: np.arange(len(a[t])) for t in tasks})
    boots = [stat({t: rng.integers(0, len(a[t]), len(a[t])) for t in tasks}) for _ in range(n)]
    return point, *np.percentile(boots, [2.5, 97.5])


def main() -> None:
    for group in ("in-pool", "unseen"):
        mine = scores(*NEW, group)
        print(f"{group}: examples k=3 {100 * np.mean([v.mean() for v in mine.values()]):.1f} over {len(mine)} tasks")
        for name, (path, method) in REFS.items():
            ref = scores(path, method, group)
            if not ref or any(len(ref.get(t, ())) != len(v) for t, v in mine.items()):
                continue
            d = paired(mine, ref)
            print(f"  minus {name} ({100 * np.mean([ref[t].mean() for t in mine]):.1f}): "
                  f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]")
            if name == "oracle":
                r = paired(mine, ref, ratio=True)
                print(f"  / oracle: {100 * r[0]:.1f} % [{100 * r[1]:.1f}, {100 * r[2]:.1f}]")


if __name__ == "__main__":
    main()
