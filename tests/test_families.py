"""Every family through the whole path: our LoRA converter against llama.cpp's, probe signals and routed
greedy generation against transformers + PEFT, on tiny random models (tests/families.py)."""

import json
import math
import shutil

import numpy as np
import pytest
from gguf import GGUFReader

from families import (
    BIASED,
    FAMILIES,
    N_LAYER,
    adapters,
    build,
    peft_mixture_model,
    peft_mlp_mats,
    peft_probe_mats,
    peft_scale,
)
from logo_edge.convert.lora import convert_lora
from logo_edge.errors import AdapterError, ConversionError
from logo_edge.gguf_files import tensor_array
from test_reference import _engine_tokens, greedy, reference_ffn_h, reference_h, reference_signal

pytestmark = pytest.mark.slow

NAMES = list(FAMILIES)
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "SELECT name FROM users WHERE age > 30;"]
_built, _engines, _hf = {}, {}, {}


def fixture(name):
    if name not in _built:
        _built[name] = build(name, progress=lambda m: None)
    return FAMILIES[name], _built[name]


def engine(name):
    from logo_edge.engine import Engine

    if name not in _engines:
        fam, d = fixture(name)
        # every adapter probeable: mlp_r4 over the MLP's input; the query rows (fused or not) scored as the paper
        # weighs them (sv_power and probe_modules="input" are architecture-free: test_reference checks them)
        _engines[name] = Engine(d / "base-f32.gguf", d / "gguf", n_ctx=256, n_batch=32, kv_type="f32",
                                flash_attn=False, probe_modules="target-first", sv_power=1.0)
    return _engines[name]


def hf(name):
    import torch
    from transformers import AutoModelForCausalLM

    if name not in _hf:
        _, d = fixture(name)
        _hf[name] = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval()
    return _hf[name]


@pytest.fixture(scope="module", autouse=True)
def _close_engines():
    yield
    for e in _engines.values():
        e.close()
    _engines.clear()


def _read(path):
    r = GGUFReader(path)
    meta = {k: r.fields[k].contents() for k in ("general.type", "general.architecture", "adapter.type",
                                                 "adapter.lora.alpha")}
    return meta, {t.name: tensor_array(t) for t in r.tensors}


# ---- (a) converter


@pytest.mark.parametrize("family", NAMES)
def test_converter_matches_llama_cpp(family, tmp_path):
    """Ours and llama.cpp's convert_lora_to_gguf.py give the same tensors; scales compared as c * B, since
    llama.cpp writes lora_alpha as is (ignoring rsLoRA) and ours keeps PEFT's scale exactly."""
    fam, d = fixture(family)
    for name in adapters(fam):
        ours = convert_lora(d / "peft" / name, d / "hf", tmp_path / f"{name}.gguf")
        m_ours, t_ours = _read(ours)
        m_ref, t_ref = _read(d / "ref" / f"{name}.gguf")
        for k in ("general.type", "general.architecture", "adapter.type"):
            assert m_ours[k] == m_ref[k], (k, name)
        assert m_ours["general.architecture"] == fam.arch
        assert sorted(t_ours) == sorted(t_ref), name
        cfg = json.loads((d / "peft" / name / "adapter_config.json").read_text())
        assert m_ref["adapter.lora.alpha"] == pytest.approx(cfg["lora_alpha"])
        for key, ref in t_ref.items():
            if key.endswith(".lora_a"):
                np.testing.assert_array_equal(t_ours[key], ref, err_msg=key)
                continue
            r = ref.shape[1]
            module = next(m for m in cfg["target_modules"] if f".{m}" in _hf_name(fam, key))
            c_ours = m_ours["adapter.lora.alpha"] / r
            np.testing.assert_allclose(c_ours * t_ours[key], peft_scale(cfg, r, module) * ref, rtol=1e-6,
                                       atol=1e-7, err_msg=f"{name} {key}")


def _hf_name(fam, key):
    from logo_edge.convert.lora import ARCH_MODULES

    stem = key.split(".")[2]
    return next(hf_mod for hf_mod, s in ARCH_MODULES[fam.arch].items() if s == stem)


@pytest.mark.parametrize("family", NAMES)
def test_lora_bias_is_refused(family, tmp_path):
    fam, d = fixture(family)
    with pytest.raises(ConversionError, match=rf"{fam.arch} layer \d+ self_attn\.\w+_proj: .*lora_bias"):
        convert_lora(d / "peft" / BIASED, d / "hf", tmp_path / "o.gguf")
    with pytest.raises(ConversionError, match=rf"{fam.arch} layer \d+ self_attn\.\w+_proj: .*lora_bias"):
        convert_lora(d / "peft" / BIASED, d / "base-f32.gguf", tmp_path / "o.gguf")


def test_module_with_no_gguf_counterpart_is_refused(tmp_path):
    """A llama-style adapter (q_proj) on phi3 (fused qkv_proj) and the reverse: refused, naming family and module."""
    _, llama = fixture("llama")
    _, phi3 = fixture("phi3")
    for base in (phi3 / "hf", phi3 / "base-f32.gguf"):
        with pytest.raises(ConversionError, match=r"module 'self_attn\.\w_proj' .*phi3 family.*no GGUF counterpart"):
            convert_lora(llama / "peft" / "attn_r4", base, tmp_path / "o.gguf")
    for base in (llama / "hf", llama / "base-f32.gguf"):
        with pytest.raises(ConversionError, match=r"module 'self_attn\.qkv_proj' .*llama family"):
            convert_lora(phi3 / "peft" / "attn_r4", base, tmp_path / "o.gguf")


def test_unsupported_architecture_is_refused(tmp_path):
    from gguf import GGUFWriter

    _, d = fixture("llama")
    hf_dir = tmp_path / "gemma2"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"architectures": ["Gemma2ForCausalLM"]}))
    with pytest.raises(ConversionError, match="Gemma2ForCausalLM.*not supported by the LoRA converter"):
        convert_lora(d / "peft" / "attn_r4", hf_dir, tmp_path / "o.gguf")
    w = GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_qkv.weight", np.zeros((192, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConversionError, match="architecture 'gpt2' is not supported by the LoRA converter"):
        convert_lora(d / "peft" / "attn_r4", tmp_path / "gpt2.gguf", tmp_path / "o.gguf")


def test_adapter_of_another_family_is_refused_at_load(tmp_path):
    """A llama GGUF adapter into a qwen3 engine (same shapes): the architecture check names both."""
    _, llama = fixture("llama")
    eng = engine("qwen3")
    shutil.copy(llama / "gguf" / "attn_r4.gguf", tmp_path / "x.gguf")
    with pytest.raises(AdapterError, match="architecture 'llama' but the base model .* is 'qwen3'"):
        eng.pool.add(tmp_path / "x.gguf", name="from-llama")


def test_phi3_mlp_probe_target_is_refused():
    """phi3 fuses gate and up: an MLP probe target cannot be read there, and says so at engine creation."""
    from logo_edge.engine import Engine

    _, d = fixture("phi3")
    with pytest.raises(AdapterError, match="phi3 base model .* fuses its MLP projections .* 'ffn_up'"):
        Engine(d / "base-f32.gguf", target_module="ffn_up")


# ---- (b) probe signals

# llama.cpp's CPU GELU (gemma's GEGLU MLP) reads an f16 table: from block 1 on its h differs from transformers'
# by ~3e-4 of its largest entry (test_hidden_states_match_pytorch holds it to 1e-3), and the entropy signal
# amplifies that to ~1e-3 relative: the signal against transformers' h is held to 3e-3 there. Against
# llama.cpp's own h (the probe alone) every family is held to 1e-5.
H_TOL = {"gemma3": 1e-3}
SIGNAL_TOL = {"gemma3": 3e-3}


@pytest.mark.parametrize("family", NAMES)
def test_hidden_states_match_pytorch(family):
    """The probe's h at every window block against transformers' (block 0 is exact: the embeddings), and the
    MLP's input at each (read in the same pass while an adapter is scored over it: mlp_r4)."""
    eng = engine(family)
    tokens = eng.tokenize(PROMPTS[0])
    n = len(eng.pool.blocks)
    for probe_input in ("residual", "normed"):
        h = eng.probe(tokens, probe_input, blocks=eng.pool.blocks)
        assert h.shape[0] == 2 * n
        ffn = reference_ffn_h(hf(family), tokens, eng.pool.blocks, probe_input)
        for i, b in enumerate(eng.pool.blocks):
            ref = reference_h(hf(family), tokens, b, probe_input)
            tol = H_TOL.get(family, 1e-4) if b else 1e-5
            np.testing.assert_allclose(h[i], ref, rtol=0, atol=tol * np.abs(ref).max(), err_msg=f"{probe_input} {b}")
            np.testing.assert_allclose(h[n + i], ffn[b], rtol=0, atol=tol * np.abs(ffn[b]).max(),
                                       err_msg=f"MLP input, {probe_input} {b}")


@pytest.mark.parametrize("probe_input", ["residual", "normed"])
@pytest.mark.parametrize("family", NAMES)
def test_signals_match_pytorch(family, probe_input):
    fam, d = fixture(family)
    eng = engine(family)
    assert eng.pool.blocks == list(range(N_LAYER))
    assert eng.pool.target_module == ("attn_qkv" if fam.query_rows else "attn_q")
    probeable = [n for n in adapters(fam) if n != "mlp_r4"]
    mats = {(n, blk): peft_probe_mats(fam, d, n, blk) for n in probeable for blk in eng.pool.blocks}
    mlp = {blk: peft_mlp_mats(fam, d, "mlp_r4", blk) for blk in eng.pool.blocks}  # over the MLP's input

    def reference(hs, signal, ffn=None):
        outs = {n: [c * (b @ (a @ hs[blk])) for blk in eng.pool.blocks for a, b, c in [mats[n, blk]]]
                for n in probeable}
        out = {n: (math.sqrt(sum(float(x) ** 2 for o in outs[n] for x in o)) if signal == "norm"
                   else reference_signal(list(outs[n][-1]), signal)) for n in probeable}
        if ffn is not None and signal == "norm":
            out["mlp_r4"] = math.sqrt(sum(float(np.sum((c * (b @ (a @ ffn[blk]))) ** 2))
                                          for blk in eng.pool.blocks for a, b, c in mlp[blk]))
        return out

    for prompt in PROMPTS:
        tokens = eng.tokenize(prompt)
        hs_torch = {b: reference_h(hf(family), tokens, b, probe_input) for b in eng.pool.blocks}
        # llama.cpp's own h: isolates the probe (module, rows, scales) from the base model's numerics
        ffn_torch = reference_ffn_h(hf(family), tokens, eng.pool.blocks, probe_input)
        h = eng.probe(tokens, probe_input, blocks=eng.pool.blocks).astype(np.float64)
        hs_llama = dict(zip(eng.pool.blocks, h))
        ffn_llama = dict(zip(eng.pool.blocks, h[len(eng.pool.blocks):]))
        for signal in ("norm", "entropy"):
            rec = eng.route(tokens, signal=signal, k=2, probe_input=probe_input, calibration="raw")
            got = {s.name: s.signal for s in rec.adapters}
            ref = reference(hs_torch, signal, ffn_torch)
            exact = reference(hs_llama, signal, ffn_llama)
            for n in ref:
                assert got[n] == pytest.approx(exact[n], rel=1e-5), (n, signal, prompt)
                assert got[n] == pytest.approx(ref[n], rel=SIGNAL_TOL.get(family, 1e-4)), (n, signal, prompt)
            assert ("mlp_r4" in ref) == (signal == "norm") and (signal == "norm" or got["mlp_r4"] is None)
            # ranked as PEFT's A/B rank llama.cpp's h (transformers' h above: within its tolerance, which a near tie
            # of gemma3's all_r8 and mlp_r4 can flip)
            assert [s.name for s in rec.selected] == sorted(exact, key=lambda n: -exact[n])[:2]


# ---- (c) generation


@pytest.mark.parametrize("family", NAMES)
def test_routed_greedy_generation_matches_peft(family):
    fam, d = fixture(family)
    eng = engine(family)
    prompt = "Once upon a time in a land far away"
    out = eng.create_completion(prompt, max_tokens=12, k=2)
    weights = {a["name"]: a["weight"] for a in out["routing"]["adapters"] if a["rank"] is not None}
    assert len(weights) == 2 and sum(weights.values()) == pytest.approx(1.0)
    ref = greedy(peft_mixture_model(d, weights), eng.tokenize(prompt), 12)
    assert out["choices"][0]["text"] == eng.model.detokenize(ref)
    # every module of every adapter, the MLP-only one included
    weights = {"all_r8": 0.5, "rs_r16": 0.2, "attn_r4": 0.2, "mlp_r4": 0.1}
    prompt = "In 1492 Columbus sailed"
    ref = greedy(peft_mixture_model(d, weights), eng.tokenize(prompt), 12)
    assert _engine_tokens(eng, prompt, weights, 12) == ref
