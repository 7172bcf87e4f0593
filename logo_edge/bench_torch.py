"""LoGo in PyTorch/PEFT, done the paper's way: row 5 of `logo-edge bench`.

Every adapter of the pool is attached to one PeftModel. Per request: one forward of the base model
(adapters disabled) with output_hidden_states; h = hidden_states[L-1][0, -1], the residual entering the
last block (what the authors' code reads); o_i = c_i B_i A_i h from every adapter's q_proj in the last
block; s_i = ||o_i||; top-k; w_i = s_i / sum s. Then the selected adapters are made active with their
scalings multiplied by w_i, the prompt is prefilled again and greedy decoding follows on the KV cache.

The GGUF adapters are turned back into PEFT adapters (q/k B rows un-permuted from llama.cpp's RoPE
order), and the base is SmolLM2 dequantized from the shipped GGUF: the same weights llama.cpp runs.

    python -m logo_edge.bench_torch --worker SPEC.json      (run by `logo-edge bench`)
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from . import defaults

HF_MODULES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert.lora.rope_permute: llama.cpp's interleaved q/k rows back to HF's halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_peft(path: str | Path, info, out_dir: Path) -> tuple[str, Path]:
    """Write a GGUF LoRA as a PEFT adapter dir; returns (adapter name, dir).

    llama.cpp scales every tensor by alpha / r with the file's alpha (1 without one), which PEFT
    reproduces with lora_alpha = alpha and rank_pattern for ranks that differ from the commonest.
    """
    from safetensors.numpy import save_file

    from .gguf_files import read_lora

    lora = read_lora(path, info)
    tensors, ranks = {}, {}
    for stem, (a, b) in lora.pairs.items():
        _, layer, mod, _ = stem.split(".")
        if mod == "attn_q":
            b = rope_unpermute(b, info.n_head)
        elif mod == "attn_k":
            b = rope_unpermute(b, info.n_head_kv)
        module = f"model.layers.{layer}.{HF_MODULES[mod]}"
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
        ranks[module] = a.shape[0]
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = lora.alpha if lora.alpha else r  # no alpha: c = 1 for every tensor
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
           "bias": "none", "target_modules": sorted(ranks), "use_rslora": False, "fan_in_fan_out": False,
           "rank_pattern": {m: k for m, k in ranks.items() if k != r},
           "alpha_pattern": {} if lora.alpha else {m: k for m, k in ranks.items() if k != r}}
    name = lora.name.replace(".", "_")  # PEFT adapter names are module keys
    d = out_dir / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return name, d


def base_hf_dir() -> Path:
    """The HF copy of the default model that models/train_pool.py trains on (made once, ~30 s)."""
    path = defaults.REPO_ROOT / "models" / "train_pool.py"
    spec = importlib.util.spec_from_file_location("logo_edge_train_pool", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.base_hf_dir()


class LoGoTorch:
    """The paper's implementation on a PeftModel holding every adapter of the pool."""

    def __init__(self, peft_model, names: list[str], k: int):
        from peft.tuners.lora import LoraLayer

        self.peft = peft_model
        self.hf = peft_model.base_model.model  # LoRA layers are injected in place
        self.names = names
        self.k = k
        self.n_layer = self.hf.config.num_hidden_layers
        self.q_last = self.hf.model.layers[self.n_layer - 1].self_attn.q_proj
        self._scaling = [(m, dict(m.scaling)) for m in self.hf.modules() if isinstance(m, LoraLayer)]
        self._c = dict(self.q_last.scaling)  # c_i, before any mixture multiplies it by w_i
        eos = self.hf.generation_config.eos_token_id
        self.eos = (set(eos if isinstance(eos, list) else [eos]) | {self.hf.config.eos_token_id}) - {None}

    def route(self, ids) -> tuple[list[str], list[float]]:
        """Probe the base model, score every adapter by ||o_i||, keep the top k, weight by s_i / sum."""
        import torch

        with self.peft.disable_adapter():
            out = self.hf(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        h = out.hidden_states[self.n_layer - 1][0, -1]  # residual entering the last block, (d,)
        scores = []
        for name in self.names:  # adapters without q_proj in the last block cannot be probed
            if name in self.q_last.lora_A:
                a, b = self.q_last.lora_A[name], self.q_last.lora_B[name]
                o = b(a(h)) * self._c[name]  # (d_out,)
                scores.append((name, float(torch.linalg.vector_norm(o))))
        top = sorted(scores, key=lambda x: -x[1])[: self.k]  # stable: ties keep the pool order
        total = sum(s for _, s in top)
        return [n for n, _ in top], [s / total if total > 0 else 1.0 / len(top) for _, s in top]

    def activate(self, names: list[str], weights: list[float]) -> None:
        """Make `names` the active adapters with scalings c_i * w_i (the mixture)."""
        self.peft.base_model.set_adapter(names)
        w = dict(zip(names, weights))
        for module, orig in self._scaling:
            for n in names:
                if n in orig:
                    module.scaling[n] = orig[n] * w[n]

    def request(self, tokens: list[int], max_tokens: int) -> dict:
        """Route and greedily generate; timed as the other rows: TTFT, decode tok/s after it, total."""
        import torch

        t0 = time.perf_counter()
        with torch.inference_mode():
            ids = torch.tensor([tokens])
            names, weights = self.route(ids)
            self.activate(names, weights)
            out = self.hf(input_ids=ids, use_cache=True, logits_to_keep=1)  # prefill under the mixture
            tok, gen, first = int(out.logits[0, -1].argmax()), [], None
            while tok not in self.eos and len(gen) < max_tokens:
                gen.append(tok)
                first = first or time.perf_counter()
                if len(gen) == max_tokens:
                    break
                out = self.hf(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
                tok = int(out.logits[0, -1].argmax())
        end = time.perf_counter()
        first = first or end
        n = len(gen)
        return {"ttft": first - t0, "tok_s": (n - 1) / (end - first) if n > 1 else 0.0, "total": end - t0,
                "n_tok": n, "names": names, "weights": weights, "tokens": gen}


def build_reference(hf_dir: Path, model_gguf: str | Path, adapters: list, k: int, work: Path) -> LoGoTorch:
    """The HF base with every GGUF adapter converted to PEFT and attached to one PeftModel."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .gguf_files import BaseInfo

    info = BaseInfo.read(model_gguf)
    dirs = [gguf_to_peft(p, info, work) for p in adapters]
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, dirs[0][1], adapter_name=dirs[0][0])
    for name, d in dirs[1:]:
        model.load_adapter(d, adapter_name=name)
    return LoGoTorch(model.eval(), [n for n, _ in dirs], k)


def load(spec: dict, work: Path) -> tuple[LoGoTorch, float]:
    """The reference for a bench spec (default model, the spec's pool); returns it and its load time."""
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_dir = base_hf_dir()
    t0 = time.perf_counter()
    ref = build_reference(hf_dir, spec["model"], spec["adapters"], spec["k"], work)
    return ref, time.perf_counter() - t0


def run(spec: dict) -> dict:
    """Every case of the spec on its prompt tokens (repeat 0 warms up), and the top-k comparison."""
    from .bench import peak_rss_mb

    with tempfile.TemporaryDirectory(prefix="logo-edge-peft-") as tmp:
        ref, load_s = load(spec, Path(tmp))
        cases, same, n_prompts, wdiff = [], 0, 0, 0.0
        for case in spec["cases"]:
            samples = []
            for rep, (tokens, (names, weights)) in enumerate(zip(case["prompts"], case["expected"])):
                r = ref.request(tokens, case["g"])
                n_prompts += 1
                if r["names"] == [n.replace(".", "_") for n in names]:
                    same += 1
                    wdiff = max(wdiff, max(abs(a - b) for a, b in zip(r["weights"], weights)))
                if rep:
                    samples.append({k: r[k] for k in ("ttft", "tok_s", "total", "n_tok")})
            print(f"[bench_torch] case {case['p']}p/{case['g']}g done", file=sys.stderr, flush=True)
            cases.append({"samples": samples})
    return {"cases": cases, "load_s": load_s, "n_adapters": len(ref.names), "same_topk": same,
            "n_prompts": n_prompts, "max_weight_diff": wdiff, "peak_mb": peak_rss_mb()}


def main(argv: list[str]) -> int:
    """`python -m logo_edge.bench_torch --worker SPEC.json`: prints one JSON line (or why it skipped)."""
    spec = json.loads(Path(argv[argv.index("--worker") + 1]).read_text())
    missing = [m for m in ("torch", "transformers", "peft", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        print(json.dumps({"skipped": f"skipped: {', '.join(missing)} not installed (pip install -e '.[dev]')"}))
        return 0
    print(json.dumps(run(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
