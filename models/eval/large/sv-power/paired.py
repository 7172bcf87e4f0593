"""A router's in-pool score against the oracle's and the default's of models/eval/large/in-pool/results.csv, on the
same examples (paired; bootstrap over examples within each task, 2,000 resamples):

    python models/eval/large/sv-power/paired.py models/eval/large/sv-power/in-pool-results.csv \
        "LoGo-norm k=3 [zscore, normed, last 8 blocks]"
"""
import csv
import sys
from collections import defaultdict

import numpy as np

old = list(csv.DictReader(open("models/eval/large/in-pool/results.csv")))
new = list(csv.DictReader(open(sys.argv[1])))
m_new = sys.argv[2]
def table(rows, method):
    d = defaultdict(dict)
    for r in rows:
        if r["method"] == method and r["group"] == "in-pool":
            d[r["task"]][int(r["idx"])] = float(r["score"])
    return d
orc, nw, dflt = table(old, "oracle"), table(new, m_new), table(old, "LoGo-norm k=3 [zscore]")
tasks = sorted(nw)
assert all(set(nw[t]) == set(orc[t]) for t in tasks)
rng = np.random.default_rng(0)
def stat(sample):
    a = np.mean([np.mean([nw[t][i] for i in sample[t]]) for t in tasks])
    o = np.mean([np.mean([orc[t][i] for i in sample[t]]) for t in tasks])
    d = np.mean([np.mean([dflt[t][i] for i in sample[t]]) for t in tasks])
    return a, o, a / o, a - d
full = {t: sorted(nw[t]) for t in tasks}
point = stat(full)
boots = []
for _ in range(2000):
    s = {t: list(rng.choice(full[t], len(full[t]))) for t in tasks}
    boots.append(stat(s))
b = np.array(boots)
for i, name in enumerate(["new", "oracle", "new/oracle", "new - old default"]):
    print(f"{name}: {point[i]:.4f} [{np.percentile(b[:, i], 2.5):.4f}, {np.percentile(b[:, i], 97.5):.4f}]")
