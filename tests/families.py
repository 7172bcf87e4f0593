"""Tiny random models of every family logo-edge supports, random PEFT adapters on them, converted to GGUF.

One runner over families (as mlx-lm tests its architectures): each family is a transformers config
(hidden 64, 3 layers, GQA, the family's own embedding tying) with the SmolLM2 tokenizer, converted by
llama.cpp's own convert_hf_to_gguf.py; its adapters are converted by ours (gguf/) and by llama.cpp's
convert_lora_to_gguf.py (ref/, what tests/test_families.py compares ours against). Everything is cached
under the logo-edge cache keyed by the files that make it, like tests/tiny.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from peft_tools import peft_mixture, random_lora

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
MAKERS = [HERE, HERE.with_name("peft_tools.py"), *sorted((ROOT / "convert").glob("*.py")),
          ROOT / "logo_edge" / "gguf_files.py"]
N_LAYER = 3
STD = {"q": ["q_proj"], "attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
FUSED = {"q": ["qkv_proj"], "attn": ["qkv_proj", "o_proj"], "mlp": ["gate_up_proj", "down_proj"]}


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # transformers' model_type
    hf_arch: str  # config.json "architectures"
    arch: str  # GGUF general.architecture
    config: dict = field(default_factory=dict)
    modules: dict = field(default_factory=lambda: STD)
    tokenizer_class: str | None = None  # written into tokenizer_config.json for the base converter
    probe_module: str = "q_proj"  # HF module whose (query) output the probe reads
    tokenizer_as_saved: bool = False  # base converter: AutoTokenizer -> TokenizersBackend (tokenizer.json as is)

    @property
    def query_rows(self) -> int | None:
        """Rows of the probe module's output that are the query (fused q/k/v), None for all."""
        return None if self.probe_module == "q_proj" else self.config["num_attention_heads"] * self.head_dim

    @property
    def head_dim(self) -> int:
        return self.config.get("head_dim") or self.config["hidden_size"] // self.config["num_attention_heads"]


_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYER, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, initializer_range=0.15)
FAMILIES = {f.name: f for f in [
    Family("llama", "llama", "LlamaForCausalLM", "llama", dict(_COMMON, head_dim=16, tie_word_embeddings=False)),
    Family("mistral", "mistral", "MistralForCausalLM", "llama",
           dict(_COMMON, head_dim=16, sliding_window=None, tie_word_embeddings=False)),
    # transformers 5 loads any qwen2 tokenizer as Qwen2Tokenizer (Qwen's pre-tokenizer regex over SmolLM2's vocab),
    # whose hash llama.cpp's converter does not know: the base is converted with the tokenizer.json as saved
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", "qwen2", dict(_COMMON, tie_word_embeddings=True),
           tokenizer_as_saved=True),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", "qwen3", dict(_COMMON, head_dim=16, tie_word_embeddings=True)),
    Family("gemma3", "gemma3_text", "Gemma3ForCausalLM", "gemma3",
           dict(_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=512, tie_word_embeddings=True,
                # every block sliding, as llama.cpp reads this GGUF: the pinned converter writes no sliding-window
                # pattern, and llama.cpp's default for gemma3 (5 sliding, then 1 full) makes all 3 sliding (with
                # "full_attention" last, transformers' RoPE base there is 1e6 against llama.cpp's 1e4: its MLP's
                # input differed by 5.5 %)
                layer_types=["sliding_attention"] * 3)),
    Family("phi3", "phi3", "Phi3ForCausalLM", "phi3",
           dict(_COMMON, original_max_position_embeddings=1024, tie_word_embeddings=False),
           modules=FUSED, tokenizer_class="GPT2Tokenizer", probe_module="qkv_proj"),
]}


def adapters(fam: Family) -> dict[str, dict]:
    """name -> LoraConfig kwargs, in the family's own module names."""
    m = fam.modules
    return {
        "attn_r4": dict(r=4, lora_alpha=8, target_modules=m["attn"]),
        "all_r8": dict(r=8, lora_alpha=16, target_modules=m["attn"] + m["mlp"]),
        "rs_r16": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=m["q"] + m["mlp"][-1:]),
        "mlp_r4": dict(r=4, lora_alpha=4, target_modules=m["mlp"]),  # no query projection: unprobeable
    }


BIASED = "bias_r4"  # lora_bias=True: no GGUF counterpart, must be refused


def biased(fam: Family) -> dict:
    return dict(r=4, lora_alpha=8, lora_bias=True, target_modules=fam.modules["attn"])


def fixture_dir(fam: Family) -> Path:
    from logo_edge.native.build import cache_root, source_tree

    h = hashlib.sha256(str(source_tree()).encode())
    for p in MAKERS:
        h.update(p.name.encode() + p.read_bytes())
    return cache_root() / "test-fixtures" / f"family-{fam.name}-{h.hexdigest()[:12]}"


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from logo_edge.defaults import default_model_path

    p = default_model_path()
    return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


_LLAMA_CPP = """
import runpy, sys
sys.path.insert(0, {tree!r})
if {as_saved!r}:
    import transformers
    transformers.AutoTokenizer.from_pretrained = transformers.TokenizersBackend.from_pretrained
for argv in {jobs!r}:
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
"""


def llama_cpp_run(argvs: list[list[str]], as_saved: bool = False) -> None:
    """llama.cpp's own converter scripts (argv[0]), all in one process (torch loads once)."""
    from logo_edge.native.build import source_tree

    code = _LLAMA_CPP.format(tree=str(source_tree()), jobs=argvs, as_saved=as_saved)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {argvs}:\n{res.stderr[-3000:]}")


def llama_cpp_convert_loras(jobs: list[tuple[Path, Path, Path]]) -> None:
    """llama.cpp's convert_lora_to_gguf.py on (peft_dir, hf_dir, out) jobs."""
    from logo_edge.native.build import source_tree

    script = str(source_tree() / "convert_lora_to_gguf.py")
    llama_cpp_run([[script, "--base", str(hf), "--outfile", str(out), "--outtype", "f32", str(peft)]
                   for peft, hf, out in jobs])


def build(fam: Family | str, progress=print) -> Path:
    """Build (or reuse) one family's tiny model and adapters; returns the directory holding them:
    hf/, base-f32.gguf, peft/<name>/, gguf/<name>.gguf (ours), ref/<name>.gguf (llama.cpp's)."""
    fam = FAMILIES[fam] if isinstance(fam, str) else fam
    out = fixture_dir(fam)
    if (out / "done").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from logo_edge.convert.base import convert_base
    from logo_edge.convert.lora import convert_lora

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "hf").mkdir(parents=True)
    progress(f"{fam.name}: tiny {fam.hf_arch}")
    tok = smollm2_tokenizer()
    cfg = AutoConfig.for_model(fam.model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **fam.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp / "hf", safe_serialization=True)
    tok.save_pretrained(tmp / "hf")
    cfg_json = json.loads((tmp / "hf" / "config.json").read_text())
    cfg_json["architectures"] = [fam.hf_arch]
    (tmp / "hf" / "config.json").write_text(json.dumps(cfg_json, indent=1))
    if fam.tokenizer_class:
        tc = json.loads((tmp / "hf" / "tokenizer_config.json").read_text())
        tc["tokenizer_class"] = fam.tokenizer_class
        (tmp / "hf" / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
    progress(f"{fam.name}: convert_hf_to_gguf.py (llama.cpp's converter)")
    if fam.tokenizer_as_saved:
        from logo_edge.native.build import source_tree

        llama_cpp_run([[str(source_tree() / "convert_hf_to_gguf.py"), str(tmp / "hf"), "--outfile",
                        str(tmp / "base-f32.gguf"), "--outtype", "f32"]], as_saved=True)
    else:
        convert_base(tmp / "hf", tmp / "base-f32.gguf", "f32")
    jobs = []
    for i, (name, kw) in enumerate({**adapters(fam), BIASED: biased(fam)}.items()):
        random_lora(tmp / "hf", kw, 100 + i, tmp / "peft" / name)
        if name != BIASED:
            (tmp / "gguf").mkdir(exist_ok=True)
            (tmp / "ref").mkdir(exist_ok=True)
            convert_lora(tmp / "peft" / name, tmp / "hf", tmp / "gguf" / f"{name}.gguf", "f32", name=name)
            jobs.append((tmp / "peft" / name, tmp / "hf", tmp / "ref" / f"{name}.gguf"))
    progress(f"{fam.name}: convert_lora_to_gguf.py (llama.cpp's converter) on {len(jobs)} adapters")
    llama_cpp_convert_loras(jobs)
    (tmp / "done").write_text("ok")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ---- the reference side: transformers + PEFT


def peft_scale(cfg: dict, r: int, module: str) -> float:
    alpha = (cfg.get("alpha_pattern") or {}).get(module, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def peft_probe_mats(fam: Family, d: Path, name: str, block: int):
    """(A, B, c) of the adapter's probe module at `block` from PEFT's files, B cut to the query rows."""
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((d / "peft" / name / "adapter_config.json").read_text())
    w = load_file(d / "peft" / name / "adapter_model.safetensors")
    key = f"base_model.model.model.layers.{block}.self_attn.{fam.probe_module}.lora_{{}}.weight"
    a, b = w[key.format("A")].astype(np.float64), w[key.format("B")].astype(np.float64)
    if fam.query_rows is not None:
        b = b[:fam.query_rows]
    return a, b, peft_scale(cfg, a.shape[0], fam.probe_module)


def peft_mlp_mats(fam: Family, d: Path, name: str, block: int) -> list:
    """[(A, B, c)] of the adapter's MLP modules reading the MLP's input (gate and up, or phi3's fused gate_up)
    at `block`, from PEFT's files."""
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((d / "peft" / name / "adapter_config.json").read_text())
    w = load_file(d / "peft" / name / "adapter_model.safetensors")
    out = []
    for m in ("gate_proj", "up_proj", "gate_up_proj"):
        key = f"base_model.model.model.layers.{block}.mlp.{m}.lora_{{}}.weight"
        if key.format("A") in w:
            a, b = w[key.format("A")].astype(np.float64), w[key.format("B")].astype(np.float64)
            out.append((a, b, peft_scale(cfg, a.shape[0], m)))
    return out


def peft_mixture_model(d: Path, weights: dict):
    """transformers + PEFT with every adapter of `weights` active and its scaling multiplied by w."""
    return peft_mixture(d / "hf", d / "peft", weights)


if __name__ == "__main__":
    for f in sys.argv[1:] or FAMILIES:
        print(build(f))
