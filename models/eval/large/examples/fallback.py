"""Knowing when not to route, with examples (README.md): a request whose best cosine is under the 5th percentile of
the in-pool validation prompts' gets the uniform mixture of every adapter (RouteConfig(min_score=CUT,
fallback="uniform")). Greedy answers are a function of the prompt and the mixture, so the rule's score is the routed
answer's (eval/results.csv) where it routes and the uniform mixture's where it falls back: the unseen tasks'
uniform answers are ../unseen/results.csv's; the in-pool prompts it takes are answered here.

    PYTHONPATH=../broad python fallback.py /tmp/st-0.pkl /tmp/st-1.pkl > fallback.txt    # ~5 min
"""
from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict

import numpy as np
from paired import HERE, paired
from prototypes import SHIPPED_K, Study

from logo_edge.tasks import TASKS, score, splits


def answers(path: str, method: str) -> dict[tuple[str, str], dict[int, float]]:
    by: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for r in csv.DictReader(open(HERE / path)):
        if r["method"] == method:
            by[(r["group"], r["task"])][int(r["idx"])] = float(r["score"])
    return {k: [v[i] for i in sorted(v)] for k, v in by.items()}  # by position in the task's test split


def uniform_in_pool(todo: list[tuple[str, int]], names: list[str]) -> dict[tuple[str, int], float]:
    """The uniform mixture's score on the in-pool test prompts the rule takes (cached in fallback-uniform.json)."""
    cache = HERE / "fallback-uniform.json"
    done = {tuple(k.split("/")[:1]) + (int(k.split("/")[1]),): v
            for k, v in (json.loads(cache.read_text()) if cache.exists() else {}).items()}
    need = [t for t in todo if t not in done]
    if need:
        from study import engine

        eng = engine(2)
        mix = {a: 1.0 / len(names) for a in names}
        for j, (task, i) in enumerate(need):
            print(f"\runiform {j}/{len(need)}", end="", file=sys.stderr, flush=True)
            ex = splits(TASKS[task])["test"][i]
            out = eng.create_chat_completion([{"role": "user", "content": ex.prompt}], adapters=mix,
                                             max_tokens=TASKS[task].max_tokens)
            done[(task, i)] = score(TASKS[task], out["choices"][0]["message"]["content"], ex.refs)
        cache.write_text(json.dumps({f"{t}/{i}": v for (t, i), v in sorted(done.items())}, indent=0))
    return done


def main(paths: list[str]) -> None:
    st = Study(paths)
    best = st.cosines(SHIPPED_K).max(1)
    cut = float(np.percentile(best[(st.g == "in") & (st.s == "val")], 5))
    routed, uniform = answers("eval/results.csv", "examples k=3"), answers("../unseen/results.csv", "uniform")
    m = (st.g != "cal") & (st.s == "test")
    low = {(g, t): set() for g, t in zip(st.g[m], st.t[m])}
    for g, t, i, b in zip(st.g[m], st.t[m], st.i[m], best[m]):
        if b < cut:
            low[(g, t)].add(int(i))
    taken = [(t, i) for (g, t), v in low.items() if g == "in" for i in sorted(v)]
    got = uniform_in_pool(taken, st.names)
    print(f"cut (5th percentile of in-pool validation, K = {SHIPPED_K}): {cut:.3f}")
    for group, g in (("in-pool", "in"), ("unseen", "unseen")):
        tasks = sorted(t for (gg, t) in low if gg == g)
        plain = {t: np.array(routed[(group, t)]) for t in tasks}
        rule = {t: np.array([(uniform[(group, t)][i] if group == "unseen" else got[(t, i)])
                             if i in low[(g, t)] else s for i, s in enumerate(routed[(group, t)])]) for t in tasks}
        n_low = sum(len(low[(g, t)]) for t in tasks)
        d = paired(rule, plain)
        print(f"{group}: the rule takes {n_low} of {sum(map(len, plain.values()))} test prompts; routed "
              f"{100 * np.mean([v.mean() for v in plain.values()]):.1f}, with the rule "
              f"{100 * np.mean([v.mean() for v in rule.values()]):.1f}, paired {100 * d[0]:+.1f} "
              f"[{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]")
        if group == "unseen":
            u = {t: np.array(uniform[(group, t)]) for t in tasks}
            d = paired(rule, u)
            print(f"  against the uniform mixture ({100 * np.mean([v.mean() for v in u.values()]):.1f}): "
                  f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]")


if __name__ == "__main__":
    main(sys.argv[1:])
