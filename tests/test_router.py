"""Router edge cases (SPEC §1) and the vectorized router against a plain-loop reference. No llama.cpp."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from logo_edge.errors import RoutingError
from logo_edge.router import ProbeBank, RouterConfig, entropy_signal, route, select, weights_for


def loop_signal(o, signal):
    if signal == "norm":
        return math.sqrt(sum(float(x) ** 2 for x in o))
    m = max(o)
    e = [math.exp(float(x) - m) for x in o]
    z = sum(e)
    return 1.0 / (-sum(v / z * math.log(v / z + 1e-8) for v in e) + 1e-6)


def loop_route(outputs, k, signal):
    s = [loop_signal(o, signal) for o in outputs]
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))[: min(k, len(s))]
    tot = sum(s[i] for i in order)
    w = [0.0] * len(s)
    for i in order:
        w[i] = s[i] / tot if tot > 0 else 1 / len(order)
    return s, order, w


finite = st.floats(-50, 50, allow_nan=False, width=32)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(outputs=arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 16)), elements=finite),
       k=st.integers(1, 15), signal=st.sampled_from(["norm", "entropy"]))
def test_route_equals_plain_loop(outputs, k, signal):
    names = [f"a{i}" for i in range(len(outputs))]
    r = route(outputs, names, RouterConfig(signal, k))
    s, order, w = loop_route(outputs, k, signal)
    np.testing.assert_allclose(r.signals, s, rtol=1e-6, atol=1e-12)  # 1/(H+1e-6) amplifies rounding as H->0
    # near-ties may order differently under rounding; compare the chosen signal values instead
    assert [round(s[i], 6) for i in r.selected] == [round(s[i], 6) for i in order]
    assert len(r.selected) == min(k, len(outputs))
    assert r.weights.sum() == pytest.approx(1.0)
    assert all(r.weights[i] == 0 for i in range(len(outputs)) if i not in r.selected)
    if [round(s[i], 6) for i in r.selected] == [round(s[i], 6) for i in order] and r.selected == order:
        np.testing.assert_allclose(r.weights, w, rtol=1e-6, atol=1e-9)  # the loop's weights, where it chose alike


@settings(max_examples=150, deadline=None, derandomize=True)
@given(outputs=arrays(np.float64, st.tuples(st.integers(1, 10), st.integers(1, 12)), elements=finite),
       k=st.integers(1, 12), mode=st.sampled_from(["ratio", "zscore"]), seed=st.integers(0, 10_000))
def test_calibrated_routing_equals_a_plain_loop_property(outputs, k, mode, seed):
    """ratio: s / mean, weights proportional; zscore: (s - mean) / sd, weights a softmax over the selected."""
    rng = np.random.default_rng(seed)
    n = len(outputs)
    mean, sd = rng.uniform(0.1, 20, n), rng.uniform(0.05, 5, n)
    r = route(outputs, [f"a{i}" for i in range(n)], RouterConfig("norm", k, mode), stats=(mean, sd))
    s = [loop_signal(o, "norm") for o in outputs]
    score = [s[i] / mean[i] if mode == "ratio" else (s[i] - mean[i]) / sd[i] for i in range(n)]
    order = sorted(range(n), key=lambda i: (-score[i], i))[: min(k, n)]
    assert [round(score[i], 6) for i in r.selected] == [round(score[i], 6) for i in order]
    np.testing.assert_allclose(r.scores, score, rtol=1e-9, atol=1e-12)
    if r.selected == order:
        sel = [score[i] for i in order]
        if mode == "ratio":
            tot = sum(sel)
            want = [v / tot for v in sel] if tot > 0 else [1 / len(sel)] * len(sel)
        else:
            e = [math.exp(v - max(sel)) for v in sel]
            want = [v / sum(e) for v in e]
        np.testing.assert_allclose([r.weights[i] for i in order], want, rtol=1e-9, atol=1e-12)
    assert r.weights.sum() == pytest.approx(1.0)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(n=st.integers(1, 6), n_blocks=st.integers(1, 3), d_in=st.integers(1, 8), d_out=st.integers(1, 8),
       seed=st.integers(0, 10_000))
def test_probe_bank_equals_per_adapter_products(n, n_blocks, d_in, d_out, seed):
    """Outputs (target block) and window norms from the folded bank, against each adapter's own c * B (A h)
    per block; adapters of any rank (the bank does not pad), with and without LoRA at earlier blocks."""
    rng = np.random.default_rng(seed)
    entries = []
    for r in rng.integers(1, 9, size=n):
        row = [(rng.normal(size=(r, d_in)), rng.normal(size=(d_out, r)), float(rng.uniform(-4, 4)))
               if j == n_blocks - 1 or rng.random() < 0.7 else None for j in range(n_blocks)]
        entries.append(row)
    bank, h = ProbeBank.of(entries), rng.normal(size=(n_blocks, d_in))
    per_block = [[np.zeros(d_out) if e is None else e[2] * (e[1] @ (e[0] @ h[j])) for j, e in enumerate(row)]
                 for row in entries]
    want_out = np.stack([row[-1] for row in per_block])
    want_norm = np.array([np.sqrt(sum(np.sum(o ** 2) for o in row)) for row in per_block])
    np.testing.assert_allclose(bank.outputs(h), want_out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bank.norms(h), want_norm, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bank.norms(h, last=1), np.linalg.norm(want_out, axis=1), rtol=1e-4, atol=1e-5)
    among = np.arange(n)[::-1]
    np.testing.assert_allclose(bank.norms(h, among=among), bank.norms(h)[among], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(bank.signals(h, "entropy"), entropy_signal(want_out), rtol=1e-3)
    # a large pool's bank stores the earlier window blocks in float16 (rel. error 2^-11 per element, float32
    # accumulation): window norms to a few parts in 10^4; the target block (stage one, outputs) stays exact
    half = ProbeBank(n_blocks, d_in, d_out, np.float16)
    for row in entries:
        half.add(row)
    np.testing.assert_allclose(half.norms(h), want_norm, rtol=2e-3, atol=1e-5)
    np.testing.assert_array_equal(half.norms(h, last=1), bank.norms(h, last=1))
    np.testing.assert_array_equal(half.outputs(h), bank.outputs(h))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(1, 5), n_blocks=st.integers(1, 3), d_in=st.integers(1, 9), d_out=st.integers(1, 9),
       power=st.sampled_from([0.0, 0.25, 0.5, 1.0]), seed=st.integers(0, 10_000))
def test_sv_power_weighs_the_norm_by_the_dense_updates_singular_values(n, n_blocks, d_in, d_out, power, seed):
    """A bank with sv_power=p: each adapter's window norm is sqrt(sum_j ||S_j^p V_j^T h_j||^2) from the SVD
    of the dense update c B A (numpy on the product, not the folded rows); p=0 is SpectR's score over |c| (it
    and the rank read the same directions); the target block's outputs stay c B A h whatever p; several modules
    on one input (a list per block) are weighed as their stacked update, the target's outputs read alone."""
    rng = np.random.default_rng(seed)
    entries = []
    for r in rng.integers(1, 7, size=n):
        def one():
            return rng.normal(size=(r, d_in)), rng.normal(size=(d_out, r)), float(rng.uniform(-4, 4))
        row = [one() if j == n_blocks - 1 else (None if rng.random() < 0.3 else [one(), one()])
               for j in range(n_blocks)]
        if rng.random() < 0.5:  # the target module stacked with another reading the same input (probe_modules="input")
            row[-1] = [(*row[-1], True), one()]
        entries.append(row)
    bank, h = ProbeBank.of(entries, sv_power=power), rng.normal(size=(n_blocks, d_in))

    def weighed(e, x):
        parts = e if isinstance(e, list) else [e]
        dense = np.concatenate([c * b @ a for a, b, c, *_ in parts])  # the update(s) reading x, stacked
        _, s, vt = np.linalg.svd(dense, full_matrices=False)
        keep = s > s.max() * 1e-6
        return np.sum((s[keep] ** power * (vt[keep] @ x)) ** 2)

    want = np.array([np.sqrt(sum(weighed(e, h[j]) for j, e in enumerate(row) if e is not None))
                     for row in entries])
    np.testing.assert_allclose(bank.norms(h), want, rtol=1e-4, atol=1e-6)
    targets = [row[-1][0] if isinstance(row[-1], list) else row[-1] for row in entries]  # its outputs alone
    want_out = np.stack([c * b @ (a @ h[-1]) for a, b, c, *_ in targets])
    np.testing.assert_allclose(bank.outputs(h), want_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("power", [-0.5, 1.5, float("nan"), True, "1"])
def test_sv_power_out_of_range_names_the_value(tiny_engine, power):
    from logo_edge.errors import AdapterError
    from logo_edge.pool import AdapterPool

    with pytest.raises(AdapterError, match="sv_power must be a number in \\[0, 1\\]"):
        AdapterPool(tiny_engine.model, sv_power=power)


def test_probe_bank_rejects_a_state_of_the_wrong_window():
    a, b = np.ones((2, 4)), np.ones((3, 2))
    bank = ProbeBank.of([[None, (a, b, 1.0)]])
    with pytest.raises(RoutingError, match=r"probe state has shape \(4,\); the bank reads 2 block"):
        bank.norms(np.ones(4))
    with pytest.raises(RoutingError, match="target"):
        bank.add([(a, b, 1.0), None])
    with pytest.raises(RoutingError, match=r"A \(2, 4\) / B \(2, 2\) do not match"):
        bank.add([None, (a, np.ones((2, 2)), 1.0)])
    with pytest.raises(RoutingError, match="update is zero at every window block"):
        ProbeBank(2, 4, 3, sv_power=0.25).add([None, (a, np.zeros((3, 2)), 1.0)])  # B = 0: no row to read
    assert len(bank) == 1  # a rejected entry leaves the bank as it was
    with pytest.raises(RoutingError, match="empty"):
        ProbeBank.of([[None]])


def test_bank_grows_and_shrinks_without_changing_results():
    rng = np.random.default_rng(3)
    entries = [[(rng.normal(size=(r, 5)), rng.normal(size=(4, r)), 1.5)] for r in rng.integers(1, 40, size=30)]
    bank = ProbeBank(1, 5, 4)
    for row in entries:
        bank.add(row)
    h = rng.normal(size=5)
    before = bank.norms(h), bank.outputs(h)
    big = bank.nbytes
    bank.shrink()
    assert bank.nbytes < big and bank.M.shape[1] == sum(int(a.shape[0]) for (a, _, _), in entries)
    np.testing.assert_array_equal(bank.norms(h), before[0])
    np.testing.assert_array_equal(bank.outputs(h), before[1])


def test_k_larger_than_pool_means_all():
    r = route(np.eye(3), ["a", "b", "c"], RouterConfig("norm", 10))
    assert sorted(r.selected) == [0, 1, 2]


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_k_below_one_is_an_error(k):
    with pytest.raises(RoutingError, match="k must be an integer >= 1"):
        RouterConfig("norm", k)


def test_unknown_signal():
    with pytest.raises(RoutingError, match="unknown signal 'cosine'"):
        RouterConfig("cosine", 3)


def test_ties_go_to_lower_index():
    assert select(np.array([1.0, 2.0, 2.0, 2.0, 0.5]), 2) == [1, 2]
    r = route(np.array([[1.0], [3.0], [3.0]]), ["a", "b", "c"], RouterConfig("norm", 1))
    assert r.selected == [1]


def test_all_zero_signals_give_uniform_weights():
    w = weights_for(np.zeros(4), [2, 0, 3])
    np.testing.assert_allclose(w, [1 / 3, 0, 1 / 3, 1 / 3])
    r = route(np.zeros((3, 5)), ["a", "b", "c"], RouterConfig("norm", 2))
    np.testing.assert_allclose(r.weights[r.selected], [0.5, 0.5])


def test_non_finite_output_is_excluded_with_warning_naming_it():
    out = np.array([[1.0, 2.0], [np.nan, 1.0], [5.0, np.inf], [0.5, 0.5]])
    with pytest.warns(RuntimeWarning, match="'bad_nan'") as rec:
        r = route(out, ["ok1", "bad_nan", "bad_inf", "ok2"], RouterConfig("norm", 4))
    assert any("'bad_inf'" in str(w.message) for w in rec)
    assert r.selected == [0, 3]
    assert set(r.excluded) == {"bad_nan", "bad_inf"}
    assert r.weights[1] == r.weights[2] == 0


def test_entropy_overflow_is_finite():
    # huge logits: softmax must not overflow
    r = route(np.array([[1e6, 0.0, -1e6], [1.0, 1.0, 1.0]]), ["peaked", "flat"], RouterConfig("entropy", 1))
    assert r.selected == [0] and np.isfinite(r.signals).all()


def test_unprobeable_adapters_are_reported_not_ranked():
    r = route(np.array([[1.0], [2.0]]), ["a", "noq", "b"], RouterConfig("norm", 3), {"noq": "no attn_q"})
    assert r.selected == [2, 0]
    assert np.isnan(r.signals[1]) and r.excluded["noq"] == "no attn_q"


def test_every_adapter_unusable_is_an_error():
    with pytest.raises(RoutingError, match="no adapter could be scored"):
        route(np.array([[np.nan]]), ["a"], RouterConfig("norm", 1))

