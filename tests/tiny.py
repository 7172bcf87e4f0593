"""A tiny random llama model and random PEFT adapters, made here (no downloads), converted to GGUF.

The base goes through llama.cpp's own convert_hf_to_gguf.py; adapters through ours. The result
is cached under the logo-edge cache keyed by the hash of everything that makes it (this file, our
converters and GGUF writer), so reruns start at once and a converter change rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from peft_tools import random_lora

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
# every file whose code produces the fixtures: a change to any of them rebuilds them
MAKERS = [HERE, HERE.with_name("peft_tools.py"), *sorted((ROOT / "convert").glob("*.py")),
          ROOT / "logo_edge" / "gguf_files.py"]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYER = 4

# name -> LoraConfig kwargs: different ranks, alphas, an rsLoRA, different target modules
ADAPTERS = {
    "qv_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all7_r4": dict(r=4, lora_alpha=8, target_modules=ALL7),
    "rs_r16": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
    "qkd_r2": dict(r=2, lora_alpha=1, target_modules=["q_proj", "k_proj", "down_proj"]),
    "pattern_r8": dict(r=8, lora_alpha=8, target_modules=["q_proj", "up_proj"], alpha_pattern={"up_proj": 32}),
}
# no q anywhere: by default v_only is scored over its v, mlp_only over its gate and up (the FFN's input), and
# od_only (o and down read inputs the probe does not) cannot be probed
NO_QUERY = {"v_only": dict(r=8, lora_alpha=16, target_modules=["v_proj"]),
            "mlp_only": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
            "od_only": dict(r=4, lora_alpha=4, target_modules=["o_proj", "down_proj"])}


def smollm2_dir() -> tuple[Path, str]:
    from logo_edge.defaults import default_model_path

    p = default_model_path()
    return p.parent, p.name


def fixture_dir() -> Path:
    from logo_edge.native.build import cache_root

    h = hashlib.sha256()
    for p in MAKERS:
        h.update(p.name.encode() + p.read_bytes())
    key = h.hexdigest()[:12]
    return cache_root() / "test-fixtures" / f"tiny-{key}"


def build(progress=print) -> Path:
    """Build (or reuse) the tiny model and adapters; returns the directory holding them."""
    out = fixture_dir()
    if (out / "done").exists():
        return out
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from logo_edge.convert.base import convert_base
    from logo_edge.convert.lora import convert_lora

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "hf").mkdir(parents=True)
    progress("tiny model: tokenizer from the SmolLM2 GGUF")
    d, f = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYER,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      rms_norm_eps=1e-5, initializer_range=0.15, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp / "hf", safe_serialization=True)
    tok.save_pretrained(tmp / "hf")
    cfg_json = json.loads((tmp / "hf" / "config.json").read_text())
    cfg_json["architectures"] = ["LlamaForCausalLM"]
    (tmp / "hf" / "config.json").write_text(json.dumps(cfg_json, indent=1))
    progress("tiny model: convert_hf_to_gguf.py (llama.cpp's converter)")
    convert_base(tmp / "hf", tmp / "tiny-f32.gguf", "f32")
    for i, (name, kw) in enumerate({**ADAPTERS, **NO_QUERY}.items()):
        progress(f"tiny adapters: {name}")
        random_lora(tmp / "hf", kw, 100 + i, tmp / "peft" / name)
        (tmp / "gguf").mkdir(exist_ok=True)
        convert_lora(tmp / "peft" / name, tmp / "hf", tmp / "gguf" / f"{name}.gguf", "f32", name=name)
    (tmp / "done").write_text("ok")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
