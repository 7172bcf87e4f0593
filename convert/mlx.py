"""mlx-lm LoRA (`mlx_lm.lora` output: adapter_config.json + adapters.safetensors) -> GGUF LoRA, with numpy only.

    logo-edge convert-lora ADAPTER_DIR --base BASE.gguf|HF_DIR -o out.gguf   (PEFT and mlx-lm dirs alike)

mlx-lm's LoRALinear (mlx_lm/tuner/lora.py) adds scale * (x @ lora_a) @ lora_b with lora_a (d_in, r) and
lora_b (r, d_out): its update is dW = scale * lora_b.T @ lora_a.T. llama.cpp adds (alpha / r) * B A x, so
A = lora_a.T, B = lora_b.T and alpha = scale * r reproduce it; `scale` is used as is (the `alpha` that
older configs carry beside it is read by no mlx-lm layer). The adapted blocks are the last `num_layers`
(`lora_layers` before mlx-lm 0.19; <= 0 means all), as linear_to_lora_layers (mlx_lm/tuner/utils.py)
chooses them. Llama-architecture q/k B rows get the RoPE row permutation, as for PEFT.

What a GGUF LoRA cannot carry is refused with an error naming the file and the value: DoRA (a magnitude
`.m` per module), full fine-tuning, MoE expert (switch) layers, embeddings and lm_head, and modules the
base family has no GGUF counterpart for.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from logo_edge.convert.lora import ARCH_MODULES, ROPE_PERMUTED_ARCHS, BaseSpec, read_safetensors, rope_permute
from logo_edge.errors import ConversionError
from logo_edge.gguf_files import write_lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
# model.layers.N.<module>.<leaf>; gemma3's multimodal wrapper nests the text model under language_model
_KEY = re.compile(r"^(?:language_model\.)?model\.layers\.(\d+)\.(.+)\.([^.]+)$")
# what a key names when it is not a LoRA on a supported module -> why a GGUF LoRA cannot hold it
_REFUSED = {
    "switch_mlp": "an MoE expert (SwitchLinear) layer: its LoRA is per expert (3-D), llama.cpp's is not",
    "experts": "an MoE expert layer: its LoRA is per expert, llama.cpp's is not",
    "embed_tokens": "the token embeddings, which logo-edge does not adapt",
    "lm_head": "lm_head, which logo-edge does not adapt",
}


def is_mlx_adapter(path: str | Path) -> bool:
    """True for an mlx-lm adapter dir: adapter_config.json with mlx-lm's `lora_parameters` or
    `fine_tune_type` (PEFT configs have neither), or adapters.safetensors without PEFT's weights file."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / WEIGHTS_FILE).exists() and not (path / "adapter_model.safetensors").exists():
        return True
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and ("lora_parameters" in cfg or "fine_tune_type" in cfg)


@dataclass(frozen=True)
class MlxLoraConfig:
    """The parts of an mlx-lm adapter_config.json that decide the update."""

    path: Path
    scale: float
    rank: int | None  # lora_parameters.rank; the tensors' own ranks are what count
    num_layers: int  # the last num_layers blocks are adapted; <= 0: all
    keys: frozenset[str] | None  # lora_parameters.keys (None: mlx-lm's default, every linear in a block)

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale) or self.scale == 0:
            # llama.cpp reads alpha = 0 as "no alpha" (scale 1), so a zero scale cannot be written either
            raise ConversionError(f"{self.path}: lora_parameters.scale is {self.scale}; it must be a finite, "
                                  "non-zero number")
        if self.rank is not None and self.rank < 1:
            raise ConversionError(f"{self.path}: lora_parameters.rank is {self.rank}; it must be >= 1")

    @classmethod
    def read(cls, adapter_dir: Path) -> "MlxLoraConfig":
        path = adapter_dir / CONFIG_FILE
        if not path.exists():
            raise ConversionError(f"{path}: not found; an mlx-lm adapter dir holds {CONFIG_FILE} and {WEIGHTS_FILE}")
        try:
            cfg = json.loads(path.read_text())
        except ValueError as e:
            raise ConversionError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(cfg, dict):
            raise ConversionError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
        _check_fine_tune_type(path, cfg)
        lp = cfg.get("lora_parameters")
        if not isinstance(lp, dict) or not _is_number(lp.get("scale")):
            raise ConversionError(f"{path}: lora_parameters {lp!r} has no numeric scale; mlx-lm's LoRA "
                                  "needs lora_parameters.scale (and rank)")
        rank, keys = lp.get("rank"), lp.get("keys")
        if rank is not None and not _is_int(rank):
            raise ConversionError(f"{path}: lora_parameters.rank is {rank!r}; it must be an integer")
        if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
            raise ConversionError(f"{path}: lora_parameters.keys is {keys!r}; it must be a list of module names")
        num_layers = cfg.get("num_layers", cfg.get("lora_layers"))  # lora_layers: configs before mlx-lm 0.19
        if not _is_int(num_layers):
            raise ConversionError(f"{path}: num_layers is {num_layers!r}; it must be an integer (the number "
                                  "of last blocks adapted, -1 for all)")
        return cls(path, float(lp["scale"]), rank, num_layers, None if keys is None else frozenset(keys))

    def window(self, n_layer: int) -> range:
        """The blocks mlx-lm adapts: model.layers[-max(num_layers, 0):]."""
        if self.num_layers > n_layer:
            raise ConversionError(f"{self.path}: num_layers={self.num_layers} but the base model has only "
                                  f"{n_layer} blocks; the adapter was made for another model")
        return range(n_layer - self.num_layers if self.num_layers > 0 else 0, n_layer)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_fine_tune_type(path: Path, cfg: dict) -> None:
    kind = cfg.get("fine_tune_type", "dora" if cfg.get("use_dora") else "lora")  # use_dora: before 0.19
    if kind == "dora":
        raise ConversionError(f"{path}: fine_tune_type is 'dora' (use_dora): DoRA rescales each weight row by a "
                              "learned magnitude (.m), which a GGUF LoRA cannot express; retrain with "
                              "--fine-tune-type lora")
    if kind == "full":
        raise ConversionError(f"{path}: fine_tune_type is 'full': {WEIGHTS_FILE} holds full weights, not a "
                              "low-rank update; fuse them into the base model instead")
    if kind != "lora":
        raise ConversionError(f"{path}: fine_tune_type {kind!r} is not one of mlx-lm's lora, dora, full")


def _refusal(adapter_dir: Path, key: str, base: BaseSpec) -> ConversionError:
    """The error for a tensor that is not a LoRA half on a module of the base family."""
    modules = ARCH_MODULES[base.arch]
    why = next((w for part, w in _REFUSED.items() if part in key), None)
    m = _KEY.match(key)
    if why is None and m is not None and m.group(3) == "m":
        why = "a DoRA magnitude (.m), which a GGUF LoRA cannot express; retrain with --fine-tune-type lora"
    elif why is None and m is not None and m.group(3) not in ("lora_a", "lora_b"):
        why = f"a full weight ({m.group(3)}) as full fine-tuning saves, not a LoRA half"
    elif why is None and m is not None:
        why = (f"a LoRA on module {m.group(2)!r}, which the {base.arch} family lacks (its LoRA modules: "
               f"{', '.join(modules)}); the adapter was made for another architecture")
    why = why or "not a LoRA tensor on a decoder block (model.layers.N.<module>.lora_a / lora_b)"
    return ConversionError(f"{adapter_dir / WEIGHTS_FILE}: tensor {key!r} is {why}")


def _halves(adapter_dir: Path, tensors: dict[str, np.ndarray], base: BaseSpec,
            cfg: MlxLoraConfig) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    """(layer, HF module) -> {"lora_a": ..., "lora_b": ...}, every key checked against the family."""
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(3) not in ("lora_a", "lora_b") or m.group(2) not in ARCH_MODULES[base.arch]:
            raise _refusal(adapter_dir, key, base)
        layer, module = int(m.group(1)), m.group(2)
        if cfg.keys is not None and module not in cfg.keys:
            raise ConversionError(f"{adapter_dir / WEIGHTS_FILE}: tensor {key!r} adapts {module!r}, which "
                                  f"lora_parameters.keys {sorted(cfg.keys)} of {cfg.path.name} does not list")
        halves.setdefault((layer, module), {})[m.group(3)] = arr
    if not halves:
        raise ConversionError(f"{adapter_dir / WEIGHTS_FILE}: the adapter has no LoRA tensors")
    return halves


def _check_layers(adapter_dir: Path, layers: set[int], base: BaseSpec, cfg: MlxLoraConfig) -> None:
    """The adapted blocks exist in the base and are exactly the last num_layers."""
    if (too_deep := sorted(x for x in layers if x >= base.n_layer)):
        raise ConversionError(f"{adapter_dir / WEIGHTS_FILE}: layer {too_deep[0]} does not exist in the base "
                              f"model {base.source.name} ({base.n_layer} layers); the adapter was made for "
                              "another model")
    window = cfg.window(base.n_layer)
    outside, missing = sorted(layers - set(window)), sorted(set(window) - layers)
    if outside or missing:
        what = (f"layer {outside[0]} is adapted" if outside else
                f"layers {missing} have no LoRA tensors (a truncated or edited {WEIGHTS_FILE}?)")
        raise ConversionError(f"{adapter_dir}: num_layers={cfg.num_layers} in {CONFIG_FILE} means blocks "
                              f"{window.start}..{window.stop - 1} of {base.n_layer} are adapted, but {what}")


def _pair(adapter_dir: Path, layer: int, module: str, ab: dict[str, np.ndarray],
          base: BaseSpec) -> tuple[np.ndarray, np.ndarray]:
    """(A (r, d_in), B (d_out, r)) for llama.cpp from mlx-lm's lora_a (d_in, r) and lora_b (r, d_out)."""
    where = f"{adapter_dir / WEIGHTS_FILE}: layer {layer} {module}"
    if set(ab) != {"lora_a", "lora_b"}:
        raise ConversionError(f"{where} has only {''.join(ab)}; both lora_a and lora_b are needed")
    a, b = ab["lora_a"], ab["lora_b"]
    if a.ndim != 2 or b.ndim != 2:
        raise ConversionError(f"{where}: lora_a {a.shape} and lora_b {b.shape} are not matrices (an MoE "
                              "switch layer?); a GGUF LoRA holds one (d_in, r) and one (r, d_out) per module")
    if a.shape[1] != b.shape[0]:
        raise ConversionError(f"{where}: rank mismatch: lora_a {a.shape} has rank {a.shape[1]}, lora_b "
                              f"{b.shape} has rank {b.shape[0]}")
    n_in, n_out = base.shapes[f"blk.{layer}.{ARCH_MODULES[base.arch][module]}.weight"]
    if a.shape[0] != n_in or b.shape[1] != n_out:
        raise ConversionError(f"{where}: lora_a {a.shape} and lora_b {b.shape} do not fit the base weight "
                              f"(in={n_in}, out={n_out}) of {base.source.name}; the adapter was made for "
                              "another model size")
    for name, arr in (("lora_a", a), ("lora_b", b)):
        if not np.isfinite(arr).all():
            raise ConversionError(f"{where}: {name} holds {int((~np.isfinite(arr)).sum())} non-finite values "
                                  "(NaN or inf); the training diverged")
    a, b = a.T, b.T  # (r, d_in), (d_out, r)
    if base.arch in ROPE_PERMUTED_ARCHS and module in ("self_attn.q_proj", "self_attn.k_proj"):
        b = rope_permute(b, base.n_head if module == "self_attn.q_proj" else base.n_head_kv)
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def mlx_to_pairs(adapter_dir: str | Path, base: BaseSpec) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """Read an mlx-lm adapter dir and return (GGUF stem -> (A, B), alpha to write).

    alpha = scale * r makes llama.cpp's c = alpha / r equal to scale; a tensor whose rank differs from
    the one alpha was written for gets its B multiplied by the ratio, so every c B A = scale lora_b.T lora_a.T."""
    adapter_dir = Path(adapter_dir)
    cfg = MlxLoraConfig.read(adapter_dir)
    halves = _halves(adapter_dir, read_safetensors(adapter_dir / WEIGHTS_FILE), base, cfg)
    _check_layers(adapter_dir, {layer for layer, _ in halves}, base, cfg)
    pairs = {f"blk.{layer}.{ARCH_MODULES[base.arch][module]}.weight": _pair(adapter_dir, layer, module, ab, base)
             for (layer, module), ab in sorted(halves.items())}
    ranks = Counter(a.shape[0] for a, _ in pairs.values())
    r_ref = cfg.rank if cfg.rank in ranks else ranks.most_common(1)[0][0]
    for stem, (a, b) in pairs.items():
        if a.shape[0] != r_ref:  # c = scale * r_ref / r here: B * r / r_ref restores scale
            pairs[stem] = (a, b * np.float32(a.shape[0] / r_ref))
    return pairs, cfg.scale * r_ref


def convert_mlx(adapter_dir: str | Path, base: str | Path, out: str | Path, outtype: str = "f32",
                name: str | None = None) -> Path:
    """Convert an mlx-lm LoRA dir to a GGUF adapter for `base` (a GGUF file or an HF model dir).

    The file records its source as logo_edge.origin = "mlx:<adapter dir>"."""
    spec = BaseSpec.load(base)
    pairs, alpha = mlx_to_pairs(adapter_dir, spec)
    src = Path(adapter_dir).resolve()
    return write_lora(out, spec.arch, alpha, pairs, outtype, name=name or src.name,
                      extra={"logo_edge.origin": f"mlx:{src}"})
