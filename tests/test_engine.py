"""Engine behaviour on the tiny model: bad input, caching, streaming, sampling, fusion, the record."""

import os
import shutil

import numpy as np
import pytest

from logo_edge.engine import Engine
from logo_edge.errors import AdapterError, ContextOverflowError, ModelLoadError, RoutingError
from logo_edge.gguf_files import BaseInfo, read_lora, write_lora

pytestmark = pytest.mark.slow


def still_usable(eng, n_adapters):
    assert len(eng.pool) == n_adapters
    rec = eng.route("still working?")
    assert rec.selected
    out = eng.create_completion("still working?", max_tokens=4)
    assert out["usage"]["completion_tokens"] >= 1


@pytest.fixture
def pairs(tiny):
    return read_lora(tiny / "gguf" / "qv_r8.gguf", BaseInfo.read(tiny / "tiny-f32.gguf")).pairs


def test_bad_adapters_give_clear_errors_and_leave_the_pool_usable(tiny, tiny_engine, tmp_path, pairs):
    eng, n = tiny_engine, len(tiny_engine.pool)
    write_lora(tmp_path / "qwen.gguf", "qwen2", 16, pairs)
    small = {k: (a[:, :32], b[:32]) for k, (a, b) in pairs.items()}
    write_lora(tmp_path / "small.gguf", "llama", 16, small)
    nan = {k: (a, b.copy()) for k, (a, b) in pairs.items()}
    next(iter(nan.values()))[1][0, 0] = np.nan
    write_lora(tmp_path / "nan.gguf", "llama", 16, nan)
    raw = (tiny / "gguf" / "qv_r8.gguf").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(raw[: len(raw) // 3])
    (tmp_path / "junk.gguf").write_bytes(b"\x00junk" * 100)
    cases = [
        (tmp_path / "qwen.gguf", "architecture 'qwen2' but the base model"),
        (tmp_path / "small.gguf", "another model size"),
        (tmp_path / "nan.gguf", "NaN or infinite"),
        (tmp_path / "trunc.gguf", "truncated or corrupt"),
        (tmp_path / "junk.gguf", "truncated or corrupt"),
        (tmp_path / "missing.gguf", "adapter file not found"),
        (tiny / "tiny-f32.gguf", "not a LoRA adapter"),
    ]
    for path, msg in cases:
        with pytest.raises(AdapterError, match=msg) as e:
            eng.pool.add(path)
        assert str(path) in str(e.value)
        still_usable(eng, n)
    with pytest.raises(AdapterError, match="already in the pool"):
        eng.pool.add(tiny / "gguf" / "qv_r8.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no \\*.gguf adapters"):
        eng.pool.add_many(tmp_path / "empty")
    still_usable(eng, n)


def test_bad_model_files(tmp_path, tiny):
    with pytest.raises(ModelLoadError, match="model file not found"):
        Engine(tmp_path / "nope.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        Engine(tmp_path / "bad.gguf")
    with pytest.raises(ModelLoadError, match="not a model"):
        Engine(tiny / "gguf" / "qv_r8.gguf")


def test_prompt_longer_than_context(tiny_engine):
    long = "word " * 600  # > n_ctx=512 tokens
    with pytest.raises(ContextOverflowError, match="context holds 512"):
        tiny_engine.create_completion(long, max_tokens=4)
    with pytest.raises(ContextOverflowError):
        tiny_engine.route(long)
    still_usable(tiny_engine, len(tiny_engine.pool))


def test_routing_settings_errors(tiny_engine):
    with pytest.raises(RoutingError, match="k must be an integer >= 1"):
        tiny_engine.route("hi", k=0)
    with pytest.raises(RoutingError, match="probe_input"):
        tiny_engine.route("hi", probe_input="middle")
    with pytest.raises(AdapterError, match="no adapter named 'nope'.*have: all7_r4, "):
        tiny_engine.create_completion("hi", adapters={"nope": 1.0})
    with pytest.raises(RoutingError, match="finite"):
        tiny_engine.create_completion("hi", adapters={"qv_r8": float("nan")})
    still_usable(tiny_engine, len(tiny_engine.pool))


def test_record_has_every_adapter_settings_and_timings(tiny_engine):
    out = tiny_engine.create_chat_completion([{"role": "user", "content": "Hello!"}], max_tokens=8, k=2)
    rec = out["routing"]
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert [a["name"] for a in rec["adapters"]] == tiny_engine.pool.names
    assert sum(a["weight"] for a in rec["adapters"]) == pytest.approx(1.0)
    assert sum(a["rank"] is not None for a in rec["adapters"]) == 2
    assert rec["settings"] == dict(signal="norm", k=2, k_used=2, calibration="zscore", target_block=3,
                                   probe_blocks=4, target_module="attn_q", probe_modules="input", sv_power=0.25,
                                   probe_input="normed", merge="auto", merge_applied="packed", prefill="exact",
                                   mixture="new", shortlist=None, keep_rule="base probe")  # None: every window read
    t = rec["timings"]
    assert t["probe_s"] > 0 and t["prefill_s"] > 0 and t["decode_s"] > 0 and t["prompt_tokens"] > 5


def test_stream_equals_non_stream_and_stop_strings(tiny_engine):
    full = tiny_engine.create_completion("Tell me a story", max_tokens=24)["choices"][0]["text"]
    chunks = list(tiny_engine.create_completion("Tell me a story", max_tokens=24, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "routing" in chunks[-1]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = tiny_engine.create_completion("Tell me a story", max_tokens=24, stop=[stop])
    assert cut["choices"][0]["text"] == full[: full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(tiny_engine):
    kw = dict(max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    tiny_engine.forget_prompts()  # a cached prefix may change the logits' low bits, hence a draw
    a = tiny_engine.create_completion("Sample me", **kw)["choices"][0]["text"]
    tiny_engine.forget_prompts()
    b = tiny_engine.create_completion("Sample me", **kw)["choices"][0]["text"]
    c = tiny_engine.create_completion("Sample me", **{**kw, "seed": 8})["choices"][0]["text"]
    assert a == b and a != c


def test_kv_cache_reused_only_under_the_same_mixture(tiny_engine):
    eng = tiny_engine
    mix = {"qv_r8": 0.7, "rs_r16": 0.3}
    first = eng.create_completion("The history of the city", adapters=mix, max_tokens=8)
    prompt2 = "The history of the city" + first["choices"][0]["text"] + " and then"
    warm = eng.create_completion(prompt2, adapters=mix, max_tokens=8)
    assert warm["routing"]["timings"]["cached_tokens"] > 5
    eng.ctx.cache_truncate(0)
    eng._cache = []
    cold = eng.create_completion(prompt2, adapters=mix, max_tokens=8)
    assert cold["routing"]["timings"]["cached_tokens"] == 0
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
    other = eng.create_completion(prompt2, adapters={"qv_r8": 0.5, "rs_r16": 0.5}, max_tokens=8)
    assert other["routing"]["timings"]["cached_tokens"] == 0  # another mixture never reuses the cache


def test_kv_kept_per_mixture_comes_back_when_a_request_returns_to_it(tiny):
    """K/V kept per mixture: after a request under another mixture, a request that continues the first one's
    history under the first mixture gets that history's K/V back (llama.cpp's sequence state) and prefills only what
    follows; its answer equals a fresh engine's. Off (kv_keep_mb=0), or over the budget, nothing comes back."""
    files = [tiny / "gguf" / f"{n}.gguf" for n in ("qv_r8", "all7_r4", "rs_r16")]
    a, b = {"qv_r8": 0.7, "rs_r16": 0.3}, {"all7_r4": 1.0}
    p1 = "The history of the city and its rivers and markets, told from the beginning " * 2

    def talk(**kw):
        with Engine(tiny / "tiny-f32.gguf", files, n_ctx=512, kv_type="f32", **kw) as eng:
            first = eng.create_completion(p1, adapters=a, max_tokens=6)
            eng.create_completion("Something else entirely", adapters=b, max_tokens=4)
            eng.create_completion("And a base model question", adapters="base", max_tokens=4)
            p3 = p1 + first["choices"][0]["text"] + " and then"
            return first, eng.create_completion(p3, adapters=a, max_tokens=8), p3

    first, back, p3 = talk()
    n1 = first["routing"]["timings"]["prompt_tokens"]
    assert back["routing"]["timings"]["cached_tokens"] >= n1
    assert back["routing"]["settings"]["kv_restored_tokens"] >= n1
    with Engine(tiny / "tiny-f32.gguf", files, n_ctx=512, kv_type="f32") as fresh:
        ref = fresh.create_completion(p3, adapters=a, max_tokens=8)
    assert ref["routing"]["timings"]["cached_tokens"] == 0
    assert back["choices"][0]["text"] == ref["choices"][0]["text"]
    for kw in ({"kv_keep_mb": 0}, {"kv_keep_mb": 0.01}):  # off; a budget smaller than one history
        _, cold, _ = talk(**kw)
        assert cold["routing"]["timings"]["cached_tokens"] == 0 and "kv_restored_tokens" not in cold["routing"][
            "settings"]
        assert cold["choices"][0]["text"] == ref["choices"][0]["text"]


def test_a_routed_conversation_returns_to_its_saved_mixture(tiny):
    """A conversation interrupted by a request under another mixture: its next turn, routed within `keep` of the
    mixture it had, takes that mixture back with its K/V ("returned"), exact under it."""
    from logo_edge.engine import RouteConfig

    files = [tiny / "gguf" / f"{n}.gguf" for n in ("qv_r8", "all7_r4", "rs_r16", "qkd_r2", "pattern_r8")]
    turn1 = [{"role": "user", "content": "tell me about rivers and markets and the proof of energy " * 3}]
    with Engine(tiny / "tiny-f32.gguf", files, n_ctx=512, kv_type="f32", routing=RouteConfig(keep=1.0)) as eng:
        a = eng.create_chat_completion(turn1, max_tokens=6)
        eng.create_chat_completion([{"role": "user", "content": "hello"}], adapters={"pattern_r8": 1.0}, max_tokens=3)
        msgs = turn1 + [{"role": "assistant", "content": a["choices"][0]["message"]["content"]},
                        {"role": "user", "content": "and more"}]
        back = eng.create_chat_completion(msgs, max_tokens=6)
    rec1, rec2 = a["routing"], back["routing"]
    assert rec2["settings"]["mixture"] == "returned", rec2["settings"]
    assert rec2["timings"]["cached_tokens"] >= rec1["timings"]["prompt_tokens"]
    w1 = {x["name"]: x["weight"] for x in rec1["adapters"] if x["rank"]}
    assert {x["name"]: x["weight"] for x in rec2["adapters"] if x["rank"]} == w1
    with Engine(tiny / "tiny-f32.gguf", files, n_ctx=512, kv_type="f32") as fresh:
        ref = fresh.create_chat_completion(msgs, max_tokens=6, adapters=w1)
    assert back["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]


def test_a_record_says_returned_only_when_saved_kv_came_back(tiny):
    """A probe-cache request sets a mixture keeping its cache (no swap): the K/V saved under that mixture stay
    saved, and a later exact turn must not claim to have "returned" to the mixture already set (nothing restored)."""
    from logo_edge.engine import RouteConfig

    files = [tiny / "gguf" / f"{n}.gguf" for n in ("qv_r8", "all7_r4", "rs_r16", "qkd_r2", "pattern_r8")]
    turn1 = [{"role": "user", "content": "tell me about rivers and markets and the proof of energy " * 3}]
    with Engine(tiny / "tiny-f32.gguf", files, n_ctx=512, kv_type="f32", routing=RouteConfig(keep=1.0)) as eng:
        a = eng.create_chat_completion(turn1, max_tokens=6)
        eng.create_chat_completion([{"role": "user", "content": "hello"}], adapters={"pattern_r8": 1.0}, max_tokens=3)
        eng.create_chat_completion(turn1, max_tokens=3, prefill="probe-cache")
        msgs = turn1 + [{"role": "assistant", "content": a["choices"][0]["message"]["content"]},
                        {"role": "user", "content": "and more"}]
        b = eng.create_chat_completion(msgs, max_tokens=6)
    s = b["routing"]["settings"]
    if s["mixture"] == "returned":
        assert s.get("kv_restored_tokens"), s  # a return brings saved K/V back
    w = {x["name"]: x["weight"] for x in b["routing"]["adapters"] if x["rank"]}
    with Engine(tiny / "tiny-f32.gguf", files, n_ctx=512, kv_type="f32") as fresh:
        ref = fresh.create_chat_completion(msgs, max_tokens=6, adapters=w)
    assert b["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]


def test_probe_leaves_the_generation_cache_alone(tiny_engine):
    eng = tiny_engine
    out1 = eng.create_completion("Probe isolation", adapters="base", max_tokens=6)
    eng.route("a completely different prompt that is probed")
    out2 = eng.create_completion("Probe isolation", adapters="base", max_tokens=6)
    assert out2["routing"]["timings"]["cached_tokens"] > 0
    assert out1["choices"][0]["text"] == out2["choices"][0]["text"]


def test_fusion_equals_the_averaged_adapter(tiny, tmp_path, pairs):
    write_lora(tmp_path / "p1.gguf", "llama", 16, pairs)
    write_lora(tmp_path / "p2.gguf", "llama", 16, {k: (a * 0.5, b * 3.0) for k, (a, b) in pairs.items()})
    w1, w2 = 0.25, 0.75
    avg = {k: (w1 * a + w2 * a * 0.5, w1 * b + w2 * b * 3.0) for k, (a, b) in pairs.items()}
    write_lora(tmp_path / "avg.gguf", "llama", 16, avg)
    kw = dict(max_tokens=12)
    with Engine(tiny / "tiny-f32.gguf", [tmp_path / f for f in ("p1.gguf", "p2.gguf", "avg.gguf")],
                n_ctx=128, kv_type="f32", flash_attn=False) as eng:
        fused = eng.create_completion("Fusion test", adapters={"p1": w1, "p2": w2}, merge="fusion", **kw)
        ref = eng.create_completion("Fusion test", adapters={"avg": 1.0}, **kw)
        mixed = eng.create_completion("Fusion test", adapters={"p1": w1, "p2": w2}, **kw)
        assert fused["choices"][0]["text"] == ref["choices"][0]["text"]
        assert mixed["choices"][0]["text"] != ref["choices"][0]["text"]  # mixture != parameter averaging
        eng.pool.add(tiny / "gguf" / "all7_r4.gguf")
        with pytest.raises(AdapterError, match="fusion needs the same modules"):
            eng.create_completion("x", adapters={"p1": 0.5, "all7_r4": 0.5}, merge="fusion", max_tokens=2)
        assert eng.create_completion("x", adapters={"p1": 1.0}, max_tokens=2)["usage"]["completion_tokens"]


def test_unprobeable_adapter_reported_at_load_and_usable_by_name(tiny, tiny_engine):
    assert set(tiny_engine.pool.unprobeable) == {"od_only"}
    rec = tiny_engine.route("any prompt", k=10)
    m = next(a for a in rec.adapters if a.name == "od_only")
    assert m.signal is None and m.weight == 0 and "attn_q or attn_k or attn_v or ffn_gate or ffn_up" in m.note
    assert "attn_output, ffn_down" in m.note
    out = tiny_engine.create_completion("any prompt", adapters=["od_only"], max_tokens=3)
    assert out["routing"]["mode"] == "manual"
    # without a query LoRA, v_only is scored over its v (the same input), mlp_only over its gate and up (the FFN's
    # input, read in the same probe pass): ranked like the others, and the record says so
    v = next(a for a in rec.adapters if a.name == "v_only")
    assert v.signal > 0 and v.rank is not None and v.note == "scored over attn_v"
    m = next(a for a in rec.adapters if a.name == "mlp_only")
    assert m.signal > 0 and m.rank is not None and m.note == "scored over ffn_gate, ffn_up"
    assert rec.settings["probe_modules"] == "input"


def test_paper_probe_routes_only_adapters_with_the_target(tiny):
    """probe_modules="target": the paper's probe, exactly; an adapter without the query projection is not routed
    (and the index built for the default is not reused for it)."""
    from logo_edge.engine import Engine

    with pytest.warns(UserWarning, match="v_only") as caught:
        eng = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=128, probe_modules="target")
    with eng:
        assert set(eng.pool.unprobeable) == {"v_only", "mlp_only", "od_only"}
        assert "no LoRA on blk.3.attn_q.weight" in eng.pool.unprobeable["v_only"]
        rec = eng.route("any prompt", k=10)
        assert rec.settings["probe_modules"] == "target"
        assert {a.name for a in rec.adapters if a.signal is None} == {"v_only", "mlp_only", "od_only"}
        assert eng.pool.probe_reads == "attn_q"  # the paper's probe reads the query's input alone
    assert {n for n in ("mlp_only", "od_only") if any(n in str(w.message) for w in caught)} == {"mlp_only", "od_only"}
    with pytest.raises(AdapterError, match="probe_modules"):
        Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=128, probe_modules="every")


def test_base_mode_and_empty_pool(tiny):
    with Engine(tiny / "tiny-f32.gguf", n_ctx=128) as eng:
        with pytest.raises(RoutingError, match="pool is empty"):
            eng.route("hi")
        out = eng.create_completion("hi", adapters="base", max_tokens=3)
        assert out["routing"]["mode"] == "base"


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_probe_window_must_be_a_positive_integer(tiny, bad):
    with pytest.raises(AdapterError, match=f"probe_blocks must be an integer >= 1, got {bad!r}"):
        Engine(tiny / "tiny-f32.gguf", n_ctx=128, probe_blocks=bad)


def test_probe_window_is_clipped_at_block_0_and_ends_at_the_target(tiny):
    with Engine(tiny / "tiny-f32.gguf", n_ctx=128, target_block=1, probe_blocks=8) as eng:
        assert eng.pool.blocks == [0, 1]
        h = eng.probe(eng.tokenize("hello there"))
        assert h.shape == (2, eng.model.n_embd)


def test_names_in_a_directory_are_file_names_and_alone_from_metadata(tiny, tmp_path):
    shutil.copy(tiny / "gguf" / "qv_r8.gguf", tmp_path / "renamed-file.gguf")
    with Engine(tiny / "tiny-f32.gguf", tmp_path, n_ctx=128) as eng:
        assert eng.pool.names == ["renamed-file"]  # in a pool directory the file name is the name (`pool rename`)
    with Engine(tiny / "tiny-f32.gguf", tmp_path / "renamed-file.gguf", n_ctx=128) as eng:
        assert eng.pool.names == ["qv_r8"]  # a file given alone: its general.name


def test_packed_adapters_count_in_the_budget(tiny):
    """Packed mixtures are adapters llama.cpp holds too: the budget counts them (their f32 size), evicting older
    ones and the pool's own before going over; what is set in the context stays, and a packed adapter set when
    a new one was built is freed once the context moves on; answers do not change."""
    mixes = [{"qv_r8": 0.5, "all7_r4": 0.5}, {"rs_r16": 0.3, "qkd_r2": 0.7}, {"qv_r8": 0.2, "rs_r16": 0.8},
             {"all7_r4": 0.6, "qkd_r2": 0.4}, {"qv_r8": 0.5, "all7_r4": 0.5}]
    with pytest.warns(UserWarning, match="od_only"):
        ref = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=256, kv_type="f32", flash_attn=False)
    try:
        want = [ref.create_completion("Budget check", adapters=mix, max_tokens=6, merge="packed") for mix in mixes]
        largest = max(ref._merged_bytes.values())
    finally:
        ref.close()
    with pytest.warns(UserWarning, match="od_only"):  # room for two packed adapters, not three
        eng = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=256, kv_type="f32", flash_attn=False,
                     max_loaded_mb=2.25 * largest / 2**20)
    try:
        for mix, w in zip(mixes, want):
            got = eng.create_completion("Budget check", adapters=mix, max_tokens=6, merge="packed")
            assert got["choices"][0]["text"] == w["choices"][0]["text"]
            held = eng.pool.extra_bytes
            assert held == sum(eng._merged_bytes.values()) > 0 and len(eng._merged) == len(eng._merged_bytes)
            # within the budget: the pool's own adapters were freed first, then the oldest packed ones
            assert eng.pool.loaded_bytes <= eng.pool.max_loaded_bytes
        assert len(eng._merged) == 2  # older packed adapters were freed for the budget (8 fit without it)
    finally:
        eng.close()


@pytest.mark.parametrize("types", [("f16", "f16"), ("f16", "f32")])
def test_packed_file_holds_the_stacked_a_and_the_scaled_b_exactly(tiny, tmp_path, types):
    """The packed adapter as written (the scratch GGUF llama.cpp loads): A stacked in f16 where every source file
    holds A in f16 (else f32), B as w_i c_i B_i in f32, the rank padded with zeros; every value equals numpy's
    stacking of the files' own values."""
    from gguf import GGMLQuantizationType, GGUFReader

    from logo_edge.engine import PACK_RANK_MULTIPLE, _pack
    from logo_edge.gguf_files import BaseInfo, read_lora, tensor_array, write_lora

    base = BaseInfo.read(tiny / "tiny-f32.gguf")
    files = []
    for name, t in zip(("qv_r8", "rs_r16"), types):
        src = read_lora(tiny / "gguf" / f"{name}.gguf", base)
        files.append(write_lora(tmp_path / f"{name}-{t}.gguf", base.arch, src.alpha or 0.0, src.pairs, t))
    loras = [read_lora(f, base) for f in files]
    weights = [0.7, 0.3]
    _, pairs = _pack(loras, weights)
    out = write_lora(tmp_path / "packed.gguf", base.arch, 0.0, pairs, "exact", durable=False)
    got = {t.name: t for t in GGUFReader(out).tensors}
    kinds = {id(lo): t for lo, t in zip(loras, types)}
    for m in sorted({m for lo in loras for m in lo.pairs}):
        have = [(lo, w) for lo, w in zip(loras, weights) if m in lo.pairs]
        a = np.concatenate([lo.pairs[m][0] for lo, _ in have])
        b = np.concatenate([np.float32(w * lo.scale(m)) * lo.pairs[m][1] for lo, w in have], axis=1)
        pad = -len(a) % PACK_RANK_MULTIPLE
        ta, tb = got[m + ".lora_a"], got[m + ".lora_b"]
        # f16 where every source file holds A in f16, else wherever every value happens to be an f16 value
        f16 = all(kinds[id(lo)] == "f16" for lo, _ in have) or np.array_equal(a.astype(np.float16), a)
        want = GGMLQuantizationType.F16 if f16 else GGMLQuantizationType.F32
        assert GGMLQuantizationType(int(ta.tensor_type)) == want, m
        assert GGMLQuantizationType(int(tb.tensor_type)) == GGMLQuantizationType.F32, m
        np.testing.assert_array_equal(tensor_array(ta), np.pad(a, ((0, pad), (0, 0))))
        np.testing.assert_array_equal(tensor_array(tb), np.pad(b, ((0, 0), (0, pad))))


def test_auto_merge_packs_small_mixtures_with_the_mixtures_answers(tiny, monkeypatch):
    """merge="auto" (the default) applies two or more adapters packed while they are small (PACK_MAX_BYTES),
    otherwise as a mixture; one adapter is set as it is. The answers are the mixture's either way; a changed
    adapter file is read again for the next packed mixture."""
    import logo_edge.engine as engine_mod

    files = [tiny / "gguf" / f"{n}.gguf" for n in ("qv_r8", "all7_r4", "rs_r16")]
    mix = {"qv_r8": 0.6, "all7_r4": 0.3, "rs_r16": 0.1}
    with Engine(tiny / "tiny-f32.gguf", files, n_ctx=256, kv_type="f32", flash_attn=False) as eng:
        assert eng.routing.merge == "auto"
        auto = eng.create_completion("Auto merge check", adapters=mix, max_tokens=8)
        assert auto["routing"]["settings"]["merge_applied"] == "packed"
        plain = eng.create_completion("Auto merge check", adapters=mix, max_tokens=8, merge="mixture")
        assert plain["routing"]["settings"]["merge_applied"] == "mixture"
        assert auto["choices"][0]["text"] == plain["choices"][0]["text"]
        one = eng.create_completion("Auto merge check", adapters={"rs_r16": 1.0}, max_tokens=2)
        assert one["routing"]["settings"]["merge_applied"] == "mixture"
        monkeypatch.setattr(engine_mod, "PACK_MAX_BYTES", sum(eng.pool.adapters[i].nbytes for i in range(3)) - 1)
        big = eng.create_completion("Auto merge check", adapters=mix, max_tokens=8)
        assert big["routing"]["settings"]["merge_applied"] == "mixture"
        assert big["choices"][0]["text"] == plain["choices"][0]["text"]
        assert len(eng._lora_files) == 3  # read once for packing, kept while unchanged
        path = eng.pool.adapters[0].path
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
        eng._merged_handle([0, 1], [0.5, 0.5], "packed")
        assert sorted(k[2] - st.st_mtime_ns for k in eng._lora_files if k[0] == str(path)) == [0, 1000]


def test_loaded_adapters_stay_within_the_budget_and_never_under_the_context(tiny):
    """The per-adapter path (merge="mixture"): the pool's LRU never frees what the context holds."""
    from logo_edge.engine import RouteConfig

    sizes = {p.stem: p.stat().st_size for p in (tiny / "gguf").glob("*.gguf")}
    budget_mb = 1.5 * max(sizes.values()) / 2**20  # room for about one adapter
    with pytest.warns(UserWarning, match="od_only"):
        eng = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=256, kv_type="f32", flash_attn=False,
                     max_loaded_mb=budget_mb, routing=RouteConfig(merge="mixture"))
    with pytest.warns(UserWarning, match="od_only"):
        ref = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=256, kv_type="f32", flash_attn=False)
    try:
        for mix in ({"qv_r8": 1.0}, {"all7_r4": 0.5, "rs_r16": 0.5}, {"qkd_r2": 1.0}, {"qv_r8": 0.3, "qkd_r2": 0.7}):
            got = eng.create_completion("Budget check", adapters=mix, max_tokens=8)["choices"][0]["text"]
            want = ref.create_completion("Budget check", adapters=mix, max_tokens=8)["choices"][0]["text"]
            assert got == want
            loaded = {eng.pool.adapters[i].name for i in eng.pool._loaded}
            assert set(mix) <= loaded  # the adapters set in the context stay loaded, even over budget
            assert eng.pool.loaded_bytes <= max(eng.pool.max_loaded_bytes, sum(sizes[n] for n in mix))
        assert eng.pool.adapters[eng.pool.index("all7_r4")].handle is None  # evicted once unused
    finally:
        eng.close()
        ref.close()


def test_route_command_shows_raw_and_calibrated_signals_and_the_window(tiny, capsys):
    from logo_edge.cli import main

    with pytest.warns(UserWarning, match="od_only"):
        assert main(["route", "Tell me a story", "--raw", "--model", str(tiny / "tiny-f32.gguf"),
                     "--adapters", str(tiny / "gguf"), "--n-ctx", "128", "--probe-blocks", "2"]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0].split()
    assert head[:4] == ["adapter", "raw", "signal", "zscore"]
    assert "norm signal of attn_q (normed input) over blocks 2-3" in out
    assert "od_only" in out and "no LoRA at block 3 on attn_q or attn_k or attn_v or ffn_gate or ffn_up" in out
    assert "scored over attn_v" in out


def test_interleaved_streams_are_refused_not_mixed(tiny_engine):
    """Two streams on one engine share its context: the second is refused while the first is unfinished."""
    from logo_edge.errors import EngineBusyError

    msgs = [{"role": "user", "content": "tell me more"}]
    alone = tiny_engine.create_chat_completion(msgs, max_tokens=6)["choices"][0]["message"]["content"]
    first = tiny_engine.create_chat_completion(msgs, max_tokens=6, stream=True)
    second = tiny_engine.create_chat_completion(msgs, max_tokens=6, stream=True, adapters="base")
    head = next(first)
    with pytest.raises(EngineBusyError, match="already generating"):
        next(second)
    with pytest.raises(EngineBusyError, match="while this Engine is generating"):
        tiny_engine.remove_adapter("qv_r8")
    rest = "".join(c["choices"][0]["delta"].get("content", "") for c in first)
    assert head["choices"][0]["delta"]["content"] + rest == alone  # the first stream was not disturbed
    first2 = tiny_engine.create_chat_completion(msgs, max_tokens=6, stream=True)
    next(first2)
    first2.close()  # closing a stream frees the engine at once
    assert tiny_engine.create_chat_completion(msgs, max_tokens=6)["choices"][0]["message"]["content"] == alone


def test_removing_an_adapter_equals_a_pool_built_without_it(tiny):
    names = ["qv_r8", "all7_r4", "rs_r16", "qkd_r2", "pattern_r8"]
    files = [tiny / "gguf" / f"{n}.gguf" for n in names]
    prompt = [{"role": "user", "content": "which one fits"}]
    with Engine(tiny / "tiny-f32.gguf", files, n_ctx=256) as eng, \
            Engine(tiny / "tiny-f32.gguf", [f for f in files if "rs_r16" not in f.name], n_ctx=256) as ref:
        eng.create_chat_completion(prompt, max_tokens=3, adapters={"rs_r16": 0.5, "pattern_r8": 0.5})  # loaded, set
        removed = eng.remove_adapter("rs_r16")
        assert removed.name == "rs_r16" and eng.pool.names == ref.pool.names
        for k in (1, 4):
            got, want = eng.route(prompt, k=k), ref.route(prompt, k=k)
            assert [a.name for a in got.adapters] == [a.name for a in want.adapters]
            np.testing.assert_allclose([a.signal for a in got.adapters], [a.signal for a in want.adapters], rtol=1e-6)
            np.testing.assert_allclose([a.weight for a in got.adapters], [a.weight for a in want.adapters], rtol=1e-6)
        out = eng.create_chat_completion(prompt, max_tokens=6)["choices"][0]["message"]["content"]
        assert out == ref.create_chat_completion(prompt, max_tokens=6)["choices"][0]["message"]["content"]
        eng.add_adapter(files[2])  # and back: routable again, last in the pool
        assert eng.pool.names[-1] == "rs_r16" and eng.route(prompt, k=5).adapters[-1].rank is not None
        with pytest.raises(AdapterError, match="no adapter named 'nope'"):
            eng.remove_adapter("nope")


def test_a_conversation_keeps_its_mixture_while_routing_agrees(tiny):
    from logo_edge.engine import RouteConfig

    files = [tiny / "gguf" / f"{n}.gguf" for n in ("qv_r8", "all7_r4", "rs_r16", "qkd_r2", "pattern_r8")]
    turn1 = [{"role": "user", "content": "tell me about rivers and markets and the proof of energy " * 3}]

    def chat(keep):
        with Engine(tiny / "tiny-f32.gguf", files, n_ctx=512, kv_type="f32", routing=RouteConfig(keep=keep)) as eng:
            a = eng.create_chat_completion(turn1, max_tokens=6)
            msgs = turn1 + [{"role": "assistant", "content": a["choices"][0]["message"]["content"]},
                            {"role": "user", "content": "and more"}]
            return a, msgs, eng.create_chat_completion(msgs, max_tokens=6)

    a, msgs, kept = chat(1.0)  # any agreement is enough: the second turn keeps the first's mixture
    rec1, rec2 = a["routing"], kept["routing"]
    assert rec1["settings"]["mixture"] == "new" and rec2["settings"]["mixture"] == "kept"
    assert rec2["timings"]["cached_tokens"] >= rec1["timings"]["prompt_tokens"]  # the history is reused
    w1 = {x["name"]: x["weight"] for x in rec1["adapters"] if x["rank"]}
    assert {x["name"]: x["weight"] for x in rec2["adapters"] if x["rank"]} == w1  # the record says what answered
    with Engine(tiny / "tiny-f32.gguf", files, n_ctx=512, kv_type="f32") as fresh:  # exact under that mixture
        ref = fresh.create_chat_completion(msgs, max_tokens=6, adapters=w1)
    assert kept["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]

    _, _, rerouted = chat(0.0)  # keep=0: every turn routed afresh
    assert rerouted["routing"]["settings"]["mixture"] == "new"
    with pytest.raises(RoutingError, match="keep"):
        RouteConfig(keep=2)


def test_keep_decided_on_the_mixture_states_is_one_pass_and_exact(tiny):
    """keep_probe="mixture": a continuing turn is prefilled once, under the kept mixture, and routed on the states
    it reaches there; kept, the answer equals a fresh engine with that mixture set by hand. When those states
    route away (keep tiny), the turn falls back to the base probe."""
    from logo_edge.engine import RouteConfig

    files = [tiny / "gguf" / f"{n}.gguf" for n in ("qv_r8", "all7_r4", "rs_r16", "qkd_r2", "pattern_r8")]
    turn1 = [{"role": "user", "content": "tell me about rivers and markets and the proof of energy " * 3}]

    def chat(keep):
        with Engine(tiny / "tiny-f32.gguf", files, n_ctx=512, kv_type="f32",
                    routing=RouteConfig(keep=keep, keep_probe="mixture", keep_score=None, keep_drop=None)) as eng:
            a = eng.create_chat_completion(turn1, max_tokens=6)
            msgs = turn1 + [{"role": "assistant", "content": a["choices"][0]["message"]["content"]},
                            {"role": "user", "content": "and more"}]
            return a["routing"], msgs, eng.create_chat_completion(msgs, max_tokens=6)

    rec1, msgs, kept = chat(1.0)
    rec2 = kept["routing"]
    assert rec1["settings"]["keep_rule"] == "base probe" and rec1["settings"]["mixture"] == "new"
    assert rec2["settings"]["keep_rule"] == "mixture states" and rec2["settings"]["mixture"] == "kept"
    assert rec2["timings"]["probe_s"] == 0  # no base-model pass on a kept turn
    assert rec2["timings"]["cached_tokens"] >= rec1["timings"]["prompt_tokens"]
    w1 = {x["name"]: x["weight"] for x in rec1["adapters"] if x["rank"]}
    assert {x["name"]: x["weight"] for x in rec2["adapters"] if x["rank"]} == w1
    with Engine(tiny / "tiny-f32.gguf", files, n_ctx=512, kv_type="f32") as fresh:
        ref = fresh.create_chat_completion(msgs, max_tokens=6, adapters=w1)
    assert kept["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]

    _, _, fell_back = chat(1e-9)  # the mixture's states never route within 1e-9 of it: the base probe decides
    assert fell_back["routing"]["settings"]["keep_rule"] == "base probe"
    assert fell_back["routing"]["timings"]["probe_s"] > 0
    with pytest.raises(RoutingError, match="keep_probe"):
        RouteConfig(keep_probe="nope")


def test_keep_score_rule_compares_the_turn_with_the_one_that_chose_the_mixture(tiny):
    """keep_probe="mixture" with keep_score/keep_drop: the turn that routes a new mixture reads its own states under
    that mixture while it is prefilled (the reference: equal to probing a fresh engine with the mixture set by
    hand); a later turn keeps the mixture when its leader is still first, scores >= keep_score and at most keep_drop
    below the reference; its answer starts from the logits of that one pass and equals a fresh engine's."""
    from logo_edge.engine import RouteConfig
    from logo_edge.llm import ProbeCapture

    files = [tiny / "gguf" / f"{n}.gguf" for n in ("qv_r8", "all7_r4", "rs_r16", "qkd_r2", "pattern_r8")]
    turn1 = [{"role": "user", "content": "tell me about rivers and markets and the proof of energy " * 3}]

    def chat(**rule):
        with Engine(tiny / "tiny-f32.gguf", files, n_ctx=512, kv_type="f32",
                    routing=RouteConfig(keep=1.0, keep_probe="mixture", **rule)) as eng:
            a = eng.create_chat_completion(turn1, max_tokens=6)
            ref = eng._keep_ref
            msgs = turn1 + [{"role": "assistant", "content": a["choices"][0]["message"]["content"]},
                            {"role": "user", "content": "and more"}]
            return a["routing"], ref, msgs, eng.create_chat_completion(msgs, max_tokens=6)

    rec1, ref, msgs, kept = chat(keep_score=-1e9, keep_drop=1e9)
    w1 = {x["name"]: x["weight"] for x in rec1["adapters"] if x["rank"]}
    assert kept["routing"]["settings"]["mixture"] == "kept" and kept["routing"]["timings"]["probe_s"] == 0
    with Engine(tiny / "tiny-f32.gguf", files, n_ctx=512, kv_type="f32") as fresh:
        answer = fresh.create_chat_completion(msgs, max_tokens=6, adapters=w1)
        assert kept["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]
        fresh.forget_prompts()
        fresh._apply([fresh.pool.index(n) for n in w1], list(w1.values()), "mixture")
        cap = ProbeCapture(fresh.ctx, fresh.pool.blocks, fresh.pool.probe_reads, fresh.routing.probe_input,
                           stop_early=False)
        h = cap.run(fresh.tokenize(fresh.format_chat(turn1)))
        lead = fresh.pool.index(max(w1, key=w1.get))
        direct = fresh.route_state(h, fresh.routing)[0].scores[lead]
    assert ref is not None and ref[0] == {fresh.pool.index(n): w for n, w in w1.items()}
    assert ref[1] == pytest.approx(float(direct), rel=1e-4, abs=1e-4)

    for rule in (dict(keep_score=1e9, keep_drop=1e9), dict(keep_score=-1e9, keep_drop=-1e9)):
        _, _, _, rerouted = chat(**rule)  # too strict: the base probe decides
        assert rerouted["routing"]["settings"]["keep_rule"] == "base probe", rule
    with pytest.raises(RoutingError, match="keep_drop"):
        RouteConfig(keep_drop=float("nan"))


def test_min_score_answers_with_the_base_model_when_no_adapter_fits(tiny):
    """min_score: a request whose best calibrated score is below it is answered by the base model (the record says
    why, and shows no adapter); above it, routed as without the rule."""
    from logo_edge.engine import RouteConfig

    files = [tiny / "gguf" / f"{n}.gguf" for n in ("qv_r8", "all7_r4", "rs_r16")]
    prompt = "A question no adapter was trained for"
    with Engine(tiny / "tiny-f32.gguf", files, n_ctx=256, kv_type="f32") as eng:
        routed = eng.create_completion(prompt, max_tokens=6)
        best = max(a["score"] for a in routed["routing"]["adapters"] if a["rank"])
        base = eng.create_completion(prompt, max_tokens=6, adapters="base")
        low = eng.create_completion(prompt, max_tokens=6, min_score=best - 1e-3)
        high = eng.create_completion(prompt, max_tokens=6, min_score=best + 1e-3)
    assert "fallback" not in low["routing"]["settings"]
    assert low["choices"][0]["text"] == routed["choices"][0]["text"]
    assert high["routing"]["settings"]["fallback"].startswith("base model: best calibrated score")
    assert not [a for a in high["routing"]["adapters"] if a["rank"]]
    assert high["choices"][0]["text"] == base["choices"][0]["text"]
    with pytest.raises(RoutingError, match="min_score"):
        RouteConfig(min_score=float("inf"))


def test_the_uniform_fallback_mixes_every_ranked_adapter_equally(tiny):
    """fallback="uniform": a request below min_score is answered by every ranked adapter with equal weights, the
    same answer as that mixture set by hand; the record names them, best-ranked first."""
    from logo_edge.engine import RouteConfig

    files = [tiny / "gguf" / f"{n}.gguf" for n in ("qv_r8", "all7_r4", "rs_r16")]
    prompt = "A question no adapter was trained for"
    with Engine(tiny / "tiny-f32.gguf", files, n_ctx=256, kv_type="f32") as eng:
        routed = eng.create_completion(prompt, max_tokens=6, k=1)
        order = sorted((a for a in routed["routing"]["adapters"]), key=lambda a: -a["score"])
        out = eng.create_completion(prompt, max_tokens=6, k=1, min_score=1e9, fallback="uniform")
        by_hand = eng.create_completion(prompt, max_tokens=6, adapters={a["name"]: 1 / 3 for a in order})
    assert out["routing"]["settings"]["fallback"].startswith("uniform over 3 adapters: best calibrated score")
    got = sorted((a for a in out["routing"]["adapters"] if a["rank"]), key=lambda a: a["rank"])
    assert [a["name"] for a in got] == [a["name"] for a in order]
    assert all(a["weight"] == pytest.approx(1 / 3) for a in got)
    assert out["choices"][0]["text"] == by_hand["choices"][0]["text"]
    with pytest.raises(RoutingError, match="fallback"):
        RouteConfig(fallback="broad")


def test_probe_cache_mode_reuses_the_previous_turn(tiny):
    """probe-cache: a continuing turn probes (and prefills) only its new tokens; the record says how many
    the probe reused. Exact probing always reuses its own base-model prefix too."""
    files = [tiny / "gguf" / f"{n}.gguf" for n in ("qv_r8", "all7_r4", "rs_r16")]
    turn1 = [{"role": "user", "content": "tell me about rivers and markets and the proof of energy " * 3}]
    with Engine(tiny / "tiny-f32.gguf", files, n_ctx=512, kv_type="f32") as eng:
        for prefill in ("probe-cache", "exact"):
            eng.forget_prompts()
            a = eng.create_chat_completion(turn1, max_tokens=6, prefill=prefill, keep=0)
            msgs = turn1 + [{"role": "assistant", "content": a["choices"][0]["message"]["content"]},
                            {"role": "user", "content": "and more"}]
            b = eng.create_chat_completion(msgs, max_tokens=6, prefill=prefill, keep=0)["routing"]["timings"]
            first = a["routing"]["timings"]["prompt_tokens"]
            assert b["probe_cached_tokens"] >= first - 1, prefill  # the first turn's prompt was not probed again
            if prefill == "probe-cache":  # and not prefilled again (exact re-prefills under a new mixture)
                assert b["cached_tokens"] == b["prompt_tokens"] - 1


def test_ignore_eos_generates_exactly_max_tokens():
    """ignore_eos masks end-of-generation: exactly max_tokens, the same text up to where the default stopped."""
    from logo_edge.defaults import default_model_path

    try:
        model = default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))
    from logo_edge.engine import RouteConfig

    msgs = [{"role": "user", "content": "Reply with one word: yes or no. Is the sky blue?"}]  # SmolLM2 says "No"
    with Engine(model, n_ctx=256, routing=RouteConfig(calibration="raw")) as eng:  # no pool: nothing to calibrate
        short = eng.create_chat_completion(msgs, adapters="base", max_tokens=12)
        assert short["choices"][0]["finish_reason"] == "stop" and short["usage"]["completion_tokens"] < 12
        eng.forget_prompts()
        full = eng.create_chat_completion(msgs, adapters="base", max_tokens=12, ignore_eos=True)
        assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 12
        text = short["choices"][0]["message"]["content"]
        assert text and full["choices"][0]["message"]["content"].startswith(text)
        chunks = list(eng.create_chat_completion(msgs, adapters="base", max_tokens=12, ignore_eos=True,
                                                 temperature=0.9, seed=1, stream=True))  # sampled, streamed
        assert chunks[-1]["usage"]["completion_tokens"] == 12
        assert not any(eng.model.token_text(t) in "".join(c["choices"][0]["delta"].get("content", "")
                                                          for c in chunks) for t in eng.model.eog_tokens)


def test_models_loaded_at_once_leave_the_process_output_where_it_was(tiny):
    """llama-cpp-python silences a model load by pointing fds 1 and 2 at /dev/null and back; two loads at once
    (engines started together, `serve --parallel`) must not leave the process writing to /dev/null."""
    import sys
    import threading

    from logo_edge.llm import Model

    before = (os.readlink("/proc/self/fd/1"), os.readlink("/proc/self/fd/2"), sys.stdout, sys.stderr)
    for _ in range(4):
        start, models = threading.Barrier(3), []

        def load():
            start.wait()
            models.append(Model(tiny / "tiny-f32.gguf", extra_bufts=False))

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(models) == 3 and all(m.buffers for m in models)  # each took its own load log
        models.clear()
        assert (os.readlink("/proc/self/fd/1"), os.readlink("/proc/self/fd/2"), sys.stdout, sys.stderr) == before


def test_a_chat_template_that_refuses_the_messages_is_a_request_error_naming_it(tiny):
    """Templates call raise_exception for roles they refuse (Mistral, Mixtral, Gemma: a system message):
    a RequestError (HTTP 400) with the template's words, not an unexpected ValueError (500)."""
    from llama_cpp.llama_chat_format import MIXTRAL_INSTRUCT_CHAT_TEMPLATE

    from logo_edge.errors import RequestError

    with Engine(tiny / "tiny-f32.gguf", n_ctx=256, kv_type="f32", flash_attn=False) as eng:
        object.__setattr__(eng.model.info, "chat_template", MIXTRAL_INSTRUCT_CHAT_TEMPLATE)
        with pytest.raises(RequestError, match="chat template refused these messages: .*alternate"):
            eng.create_chat_completion([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                       adapters="base", max_tokens=2)
        out = eng.create_chat_completion([{"role": "user", "content": "hi"}], adapters="base", max_tokens=2)
        assert out["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("index", [False, True])
def test_an_adapter_file_removed_or_rewritten_after_loading_is_a_409_naming_it(tiny, tmp_path, monkeypatch, index):
    """Handles and packed mixtures read an adapter's file again after the pool validated it: a file gone since
    (a pool rename, a delete) or rewritten (add --replace) is an AdapterFileChangedError naming the adapter and
    the file, not a bare FileNotFoundError (HTTP 500) nor an answer under weights other than those routed."""
    from logo_edge.errors import AdapterFileChangedError

    monkeypatch.setenv("LOGO_EDGE_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "pool"
    d.mkdir()
    for name in ("qv_r8", "all7_r4", "rs_r16"):
        shutil.copy(tiny / "gguf" / f"{name}.gguf", d / f"{name}.gguf")
    msg = [{"role": "user", "content": "hello"}]
    with Engine(tiny / "tiny-f32.gguf", d, n_ctx=256, kv_type="f32", flash_attn=False, pool_index=index) as eng:
        (d / "qv_r8.gguf").rename(d / "moved.gguf")
        for adapters, merge in (({"qv_r8": 0.5, "all7_r4": 0.5}, "packed"), ({"qv_r8": 1.0}, "mixture")):
            with pytest.raises(AdapterFileChangedError, match=r"'qv_r8': its file .*qv_r8.gguf is gone"):
                eng.create_chat_completion(msg, adapters=adapters, merge=merge, max_tokens=2)
        (d / "moved.gguf").rename(d / "qv_r8.gguf")
        st = (d / "qv_r8.gguf").stat()  # touched, the same content: the same adapter
        os.utime(d / "qv_r8.gguf", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
        eng.create_chat_completion(msg, adapters={"qv_r8": 0.5, "all7_r4": 0.5}, merge="packed", max_tokens=2)
        shutil.copy(tiny / "gguf" / "all7_r4.gguf", d / "qv_r8.gguf")  # another adapter's weights, same name
        with pytest.raises(AdapterFileChangedError, match=r"'qv_r8': its file .*qv_r8.gguf changed"):
            eng.create_chat_completion(msg, adapters={"qv_r8": 1.0}, max_tokens=2)
        out = eng.create_chat_completion(msg, adapters={"rs_r16": 1.0}, max_tokens=2)  # the others still serve
        assert out["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("block_count", [0, 513])
def test_a_model_llama_cpp_would_abort_on_is_a_load_error_naming_the_key(tiny, tmp_path, block_count):
    """llama.cpp GGML_ASSERTs on some hyperparameters (block_count 0 or over 512, experts over its limit): an
    abort of the whole process. They are checked first; the load runs in a child so a regression aborts it alone."""
    import struct
    import subprocess
    import sys

    from gguf import GGUFReader

    src = tiny / "tiny-f32.gguf"
    field = GGUFReader(src).fields["llama.block_count"]
    bad = tmp_path / "bad.gguf"
    shutil.copy(src, bad)
    with open(bad, "r+b") as f:
        f.seek(int(field.offset) + 8 + len("llama.block_count") + 4)
        f.write(struct.pack("<I", block_count))
    child = ("import sys\nfrom logo_edge.errors import ModelLoadError\nfrom logo_edge.llm import Model\n"
             "try:\n    Model(sys.argv[1], extra_bufts=False)\nexcept ModelLoadError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", child, str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"llama.block_count is {block_count}, not 1 to 512" in out.stdout and str(bad) in out.stdout


@pytest.mark.parametrize("calibration", ["zscore", "raw"])
def test_a_pool_of_unprobeable_adapters_refuses_routing_naming_them(tiny, calibration):
    """Adapters on o/down only: routed requests get a RoutingError naming them (HTTP 400) under every
    calibration (calibrated routing raised an IndexError: a 500), and each still serves by name."""
    with pytest.warns(UserWarning, match="od_only"):
        eng = Engine(tiny / "tiny-f32.gguf", [tiny / "gguf" / "od_only.gguf"], n_ctx=256, kv_type="f32",
                     flash_attn=False)
    with eng:
        with pytest.raises(RoutingError, match="no adapter could be scored: od_only: no LoRA"):
            eng.create_completion("hello there", max_tokens=2, calibration=calibration)
        out = eng.create_completion("hello there", adapters=["od_only"], max_tokens=2)
        assert out["choices"][0]["text"] is not None


def test_text_held_back_for_a_stop_string_is_kept_when_the_model_ends(tiny_engine, monkeypatch):
    """The last characters may begin a stop string and are held back; if the model then ends (an end-of-generation
    token) they are the answer's, as llama-server and llama-cpp-python return them."""
    eng = tiny_engine
    full = eng.create_completion("Hello world", adapters="base", max_tokens=6)["choices"][0]["text"]
    calls, real = {"n": 0}, eng.model.is_eog

    def ends_after_six(tok):  # the 7th sampled token is an end-of-generation token
        calls["n"] += 1
        return calls["n"] == 7 or real(tok)

    monkeypatch.setattr(eng.model, "is_eog", ends_after_six)
    out = eng.create_completion("Hello world", adapters="base", max_tokens=7, stop=[full[-1] + "\u2603never"])
    assert out["choices"][0]["text"] == full and out["choices"][0]["finish_reason"] == "stop"
    calls["n"] = 0
    streamed = eng.create_completion("Hello world", adapters="base", max_tokens=7, stop=[full[-1] + "\u2603x"],
                                     stream=True)
    assert "".join(c["choices"][0]["text"] for c in streamed) == full


@pytest.mark.parametrize("kw, says", [
    (dict(stop=["x"] * 17), "at most 16 stop strings"),
    (dict(stop=["y" * 1001]), "of at most 1000 characters"),
])
def test_stop_strings_that_cost_per_token_are_refused(tiny_engine, kw, says):
    from logo_edge.errors import RequestError

    with pytest.raises(RequestError, match=says):
        tiny_engine.create_completion("Hello", adapters="base", max_tokens=2, **kw)


def test_seeds_top_k_and_empty_stops_are_read_as_llama_server_reads_them(tiny_engine):
    """A seed is taken modulo 2**32 (2**32 - 1 and -1: random), a top_k beyond 32 bits is clamped, an empty
    stop string is dropped: clients that work with llama-server get the same here."""
    def text(**kw):
        kw = {"adapters": "base", "max_tokens": 8, "temperature": 1.5, **kw}
        return tiny_engine.create_completion("Once upon a time", **kw)["choices"][0]["text"]

    assert text(seed=2**32 + 7) == text(seed=7) and text(seed=-2) == text(seed=2**32 - 2)
    assert text(seed=7, top_k=2**40) == text(seed=7, top_k=2**31 - 1)  # clamped (it wrapped to 1: greedy)
    assert text(seed=7, stop=["", "\u2603"]) == text(seed=7)
    assert len({text(seed=-1) for _ in range(4)}) > 1  # random
