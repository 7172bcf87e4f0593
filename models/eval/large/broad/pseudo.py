"""Data-free, pool-relative calibration: each adapter also calibrated on pseudo-prompts built from the other
adapters' top input directions (the calibration prompts' mean state moved along adapter j's leading right
singular direction at every window block). An adapter that fires on many others' directions is marked down.

    PYTHONPATH=. python pseudo.py
"""
from __future__ import annotations

import numpy as np
from calib import load, row
from study import engine

if __name__ == "__main__":
    names, raw, meta, cal = load()
    eng = engine(1)
    pool, bank = eng.pool, eng.pool._bank
    in_bank = [i for i, a in enumerate(pool.adapters) if a.bank_index is not None]
    bidx = [pool.adapters[i].bank_index for i in in_bank]
    states = pool.calibration_states(eng.routing.probe_input)  # (n, blocks, d)
    m = states.mean(0)
    s = np.sqrt(np.mean(np.sum((states - m) ** 2, -1), 0))  # per block RMS deviation norm
    M = bank.M  # (blocks, rows, d)
    print("| calibration | val top-1 | test top-1 |\n|---|---|---|")
    print(row("z (the default)", (raw - cal.mean(0)) / cal.std(0), names, meta))
    for alpha in (0.1, 0.25, 0.5, 1.0):
        pseudo = []
        for j in bidx:
            v = M[:, bank.offsets[j]].astype(np.float64)
            v /= np.linalg.norm(v, axis=-1, keepdims=True) + 1e-12
            for sign in (1, -1):
                h = (m + sign * alpha * s[:, None] * v).astype(np.float32)
                pseudo.append(bank.signals(h, "norm"))
        pseudo = np.array(pseudo)  # (2 * n_bank, n_bank) in bank order
        mu, sd = cal.mean(0), cal.std(0)
        for k, (i, j) in enumerate(zip(in_bank, bidx)):  # adapter i: generic prompts and the others' pseudo-prompts
            others = np.array([p for p in range(len(pseudo)) if p // 2 != k])
            col = np.concatenate([cal[:, i], pseudo[others, j]])
            mu[i], sd[i] = col.mean(), col.std()
        print(row(f"z over generic + pseudo-prompts (alpha {alpha})", (raw - mu) / sd, names, meta))
