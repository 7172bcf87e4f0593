"""Per prompt, for every adapter of a pool and window block: the squared norm of its bank rows times the probe state
at the last token, the mean over the prompt's tokens of that squared norm, and the squared norm at the tokens' mean
state (the bank as the engine folds it). The calibration prompts' too. Exploratory (README.md).

    SPLITS=test python collect.py models/pool-large tok.pkl 8
"""

import os
import pickle
import sys
import time

import numpy as np

from logo_edge.calibration import calibration_prompts
from logo_edge.engine import Engine
from logo_edge.tasks import TASKS, splits

pool_dir, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
eng = Engine(None, adapters=pool_dir, n_threads=2)
pool = eng.pool
B = len(pool.blocks)
in_bank, index = pool._layout()
names = [a.name for a in pool.adapters if a.probeable]
banks = [pool._bank, pool._other]
every_row = [b.M.astype(np.float64) for b in banks]
rows_of = []  # (which input: 0 the attention's, 1 the FFN's, (B, r, d) rows) per probeable adapter
for i in range(len(names)):
    w = 0 if in_bank[i] else 1
    o, r = int(banks[w].offsets[index[i]]), int(banks[w].ranks[index[i]])
    rows_of.append((w, every_row[w][:, o:o + r]))


def features(text: str) -> np.ndarray:
    """(3, N, B): last token, mean over tokens of the squared norm, squared norm at the mean state."""
    tok = eng.tokenize(eng.format_chat([{"role": "user", "content": text}]))
    att = eng.probe_tokens(tok).astype(np.float64)  # (B, T, d): the attention norm's output at every token
    last = np.asarray(eng.probe(tok), np.float64)  # (2B, d): both inputs at the last token
    states = [att, last[B:, None, :]]  # the FFN input at the last token only (llama.cpp drops the rest there)
    f = np.full((3, len(names), B), np.nan)
    for i, (w, m) in enumerate(rows_of):
        h = states[w]
        mean = h.mean(1)
        for j in range(B):
            if not np.abs(m[j]).sum():
                continue
            y = h[j] @ m[j].T  # (T, r)
            z = m[j] @ mean[j]
            f[0, i, j], f[1, i, j], f[2, i, j] = y[-1] @ y[-1], (y * y).sum(1).mean(), z @ z
    return f


t0 = time.time()
data = {"names": names, "kinds": ["+".join(a.probed) for a in pool.adapters if a.probeable],
        "cal": np.stack([features(p) for p in calibration_prompts()])}
print("calibration", round(time.time() - t0), flush=True)
for split in os.environ.get("SPLITS", "val test").split():
    got = []
    for i, task in enumerate(t for t in names if t in TASKS):
        got += [(task, features(ex.prompt)) for ex in splits(TASKS[task])[split][:n]]
        print(split, i, task, round(time.time() - t0), flush=True)
    data[split] = got
with open(out, "wb") as f:
    pickle.dump(data, f)
print("done", round(time.time() - t0))
