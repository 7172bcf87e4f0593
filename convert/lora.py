"""PEFT LoRA (adapter_config.json + adapter_model.safetensors) -> GGUF LoRA, with numpy only.

    python -m logo_edge.convert.lora ADAPTER_DIR --base BASE.gguf|HF_DIR -o out.gguf [--outtype f32|f16|q8_0]

ADAPTER_DIR may also be an mlx-lm LoRA dir (`mlx_lm.lora`: adapter_config.json + adapters.safetensors):
convert_lora hands it to logo_edge.convert.mlx, which reuses this module's base spec and module tables.

Scales: llama.cpp applies alpha / r per tensor with one alpha per file. Each module's
PEFT scale c_m (lora_alpha / r, or / sqrt(r) with rsLoRA, alpha_pattern honoured) is kept
exactly: alpha is written as c * r of the first module and any module whose c_m differs
gets its B multiplied by the ratio. Llama-architecture q/k B rows get the RoPE row
permutation the base converter applies to q/k weights.

Families (GGUF architectures) and their LoRA modules are listed in ARCH_MODULES; phi3 keeps its
fused qkv_proj / gate_up_proj fused (attn_qkv / ffn_up), as llama.cpp's converter does. Anything
else (another architecture, a module with no GGUF counterpart in the family, a lora_B bias) is
refused with an error naming the family and the module, never converted into something that runs wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from logo_edge.errors import ConversionError
from logo_edge.gguf_files import BaseInfo, write_lora

# HF module path (inside a decoder layer) -> GGUF tensor stem
MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# phi3 keeps q/k/v and gate/up fused, in HF and in GGUF (rows [q; k; v] and [gate; up])
PHI3_MODULES = {
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# GGUF architecture (family) -> its LoRA modules; each is tested against llama.cpp's converter, transformers
# + PEFT probe signals and routed generation in tests/test_families.py
ARCH_MODULES = {"llama": MODULES, "qwen2": MODULES, "qwen3": MODULES, "gemma3": MODULES, "phi3": PHI3_MODULES}
ROPE_PERMUTED_ARCHS = {"llama"}  # q/k rows are permuted by convert_hf_to_gguf for these
HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
            "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3"}
# Bumped whenever what a PEFT adapter converts to changes (caches of converted files key on it): 2: alpha_pattern
# keys matched on the model's module names, as PEFT matches them.
CONVERTER_VERSION = 2
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
_BIAS_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(\w+\.\w+)\.lora_B(?:\.\w+)?\.bias$")
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bf16", "F64": np.float64}


@dataclass
class BaseSpec:
    """What the adapter is checked against: architecture, heads, and weight shapes (ne0=in, ne1=out)."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    shapes: dict[str, tuple[int, int]]
    source: Path

    @classmethod
    def load(cls, base: str | Path) -> "BaseSpec":
        base = Path(base)
        if base.is_file() and base.suffix == ".gguf":
            info = BaseInfo.read(base)
            if info.arch not in ARCH_MODULES:
                raise ConversionError(f"{base}: architecture {info.arch!r} is not supported by the LoRA "
                                      f"converter (supported families: {sorted(ARCH_MODULES)})")
            return cls(info.arch, info.n_layer, info.n_head, info.n_head_kv,
                       {k: v[:2] for k, v in info.shapes.items()}, base)
        cfg_path = base / "config.json" if base.is_dir() else base
        if not cfg_path.exists():
            raise ConversionError(f"{cfg_path}: base model config not found; pass a base GGUF or an HF model dir")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg_path}: not valid JSON: {e}") from e
        hf_arch = (cfg.get("architectures") or ["?"])[0]
        if hf_arch not in HF_ARCHS:
            raise ConversionError(f"{cfg_path}: architecture {hf_arch!r} is not supported by the LoRA converter "
                                  f"(supported: {sorted(HF_ARCHS)})")
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        n_head = cfg["num_attention_heads"]
        n_kv = cfg.get("num_key_value_heads", n_head)
        hd = cfg.get("head_dim") or hidden // n_head
        if HF_ARCHS[hf_arch] == "phi3":
            per_layer = {"attn_qkv": (hidden, (n_head + 2 * n_kv) * hd), "attn_output": (n_head * hd, hidden),
                         "ffn_up": (hidden, 2 * inter), "ffn_down": (inter, hidden)}
        else:
            per_layer = {"attn_q": (hidden, n_head * hd), "attn_k": (hidden, n_kv * hd),
                         "attn_v": (hidden, n_kv * hd), "attn_output": (n_head * hd, hidden),
                         "ffn_gate": (hidden, inter), "ffn_up": (hidden, inter), "ffn_down": (inter, hidden)}
        n_layer = cfg["num_hidden_layers"]
        shapes = {f"blk.{i}.{m}.weight": s for i in range(n_layer) for m, s in per_layer.items()}
        return cls(HF_ARCHS[hf_arch], n_layer, n_head, n_kv, shapes, cfg_path)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Minimal safetensors reader (F32/F16/BF16) so conversion needs neither torch nor bf16 numpy."""
    if not path.exists():
        raise ConversionError(f"{path}: adapter weights not found")
    raw = path.read_bytes()
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
    except Exception as e:
        raise ConversionError(f"{path}: not a safetensors file (corrupt or truncated header): {e}") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data = memoryview(raw)[8 + n:]
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dt = _SAFETENSORS_DTYPES.get(meta["dtype"])
            start, end = (int(x) for x in meta["data_offsets"])
            shape = [int(x) for x in meta["shape"]]
        except (TypeError, KeyError, ValueError) as e:
            raise ConversionError(f"{path}: tensor {key!r} has a malformed header entry {meta!r}: {e}") from None
        if dt is None or not 0 <= start <= end <= len(data):
            raise ConversionError(f"{path}: tensor {key!r} has dtype {meta['dtype']} or lies outside the file's "
                                  "data (truncated?)")
        width = 2 if dt == "bf16" else np.dtype(dt).itemsize
        if (end - start) != width * math.prod(shape) or min(shape, default=1) < 0:
            raise ConversionError(f"{path}: tensor {key!r} holds {end - start} bytes, not the {width} x {shape} "
                                  f"its header says")
        buf = np.frombuffer(data[start:end], np.uint16 if dt == "bf16" else dt)
        arr = (buf.astype(np.uint32) << 16).view(np.float32) if dt == "bf16" else buf.astype(np.float32)
        out[key] = arr.reshape(shape)
    return out


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Row permutation convert_hf_to_gguf applies to llama q/k weights (HF halves -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pattern_value(patterns: dict, module: str, default):
    for key, val in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return val
    return default


def peft_to_pairs(adapter_dir: str | Path, base: BaseSpec) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """Read a PEFT adapter dir and return (GGUF stem -> (A, B), alpha to write)."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.exists():
        raise ConversionError(f"{cfg_path}: not found; a PEFT adapter dir holds adapter_config.json "
                              "and adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_path}: not valid JSON: {e}") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    for flag, why in (("use_dora", "DoRA magnitudes"), ("fan_in_fan_out", "Conv1D (GPT-2 style) layers")):
        if cfg.get(flag):
            raise ConversionError(f"{cfg_path}: {flag}=true ({why}) cannot be expressed as a GGUF LoRA")
    if cfg.get("alora_invocation_tokens"):
        raise ConversionError(f"{cfg_path}: an activated LoRA (alora_invocation_tokens) applies only after its "
                              "invocation tokens; a GGUF LoRA would apply it to every token")
    if cfg.get("modules_to_save"):
        raise ConversionError(f"{cfg_path}: modules_to_save {cfg['modules_to_save']} holds full weights, "
                              "which a GGUF LoRA cannot carry")
    modules = ARCH_MODULES[base.arch]
    tensors = read_safetensors(adapter_dir / "adapter_model.safetensors")
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    full: dict[tuple[int, str], str] = {}  # the module's name in the model (what PEFT matches alpha_pattern on)
    for key, arr in tensors.items():
        if "embed" in key or "lm_head" in key:
            raise ConversionError(f"{adapter_dir}: tensor {key!r} adapts embeddings or lm_head, which "
                                  "logo-edge does not support; retrain without them in target_modules")
        if (mb := _BIAS_KEY.match(key)) is not None:
            raise ConversionError(f"{adapter_dir}: {base.arch} layer {mb.group(1)} {mb.group(2)}: tensor {key!r} "
                                  "is a lora_B bias (lora_bias=true), which a GGUF LoRA cannot carry "
                                  "(llama.cpp adds B A x only); retrain with lora_bias=false")
        m = _KEY.match(key)
        if m is None or m.group(2) not in modules:
            mod = f"module {m.group(2)!r}" if m else f"tensor {key!r}"
            raise ConversionError(f"{adapter_dir}: {mod} is not a LoRA on a supported module of the "
                                  f"{base.arch} family ({', '.join(modules)}); it has no GGUF counterpart there: "
                                  f"the adapter was made for another architecture (tensor {key!r})")
        if not np.isfinite(arr).all():
            raise ConversionError(f"{adapter_dir}: tensor {key!r} holds NaN or infinite values")
        halves.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = arr
        full[(int(m.group(1)), m.group(2))] = re.sub(r"\.lora_[AB](?:\.\w+)?\.weight$", "",
                                                     key.removeprefix("base_model.model."))
    if not halves:
        raise ConversionError(f"{adapter_dir}: the adapter has no LoRA tensors")
    use_rslora = bool(cfg.get("use_rslora"))
    alpha_default = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    scales: dict[str, float] = {}
    for (layer, hf_mod), ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise ConversionError(f"{adapter_dir}: layer {layer} {hf_mod} has only lora_{''.join(ab)}")
        a, b = ab["A"], ab["B"]
        stem = f"blk.{layer}.{modules[hf_mod]}.weight"
        if stem not in base.shapes:
            raise ConversionError(f"{adapter_dir}: layer {layer} does not exist in the base model "
                                  f"{base.source.name} ({base.n_layer} layers)")
        n_in, n_out = base.shapes[stem]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
            raise ConversionError(f"{adapter_dir}: layer {layer} {hf_mod}: A {a.shape} and B {b.shape} do not "
                                  f"fit the base weight (in={n_in}, out={n_out}) of {base.source.name}")
        r = a.shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), full[(layer, hf_mod)], alpha_default))
        if not (math.isfinite(alpha) and alpha != 0):
            raise ConversionError(f"{cfg_path}: lora_alpha (or its alpha_pattern) for {full[(layer, hf_mod)]} is "
                                  f"{alpha:g}: the update c B A would be {'zero' if alpha == 0 else 'not finite'}")
        scales[stem] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if base.arch in ROPE_PERMUTED_ARCHS and hf_mod == "self_attn.q_proj":
            b = rope_permute(b, base.n_head)
        elif base.arch in ROPE_PERMUTED_ARCHS and hf_mod == "self_attn.k_proj":
            b = rope_permute(b, base.n_head_kv)
        pairs[stem] = (a, b)
    # one alpha per file: the config's own (rsLoRA-adjusted) if some module uses it, else the commonest
    effective = [scales[stem] * a.shape[0] for stem, (a, _) in pairs.items()]
    wanted = [alpha_default * math.sqrt(a.shape[0]) if use_rslora else alpha_default for a, _ in pairs.values()]
    matching = [e for e, w in zip(effective, wanted) if math.isclose(e, w, rel_tol=1e-9)]
    alpha_out = matching[0] if matching else max(set(effective), key=effective.count)
    for stem, (a, b) in pairs.items():
        ratio = scales[stem] * a.shape[0] / alpha_out  # 1 unless rsLoRA ranks or alpha_pattern differ
        if not math.isclose(ratio, 1.0, rel_tol=1e-9):
            pairs[stem] = (a, b * np.float32(ratio))
    return pairs, alpha_out


def convert_lora(adapter_dir: str | Path, base: str | Path, out: str | Path, outtype: str = "f32",
                 name: str | None = None) -> Path:
    """Convert a PEFT LoRA dir, or an mlx-lm one (via convert_mlx), to a GGUF adapter for `base`
    (a GGUF file or an HF model dir)."""
    from logo_edge.convert.mlx import convert_mlx, is_mlx_adapter  # mlx.py builds on this module

    if is_mlx_adapter(adapter_dir):
        return convert_mlx(adapter_dir, base, out, outtype, name)
    spec = BaseSpec.load(base)
    pairs, alpha = peft_to_pairs(adapter_dir, spec)
    if outtype == "f16":  # written as float16: a value beyond its range would become infinite
        big = max(float(np.abs(x).max(initial=0.0)) for ab in pairs.values() for x in ab)
        if big > np.finfo(np.float16).max:
            raise ConversionError(f"{adapter_dir}: values up to {big:.4g} (after folding the scales) exceed float16's "
                                  "range; convert with outtype f32")
    name = name or Path(adapter_dir).resolve().name
    return write_lora(out, spec.arch, alpha, pairs, outtype, name=name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter_dir", help="PEFT LoRA dir, or mlx-lm LoRA dir (adapters.safetensors)")
    ap.add_argument("--base", required=True, help="base model GGUF, or HF model dir with config.json")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--outtype", default="f32", choices=["f32", "f16", "q8_0"])
    ap.add_argument("--name", help="adapter name stored in the file (default: the dir name)")
    args = ap.parse_args(argv)
    try:
        path = convert_lora(args.adapter_dir, args.base, args.out, args.outtype, args.name)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
