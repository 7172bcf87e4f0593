"""A router's score against others of the first evaluation (models/eval/large/<group>/results.csv, or the
results.csv given last) on the same examples: paired, bootstrap over examples within each task (2,000
resamples), mean over tasks. The shipped pools: `... results.csv "LoGo-norm k=3 [zscore]" in-pool
models/eval/uniform/results.csv`.

    python models/eval/large/sv-power/paired.py models/eval/large/sv-power/in-pool-results.csv \\
        "LoGo-norm k=3 [zscore, normed, last 8 blocks]" in-pool
    python models/eval/large/sv-power/paired.py models/eval/large/sv-power/unseen-results.csv \\
        "LoGo-norm k=3 [zscore, normed, last 8 blocks]" unseen
"""
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

new_csv, method, group = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "in-pool"
# the first evaluation's results.csv: the large pool's by default, or another (e.g. models/eval/uniform/results.csv)
old_csv = sys.argv[4] if len(sys.argv) > 4 else Path(__file__).parents[1] / group / "results.csv"
old = list(csv.DictReader(open(old_csv)))
new = list(csv.DictReader(open(new_csv)))


def table(rows, m):
    d = defaultdict(dict)
    for r in rows:
        if r["method"] == m and r["group"] == group:
            d[r["task"]][int(r["idx"])] = float(r["score"])
    return d


mine = table(new, method)
tasks = sorted(mine)
refs = {m: table(old, m) for m in ("oracle", "LoGo-norm k=3 [zscore]", "uniform", "base")}
refs = {m: t for m, t in refs.items() if t and all(set(t[k]) == set(mine[k]) for k in tasks)}


def mean(t, sample):
    return np.mean([np.mean([t[k][i] for i in sample[k]]) for k in tasks])


def stats(sample):
    a = mean(mine, sample)
    out = {"this router": a}
    for m, t in refs.items():
        r = mean(t, sample)
        out[m] = r
        out[f"this router - {m}"] = a - r
        if m == "oracle":
            out["this router / oracle"] = a / r
    return out


full = {k: sorted(mine[k]) for k in tasks}
point = stats(full)
rng = np.random.default_rng(0)
boots = [stats({k: list(rng.choice(full[k], len(full[k]))) for k in tasks}) for _ in range(2000)]
for name, v in point.items():
    b = np.array([x[name] for x in boots])
    print(f"{name:<45} {100 * v:6.1f} [{100 * np.percentile(b, 2.5):6.1f}, {100 * np.percentile(b, 97.5):6.1f}]")
