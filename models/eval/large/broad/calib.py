"""Calibration variants on raw norm signals (raw.py, rawext.py): top-1 on the in-pool validation and test prompts.

    PYTHONPATH=. python calib.py
"""
from __future__ import annotations

import json

import numpy as np
from analyze import boot
from study import HERE


def load():
    names = (HERE / "raw-names.txt").read_text().split()
    rows, meta = [], []
    for k in (0, 1):
        rows.append(np.load(HERE / f"raw-{k}.npy"))
        meta += (HERE / f"raw-{k}.txt").read_text().split()
    return names, np.concatenate(rows), [m.split("/") for m in meta], np.load(HERE / "raw-calibration.npy")


def load_ext() -> tuple[np.ndarray, list[str]]:
    """The task-like calibration prompts' raw signals, in extcal.json's order, and their sources."""
    e0, e1 = np.load(HERE / "raw-ext-0.npy"), np.load(HERE / "raw-ext-1.npy")
    ext = np.empty((len(e0) + len(e1), e0.shape[1]))
    ext[0::2], ext[1::2] = e0, e1
    return ext, [p["source"] for p in json.loads((HERE / "extcal.json").read_text())]


def top1(score: np.ndarray, names, meta, split: str):
    by: dict[str, list[float]] = {}
    for s, (t, sp, _) in zip(score, meta):
        if sp == split:
            by.setdefault(t, []).append(float(names[int(np.nanargmax(s))] == t))
    return boot([np.array(v) for v in by.values()], n=300)


def variants(raw: np.ndarray, cal: np.ndarray) -> dict[str, np.ndarray]:
    """Per-adapter transforms of the raw signal from the calibration prompts' signals `cal`."""
    mu, sd = cal.mean(0), cal.std(0)
    lc = np.log(cal)
    med = np.median(cal, 0)
    mad = np.median(np.abs(cal - med), 0) * 1.4826
    out = {"z (the default)": (raw - mu) / sd, "ratio": raw / mu, "log z": (np.log(raw) - lc.mean(0)) / lc.std(0),
           "robust z (median, MAD)": (raw - med) / mad,
           "log robust z": (np.log(raw) - np.median(lc, 0)) / (1.4826 * np.median(np.abs(lc - np.median(lc, 0)), 0))}
    for f in (0.1, 0.25):
        out[f"z, sd floored at {f} x mean"] = (raw - mu) / np.maximum(sd, f * mu)
    out["(s - mean) / (q95 - mean)"] = (raw - mu) / (np.percentile(cal, 95, 0) - mu)
    return out


def row(name: str, s: np.ndarray, names, meta) -> str:
    v, t = top1(s, names, meta, "val"), top1(s, names, meta, "test")
    return f"| {name} | {100 * v[0]:.1f} | {100 * t[0]:.1f} [{100 * t[1]:.1f}, {100 * t[2]:.1f}] |"


if __name__ == "__main__":
    names, raw, meta, cal = load()
    print(f"{len(meta)} prompts, {cal.shape[0]} calibration prompts, {len(names)} adapters\n")
    print("| calibration | val top-1 | test top-1 |\n|---|---|---|")
    for name, s in variants(raw, cal).items():
        print(row(name, s, names, meta))
    z = lambda c: (raw - c.mean(0)) / c.std(0)  # noqa: E731
    ext, src = load_ext()
    first = np.array([i for i, s in enumerate(src) if i == 0 or src[i - 1] != s])
    rng = np.random.default_rng(1)
    print(row(f"z over generic + {len(ext)} task-like prompts ({len(set(src))} other BIG-bench tasks)",
              z(np.concatenate([cal, ext])), names, meta))
    print(row(f"z over generic + {len(first)} task-like (one per task)", z(np.concatenate([cal, ext[first]])),
              names, meta))
    for n in (60, 240):
        print(row(f"z over generic + {n} task-like (random)",
                  z(np.concatenate([cal, ext[rng.choice(len(ext), n, replace=False)]])), names, meta))
    val = np.array([m[1] == "val" for m in meta])
    print(row("z over generic + the pool's own validation prompts (unlabeled)", z(np.concatenate([cal, raw[val]])),
              names, meta).replace("| z over", "| (not a product setting) z over"))
