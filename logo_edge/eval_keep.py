"""When may a conversation keep its mixture? The keep rules measured on held-out two-turn chats.

`logo-edge eval --keep-rules` builds two-turn chats from a pool's tasks: turn 1 is a held-out prompt of task
A with its reference answer, turn 2 a different held-out prompt of task A again ("same") or of another task
B ("switch"). Turn 1 is routed and answered as the engine does; turn 2 is then decided two ways:

    base probe       the exact route of turn 2 (the base model's probe, as every new request) keeps the
                     mixture when its weights are within `keep` (total variation) of turn 1's: the reference
    mixture states   turn 2's new tokens are prefilled once under turn 1's mixture and routed on the states
                     they reach there (no separate probe pass): what a kept turn then costs is one prefill

Under a mixture its own adapters' signals grow (their updates are in the states), so the mixture-state
route is compared with turn 1's mixture by a stated rule with one threshold, chosen on the validation
split and reported on the test split: keep when the mixture-state route ranks turn 1's leading adapter
first with a calibrated score of at least `keep_score` (RouteConfig.keep_score). Reported with bootstrap
95 % intervals: how often each rule keeps on same-task turns, how often it keeps on task switches (the
mixture answering a prompt it was not chosen for), and its agreement with the base-probe rule. Writes keep.md.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .eval_approx import _interval
from .tasks import TASKS, splits


@dataclass
class Pair:
    """One two-turn chat and what each rule saw at turn 2."""

    first: str  # turn 1's task
    second: str  # turn 2's task
    base_keeps: bool  # the base-probe rule kept turn 1's mixture
    base_lead: str  # the base probe's first adapter at turn 2
    lead_first: bool  # the mixture-state route ranks turn 1's leader first
    lead_score: float  # turn 1's leader's calibrated score on the mixture states
    distance: float  # total variation between the mixture-state route's weights and turn 1's mixture
    continues: bool  # turn 2 continues the conversation (the engine would consider keeping at all)
    ref_distance: float = float("nan")  # total variation between turn 2's and turn 1's routes, both on mixture states
    ref_lead_drop: float = float("nan")  # turn 1's leader's score on turn 1's mixture states minus on turn 2's
    score_kept: float = float("nan")  # turn 2's answer's task score under turn 1's mixture (test split)
    score_new: float = float("nan")  # ... under turn 2's own route from the base probe
    score_approx: float = float("nan")  # ... both turns in probe-cache mode (approximate: history K/V kept)


def chat_pairs(tasks: list[str], split: str, n: int, seed: int) -> list[tuple[str, object, str, object]]:
    """(task A, example, task B, example) per chat: for each task, n same-task chats and n switches to a task
    drawn at random among the others; examples are distinct held-out prompts."""
    rng = random.Random(seed)
    data = {t: splits(TASKS[t])[split] for t in tasks}
    out = []
    for a in tasks:
        ex = data[a]
        for i in range(n):
            x, y = ex[(2 * i) % len(ex)], ex[(2 * i + 1) % len(ex)]
            out.append((a, x, a, y))
            b = rng.choice([t for t in tasks if t != a])
            out.append((a, x, b, data[b][i % len(data[b])]))
    return out


def measure(eng, pairs, what: str, answers: bool = False) -> list[Pair]:
    """Each chat's turn 2 as both rules see it; with `answers`, also turn 2 answered under turn 1's mixture and
    under its own route, scored."""
    from .engine import SamplingConfig, weight_distance
    from .tasks import score

    cfg = replace(eng.routing, keep_probe="base")
    got = []
    t0 = time.time()
    for i, (a, x, b, y) in enumerate(pairs):
        if i % 10 == 0:
            print(f"\r[eval --keep-rules] {what}: {i}/{len(pairs)} chats, {time.time() - t0:.0f} s", end="",
                  file=sys.stderr)
        turn1 = [{"role": "user", "content": x.prompt}]
        msgs = turn1 + [{"role": "assistant", "content": x.refs[0]}, {"role": "user", "content": y.prompt}]
        eng.forget_prompts()
        for _ in eng.stream(eng.format_chat(turn1), "auto", SamplingConfig(max_tokens=1), **vars(cfg)):
            pass
        current = dict(eng._mixture[1])
        lead = max(current, key=current.get)
        from .llm import ProbeCapture
        t1 = eng.tokenize(eng.format_chat(turn1))
        cap = ProbeCapture(eng.ctx, eng.pool.blocks, eng.pool.probe_reads, cfg.probe_input, stop_early=False)
        eng.ctx.cache_truncate(0)
        ref = eng.route_state(cap.run(t1, keep_cache=True), cfg)[0]
        eng._cache = list(t1)
        tokens = eng.tokenize(eng.format_chat(msgs))
        routing, _ = eng._route(tokens, cfg)
        base_keeps = weight_distance(dict(routing.mixture()), current) <= cfg.keep
        states = eng._mixture_states(tokens, cfg)
        if states is None:
            got.append(Pair(a, b, base_keeps, routing.names[routing.selected[0]], False, float("nan"),
                            float("nan"), False))
            continue
        mix = states[0]
        got.append(Pair(a, b, base_keeps, routing.names[routing.selected[0]], mix.selected[:1] == [lead],
                        float(mix.scores[lead]), weight_distance(dict(mix.mixture()), current), True,
                        weight_distance(dict(mix.mixture()), dict(ref.mixture())),
                        float(ref.scores[lead] - mix.scores[lead])))
        if answers:
            task = TASKS[b]
            text = eng.format_chat(msgs)
            for field, mixture in (("score_kept", current), ("score_new", dict(routing.mixture()))):
                chosen = {eng.pool.names[i]: w for i, w in mixture.items()}
                out = "".join(piece for piece, _, _ in eng.stream(text, chosen, SamplingConfig(task.max_tokens)))
                setattr(got[-1], field, score(task, out, y.refs))
            eng.forget_prompts()  # the approximate option: both turns in probe-cache mode, turn 1's K/V kept
            approx = replace(cfg, prefill="probe-cache", keep=0.0)
            for _ in eng.stream(eng.format_chat(turn1), "auto", SamplingConfig(max_tokens=1), **vars(approx)):
                pass
            out = "".join(p for p, _, _ in eng.stream(text, "auto", SamplingConfig(task.max_tokens), **vars(approx)))
            got[-1].score_approx = score(task, out, y.refs)
    print(file=sys.stderr)
    return got


def rule_keeps(p: Pair, score: float, drop: float) -> bool:
    """The mixture-state rule (engine.mixture_keeps) with RouteConfig.keep_score = score, keep_drop = drop."""
    return p.continues and p.lead_first and p.lead_score >= score and p.ref_lead_drop <= drop


def choose_rule(val: list[Pair]) -> tuple[float, float]:
    """(keep_score, keep_drop) keeping the most same-task validation chats while keeping no task switch that the
    base-probe rule re-routes; ties go to the stricter pair (higher score, then lower drop)."""
    cand = [p for p in val if p.continues and p.lead_first]
    scores = sorted({p.lead_score for p in cand}, reverse=True)
    drops = sorted({p.ref_lead_drop for p in cand})
    best, rule = -1, (float("inf"), float("-inf"))
    for tau in scores:
        for delta in drops:
            kept = [p for p in cand if p.lead_score >= tau and p.ref_lead_drop <= delta]
            if any(p.first != p.second and not p.base_keeps for p in kept):
                break  # a larger drop keeps at least these
            n = sum(p.first == p.second for p in kept)
            if n > best:
                best, rule = n, (tau, delta)
    return rule


def keep_report(eng, n: int, out_dir: Path, seed: int = 0) -> dict:
    tasks = [t for t in eng.pool.names if t in TASKS]
    if len(tasks) < 2:
        raise ValueError(f"--keep-rules needs a pool with at least two evaluation tasks; {eng.pool.names} has {tasks}")
    val = measure(eng, chat_pairs(tasks, "val", n, seed), "validation")
    test = measure(eng, chat_pairs(tasks, "test", n, seed + 1), "test", answers=True)
    desc = (f"`{Path(eng.pool.adapters[0].path).parent.name}` ({len(tasks)} tasks); signal {eng.routing.signal}, "
            f"k={eng.routing.k}, calibration {eng.routing.calibration}, keep={eng.routing.keep}")
    return write_report(val, test, n, desc, eng.routing.keep, out_dir, seed)


def write_report(val: list[Pair], test: list[Pair], n: int, desc: str, keep: float, out_dir: Path,
                 seed: int = 0) -> dict:
    """Choose the rule on `val`, report every rule on `test` into out_dir/keep.md (measure's pairs, or
    the chats.json a run wrote: the report can be written again without measuring)."""
    tau, delta = choose_rule(val)
    floor = min((p.lead_score for p in val if p.continues and p.lead_first), default=tau)
    chosen = (f"leader first, drop <= {delta:.3f}" + ("" if tau <= floor else f", score >= {tau:.3f}"))
    rng = np.random.default_rng(seed)

    def rates(keeps, pairs) -> dict:
        k = np.array([keeps(p) for p in pairs], float)
        same = np.array([p.first == p.second for p in pairs])
        base = np.array([p.base_keeps for p in pairs])
        cont = [p for p in pairs if p.continues]
        sc = np.array([p.score_kept if keeps(p) else p.score_new for p in cont])
        return {"keeps, same task": _interval(k[same], rng), "keeps, task switch": _interval(k[~same], rng),
                "keeps where base probe re-routes": _interval(k[~base], rng),
                "same decision as base probe": _interval((k == base).astype(float), rng),
                "turn-2 task score (x100)": tuple(100 * v for v in _interval(sc, rng))}

    rules = {"base probe (reference; keep_probe='base')": lambda p: p.base_keeps,
             f"mixture states: {chosen} (chosen on validation)": lambda p: rule_keeps(p, tau, delta),
             "the engine's default: the chosen rule, else the base probe":
                 lambda p: rule_keeps(p, tau, delta) or p.base_keeps,
             "mixture states: leader first (no drop limit)": lambda p: rule_keeps(p, -np.inf, np.inf),
             f"mixture states: weights within keep={keep} (the previous rule)":
                 lambda p: p.continues and p.distance <= keep,
             "never keep": lambda p: False}
    table = {name: rates(f, test) for name, f in rules.items()}
    n_cont = sum(p.continues for p in test)
    lines = ["# Keeping a conversation's mixture: the keep rules on held-out two-turn chats", "",
             f"Pool {desc}. Two-turn chats from held-out prompts, {n} same-task and {n} task-switch chats per "
             f"task and split ({len(val)} validation, {len(test)} test; {n_cont} of the test chats continue the cached "
             f"conversation, the rest re-route under every rule). Rule chosen on validation (the most same-task "
             f"chats kept in one pass with no kept task switch that the base probe re-routes): {chosen} "
             f"(keep_score {tau:.4f}, keep_drop {delta:.4f}). Test split, mean [bootstrap 95 % interval].", "",
             "| rule | " + " | ".join(next(iter(table.values()))) + " |", "|---|" + "---|" * 5]
    for name, r in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]" for v in r.values()) + " |")
    cont = [p for p in test if p.continues]
    approx = _interval(np.array([p.score_approx for p in cont]), rng)
    new = _interval(np.array([p.score_new for p in cont]), rng)
    lines += ["", "The approximate option (probe-cache: turn 1's K/V kept, turn 2 routed afresh and only its new "
              f"tokens prefilled, under its own mixture), same continuing test chats: turn-2 task score "
              f"{100 * approx[0]:.1f} [{100 * approx[1]:.1f}, {100 * approx[2]:.1f}] against "
              f"{100 * new[0]:.1f} [{100 * new[1]:.1f}, {100 * new[2]:.1f}] routed afresh exactly (never keep)."]
    one = [p for p in test if p.first == p.second and rule_keeps(p, tau, delta)]
    both = [p for p in test if p.first == p.second and (rule_keeps(p, tau, delta) or p.base_keeps)]
    lines += ["", f"Same-task test chats the engine keeps: {len(both)}, of which {len(one)} in one pass (the "
              "mixture-state rule; the others after the base probe too)."]
    lead_same = [p.lead_score for p in test if p.continues and p.lead_first and p.first == p.second]
    lead_switch = [p.lead_score for p in test if p.continues and p.lead_first and p.first != p.second]
    lines += ["", "Turn 1's leader's calibrated score on the mixture states, where ranked first (test): same task "
              f"median {np.median(lead_same) if lead_same else float('nan'):.2f} (n={len(lead_same)}), task switch "
              f"median {np.median(lead_switch) if lead_switch else float('nan'):.2f} (n={len(lead_switch)}).",
              "", "A kept turn is answered exactly under the kept mixture; keeping on a task switch answers with "
              "the previous task's adapters, which is what the rule must avoid."]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "keep.md").write_text("\n".join(lines) + "\n")
    return {"keep_score": tau, "keep_drop": delta,
            "rules": {k: {m: v[0] for m, v in r.items()} for k, r in table.items()},
            "pairs": {"val": [vars(p) for p in val], "test": [vars(p) for p in test]}}
