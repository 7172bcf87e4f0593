"""logo-edge against an independent PyTorch/PEFT reference on the same tiny model and adapters."""

import json
import math

import numpy as np
import pytest
import torch

from peft_tools import peft_mixture
from tiny import ADAPTERS, N_LAYER

pytestmark = pytest.mark.slow

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "SELECT name FROM users WHERE age > 30;",
    # longer than the engine's n_batch (64): the probe spans several ubatches
    " ".join(f"word{i}" for i in range(60)) + " and finally the question?",
]


def peft_probe_mats(tiny, name, block, module="q_proj"):
    """(A, B, c) of the adapter's `module` (an attention or MLP projection) at `block`, straight from PEFT's
    files; None where it has none."""
    from safetensors.numpy import load_file

    cfg = json.loads((tiny / "peft" / name / "adapter_config.json").read_text())
    w = load_file(tiny / "peft" / name / "adapter_model.safetensors")
    part = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    key = f"base_model.model.model.layers.{block}.{part}.{module}.lora_{{}}.weight"
    if key.format("A") not in w:
        return None
    a, b = w[key.format("A")].astype(np.float64), w[key.format("B")].astype(np.float64)
    r = a.shape[0]
    alpha = cfg.get("alpha_pattern", {}).get(module, cfg["lora_alpha"])
    c = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return a, b, c


def reference_h(hf_tiny, tokens, block, probe_input):
    with torch.no_grad():
        out = hf_tiny(torch.tensor([tokens]), output_hidden_states=True)
        h = out.hidden_states[block][0, -1]  # residual entering `block`
        if probe_input == "normed":
            h = hf_tiny.model.layers[block].input_layernorm(h)
    return h.double().numpy()


def reference_ffn_h(hf_tiny, tokens, blocks, probe_input):
    """The MLP's input at each block for the last token: what enters the MLP's norm (residual) or leaves it
    (normed); the norm is post_attention_layernorm, or pre_feedforward_layernorm where there is one (gemma)."""
    got = {}

    def norm(layer):
        return getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm

    hooks = [norm(hf_tiny.model.layers[b]).register_forward_hook(
        lambda mod, inp, out, b=b: got.__setitem__(b, (inp[0][0, -1], out[0, -1]))) for b in blocks]
    try:
        with torch.no_grad():
            hf_tiny(torch.tensor([tokens]))
    finally:
        for h in hooks:
            h.remove()
    return {b: got[b][probe_input == "normed"].double().numpy() for b in blocks}


def reference_signal(o, signal):
    """SPEC §1 written as a plain loop over output entries."""
    if signal == "norm":
        return math.sqrt(sum(x * x for x in o))
    m = max(o)
    e = [math.exp(x - m) for x in o]
    z = sum(e)
    ent = -sum((v / z) * math.log(v / z + 1e-8) for v in e)
    return 1.0 / (ent + 1e-6)


CASES = [(b, s, "target-first", 1.0) for b in (N_LAYER - 1, 1, 0) for s in ("norm", "entropy")] + [
    (b, "norm", "input", p) for b in (N_LAYER - 1, 0) for p in (1.0, 0.25)] + [  # "input": what the norm reads
    (N_LAYER - 1, "norm", "target-first", 0.25), (1, "norm", "target-first", 0.0),  # sv_power: how it weighs
    (N_LAYER - 1, "entropy", "input", 0.25)]  # q stacked with k and v: its outputs still read alone


@pytest.mark.parametrize("probe_input", ["residual", "normed"])
@pytest.mark.parametrize(("block", "signal", "probe_modules", "sv_power"), CASES)
def test_signals_match_pytorch(tiny, hf_tiny, probe_input, signal, block, probe_modules, sv_power):
    """Each adapter's signal as PEFT's own A, B and scaling give it on transformers' hidden states: over its
    q_proj (the paper's probe), or, for an adapter without one, over the modules reading the same input (v_only),
    else over gate and up on the MLP's input (mlp_only); with probe_modules="input" over all of q, k and v.
    With sv_power p the norm is sqrt(sum over blocks of ||S^p V^T x||^2), U S V^T the SVD (torch's) of the
    block's dense updates c B A stacked; p = 1 is the norm of the outputs. od_only (o and down) is not probed."""
    import torch

    from logo_edge.engine import Engine

    with pytest.warns(UserWarning, match="od_only"):
        eng = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=256, n_batch=32, target_block=block,
                     kv_type="f32", flash_attn=False, probe_modules=probe_modules, sv_power=sv_power)
    try:
        for prompt in PROMPTS:
            tokens = eng.tokenize(prompt)
            rec = eng.route(tokens, signal=signal, k=3, probe_input=probe_input, calibration="raw")
            # the default window holds every block up to `block` here (the tiny model has 4): the norm signal
            # sums the q-update over all of them, entropy reads the target block; block 0 is the paper's probe
            assert eng.pool.blocks == list(range(block + 1))
            hs = {b: reference_h(hf_tiny, tokens, b, probe_input) for b in eng.pool.blocks}
            ffn = reference_ffn_h(hf_tiny, tokens, eng.pool.blocks, probe_input)
            ref = {}
            for name in [*ADAPTERS, "v_only", "mlp_only"]:
                has = {m for m in ("q_proj", "k_proj", "v_proj") if peft_probe_mats(tiny, name, block, m) is not None}
                modules = (["q_proj"] if "q_proj" in has and probe_modules == "target-first" else
                           ["q_proj", "k_proj", "v_proj"] if has else ["gate_proj", "up_proj"])
                if signal != "norm" and "q_proj" not in has:
                    continue  # only the norm reads an adapter without the target
                outs, weighed = {}, 0.0
                for blk in eng.pool.blocks:
                    dense = []
                    for m in modules:
                        if (abc := peft_probe_mats(tiny, name, blk, m)) is not None:
                            a, b, c = abc
                            x = ffn[blk] if m in ("gate_proj", "up_proj") else hs[blk]
                            outs[blk, m] = c * (b @ (a @ x))
                            dense.append(c * (torch.as_tensor(b, dtype=torch.float64)
                                              @ torch.as_tensor(a, dtype=torch.float64)))
                    if dense:  # the block's updates stacked (they read the same x), weighed by their spectrum
                        _, sv, vh = torch.linalg.svd(torch.cat(dense), full_matrices=False)
                        keep = sv > sv.max() * 1e-6
                        y = sv[keep] ** sv_power * (vh[keep] @ torch.as_tensor(x, dtype=torch.float64))
                        weighed += float(y @ y)
                ref[name] = (math.sqrt(weighed) if signal == "norm"
                             else reference_signal(list(outs[block, "q_proj"]), signal))
            got = {s.name: s.signal for s in rec.adapters}
            for name in ref:
                assert got[name] == pytest.approx(ref[name], rel=1e-4), (name, prompt)
            assert got["od_only"] is None and all(n in ref or got[n] is None for n in ("v_only", "mlp_only"))
            assert len(ref) == len(ADAPTERS) + 2 * (signal == "norm")
            ref_top = sorted(ref, key=lambda n: -ref[n])[:3]
            assert [s.name for s in rec.selected] == ref_top
            notes = {s.name: s.note for s in rec.adapters}
            assert "attn_v" in notes["v_only"] and "ffn_gate, ffn_up" in notes["mlp_only"]
            assert list(eng.pool.unprobeable) == ["od_only"]
    finally:
        eng.close()


def peft_mixture_model(tiny, weights: dict):
    """transformers + PEFT with every adapter of `weights` active and its scaling multiplied by w."""
    return peft_mixture(tiny / "hf", tiny / "peft", weights)


def greedy(model, tokens, n):
    ids = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(tokens):]


@pytest.mark.parametrize("signal", ["norm", "entropy"])
def test_routed_greedy_generation_matches_peft(tiny, tiny_engine, signal):
    prompt = "Once upon a time in a land far away"
    out = tiny_engine.create_completion(prompt, max_tokens=20, signal=signal, k=3)
    rec = out["routing"]
    weights = {a["name"]: a["weight"] for a in rec["adapters"] if a["rank"] is not None}
    assert len(weights) == 3 and sum(weights.values()) == pytest.approx(1.0)
    assert rec["timings"]["completion_tokens"] == 20
    ref = greedy(peft_mixture_model(tiny, weights), tiny_engine.tokenize(prompt), 20)
    assert _engine_tokens(tiny_engine, prompt, weights, 20) == ref
    # the routed call's own text is the same generation
    assert out["choices"][0]["text"] == tiny_engine.model.detokenize(ref)


def _engine_tokens(eng, prompt, weights, n, merge="mixture"):
    """Greedy token ids from the engine under a fixed mixture (ids, not text, to avoid re-tokenizing)."""
    from logo_edge.engine import SamplingConfig

    toks = []
    orig = eng.model.token_bytes

    def spy(t):
        toks.append(t)
        return orig(t)

    eng.model.token_bytes = spy
    try:
        for _ in eng.stream(prompt, weights, SamplingConfig(max_tokens=n), merge=merge):
            pass
    finally:
        del eng.model.token_bytes
    return toks


@pytest.mark.parametrize("merge", ["mixture", "packed"])
def test_manual_mixture_all_modules_matches_peft(tiny, tiny_engine, merge):
    # every adapter, including the unprobeable one and the rsLoRA / alpha_pattern ones; "packed" builds
    # them as one adapter of rank 4+16+8+8 with B scaled by w_i c_i and must give the same tokens
    weights = {"all7_r4": 0.5, "rs_r16": 0.3, "pattern_r8": 0.1, "v_only": 0.04, "mlp_only": 0.03, "od_only": 0.03}
    prompt = "In 1492 Columbus sailed"
    ref = greedy(peft_mixture_model(tiny, weights), tiny_engine.tokenize(prompt), 16)
    assert _engine_tokens(tiny_engine, prompt, weights, 16, merge) == ref


def test_packed_logits_equal_mixture_logits(tiny, tiny_engine):
    from logo_edge.engine import SamplingConfig

    weights = {"qv_r8": 0.6, "qkd_r2": 0.25, "rs_r16": 0.15}
    toks = tiny_engine.tokenize("Packed or not, the same function")
    logits = {}
    for merge in ("mixture", "packed"):
        list(tiny_engine.stream(toks, weights, SamplingConfig(max_tokens=1), merge=merge))
        logits[merge] = tiny_engine.ctx.logits()
    np.testing.assert_allclose(logits["packed"], logits["mixture"], rtol=1e-4, atol=1e-4)


def test_single_adapter_weight_one_equals_plain_lora(tiny, tiny_engine):
    prompt = "Plain LoRA check"
    ref = greedy(peft_mixture_model(tiny, {"qv_r8": 1.0}), tiny_engine.tokenize(prompt), 16)
    assert _engine_tokens(tiny_engine, prompt, {"qv_r8": 1.0}, 16) == ref


def test_base_mode_matches_transformers(tiny, tiny_engine, hf_tiny):
    prompt = "The base model alone"
    ref = greedy(hf_tiny, tiny_engine.tokenize(prompt), 16)
    assert _engine_tokens(tiny_engine, prompt, "base", 16) == ref


def test_zero_b_adapter_gives_base_logits_exactly(tiny, tmp_path):
    from logo_edge.engine import Engine, SamplingConfig
    from logo_edge.gguf_files import BaseInfo, read_lora, write_lora

    lo = read_lora(tiny / "gguf" / "all7_r4.gguf", BaseInfo.read(tiny / "tiny-f32.gguf"))
    zero = {k: (a, np.zeros_like(b)) for k, (a, b) in lo.pairs.items()}
    write_lora(tmp_path / "zero.gguf", "llama", lo.alpha, zero)
    with Engine(tiny / "tiny-f32.gguf", [tmp_path / "zero.gguf"], n_ctx=128, kv_type="f32", flash_attn=False) as eng:
        toks = eng.tokenize("zero adapter")
        list(eng.stream(toks, "base", SamplingConfig(max_tokens=1)))
        base_logits = eng.ctx.logits()
        eng.ctx.cache_truncate(0)
        eng._cache = []
        list(eng.stream(toks, {"zero": 1.0}, SamplingConfig(max_tokens=1)))
        np.testing.assert_array_equal(eng.ctx.logits(), base_logits)


def test_probe_cache_mode_equals_peft_with_a_base_prompt_cache(tiny, tiny_engine):
    """The approximate mode's exact meaning: prompt K/V from the base model (the probe's), the last prompt
    token and every generated token under the mixture. PEFT reproduces that with past_key_values."""
    prompt = "A different way to answer quickly"
    out = tiny_engine.create_completion(prompt, max_tokens=12, k=3, prefill="probe-cache")
    rec = out["routing"]
    assert rec["settings"]["prefill"] == "probe-cache" and rec["timings"]["cached_tokens"] > 0
    weights = {a["name"]: a["weight"] for a in rec["adapters"] if a["rank"] is not None}
    tokens = tiny_engine.tokenize(prompt)
    model = peft_mixture_model(tiny, weights)
    with torch.no_grad():
        with model.disable_adapter():
            past = model(torch.tensor([tokens[:-1]]), use_cache=True).past_key_values
        ids, nxt = [], tokens[-1]
        for _ in range(12):
            o = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, nxt = o.past_key_values, int(torch.argmax(o.logits[0, -1]))
            ids.append(nxt)
    assert out["choices"][0]["text"] == tiny_engine.model.detokenize(ids)
    # an exact request right after never reuses the base-model K/V
    exact = tiny_engine.create_completion(prompt, max_tokens=12, adapters=weights)
    assert exact["routing"]["timings"]["cached_tokens"] == 0
    assert exact["choices"][0]["text"] == tiny_engine.model.detokenize(greedy(model, tokens, 12))


def test_probe_reuses_its_cache_only_where_it_is_complete(tiny, tiny_engine, hf_tiny):
    """Probes at the last block, then a lower block, then the last again, on prompts sharing a prefix:
    every h equals transformers' (a reused prefix is complete below the block it was probed at)."""
    from logo_edge.llm import Context

    eng = tiny_engine
    base = eng.tokenize("A shared beginning of a conversation, then")
    decoded = []
    orig = Context.decode

    def spy(self, toks, pos0, what="prefill"):
        decoded.append(len(toks))
        return orig(self, toks, pos0, what)

    Context.decode = spy
    try:
        for block, extra in [(N_LAYER - 1, " one"), (1, " two"), (N_LAYER - 1, " three"), (N_LAYER - 1, " four")]:
            tokens = base + eng.model.tokenize(extra, add_special=False)
            h = eng.probe(tokens, "residual", blocks=[block - 1, block])  # a window: both rows checked
            for row, b in zip(h, (block - 1, block)):
                np.testing.assert_allclose(row, reference_h(hf_tiny, tokens, b, "residual"), rtol=1e-4, atol=1e-4)
    finally:
        Context.decode = orig
    lengths = [len(base) + len(eng.model.tokenize(x, add_special=False)) for x in (" three", " four")]
    assert len(decoded) == 4  # every probe decoded something: no identical prompts
    assert decoded[2] == lengths[0] and decoded[3] < lengths[1]  # no reuse over a shallower cache
