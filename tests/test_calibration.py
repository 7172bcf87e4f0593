"""Calibrated signals (ratio, zscore): statistics against plain loops and a PyTorch reference, the
disk cache of calibration states, and the property that motivates them (invariance to update size)."""

import math
from pathlib import Path

import numpy as np
import pytest

from logo_edge.calibration import calibration_prompts
from logo_edge.errors import RoutingError
from logo_edge.router import ProbeBank, RouterConfig, route


def loop_norm(o):
    return math.sqrt(sum(float(x) ** 2 for x in o))


def loop_entropy(o):
    m = max(o)
    e = [math.exp(x - m) for x in o]
    z = sum(e)
    return 1.0 / (-sum((v / z) * math.log(v / z + 1e-8) for v in e) + 1e-6)


def loop_stats(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def test_bank_stats_equal_a_plain_loop():
    """Norm over a window of blocks (one without LoRA), entropy at the target block, for an adapter
    between two others in the bank (its rows, not its neighbours')."""
    rng = np.random.default_rng(0)
    def entry(r):
        return rng.normal(size=(r, 6)), rng.normal(size=(5, r)), float(rng.uniform(-2, 2))
    entries = [entry(4), None, entry(2)]
    bank = ProbeBank.of([[entry(3), entry(1), entry(5)], entries, [None, None, entry(7)]])
    states = rng.normal(size=(9, 3, 6))
    stats = bank.stats(1, states)
    outs = [[np.zeros(5) if e is None else e[2] * (e[1] @ (e[0] @ h[j])) for j, e in enumerate(entries)]
            for h in states]
    assert stats["norm"] == pytest.approx(loop_stats([loop_norm(np.concatenate(o)) for o in outs]), rel=1e-5)
    assert stats["entropy"] == pytest.approx(loop_stats([loop_entropy(list(o[-1])) for o in outs]), rel=1e-4)
    # the target block alone (the shortlist's first stage)
    assert stats["norm@target"] == pytest.approx(loop_stats([loop_norm(o[-1]) for o in outs]), rel=1e-5)
    with pytest.raises(RoutingError, match="do not fit the bank's 3 block"):
        bank.stats(1, states[:, :2])


@pytest.mark.parametrize("mode", ["ratio", "zscore"])
def test_calibrated_routing_equals_a_plain_loop(mode):
    rng = np.random.default_rng(1)
    outputs = rng.normal(size=(6, 8)) * rng.uniform(0.1, 10, size=(6, 1))
    mean, sd = rng.uniform(0.5, 5, 6), rng.uniform(0.1, 2, 6)
    r = route(outputs, list("abcdef"), RouterConfig("norm", 3, mode), stats=(mean, sd))
    s = [loop_norm(o) for o in outputs]
    score = [s[i] / mean[i] if mode == "ratio" else (s[i] - mean[i]) / sd[i] for i in range(6)]
    top = sorted(range(6), key=lambda i: (-score[i], i))[:3]
    assert r.selected == top
    np.testing.assert_allclose(r.signals, s)  # the raw signal is still reported
    np.testing.assert_allclose(r.scores, score)
    if mode == "ratio":
        want = [score[i] / sum(score[j] for j in top) for i in top]
    else:
        e = [math.exp(score[i] - max(score[j] for j in top)) for i in top]
        want = [x / sum(e) for x in e]
    np.testing.assert_allclose(r.weights[top], want)
    assert r.weights.sum() == pytest.approx(1.0) and (r.weights >= 0).all()


def test_calibrated_mode_without_statistics_is_an_error():
    with pytest.raises(RoutingError, match="needs the adapters' calibration statistics"):
        route(np.ones((2, 3)), ["a", "b"], RouterConfig("norm", 1, "ratio"))
    with pytest.raises(RoutingError, match="unknown calibration 'minmax'"):
        RouterConfig("norm", 1, "minmax")


def test_calibrated_scores_ignore_update_size():
    """An adapter scaled by 10 has 10x the raw signal; its calibrated scores are unchanged."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(5, 4))
    states, h = rng.normal(size=(20, 6)), rng.normal(size=6)
    outputs = np.stack([b @ (a @ h), 10 * b @ (a @ h)])
    st = [ProbeBank.of([[(a, b, c)]]).stats(0, states[:, None])["norm"] for c in (1.0, 10.0)]
    mean, sd = np.array(st).T
    raw = route(outputs, ["small", "big"], RouterConfig("norm", 1))
    assert raw.selected == [1]
    for mode in ("ratio", "zscore"):
        r = route(outputs, ["small", "big"], RouterConfig("norm", 2, mode), stats=(mean, sd))
        assert r.scores[0] == pytest.approx(r.scores[1], rel=1e-6)  # float32 bank


def test_calibration_prompts_are_generic_and_many():
    prompts = calibration_prompts()
    assert 30 <= len(prompts) <= 80 and len(set(prompts)) == len(prompts)


@pytest.mark.slow
def test_engine_calibration_matches_pytorch(tiny, hf_tiny, monkeypatch, tmp_path):
    """Statistics from the cached llama.cpp states equal transformers hidden states + PEFT A/B."""
    from logo_edge.engine import Engine, RouteConfig
    from test_reference import peft_probe_mats, reference_ffn_h, reference_h
    from tiny import ADAPTERS, N_LAYER

    monkeypatch.setenv("LOGO_EDGE_CACHE", str(tmp_path))  # a fresh states cache
    with pytest.warns(UserWarning, match="od_only"):
        # q alone, weighed as the paper (sv_power and probe_modules: test_reference; statistics read the same rows)
        eng = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=256, kv_type="f32", flash_attn=False,
                     probe_blocks=2, routing=RouteConfig(calibration="ratio", probe_input="normed"),
                     probe_modules="target-first", sv_power=1.0)
    try:
        assert eng.pool.calibrated_inputs == ["normed"] and eng.pool.blocks == [N_LAYER - 2, N_LAYER - 1]
        toks = [eng.tokenize(eng.format_chat([{"role": "user", "content": p}])) for p in calibration_prompts()]
        hs = [[reference_h(hf_tiny, t, blk, "normed") for blk in eng.pool.blocks] for t in toks]
        for name in ADAPTERS:
            mats = [peft_probe_mats(tiny, name, blk) for blk in eng.pool.blocks]
            sig = np.array([math.sqrt(sum(np.sum((c * (b @ (a @ hb))) ** 2) for (a, b, c), hb in zip(mats, h)))
                            for h in hs])
            got = eng.pool.adapters[eng.pool.index(name)].stats["normed"]["norm"]
            assert got == pytest.approx((sig.mean(), sig.std()), rel=1e-4), name
        # mlp_only, scored over gate and up on the FFN's input: its statistics from that input's states
        ffn = [reference_ffn_h(hf_tiny, t, eng.pool.blocks, "normed") for t in toks]
        mats = {(blk, m): peft_probe_mats(tiny, "mlp_only", blk, m) for blk in eng.pool.blocks
                for m in ("gate_proj", "up_proj")}
        sig = np.array([math.sqrt(sum(np.sum((c * (b @ (a @ x[blk]))) ** 2) for (blk, _), (a, b, c) in mats.items()))
                        for x in ffn])
        got = eng.pool.adapters[eng.pool.index("mlp_only")].stats["normed"]["norm"]
        assert got == pytest.approx((sig.mean(), sig.std()), rel=1e-4)
        rec = eng.route("What is the capital of Peru?")
        assert rec.settings["calibration"] == "ratio"
        for s in rec.adapters:
            if s.signal is not None:
                mean = eng.pool.adapters[eng.pool.index(s.name)].stats["normed"]["norm"][0]
                assert s.score == pytest.approx(s.signal / mean, rel=1e-9)
        # a second engine reads the cached states instead of probing again
        files = sorted((tmp_path / "calibration").glob("*.npy"))  # the attention's input, and the FFN's
        assert len(files) == 2 and "attn_q" in files[0].name and "ffn_gate" in files[1].name
        monkeypatch.setattr(Engine, "probe", lambda *a, **k: (_ for _ in ()).throw(AssertionError("probed")))
        with pytest.warns(UserWarning, match="od_only"):
            eng2 = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=256, probe_blocks=2,
                          routing=RouteConfig(calibration="zscore", probe_input="normed"),
                          probe_modules="target-first", sv_power=1.0)
        assert eng2.pool.adapters[0].stats == eng.pool.adapters[0].stats
        eng2.close()
        files[0].write_bytes(b"not a numpy file")  # a corrupt cache is recomputed, not trusted
        monkeypatch.undo()
        monkeypatch.setenv("LOGO_EDGE_CACHE", str(tmp_path))
        with pytest.warns(UserWarning, match="od_only"):
            eng3 = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=256, kv_type="f32", flash_attn=False,
                          probe_blocks=2, routing=RouteConfig(calibration="zscore", probe_input="normed"),
                          probe_modules="target-first", sv_power=1.0)
        assert eng3.pool.adapters[0].stats["normed"]["norm"] == pytest.approx(
            eng.pool.adapters[0].stats["normed"]["norm"], rel=1e-4)
        eng3.close()
    finally:
        eng.close()


def test_model_key_sees_every_byte_and_remembers_it_by_the_files_stat(tmp_path, monkeypatch):
    """Two models of one size and name that differ only in the middle (an adapter merged into some layers) get
    different keys, so they never share calibration states or a pool index; an unchanged file is not hashed
    again, and a file rewritten in place is."""
    import os

    from logo_edge import calibration

    monkeypatch.setenv("LOGO_EDGE_CACHE", str(tmp_path / "cache"))
    data = np.random.default_rng(0).integers(0, 256, 5 << 20, dtype=np.uint8).tobytes()
    merged = bytearray(data)
    merged[(5 << 20) // 2] ^= 1  # the first and last MiB, the size and the name unchanged
    a, b, c = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c" / "m.gguf"
    for p, content in ((a, data), (b, bytes(merged)), (c, data)):
        p.parent.mkdir()
        p.write_bytes(content)
    ka, kb = calibration.model_key(a), calibration.model_key(b)
    assert ka != kb and calibration.model_key(c) == ka
    assert calibration.states_path(a, [3, 4], "attn_q", "normed") != calibration.states_path(b, [3, 4], "attn_q",
                                                                                               "normed")
    hashed = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *args, **kw: hashed.append(Path(f)) or real_open(f, *args, **kw))
    assert calibration.model_key(b) == kb and b not in hashed  # remembered: a stat, not a read
    st = b.stat()
    b.write_bytes(data)  # rewritten in place, same size: the memo's stat no longer matches
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert calibration.model_key(b) == ka and b in hashed
