"""Knowing when not to route: a confidence rule that answers with the base model, measured on held-out prompts.

`logo-edge eval --confidence` probes held-out prompts once each (the base model; the engine's routing): the
validation and test splits of the pool's tasks (in-pool), of the unseen BBH-source tasks (tasks.UNSEEN_TASKS,
no adapter of their own), and generic everyday instructions outside every task (data/generic_prompts.json,
hand-written; even positions validation, odd positions test). A request's confidence is its best selected
adapter's calibrated score (the record's `score`); the engine answers with the base model when it is below
RouteConfig.min_score.

The rule, chosen on validation only (`Rule`): min_score is the largest threshold that falls back on at most a
fraction ALPHA of every in-pool task's validation prompts. Every in-pool prompt has an adapter made for its
task, so the budget bounds how many of a task's answers the rule may change. The budget is per task because
a pooled one (at most ALPHA of all in-pool validation prompts) is spent on the task whose adapter scores
lowest: on the shipped pool, all of a pooled 5 % budget goes to qasc, half of its prompts. Pooled budgets are
reported beside it. Choosing by validation score instead would need every validation prompt generated three
ways and would tune on 20-odd prompts per task; the budget rule needs probes only.

Reported on test with bootstrap 95 % intervals: fallback rates (in-pool, unseen, generic) under each rule, and
the rules' effects on task scores. An answer changes only where a rule falls back, so base and broad-mixture
(uniform over the pool) answers are generated only there, beside the routed one; the effect is the mean score
difference over every test prompt (0 where routing is kept), as the mean over tasks with prompts resampled
within each task. With `every`, the routed answer of every scored test prompt is generated too, for the scores
with and without the rule. Generic instructions have no reference: a few are answered both ways, to read.
Writes confidence.md and confidence.json.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .eval import _boot
from .eval_approx import _interval
from .tasks import TASKS, UNSEEN_TASKS, score, splits

GENERIC_FILE = Path(__file__).with_name("data") / "generic_prompts.json"
ALPHA = 0.05  # the chosen budget: at most this fraction of each in-pool task's validation prompts falls back
GROUPS = ("in-pool", "unseen", "generic")
SCORED = ("in-pool", "unseen")  # groups with reference answers
EXAMPLE_TOKENS = 48  # generic instructions answered both ways for the report


@dataclass(frozen=True)
class Rule:
    """How min_score is chosen on validation: the largest threshold that falls back on at most `alpha` of the
    in-pool validation prompts, of every task's (`per_task`) or of all of them together."""

    alpha: float
    per_task: bool = True

    @property
    def name(self) -> str:
        return f"{'per task' if self.per_task else 'pooled'} <= {100 * self.alpha:g} %"


RULES = (Rule(ALPHA), Rule(0.10), Rule(0.02, False), Rule(ALPHA, False), Rule(0.10, False))  # the first is chosen


@dataclass
class Probed:
    """One held-out prompt as the router saw it, and its answers' task scores where generated."""

    group: str  # "in-pool", "unseen" or "generic"
    task: str  # the task's name; "generic" for the generic instructions
    split: str  # "val" or "test"
    index: int  # position in its task's split (or in the generic split)
    prompt: str
    refs: tuple[str, ...]
    best: float  # the best selected adapter's calibrated score (-inf when nothing was selected)
    mixture: dict[str, float]  # the routed mixture, best first
    scores: dict[str, float] = field(default_factory=dict)  # "routed" / "base" / "uniform" -> task score


def generic_prompts() -> dict[str, list[str]]:
    """The hand-written generic instructions: even positions are validation, odd positions test."""
    prompts = json.loads(GENERIC_FILE.read_text())["prompts"]
    return {"val": prompts[0::2], "test": prompts[1::2]}


def choose_min_score(best: Sequence[float], alpha: float) -> float:
    """The largest threshold t with at most a fraction `alpha` of `best` strictly below it (the engine falls back
    when best < min_score): the (m+1)-th smallest score, m the most prompts the budget allows. -inf when empty."""
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be a fraction in [0, 1), got {alpha!r}")
    s = np.sort(np.asarray(best, np.float64))
    if np.isnan(s).any():
        raise ValueError("best scores must be numbers or -inf, not nan")
    n = len(s)
    if n == 0:
        return float("-inf")
    m = int(alpha * n)
    while m + 1 < n and (m + 1) / n <= alpha:  # exact in the same arithmetic as a rate (count / n)
        m += 1
    while m > 0 and m / n > alpha:
        m -= 1
    return float(s[m])


def choose_per_task(best: dict[str, Sequence[float]], alpha: float) -> float:
    """The largest threshold within the budget for every task at once: the smallest of the tasks' own."""
    return min((choose_min_score(b, alpha) for b in best.values() if len(b)), default=float("-inf"))


def rule_min_score(rule: Rule, items: list[Probed]) -> float:
    """`rule`'s min_score from the in-pool validation prompts among `items`."""
    val = [p for p in items if p.split == "val" and p.group == "in-pool"]
    if not rule.per_task:
        return choose_min_score([p.best for p in val], rule.alpha)
    by: dict[str, list[float]] = {}
    for p in val:
        by.setdefault(p.task, []).append(p.best)
    return choose_per_task(by, rule.alpha)


def falls_back(p: Probed, min_score: float) -> bool:
    """RouteConfig.min_score's rule (engine._plan)."""
    return p.best < min_score


def probe_prompts(eng, n: int) -> list[Probed]:
    """Probe and route the first `n` validation and test prompts of every in-pool and unseen task, and every
    generic instruction."""
    cfg = eng.routing
    in_pool = [TASKS[t] for t in eng.pool.names if t in TASKS]
    unseen = [t for t in UNSEEN_TASKS if t.name not in eng.pool.names]
    todo = []
    for split in ("val", "test"):
        for group, tasks in (("in-pool", in_pool), ("unseen", unseen)):
            todo += [(group, t.name, split, i, ex.prompt, ex.refs) for t in tasks
                     for i, ex in enumerate(splits(t)[split][:n])]
        todo += [("generic", "generic", split, i, p, ()) for i, p in enumerate(generic_prompts()[split])]
    got, t0 = [], time.time()
    for j, (group, task, split, i, prompt, refs) in enumerate(todo):
        if j % 25 == 0:
            print(f"\r[eval --confidence] probed {j}/{len(todo)}, {time.time() - t0:.0f} s", end="", file=sys.stderr)
        tokens = eng.tokenize(eng.format_chat([{"role": "user", "content": prompt}]))
        routing = eng.route_state(eng.probe(tokens, cfg.probe_input), cfg)[0]
        best = max((float(routing.scores[k]) for k in routing.selected), default=float("-inf"))
        mixture = {routing.names[k]: w for k, w in routing.mixture()}
        got.append(Probed(group, task, split, i, prompt, refs, best, mixture))
    print(file=sys.stderr)
    return got


def reply(eng, p: Probed, adapters, max_tokens: int) -> str:
    """`p`'s greedy answer with these adapters ("base", or {name: weight})."""
    out = eng.create_chat_completion([{"role": "user", "content": p.prompt}], adapters=adapters or "base",
                                     max_tokens=max_tokens, temperature=0.0)
    return out["choices"][0]["message"]["content"]


def generate(eng, todo: list[Probed], fallback: list[Probed], uniform: bool) -> None:
    """Routed answers for `todo`; base (and uniform-mixture) answers for `fallback`, scored into each one's scores."""
    broad = {a: 1.0 / len(eng.pool.names) for a in eng.pool.names}
    jobs = [(p, "routed", p.mixture) for p in todo] + [(p, "base", "base") for p in fallback]
    jobs += [(p, "uniform", broad) for p in fallback] if uniform else []
    t0 = time.time()
    for j, (p, name, adapters) in enumerate(jobs):
        if j % 10 == 0:
            print(f"\r[eval --confidence] answered {j}/{len(jobs)}, {time.time() - t0:.0f} s", end="", file=sys.stderr)
        if name not in p.scores:
            task = TASKS[p.task]
            p.scores[name] = score(task, reply(eng, p, adapters, task.max_tokens), p.refs)
    print(file=sys.stderr)


def _by_task(items: list[Probed], value) -> list[np.ndarray]:
    """Per task, the (n, 1) values of its prompts (for eval._boot: the mean over tasks, resampled within tasks)."""
    tasks: dict[str, list[float]] = {}
    for p in items:
        tasks.setdefault(p.task, []).append(value(p))
    return [np.array(v, np.float64)[:, None] for v in tasks.values()]


def _effect(items: list[Probed], min_score: float, to: str) -> tuple[float, float, float]:
    """The mean over tasks of the score change falling back to `to` makes (0 where the rule keeps routing)."""
    def diff(p):
        return p.scores[to] - p.scores["routed"] if falls_back(p, min_score) else 0.0
    return _boot(_by_task(items, diff)) if items else (float("nan"),) * 3


def _with_rule(items: list[Probed], min_score: float, to: str) -> tuple[float, float, float]:
    return _boot(_by_task(items, lambda p: p.scores[to] if falls_back(p, min_score) else p.scores["routed"]))


def _ci(t, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * t[0]:.{digits}f} [{scale * t[1]:.{digits}f}, {scale * t[2]:.{digits}f}]"


def confidence_report(eng, n: int, out_dir: Path, rules: Sequence[Rule] = RULES, uniform: bool = True,
                      every: bool = True, examples: int = 8, seed: int = 0) -> dict:
    """Choose min_score on validation by each rule (the first is the chosen one), report on test. `uniform`: also
    fall back to the uniform mixture; `every`: generate every scored test prompt's routed answer (scores with and
    without the rule), else only where some rule falls back; `examples`: generic test prompts answered both ways."""
    if eng.routing.calibration == "raw":
        raise ValueError("the confidence rule reads calibrated scores; route with calibration 'zscore' or 'ratio'")
    items = probe_prompts(eng, n)
    thresholds = {r: rule_min_score(r, items) for r in rules}
    chosen_rule = rules[0]
    chosen = thresholds[chosen_rule]
    test = {g: [p for p in items if p.split == "test" and p.group == g] for g in GROUPS}
    scored = [p for g in SCORED for p in test[g]]
    fallback = [p for p in scored if falls_back(p, max(thresholds.values()))]
    generate(eng, scored if every else fallback, fallback, uniform)
    to = ("base", "uniform") if uniform else ("base",)
    shown = ([p for p in test["generic"] if falls_back(p, chosen)] or test["generic"])[:examples]
    answers = [(p, reply(eng, p, p.mixture, EXAMPLE_TOKENS), reply(eng, p, "base", EXAMPLE_TOKENS)) for p in shown]

    rng = np.random.default_rng(seed)
    rows = {}
    for r, t in thresholds.items():
        val = {g: float(np.mean([falls_back(p, t) for p in items if p.split == "val" and p.group == g]))
               for g in GROUPS if any(p.split == "val" and p.group == g for p in items)}
        per_task = [np.mean([falls_back(p, t) for p in items if p.split == "val" and p.task == k])
                    for k in dict.fromkeys(p.task for p in items if p.group == "in-pool")]
        rows[r] = dict(min_score=t, val=val, val_task_max=float(max(per_task, default=float("nan"))),
                       test={g: _interval(np.array([falls_back(p, t) for p in test[g]], np.float64), rng)
                             for g in GROUPS},
                       effect={(g, f): _effect(test[g], t, f) for g in SCORED for f in to})
    scores = {}
    if every:
        for g in SCORED:
            if test[g]:
                scores[g] = {"routed (no rule)": _boot(_by_task(test[g], lambda p: p.scores["routed"]))}
                scores[g] |= {f"rule -> {f}": _with_rule(test[g], chosen, f) for f in to}
    c = rows[chosen_rule]
    drop = c["effect"][("in-pool", "base")]
    ok = drop[1] <= 0 <= drop[2] or drop[1] > 0
    if scores.get("in-pool"):
        ok = ok and scores["in-pool"]["rule -> base"][0] >= scores["in-pool"]["routed (no rule)"][1]

    out_dir.mkdir(parents=True, exist_ok=True)
    md = _markdown(eng, n, items, rows, chosen_rule, scores, test, fallback, to, ok, answers)
    (out_dir / "confidence.md").write_text("\n".join(md) + "\n")
    (out_dir / "confidence.json").write_text(json.dumps(
        [{k: v for k, v in asdict(p).items() if k not in ("prompt", "refs")} for p in items], indent=0))
    return {"rule": f"min_score = the largest threshold with at most {100 * chosen_rule.alpha:g} % of "
                    f"{'each in-pool task' if chosen_rule.per_task else 'all in-pool'}'s validation prompts below it",
            "min_score": chosen, "n_per_task": n,
            "fallback_test": {g: c["test"][g] for g in GROUPS},
            "effect_test": {f"{g} -> {f}": v for (g, f), v in c["effect"].items()},
            "scores_test": scores, "in_pool_within_interval": bool(ok),
            "rules": {r.name: {"min_score": v["min_score"], "fallback_test": {g: v["test"][g][0] for g in GROUPS},
                               "effect_test": {f"{g} -> {f}": e[0] for (g, f), e in v["effect"].items()}}
                      for r, v in rows.items()}}


def _markdown(eng, n, items, rows, rule, scores, test, fallback, to, ok, answers) -> list[str]:
    cfg = eng.routing
    chosen = rows[rule]["min_score"]
    count = {(g, s): sum(p.group == g and p.split == s for p in items) for g in GROUPS for s in ("val", "test")}
    md = [f"# Knowing when not to route: a confidence rule on `{Path(eng.pool.adapters[0].path).parent}`", "",
          f"{len(eng.pool)} adapters; routing: signal {cfg.signal}, k={cfg.k}, calibration {cfg.calibration}, "
          f"probe {cfg.probe_input} over {len(eng.pool.blocks)} blocks. Held-out prompts, probed once each: the first "
          f"{n} of each task's validation and test splits, in-pool tasks ({count[('in-pool', 'val')]} validation / "
          f"{count[('in-pool', 'test')]} test prompts) and the unseen BBH-source tasks ({count[('unseen', 'val')]} / "
          f"{count[('unseen', 'test')]}), and {count[('generic', 'val')]} / {count[('generic', 'test')]} generic "
          "everyday instructions outside every task (`logo_edge/data/generic_prompts.json`: hand-written for this "
          "study, not from a dataset; even positions validation, odd positions test).", "",
          "**The rule.** A request's confidence is its best selected adapter's calibrated score; below "
          "`RouteConfig.min_score` the engine answers with the base model. min_score is chosen on validation only: "
          f"the largest threshold that falls back on at most {100 * rule.alpha:g} % of "
          f"{'every in-pool task' if rule.per_task else 'all in-pool'}'s validation prompts (prompts an adapter was "
          "made for; the budget bounds how many of a task's answers the rule may change). "
          f"**Chosen: min_score = {chosen:.3f}** ({cfg.calibration} score, rule `{rule.name}`). A pooled budget is "
          "spent on the task whose adapter scores lowest (the validation columns below show it), hence per task.",
          "", "## Best calibrated score by group (median [5th, 95th percentile])", "",
          "| group | validation | test |", "|---|---|---|"]
    for g in GROUPS:
        cells = []
        for s in ("val", "test"):
            b = np.array([p.best for p in items if p.group == g and p.split == s], np.float64)
            cells.append(f"{np.median(b):.2f} [{np.quantile(b, 0.05):.2f}, {np.quantile(b, 0.95):.2f}]"
                         if len(b) else "–")
        md.append(f"| {g} | " + " | ".join(cells) + " |")

    def name(r):
        return f"**{r.name} (chosen)**" if r == rule else r.name

    md += ["", "## Fallback rate (%) by rule: validation, and test with bootstrap 95 % intervals", "",
           "| rule (validation, in-pool) | min_score | val in-pool | val, worst in-pool task | val generic | "
           "test in-pool | test unseen | test generic |", "|---|---|---|---|---|---|---|---|"]
    for r, v in rows.items():
        md.append(f"| {name(r)} | {v['min_score']:.3f} | {100 * v['val'].get('in-pool', np.nan):.1f} | "
                  f"{100 * v['val_task_max']:.1f} | {100 * v['val'].get('generic', np.nan):.1f} | "
                  + " | ".join(_ci(v["test"][g]) for g in GROUPS) + " |")
    md += ["", "## Test split: each rule's effect on task scores (x100)", "",
           "Mean over tasks of the score change over every test prompt (0 where routing is kept), prompts resampled "
           "within each task, 2000 resamples. `-> base`: the engine's rule; `-> uniform`: falling back to the "
           "uniform mixture over every adapter instead (the broad-mixture alternative).", "",
           "| rule | min_score | " + " | ".join(f"{g} -> {f}" for g in SCORED for f in to) + " |",
           "|---|---|" + "---|" * (len(SCORED) * len(to))]
    for r, v in rows.items():
        md.append(f"| {name(r)} | {v['min_score']:.3f} | "
                  + " | ".join(_ci(v["effect"][(g, f)]) for g in SCORED for f in to) + " |")
    if scores:
        md += ["", f"## Test split: task scores (x100) with and without the chosen rule (min_score = {chosen:.3f})",
               "", "| answers | " + " | ".join(scores) + " |", "|---|" + "---|" * len(scores)]
        for row in next(iter(scores.values())):
            md.append(f"| {row} | " + " | ".join(_ci(scores[g][row]) for g in scores) + " |")
    md += _per_task(items, rows, rule, to)
    drop = rows[rule]["effect"][("in-pool", "base")]
    md += ["", "**In-pool criterion** (the rule must not lower in-pool scores beyond the interval): the chosen rule's "
           f"in-pool effect is {_ci(drop)}"
           + (f", and the in-pool score with the rule is {_ci(scores['in-pool']['rule -> base'])} against "
              f"{_ci(scores['in-pool']['routed (no rule)'])} without it" if scores.get("in-pool") else "")
           + f": **{'met' if ok else 'NOT met'}** (met: the effect's interval holds 0 or lies above it"
           + (", and the score with the rule is within the no-rule score's interval)." if scores.get("in-pool")
              else ")."),
           "", f"Answers generated (greedy, each task's max_tokens): the routed answer of "
           f"{'every scored test prompt' if scores else 'each fallback prompt'}, and the base"
           f"{' and uniform-mixture' if 'uniform' in to else ''} answers of the {len(fallback)} scored test prompts "
           f"that the widest rule (min_score {max(v['min_score'] for v in rows.values()):.3f}) falls back on; the "
           "others fall back on subsets of them. Per-prompt best scores and task scores: confidence.json."]
    if answers:
        md += ["", f"## Generic test instructions the chosen rule sends to the base model: routed vs base answers "
               f"(first {EXAMPLE_TOKENS} tokens, not scored: no reference)", "",
               "| instruction | best score | routed mixture | routed answer | base answer |", "|---|---|---|---|---|"]
        for p, routed, base in answers:
            mix = ", ".join(f"{a} {w:.2f}" for a, w in p.mixture.items())
            md.append(f"| {_cell(p.prompt)} | {p.best:.2f} | {mix} | {_cell(routed)} | {_cell(base)} |")
    return md


def _per_task(items, rows, rule, to) -> list[str]:
    """Per task: validation and test fallbacks under the chosen rule and the pooled rule of the same budget, and
    the scores of the answers where the pooled rule falls back on test."""
    pooled = Rule(rule.alpha, not rule.per_task)
    shown = [r for r in (rule, pooled) if r in rows]
    md = ["", "## Per task: fallbacks (validation ; test, each fallbacks / prompts) and the scores (x100) of the "
          f"answers where `{shown[-1].name}` falls back on test", "",
          "| task | group | " + " | ".join(f"`{r.name}`" for r in shown) + " | routed | " + " | ".join(to) + " |",
          "|---|---|" + "---|" * (len(shown) + 1 + len(to))]
    for task in dict.fromkeys(p.task for p in items):
        ps = {s: [p for p in items if p.task == task and p.split == s] for s in ("val", "test")}
        cells = [f"{sum(falls_back(p, rows[r]['min_score']) for p in ps['val'])} / {len(ps['val'])} ; "
                 f"{sum(falls_back(p, rows[r]['min_score']) for p in ps['test'])} / {len(ps['test'])}" for r in shown]
        fb = [p for p in ps["test"] if falls_back(p, rows[shown[-1]]["min_score"]) and p.scores]
        cells += [f"{100 * np.mean([p.scores[k] for p in fb]):.1f}" if fb else "–" for k in ("routed",) + to]
        md.append(f"| {task} | {ps['test'][0].group if ps['test'] else ''} | " + " | ".join(cells) + " |")
    return md


def _cell(text: str, limit: int = 160) -> str:
    """Text for one markdown table cell: one line, pipes escaped, at most `limit` characters."""
    t = " ".join(text.split()).replace("|", "\\|")
    return t if len(t) <= limit else t[:limit - 1] + "…"
