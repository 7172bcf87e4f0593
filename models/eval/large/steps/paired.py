"""Paired difference of two oracle runs (results.csv of `logo-edge eval --methods oracle`) on the same examples,
with a 95 % bootstrap interval (examples resampled within each task, as top1.py's hit rates)."""
import csv
import sys

import numpy as np
from top1 import bootstrap


def load(path):
    return {(r["task"], r["idx"]): float(r["score"]) for r in csv.DictReader(open(path))}


a, b = load(sys.argv[1]), load(sys.argv[2])
diffs: dict[str, list[float]] = {}
for (task, idx), score in a.items():
    diffs.setdefault(task, []).append(b[task, idx] - score)
mean = np.mean([d for v in diffs.values() for d in v])
lo, hi = bootstrap(diffs)
print(f"{sum(map(len, diffs.values()))} examples: {100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
