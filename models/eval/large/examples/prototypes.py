"""Top-1 of the example-prompt router and its variants on collect.py's states (README.md).

    PYTHONPATH=../broad python prototypes.py /tmp/st-0.pkl /tmp/st-1.pkl > prototypes.txt

Examples are the first K training inputs of each task (never a validation or test input); choices are read on
validation, reported on test. Intervals: 95 % bootstrap, prompts resampled within each task.
"""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
from analyze import boot  # the broad study's

SHIPPED_K = 10  # models/pool-large/*.examples.jsonl: chosen on validation (99.2 % against 98.7 for 5)
KINDS = json.loads((Path(__file__).resolve().parents[1] / "broad" / "kinds.json").read_text())


def load(paths: list[str]):
    rows, names = [], None
    for p in paths:
        with open(p, "rb") as f:
            d = pickle.load(f)
        rows += d["rows"]
        names = d["names"]
    g, t, s, i = (np.array([r[j] for r in rows]) for j in range(4))
    h = np.stack([r[4].reshape(-1) for r in rows]).astype(np.float64)
    return names, g, t, s, i.astype(int), h, np.stack([r[5] for r in rows])


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


class Study:
    def __init__(self, paths: list[str]):
        self.names, self.g, self.t, self.s, self.i, self.h, raw = load(paths)
        self.cal = self.g == "cal"
        self.z = (raw - raw[self.cal].mean(0)) / raw[self.cal].std(0)  # LoGo's calibrated score (the default)

    def firsts(self, score: np.ndarray, split: str, only=None) -> list[np.ndarray]:
        by: dict[str, list[float]] = {}
        m = (self.g == "in") & (self.s == split)
        for sc, t in zip(score[m], self.t[m]):
            if only is None or t in only:
                by.setdefault(t, []).append(float(self.names[int(np.nanargmax(sc))] == t))
        return [np.array(v) for v in by.values()]

    def row(self, label: str, score: np.ndarray) -> str:
        v, t = boot(self.firsts(score, "val"), 500), boot(self.firsts(score, "test"), 500)
        return f"| {label} | {100 * v[0]:.1f} | {100 * t[0]:.1f} [{100 * t[1]:.1f}, {100 * t[2]:.1f}] |"

    def prototypes(self, x: np.ndarray, k: int, center) -> np.ndarray:
        xc = unit(x - center)
        own = (self.g == "in") & (self.s == "train")
        return unit(np.stack([xc[own & (self.t == n) & (self.i < k)].mean(0) for n in self.names]))

    def cosines(self, k: int) -> np.ndarray:
        """The shipped router's score (logo_edge.examples): the cosine of the generic-centred probe state."""
        c = self.h[self.cal].mean(0)
        return unit(self.h - c) @ self.prototypes(self.h, k, c).T


def main(paths: list[str]) -> None:
    st = Study(paths)
    print(f"{len(st.names)} adapters; top-1 on the first 25 validation / test prompts of each task\n")
    print("| router | validation | test |\n|---|---|---|")
    print(st.row("LoGo, the default (z over the generic prompts)", st.z))
    for k in (1, 3, 5, 10):
        shipped = " (shipped)" if k == SHIPPED_K else ""
        print(st.row(f"examples, K = {k}: cosine of the centred probe state{shipped}", st.cosines(k)))
        hs = st.h[st.cal].std(0) + 1e-3
        c = st.h[st.cal].mean(0) / hs
        print(st.row(f"examples, K = {k}: the same, every dimension scaled by its generic sd",
                     unit(st.h / hs - c) @ st.prototypes(st.h / hs, k, c).T))
        print(st.row(f"examples, K = {k}: cosine of LoGo's z-score profile (78 signals)",
                     unit(st.z) @ st.prototypes(st.z, k, 0).T))
    cos = st.cosines(SHIPPED_K)
    zc = (cos - cos[st.cal].mean(0)) / cos[st.cal].std(0)
    print(st.row(f"examples, K = {SHIPPED_K}: the cosine z-scored over the generic prompts", zc))
    for lam in (0.5, 1, 2):
        print(st.row(f"LoGo z + {lam} x that z-score", st.z + lam * zc))

    print("\nHalf the adapters with examples (drawn at random, seed 0): their z-scored cosine, LoGo's z for the rest "
          "(the shipped rule for a mixed pool); top-1 of each half, validation\n")
    has = np.random.default_rng(0).random(len(st.names)) < 0.5
    mixed = np.where(has, zc, st.z)
    print("| half | adapters | mixed rule | LoGo alone |\n|---|---|---|---|")
    for label, mask in (("with examples", has), ("without", ~has)):
        only = set(np.array(st.names)[mask])
        a, b = boot(st.firsts(mixed, "val", only), 500), boot(st.firsts(st.z, "val", only), 500)
        print(f"| {label} | {mask.sum()} | {100 * a[0]:.1f} [{100 * a[1]:.1f}, {100 * a[2]:.1f}] | "
              f"{100 * b[0]:.1f} [{100 * b[1]:.1f}, {100 * b[2]:.1f}] |")

    print(f"\nTop-1 on test by what the adapter adapts (item 3), LoGo's default against examples (K = {SHIPPED_K})\n")
    print("| adapts | adapters | LoGo | examples |\n|---|---|---|---|")
    for kind in sorted(set(KINDS.values())):
        only = {n for n in st.names if KINDS.get(n) == kind}
        a, b = boot(st.firsts(st.z, "test", only), 500), boot(st.firsts(cos, "test", only), 500)
        print(f"| {kind} | {len(only)} | {100 * a[0]:.1f} [{100 * a[1]:.1f}, {100 * a[2]:.1f}] | "
              f"{100 * b[0]:.1f} [{100 * b[1]:.1f}, {100 * b[2]:.1f}] |")

    print(f"\nThe best cosine (K = {SHIPPED_K}) of in-pool and unseen prompts: percentiles 5 / 50 / 95\n")
    best = cos.max(1)
    print("| prompts | 5th | median | 95th |\n|---|---|---|---|")
    for g, s in (("in", "val"), ("in", "test"), ("unseen", "val"), ("unseen", "test")):
        p = np.percentile(best[(st.g == g) & (st.s == s)], [5, 50, 95])
        print(f"| {'in-pool' if g == 'in' else g} {s} | {p[0]:.3f} | {p[1]:.3f} | {p[2]:.3f} |")
    cut = np.percentile(best[(st.g == "in") & (st.s == "val")], 5)
    caught = [float(np.mean(best[(st.g == g) & (st.s == "test")] < cut)) for g in ("in", "unseen")]
    print(f"\nA threshold at the 5th percentile of in-pool validation ({cut:.3f}) takes {100 * caught[0]:.1f} % of "
          f"in-pool test prompts and {100 * caught[1]:.1f} % of unseen test prompts.")


if __name__ == "__main__":
    main(sys.argv[1:])
