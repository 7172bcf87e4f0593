"""Why the probe reads a window of blocks: per-block separability and window hit rates on both pools.

    python models/eval/window_study.py [--out models/eval/window_study.md]

One probe pass per prompt reads the query-projection input at every block (Engine.probe over all
blocks). For each block b, a one-block pool gives every adapter's q-update norm ||c B_b A_b h_b||. From
those, for both pools (models/pool, models/pool-mixed):
- AUC, per adapter and block, of its norm on its own task's test prompts against the other tasks'
  (1.0: every own prompt above every other; 0.5: no information);
- top-1 hit rate of the zscore-calibrated window signal sqrt(sum_{b in S} norm_b^2) for windows S (the
  last n blocks, and sets that skip blocks), on the validation split (50 prompts per task, used to choose
  the default) and the test split (40 per task, the evaluation's).
Calibration uses the shipped calibration prompts, as the engine does. About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from logo_edge.engine import Engine, RouteConfig
from logo_edge.pool import AdapterPool
from logo_edge.tasks import POOL_TASKS, splits

ROOT = Path(__file__).resolve().parents[2]
POOLS = {"uniform": ROOT / "models" / "pool", "mixed": ROOT / "models" / "pool-mixed"}
N_SPLIT = {"val": 50, "test": 40}


def block_banks(eng: Engine, pool_dir: Path) -> tuple[list[str], list]:
    """(names, one probe bank per block): each bank holds every adapter's q-update at that block."""
    banks, names = [], None
    for b in range(eng.model.n_layer):
        pool = AdapterPool(eng.model, b, "attn_q", probe_blocks=1)
        pool.add_many(pool_dir)
        names = pool.names
        banks.append(pool.bank)
    return names, banks


def block_norms(banks: list, states: np.ndarray) -> np.ndarray:
    """norms (n_prompts, n_layer, N) of every adapter's q-update at every block."""
    return np.stack([np.stack([bank.norms(h[b]) for b, bank in enumerate(banks)]) for h in states])


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float((pos[:, None] > neg[None, :]).mean())


def hit_rate(norms: dict[str, np.ndarray], calib: np.ndarray, names: list[str], blocks: list[int]) -> float:
    """Mean over tasks of top-1 hits of zscore(sqrt(sum_b norm_b^2)) over `blocks`."""
    def energy(x):
        return np.sqrt(np.square(x[:, blocks]).sum(axis=1))  # (n, N)

    c = energy(calib)
    mean, sd = c.mean(axis=0), c.std(axis=0)
    hits = [np.mean((((energy(norms[t]) - mean) / sd).argmax(axis=1)) == names.index(t)) for t in names]
    return 100 * float(np.mean(hits))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "models" / "eval" / "window_study.md"))
    args = ap.parse_args()
    eng = Engine(routing=RouteConfig(calibration="raw"), probe_blocks=10_000)  # the window: every block
    n_layer = eng.model.n_layer
    t0 = time.time()

    def probe(text: str) -> np.ndarray:
        return eng.probe(eng.tokenize(eng.format_chat([{"role": "user", "content": text}])))

    from logo_edge.calibration import calibration_prompts

    prompts = {"calib": [probe(p) for p in calibration_prompts()]}
    tasks = {t.name: t for t in POOL_TASKS}
    for name, task in tasks.items():
        sp = splits(task)
        for split, n in N_SPLIT.items():
            prompts[f"{name}/{split}"] = [probe(e.prompt) for e in sp[split][:n]]
        print(f"\r[window-study] probed {name} ({time.time() - t0:.0f} s)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    last = n_layer - 1
    windows = {f"last {n}": list(range(n_layer - n, n_layer)) for n in (1, 2, 3, 4, 6, 8, 10, 15, 20, n_layer)}
    windows.update({"15, 20, 25, 29": [15, 20, 25, last], "every 3rd, 8 blocks": list(range(last - 21, n_layer, 3)),
                    "every 2nd, 8 blocks": list(range(last - 14, n_layer, 2))})
    md = ["# Probe window study\n", "`python models/eval/window_study.py` (see its docstring).\n"]
    hits = {}
    for pool_name, pool_dir in POOLS.items():
        names, banks = block_banks(eng, pool_dir)
        calib = block_norms(banks, np.stack(prompts["calib"]))
        norms = {split: {t: block_norms(banks, np.stack(prompts[f"{t}/{split}"])) for t in names}
                 for split in N_SPLIT}
        for label, blocks in windows.items():
            hits.setdefault(label, {})[pool_name] = {s: hit_rate(norms[s], calib, names, blocks) for s in N_SPLIT}
        if pool_name == "mixed":
            shown = list(range(last % 3, n_layer, 3))  # every third block, ending at the last
            md.append("## AUC of each adapter's q-update norm, own task vs the others (mixed pool, test split)\n")
            md.append("| adapter | " + " | ".join(f"b{b}" for b in shown) + " |")
            md.append("|---|" + "---|" * len(shown))
            test = norms["test"]
            for i, a in enumerate(names):
                row = [auc(test[a][:, b, i], np.concatenate([test[t][:, b, i] for t in names if t != a]))
                       for b in shown]
                md.append(f"| {a} | " + " | ".join(f"{x:.2f}" for x in row) + " |")
            md.append("")
        print(f"[window-study] {pool_name} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    md.append("## Top-1 hit rate (%), zscore of the window norm, val / test split\n")
    md.append("| blocks | uniform val | uniform test | mixed val | mixed test |\n|---|---|---|---|---|")
    for label, h in hits.items():
        md.append(f"| {label} | {h['uniform']['val']:.1f} | {h['uniform']['test']:.1f} | "
                  f"{h['mixed']['val']:.1f} | {h['mixed']['test']:.1f} |")
    Path(args.out).write_text("\n".join(md) + "\n")
    print("\n".join(md))
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
