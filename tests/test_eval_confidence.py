"""The confidence study (logo_edge.eval_confidence): its threshold choice against brute force, its generic prompts,
and a small run on the tiny model that the engine's own min_score rule agrees with."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logo_edge.eval_confidence import GENERIC_FILE, Rule, choose_min_score, choose_per_task, generic_prompts

scores = st.lists(st.one_of(st.floats(-5, 15, allow_nan=False), st.sampled_from([0.5, 1.0, float("-inf")])),
                  max_size=40)
alphas = st.one_of(st.sampled_from([0.0, 0.02, 0.05, 0.1, 0.29, 0.5]), st.floats(0, 0.99))


@settings(max_examples=300, deadline=None)
@given(scores, alphas)
def test_the_threshold_is_the_largest_within_the_budget(best, alpha):
    t = choose_min_score(best, alpha)
    if not best:
        assert t == float("-inf")
        return
    s = np.array(best)

    def rate(x):
        return np.mean(s < x)  # the engine falls back when best < min_score

    feasible = [x for x in set(best) if rate(x) <= alpha]  # the budget's largest threshold is one of the scores
    assert t == max(feasible)
    assert rate(t) <= alpha
    assert rate(np.nextafter(t, np.inf)) > alpha or t == max(best)  # any larger threshold breaks the budget


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from("abcd"), scores.filter(len), max_size=4), alphas)
def test_the_per_task_threshold_is_the_largest_within_every_tasks_budget(best, alpha):
    t = choose_per_task(best, alpha)
    if not best:
        assert t == float("-inf")
        return

    def within(x):
        return all(np.mean(np.array(b) < x) <= alpha for b in best.values())

    values = {x for b in best.values() for x in b}
    assert t == max(x for x in values if within(x))  # brute force over every candidate
    assert within(t) and (t == max(values) or not within(np.nextafter(t, np.inf)))


def test_threshold_edge_cases():
    assert choose_min_score([3.0, 1.0, 2.0], 0.0) == 1.0  # no budget: the smallest score, nothing falls back
    assert choose_min_score([1.0] * 20, 0.5) == 1.0  # ties: nothing is strictly below
    assert choose_min_score(list(range(100)), 0.05) == 5.0  # exactly 5 of 100 below
    assert math.isinf(choose_min_score([], 0.05))
    with pytest.raises(ValueError, match="alpha"):
        choose_min_score([1.0], 1.0)
    with pytest.raises(ValueError, match="nan"):
        choose_min_score([1.0, float("nan")], 0.1)


def test_generic_prompts_are_hand_written_split_in_half_and_not_calibration_prompts():
    from logo_edge.calibration import calibration_prompts

    doc = json.loads(GENERIC_FILE.read_text())
    assert "hand-written" in doc["about"]
    g = generic_prompts()
    assert len(g["val"]) == len(g["test"]) == 30
    assert not set(g["val"]) & set(g["test"]) and not (set(g["val"]) | set(g["test"])) & set(calibration_prompts())


@pytest.mark.slow
def test_a_small_run_on_the_tiny_model_agrees_with_the_engines_rule(tiny, tmp_path):
    """Tiny adapters under pool task names: the report's threshold and fallbacks are what RouteConfig.min_score
    does in the engine."""
    from logo_edge.engine import Engine
    from logo_edge.eval_confidence import probe_prompts
    from logo_edge.tasks import UNSEEN_TASKS

    with Engine(tiny / "tiny-f32.gguf", n_ctx=1024, n_batch=64, n_threads=1, kv_type="f32", flash_attn=False) as eng:
        for task, adapter in (("sentiment", "qv_r8"), ("addition", "all7_r4"), ("langid", "rs_r16")):
            eng.add_adapter(tiny / "gguf" / f"{adapter}.gguf", task)
        from logo_edge.eval_confidence import confidence_report

        got = confidence_report(eng, 2, tmp_path, rules=(Rule(0.2, per_task=False), Rule(0.2)), examples=2)
        items = probe_prompts(eng, 2)  # the same probes again: routing is deterministic
        val = [p.best for p in items if p.split == "val" and p.group == "in-pool"]
        assert len(val) == 6 and got["min_score"] == choose_min_score(val, 0.2) == sorted(val)[1]
        assert {p.group for p in items} == {"in-pool", "unseen", "generic"}
        assert sum(p.group == "unseen" for p in items) == 4 * len(UNSEEN_TASKS)
        assert all(0 <= r[0] <= 1 for r in got["fallback_test"].values())
        t = got["min_score"]
        test = [p for p in items if p.split == "test"]
        for p in [next(p for p in test if p.best < t), next(p for p in test if p.best >= t)]:
            rec = eng.create_chat_completion([{"role": "user", "content": p.prompt}], max_tokens=1, min_score=t)
            assert ("fallback" in rec["routing"]["settings"]) == (p.best < t), (p.best, t)
    md = (tmp_path / "confidence.md").read_text()
    assert f"min_score = {t:.3f}" in md and "hand-written" in md and "In-pool criterion" in md
    assert "routed vs base answers" in md
    per_prompt = json.loads((tmp_path / "confidence.json").read_text())
    assert len(per_prompt) == len(items)
    tested = [r for r in per_prompt if r["split"] == "test" and r["group"] != "generic"]
    assert all("routed" in r["scores"] for r in tested)  # every scored test prompt answered routed
    assert all({"base", "uniform"} <= set(r["scores"]) for r in tested if r["best"] < t)
