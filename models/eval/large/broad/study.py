"""Broad mixtures for prompts no adapter fits (issue 18, targets: unseen >= uniform + 5, item 4's broad fallback).

Stage `probe`: every prompt of the in-pool tasks' and the unseen tasks' validation and test splits (first --n each) is
probed and routed once under the default; the shortlist's calibrated scores are saved (probes.json).
Stage `answer`: the unseen prompts (both splits) are answered under each candidate mixture (answers.json):
routed (the default, k = 3), uniform over the pool, and the top K of the shortlist with uniform or softmax(z / T)
weights. In-pool prompts are answered only where a rule chosen on validation would fall back (stage `inpool`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from logo_edge import Engine
from logo_edge.tasks import TASKS, UNSEEN_TASKS, score, splits

HERE = Path(__file__).resolve().parent
POOL = HERE.parents[2] / "pool-large"


def engine(threads: int) -> Engine:
    return Engine(adapters=str(POOL), n_ctx=1024, n_threads=threads)


def ranked(eng: Engine, prompt: str):
    """One chat prompt probed and routed under the engine's default: the routing and the pool indices it
    considered (the shortlist's, where there is one), best calibrated score first."""
    cfg = eng.routing
    tokens = eng.tokenize(eng.format_chat([{"role": "user", "content": prompt}]))
    routing, considered = eng.route_state(eng.probe(tokens, cfg.probe_input), cfg)
    s = np.asarray(routing.scores, np.float64)
    ok = np.isfinite(s) if considered is None else (considered & np.isfinite(s))
    return routing, [int(k) for k in np.argsort(-np.where(ok, s, -np.inf)) if ok[k]]


def probe(eng: Engine, n: int, out: Path, shard=(0, 1)) -> None:
    todo = []
    for split in ("val", "test"):
        todo += [("in-pool", t, split, i, ex.prompt) for t in eng.pool.names if t in TASKS
                 for i, ex in enumerate(splits(TASKS[t])[split][:n])]
        todo += [("unseen", t.name, split, i, ex.prompt) for t in UNSEEN_TASKS
                 for i, ex in enumerate(splits(t)[split][:n])]
    todo = todo[shard[0]::shard[1]]
    got, t0 = [], time.time()
    for j, (group, task, split, i, prompt) in enumerate(todo):
        if j % 50 == 0:
            print(f"\rprobed {j}/{len(todo)}, {time.time() - t0:.0f} s", end="", file=sys.stderr)
        routing, order = ranked(eng, prompt)
        s = routing.scores
        got.append(dict(group=group, task=task, split=split, index=i,
                        ranked=[[routing.names[k], float(s[k])] for k in order],
                        routed={routing.names[k]: w for k, w in routing.mixture()}))
    print(file=sys.stderr)
    out.write_text(json.dumps(got))


def load_probes() -> list[dict]:
    return [p for f in sorted(HERE.glob("probes-*.json")) for p in json.loads(f.read_text())]


def mixtures(p: dict, names: list[str]) -> dict[str, dict[str, float]]:
    """The candidate mixtures for one probed prompt."""
    ranked = p["ranked"]
    z = np.array([s for _, s in ranked])
    out = {"routed": p["routed"], "uniform": {a: 1.0 / len(names) for a in names}}
    for k in (10, 20):
        top = [a for a, _ in ranked[:k]]
        out[f"top{k}"] = {a: 1.0 / k for a in top}
        w = np.exp((z[:k] - z[0]) / 2.0)
        out[f"top{k}-soft2"] = {a: float(x) for a, x in zip(top, w / w.sum())}
    return out


def answer(eng: Engine, probes: list[dict], methods: list[str], out: Path) -> None:
    done = json.loads(out.read_text()) if out.exists() else {}
    tasks = {t.name: t for t in UNSEEN_TASKS} | TASKS
    jobs = [(p, m) for p in probes for m in methods if f"{p['task']}/{p['split']}/{p['index']}/{m}" not in done]
    t0 = time.time()
    for j, (p, m) in enumerate(jobs):
        if j % 10 == 0:
            print(f"\ranswered {j}/{len(jobs)}, {time.time() - t0:.0f} s", end="", file=sys.stderr)
            out.write_text(json.dumps(done))
        task = tasks[p["task"]]
        ex = splits(task)[p["split"]][p["index"]]
        mix = mixtures(p, eng.pool.names)[m]
        r = eng.create_chat_completion([{"role": "user", "content": ex.prompt}], adapters=mix,
                                       max_tokens=task.max_tokens, temperature=0.0)
        done[f"{p['task']}/{p['split']}/{p['index']}/{m}"] = score(task, r["choices"][0]["message"]["content"], ex.refs)
    out.write_text(json.dumps(done))
    print(file=sys.stderr)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["probe", "answer"])
    ap.add_argument("--n", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+",
                    default=["routed", "uniform", "top10", "top20", "top10-soft2", "top20-soft2"])
    ap.add_argument("--group", default="unseen")
    ap.add_argument("--shard", default="0/1")
    a = ap.parse_args()
    eng = engine(a.threads)
    k, m = map(int, a.shard.split("/"))
    if a.stage == "probe":
        probe(eng, a.n, HERE / f"probes-{k}.json", (k, m))
    else:
        ps = [p for p in load_probes() if p["group"] == a.group][k::m]
        answer(eng, ps, a.methods, HERE / f"answers-{a.group}-{k}.json")
