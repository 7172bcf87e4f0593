"""Paired difference of two oracle runs (results.csv of `logo-edge eval --methods oracle`) on the same examples,
with a 95 % bootstrap interval (examples resampled within each task)."""
import csv
import sys

import numpy as np


def load(path):
    return {(r["task"], r["idx"]): float(r["score"]) for r in csv.DictReader(open(path))}


a, b = load(sys.argv[1]), load(sys.argv[2])
tasks = sorted({t for t, _ in a})
diffs = {t: np.array([b[k] - a[k] for k in a if k[0] == t]) for t in tasks}
rng = np.random.default_rng(0)
n = sum(len(d) for d in diffs.values())
draws = [sum(rng.choice(d, len(d)).sum() for d in diffs.values()) / n for _ in range(2000)]
mean = sum(d.sum() for d in diffs.values()) / n
lo, hi = 100 * np.percentile(draws, 2.5), 100 * np.percentile(draws, 97.5)
print(f"{n} examples: {100 * mean:+.1f} [{lo:+.1f}, {hi:+.1f}]")
