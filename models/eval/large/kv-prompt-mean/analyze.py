"""Top-1 of each way of reading the prompt (collect.py's features), z-scored on the calibration prompts.

    python analyze.py tok.pkl
"""

import pickle
import sys

import numpy as np

with open(sys.argv[1], "rb") as f:
    d = pickle.load(f)
names, kinds = d["names"], np.array(d["kinds"])
N = len(names)


def score(feat: np.ndarray, which: np.ndarray) -> np.ndarray:
    """(P, 3, N, B) features -> (P, N): the window norm of feature which[i] for adapter i."""
    sq = feat[:, which, np.arange(N), :]  # (P, N, B)
    return np.sqrt(np.nansum(sq, axis=2))


def z_of(which: np.ndarray, feat: np.ndarray) -> np.ndarray:
    cal = score(d["cal"], which)
    return (score(feat, which) - cal.mean(0)) / np.maximum(cal.std(0), 1e-12)


def evaluate(label: str, mix: list[tuple[np.ndarray, float]]) -> None:
    out = {}
    for split in [x for x in ("val", "test") if x in d]:
        feat = np.stack([r[1] for r in d[split]])
        truth = np.array([names.index(r[0]) for r in d[split]])
        z = sum(wt * z_of(which, feat) for which, wt in mix)
        out[split] = (np.argmax(z, 1) == truth, truth)
    hit, truth = out["test"]
    by = " ".join(f"{k}:{100 * hit[kinds[truth] == k].mean():.1f}" for k in sorted(set(kinds)))
    val = f"{100 * out['val'][0].mean():5.1f}" if "val" in out else "  -  "
    print(f"{label:<40} val {val} test {100 * hit.mean():5.1f}  {by}", flush=True)


kv = np.array([k.startswith("attn") and "attn_q" not in k for k in kinds])
last, meansq, meanh = (np.full(N, k) for k in range(3))
evaluate("last token (engine now)", [(last, 1.0)])
evaluate("mean-square over tokens, all", [(meansq, 1.0)])
evaluate("norm of mean h, all", [(meanh, 1.0)])
evaluate("k/v-without-q: mean-square", [(np.where(kv, 1, 0), 1.0)])
evaluate("k/v-without-q: norm of mean", [(np.where(kv, 2, 0), 1.0)])
for w in (0.25, 0.5, 1.0):
    evaluate(f"z(last) + {w} z(meansq)", [(last, 1.0), (meansq, w)])
    evaluate(f"z(last) + {w} z(mean h)", [(last, 1.0), (meanh, w)])
