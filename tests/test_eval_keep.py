"""The keep-rule study's choice (logo_edge.eval_keep): against an exhaustive search over every threshold pair."""

import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from logo_edge.eval_keep import Pair, choose_rule, rule_keeps


def pair(first, second, base_keeps, lead_first, score, drop, continues=True) -> Pair:
    return Pair(first, second, base_keeps, second, lead_first, score, 0.0, continues, 0.0, drop)


pairs = st.lists(st.builds(pair, st.sampled_from("ab"), st.sampled_from("ab"), st.booleans(), st.booleans(),
                           st.floats(-5, 15, allow_nan=False), st.floats(-5, 10, allow_nan=False), st.booleans()),
                 max_size=30)


def harmful(p: Pair) -> bool:
    return p.first != p.second and not p.base_keeps


@settings(max_examples=200, deadline=None)
@given(pairs)
def test_the_chosen_rule_keeps_no_harmful_switch_and_the_most_same_task_chats(val):
    tau, delta = choose_rule(val)
    kept = [p for p in val if rule_keeps(p, tau, delta)]
    assert not any(harmful(p) for p in kept)
    best = 0  # the most same-task chats any harmless (score, drop) pair keeps, by brute force
    cands = [p for p in val if p.continues and p.lead_first]
    for t, d in itertools.product({p.lead_score for p in cands}, {p.ref_lead_drop for p in cands}):
        k = [p for p in val if rule_keeps(p, t, d)]
        if not any(harmful(p) for p in k):
            best = max(best, sum(p.first == p.second for p in k))
    assert sum(p.first == p.second for p in kept) == best


def test_no_candidate_keeps_nothing():
    tau, delta = choose_rule([pair("a", "b", False, True, 3.0, 0.0)])
    assert math.isinf(tau) and not rule_keeps(pair("a", "a", True, True, 1e9, -1e9), tau, delta)
