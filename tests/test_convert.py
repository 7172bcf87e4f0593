"""Our PEFT -> GGUF converter against llama.cpp's own convert_lora_to_gguf.py, tensor by tensor."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader

from logo_edge.convert.lora import convert_lora
from logo_edge.errors import ConversionError
from logo_edge.gguf_files import tensor_array
from logo_edge.native.build import source_tree
from tiny import ADAPTERS, NO_QUERY

pytestmark = pytest.mark.slow


def llama_cpp_convert(peft_dir, hf_dir, out, outtype):
    script = source_tree() / "convert_lora_to_gguf.py"
    res = subprocess.run([sys.executable, str(script), "--base", str(hf_dir), "--outfile", str(out),
                          "--outtype", outtype, str(peft_dir)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def read(path):
    r = GGUFReader(path)
    meta = {k: r.fields[k].contents() for k in ("general.type", "general.architecture", "adapter.type",
                                                 "adapter.lora.alpha")}
    return meta, {t.name: (int(t.tensor_type), tensor_array(t)) for t in r.tensors}


CASES = [(n, "f32") for n in list(ADAPTERS) + list(NO_QUERY)] + [
    (n, t) for n in ("all7_r4", "rs_r16") for t in ("f16", "q8_0")]


@pytest.mark.parametrize(("name", "outtype"), CASES)
def test_matches_llama_cpp_converter(tiny, tmp_path, name, outtype):
    ours = convert_lora(tiny / "peft" / name, tiny / "hf", tmp_path / "ours.gguf", outtype)
    ref = llama_cpp_convert(tiny / "peft" / name, tiny / "hf", tmp_path / "ref.gguf", outtype)
    m_ours, t_ours = read(ours)
    m_ref, t_ref = read(ref)
    assert {k: m_ours[k] for k in ("general.type", "general.architecture", "adapter.type")} == \
           {k: m_ref[k] for k in ("general.type", "general.architecture", "adapter.type")}
    assert sorted(t_ours) == sorted(t_ref)
    cfg = json.loads((tiny / "peft" / name / "adapter_config.json").read_text())
    alpha, r = cfg["lora_alpha"], cfg["r"]
    # llama.cpp's converter writes lora_alpha unchanged: it ignores rsLoRA and alpha_pattern
    expected_alpha = alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha
    assert m_ours["adapter.lora.alpha"] == pytest.approx(expected_alpha, rel=1e-6)
    assert m_ref["adapter.lora.alpha"] == pytest.approx(alpha)
    for key, (qtype, ref_arr) in t_ref.items():
        our_type, our_arr = t_ours[key]
        assert our_type == qtype, key
        factor = 1.0
        for mod, pat_alpha in (cfg.get("alpha_pattern") or {}).items():
            if f".{ {'up_proj': 'ffn_up'}.get(mod, mod)}." in key and key.endswith("lora_b"):
                factor = pat_alpha / alpha  # ours folds alpha_pattern into B
        np.testing.assert_allclose(our_arr, ref_arr * factor, rtol=1e-6 if outtype == "f32" else 1e-2,
                                   atol=0 if outtype == "f32" else 1e-3 * np.abs(ref_arr).max(), err_msg=key)


def _copy_adapter(tiny, tmp_path, name="qv_r8"):
    d = tmp_path / name
    shutil.copytree(tiny / "peft" / name, d)
    return d


def _rewrite_tensors(d, fn):
    from safetensors.numpy import load_file, save_file

    w = load_file(d / "adapter_model.safetensors")
    save_file(fn(w), d / "adapter_model.safetensors")


def test_error_missing_files(tiny, tmp_path):
    with pytest.raises(ConversionError, match="adapter_config.json: not found"):
        convert_lora(tmp_path, tiny / "hf", tmp_path / "o.gguf")
    d = _copy_adapter(tiny, tmp_path)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(ConversionError, match="adapter_model.safetensors: adapter weights not found"):
        convert_lora(d, tiny / "hf", tmp_path / "o.gguf")


def test_error_corrupt_weights(tiny, tmp_path):
    d = _copy_adapter(tiny, tmp_path)
    raw = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        convert_lora(d, tiny / "hf", tmp_path / "o.gguf")
    (d / "adapter_model.safetensors").write_bytes(b"garbage!" * 4)
    with pytest.raises(ConversionError, match="not a safetensors file"):
        convert_lora(d, tiny / "hf", tmp_path / "o.gguf")


def test_error_embeddings_and_lm_head(tiny, tmp_path):
    d = _copy_adapter(tiny, tmp_path)
    _rewrite_tensors(d, lambda w: {**w, "base_model.model.lm_head.lora_A.weight": np.zeros((8, 64), np.float32)})
    with pytest.raises(ConversionError, match="embeddings or lm_head"):
        convert_lora(d, tiny / "hf", tmp_path / "o.gguf")


def test_error_other_architecture(tiny, tmp_path):
    d = _copy_adapter(tiny, tmp_path)
    _rewrite_tensors(d, lambda w: {k.replace("self_attn.q_proj", "attn.c_attn"): v for k, v in w.items()})
    with pytest.raises(ConversionError, match="not a LoRA on a supported module"):
        convert_lora(d, tiny / "hf", tmp_path / "o.gguf")


def test_error_shapes_do_not_fit(tiny, tmp_path):
    d = _copy_adapter(tiny, tmp_path)
    _rewrite_tensors(d, lambda w: {k: (np.zeros((v.shape[0], 32), np.float32) if "lora_A" in k else v)
                                   for k, v in w.items()})
    with pytest.raises(ConversionError, match="do not fit the base weight"):
        convert_lora(d, tiny / "hf", tmp_path / "o.gguf")
    d = _copy_adapter(tiny, tmp_path, "all7_r4")
    _rewrite_tensors(d, lambda w: {k.replace("layers.3.", "layers.9."): v for k, v in w.items()})
    with pytest.raises(ConversionError, match="layer 9 does not exist"):
        convert_lora(d, tiny / "hf", tmp_path / "o.gguf")


def test_error_dora_and_unsupported_base(tiny, tmp_path):
    d = _copy_adapter(tiny, tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ConversionError, match="use_dora"):
        convert_lora(d, tiny / "hf", tmp_path / "o.gguf")
    base = tmp_path / "gpt2"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError, match="GPT2LMHeadModel.*not supported"):
        convert_lora(tiny / "peft" / "qv_r8", base, tmp_path / "o.gguf")


def test_base_given_as_gguf_equals_hf_dir(tiny, tmp_path):
    a = convert_lora(tiny / "peft" / "rs_r16", tiny / "hf", tmp_path / "a.gguf")
    b = convert_lora(tiny / "peft" / "rs_r16", tiny / "tiny-f32.gguf", tmp_path / "b.gguf")
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("key", ["q_proj", "self_attn.q_proj", "layers.0.self_attn.q_proj",
                                 "model.layers.0.self_attn.q_proj", "^model.layers.0.self_attn.q_proj"])
def test_alpha_pattern_keys_apply_where_peft_applies_them(tiny, tmp_path, key):
    """PEFT matches alpha_pattern keys against the model's module names (model.layers.N.self_attn.q_proj): every
    form it applies must change the converted update as it changes PEFT's (a full-name key was ignored)."""
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from logo_edge.convert.lora import BaseSpec, peft_to_pairs

    d = _copy_adapter(tiny, tmp_path, "pattern_r8")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {key: 64}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "hf", dtype=torch.float32), d)
    pairs, alpha = peft_to_pairs(d, BaseSpec.load(tiny / "hf"))
    for layer in (0, 1):
        q = model.base_model.model.model.layers[layer].self_attn.q_proj
        want = q.scaling["default"] * (q.lora_B["default"].weight @ q.lora_A["default"].weight).detach().numpy()
        a, b = pairs[f"blk.{layer}.attn_q.weight"]
        got = alpha / a.shape[0] * b @ a  # llama.cpp's scale alpha / r (rows RoPE-permuted: compare norms)
        assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(want), rel=1e-5), (key, layer)


def test_adapters_that_cannot_convert_faithfully_are_refused(tiny, tmp_path):
    """alpha 0 (a zero update: it divided by zero), an activated LoRA (applies after its invocation tokens only),
    non-finite weights, and values beyond float16's range written as f16 are errors naming the adapter."""
    d = _copy_adapter(tiny, tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 0}))
    with pytest.raises(ConversionError, match="lora_alpha .* is 0: the update c B A would be zero"):
        convert_lora(d, tiny / "hf", tmp_path / "o.gguf")
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "alora_invocation_tokens": [1, 2]}))
    with pytest.raises(ConversionError, match="activated LoRA"):
        convert_lora(d, tiny / "hf", tmp_path / "o.gguf")
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    first = next(k for k in _tensor_names(d) if k.endswith("lora_A.weight"))
    _rewrite_tensors(d, lambda w: {**w, first: np.where(np.arange(w[first].size).reshape(w[first].shape) == 0,
                                                         np.nan, w[first]).astype(np.float32)})
    with pytest.raises(ConversionError, match="NaN or infinite"):
        convert_lora(d, tiny / "hf", tmp_path / "o.gguf")
    _rewrite_tensors(d, lambda w: {**w, first: np.full_like(w[first], 1e6)})
    with pytest.raises(ConversionError, match="exceed float16's range"):
        convert_lora(d, tiny / "hf", tmp_path / "o.gguf", "f16")
    assert not (tmp_path / "o.gguf").exists()


def _tensor_names(d):
    from safetensors.numpy import load_file

    return list(load_file(d / "adapter_model.safetensors"))


@pytest.mark.parametrize("mangle, says", [
    (lambda h, k: h[k].update(shape=[3, 3]), "holds .* bytes, not the"),
    (lambda h, k: h[k].pop("dtype"), "malformed header entry"),
    (lambda h, k: h[k].update(data_offsets=[-8, h[k]["data_offsets"][1]]), "outside the file's data"),
    (lambda h, k: h.clear() or h.update(x=[1, 2]), "malformed header entry"),
])
def test_a_malformed_safetensors_header_is_an_error_naming_the_file(tiny, tmp_path, mangle, says):
    import struct

    d = _copy_adapter(tiny, tmp_path)
    f = d / "adapter_model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mangle(header, next(k for k in header if k != "__metadata__"))
    head = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])
    with pytest.raises(ConversionError, match=says) as e:
        convert_lora(d, tiny / "hf", tmp_path / "o.gguf")
    assert "adapter_model.safetensors" in str(e.value)
