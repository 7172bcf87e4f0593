"""Tie-breaking the best-ranked adapters on what sets them apart: each candidate's rows projected off the other
candidates' row spaces (per window block), its norm on the probe state calibrated over the calibration prompts
with the same projection. Needs states.py's states (in STATES).

    PYTHONPATH=. python tiebreak.py /tmp/st
"""
from __future__ import annotations

import sys

import numpy as np
from calib import load, row
from study import engine


def basis(rows: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Orthonormal basis (k, d) of the row space of `rows` (n, d)."""
    if len(rows) == 0:
        return rows
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    return vt[s > tol * s[0]]


def unique_norms(M, spans, cands, states):
    """For each candidate: sqrt(sum_b ||R_ib (I - Q Q^T) h_b||^2) with Q the other candidates' rows at block b,
    for every state in `states` (n, blocks, d): (n, len(cands))."""
    out = np.zeros((len(states), len(cands)))
    for b in range(M.shape[0]):
        rows = [M[b, spans[c]].astype(np.float64) for c in cands]
        for k in range(len(cands)):
            q = basis(np.concatenate([r for j, r in enumerate(rows) if j != k]))
            p = rows[k] - (rows[k] @ q.T) @ q
            out[:, k] += np.square(states[:, b].astype(np.float64) @ p.T).sum(1)
    return np.sqrt(out)


if __name__ == "__main__":
    names, raw, meta, cal = load()
    st = np.concatenate([np.load(f"{sys.argv[1]}/states-{k}.npy") for k in (0, 1)])
    step = int(sys.argv[2]) if len(sys.argv) > 2 else 1  # every step-th prompt
    eng = engine(1)
    pool, bank = eng.pool, eng.pool._bank
    M = bank.M
    spans = {i: slice(bank.offsets[a.bank_index], bank.offsets[a.bank_index] + bank.ranks[a.bank_index])
             for i, a in enumerate(pool.adapters) if a.bank_index is not None}
    cstates = pool.calibration_states(eng.routing.probe_input)
    z = (raw - cal.mean(0)) / cal.std(0)
    sel = np.arange(0, len(meta), step)
    for m in (2, 3):
        for lam in (0.5, 1.0, 2.0, None):
            out = z[sel].copy()
            for n, p in enumerate(sel):
                cands = [int(c) for c in np.argsort(-z[p])[:m]]
                if not all(c in spans for c in cands):
                    continue
                u = unique_norms(M, spans, cands, st[p:p + 1])[0]
                uc = unique_norms(M, spans, cands, cstates)
                zu = (u - uc.mean(0)) / np.maximum(uc.std(0), 1e-12)
                new = zu if lam is None else z[p, cands] + lam * zu
                out[n, cands] = 1e6 + new  # the candidates stay ahead of the rest, reordered
            print(row(f"top {m} re-ranked by " + ("the unique part's z alone" if lam is None else
                                                   f"z + {lam} x the unique part's z"), out,
                      names, [meta[p] for p in sel]), flush=True)
    print(row("z (the default)", z[sel], names, [meta[p] for p in sel]))
