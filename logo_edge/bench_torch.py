"""LoGo in PyTorch/PEFT, an independent check of logo-edge: rows 5 and 5b of `logo-edge bench`.

The bench makes its own pool with PEFT (`make_peft_pool`: LoraConfig on the HF SmolLM2, seeded random A and
B, save_pretrained). The PyTorch rows load those directories with PeftModel.from_pretrained / load_adapter;
logo-edge reads them converted by its own converter (convert/lora.py). Nothing on the PyTorch side reads a
GGUF adapter, so where both pick the same adapters with the same weights, the converter, the probe, the
calibration and the router agree with an implementation that shares none of their code. logo-edge routes
twice: on the model the other rows run (Q4_1, 8-bit activations: its states are a few % from torch's f32 ones,
so near-ties may swap), and on an f32 GGUF of the very weights torch runs (`twin_path`), where anything but
the same top-k with the same weights is a defect (`report` prints PASS or FAIL).

Both routings are computed in torch from the PEFT modules themselves: states from forward pre-hooks on the
base model (adapters disabled), o_ij = c_ij B_ij A_ij h_j from each adapter's q_proj LoraLayer.
  paper      (row 5)   h = the residual entering the last block; s_i = ||o_i||; top-k; w_i = s_i / sum s
  logo-edge  (row 5b)  RouteConfig's defaults: s_i = sqrt(sum_j ||o_ij||^2) over the probe window (the last
                       PROBE_BLOCKS blocks); z_i = (s_i - mean_i) / sd_i over the calibration prompts;
                       top-k by z; w = softmax(z) over the selected
Then the selected adapters are made active with scalings c * w_i, the prompt is prefilled again and exactly
g tokens are decoded greedily (end-of-generation masked, as ignore_eos does for the other rows).

The shipped pool's PEFT training output is not in the repository (models/train_pool.py makes it): its check
turns the GGUFs back into PEFT with our own `gguf_to_peft`, so it is labelled as not independent.

    python -m logo_edge.bench_torch --worker SPEC.json      (run by `logo-edge bench`)
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import tempfile
import time
import warnings
import weakref
from collections import Counter
from pathlib import Path

import numpy as np

from . import defaults

HF_MODULES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
# The bench's own pool: the shipped pool's recipe (models/pool/manifest.json), so rows 3 and 5 do the same work
PEFT_POOL = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
PEFT_POOL_SIZE = 10
MODES = ("paper", "logo-edge")  # row 5, row 5b
TWIN_TOLERANCE = 0.01  # weights, torch against logo-edge on the f32 GGUF of the same weights (measured: 4e-4)
# probe input -> the module whose input it is, inside a decoder layer
PROBE_POINTS = {"residual": "input_layernorm", "normed": "self_attn.q_proj"}
ATTN_INPUT = ("q_proj", "k_proj", "v_proj")  # the projections reading the attention norm's output (the probe's)

# One routing of one prompt: "names" (selected, best first), "weights" (theirs), "signals" and "scores" (raw and
# calibrated, of every scored adapter by name)
Choice = dict


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
    name = peft_name(lora.name)
    d = out_dir / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return name, d


def peft_name(name: str) -> str:
    return name.replace(".", "_")  # PEFT adapter names are module keys


def base_hf_dir() -> Path:
    """The HF copy of the default model that models/train_pool.py trains on (made once, ~30 s)."""
    path = defaults.REPO_ROOT / "models" / "train_pool.py"
    spec = importlib.util.spec_from_file_location("logo_edge_train_pool", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.base_hf_dir()


def make_peft_pool(hf_dir: Path, out: Path, n: int = PEFT_POOL_SIZE, seed: int = 0) -> list[Path]:
    """n PEFT LoRA dirs (out/peft00, ...) on the model in hf_dir, with the shipped pool's recipe (PEFT_POOL).

    Every lora_ weight of adapter i is drawn N(0, s_i^2), s_i in [0.01, 0.04] (from `seed` and i): update sizes
    differ, as in trained pools, which is what calibration corrects."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM", **PEFT_POOL)
    names = [f"peft{i:02d}" for i in range(n)]
    model = get_peft_model(base, cfg, adapter_name=names[0])
    scales = np.random.default_rng(seed).uniform(0.01, 0.04, n)
    with torch.no_grad():
        for i, name in enumerate(names):
            if i:
                model.add_adapter(name, cfg)
            g = torch.Generator().manual_seed(seed * 1000 + i)
            for pname, p in model.named_parameters():
                if ".lora_" in pname and pname.endswith(f".{name}.weight"):
                    p.copy_(torch.randn(p.shape, generator=g) * float(scales[i]))
            model.save_pretrained(out, selected_adapters=[name])  # out/<name>: any name but "default"
    return [out / name for name in names]


class LoGoTorch:
    """LoGo on a PeftModel holding every adapter of a pool, each routing computed from the PEFT modules.

    `routings`: mode -> {"signal", "calibration", "probe_input", "blocks", "shortlist"} as logo-edge's
    RouteConfig and pool window set them (`routing_settings`); norm signal, raw/ratio/zscore calibration."""

    def __init__(self, peft_model, names: list[str], k: int, routings: dict[str, dict]):
        from peft.tuners.lora import LoraLayer

        self.peft = peft_model
        self.hf = peft_model.base_model.model  # LoRA layers are injected in place
        self.names, self.k, self.routings = names, k, routings
        self.layers = self.hf.model.layers
        for mode, r in routings.items():
            if r["signal"] != "norm" or r["calibration"] not in ("raw", "ratio", "zscore") \
                    or r["probe_input"] not in PROBE_POINTS:
                raise ValueError(f"{mode}: the PyTorch reference routes by the norm signal (raw, ratio or zscore), "
                                 f"reading a residual or normed input, not {r}")
            if r["modules"] not in ("target", "input", "target-first") or not 0 <= r["sv_power"] <= 1:
                raise ValueError(f"{mode}: the PyTorch reference scores attention projections (modules 'target', "
                                 f"'input' or 'target-first') with sv_power in [0, 1], not {r}")
            if 0 < r["shortlist"] < len(names):  # logo-edge would route in two stages: compare nothing else
                raise ValueError(f"{mode}: {len(names)} adapters exceed logo-edge's shortlist ({r['shortlist']}); "
                                 "the PyTorch reference scores every adapter's whole window")
        # each adapter's own scalings, before a mixture multiplies them by w_i
        self._scaling = [(m, {n: m.scaling[n] for n in names if n in m.scaling}) for m in self.hf.modules()
                         if isinstance(m, LoraLayer)]
        self._c = {(b, m): dict(getattr(self.layers[b].self_attn, m).scaling) for b in range(len(self.layers))
                   for m in ATTN_INPUT}
        self.stats: dict[str, tuple[dict[str, float], dict[str, float]]] = {}  # mode -> (mean, sd) per adapter
        eos = self.hf.generation_config.eos_token_id
        self.eos = sorted((set(eos if isinstance(eos, list) else [eos]) | {self.hf.config.eos_token_id}) - {None})
        self._points = sorted({(r["probe_input"], b) for r in routings.values() for b in r["blocks"]})
        self._armed, self._got = False, {}
        for inp, b in self._points:
            module = self.layers[b].get_submodule(PROBE_POINTS[inp])
            module.register_forward_pre_hook(self._hook(inp, b))

    def _hook(self, inp: str, b: int):
        def grab(_module, args):
            if self._armed:
                self._got[(inp, b)] = args[0][0, -1].detach().double()  # the last token's input, (d_in,)
        return grab

    def probe(self, ids) -> dict[tuple[str, int], object]:
        """The base model's (adapters disabled) inputs at every probe point for the last token of ids."""
        self._got, self._armed = {}, True
        try:
            with self.peft.disable_adapter():
                self.hf(input_ids=ids, use_cache=False, logits_to_keep=1)
        finally:
            self._armed = False
        return self._got

    def scored(self, mode: str) -> dict[str, list[str]]:
        """Per adapter with a LoRA the routing scores at its target (last) block, in pool order: the attention
        projections it is scored over (the routing's `modules`: q alone; q, k and v; or q where it has one,
        else k and v)."""
        r = self.routings[mode]
        attn = self.layers[r["blocks"][-1]].self_attn
        out = {}
        for n in self.names:
            have = [m for m in ATTN_INPUT if n in getattr(attn, m).lora_A]
            use = {"target": [m for m in have if m == "q_proj"], "input": have,
                   "target-first": ["q_proj"] if "q_proj" in have else have}[r["modules"]]
            if use:
                out[n] = use
        return out

    def probeable(self, mode: str) -> list[str]:
        return list(self.scored(mode))

    def signals(self, states: dict, mode: str) -> dict[str, float]:
        """s_i = sqrt(sum over the window of ||S_j^p V_j^T h_j||^2), where U_j S_j V_j^T is the SVD of the adapter's
        updates c B A at block j on the modules it is scored over, stacked (torch's own SVD of the dense product,
        from its PEFT weights); p = 1 (the paper's) is ||c B A h_j||."""
        import torch

        r = self.routings[mode]
        p = r["sv_power"]
        out = {}
        for name, modules in self.scored(mode).items():
            sq = 0.0
            for b in r["blocks"]:
                h = states[(r["probe_input"], b)]
                parts = []
                for m in modules:
                    lin = getattr(self.layers[b].self_attn, m)
                    if name in lin.lora_A:
                        a, bw = lin.lora_A[name].weight.detach().double(), lin.lora_B[name].weight.detach().double()
                        parts.append(self._c[(b, m)][name] * (bw @ a))  # the dense update (d_out, d_in)
                if not parts:
                    continue
                w = torch.cat(parts)
                if p == 1.0:
                    o = w @ h
                else:
                    _, sv, vh = torch.linalg.svd(w, full_matrices=False)
                    keep = sv > sv.max() * 1e-6
                    o = sv[keep] ** p * (vh[keep] @ h)
                sq += float(torch.dot(o, o))
            out[name] = math.sqrt(sq)
        return out

    def calibrate(self, states: list[dict]) -> None:
        """Each adapter's signal mean and (population) sd over the calibration prompts' states, per mode."""
        for mode, r in self.routings.items():
            if r["calibration"] != "raw":
                per = [self.signals(s, mode) for s in states]
                self.stats[mode] = ({n: float(np.mean([p[n] for p in per])) for n in per[0]},
                                    {n: float(np.std([p[n] for p in per])) for n in per[0]})

    def choose(self, states: dict, mode: str) -> Choice:
        """Calibrate the signals, keep the top k (ties: pool order), weight them."""
        cal = self.routings[mode]["calibration"]
        s = self.signals(states, mode)
        mean, sd = self.stats.get(mode, ({}, {}))
        score = {n: v if cal == "raw" else v / mean[n] if cal == "ratio" else (v - mean[n]) / sd[n]
                 for n, v in s.items()}
        top = sorted(score, key=lambda n: -score[n])[: self.k]  # stable: ties keep the pool order
        z = [score[n] for n in top]
        if cal == "zscore":  # z can be negative: a softmax over the selected
            e = [math.exp(x - max(z)) for x in z]
            weights = [x / sum(e) for x in e]
        else:
            weights = [x / sum(z) if sum(z) > 0 else 1.0 / len(z) for x in z]
        return {"names": top, "weights": weights, "signals": s, "scores": score}

    def route(self, ids, mode: str) -> Choice:
        return self.choose(self.probe(ids), mode)

    def activate(self, names: list[str], weights: list[float]) -> None:
        """Make `names` the active adapters with scalings c_i * w_i (the mixture)."""
        self.peft.base_model.set_adapter(names)
        w = dict(zip(names, weights))
        for module, orig in self._scaling:
            for n in names:
                if n in orig:
                    module.scaling[n] = orig[n] * w[n]

    def request(self, tokens: list[int], max_tokens: int, mode: str) -> dict:
        """Route and greedily generate exactly max_tokens (end-of-generation masked); timed as the other rows:
        TTFT, decode tok/s after it, total."""
        import torch

        t0 = time.perf_counter()
        with torch.inference_mode():
            ids = torch.tensor([tokens])
            choice = self.route(ids, mode)
            self.activate(choice["names"], choice["weights"])
            out = self.hf(input_ids=ids, use_cache=True, logits_to_keep=1)  # prefill under the mixture
            gen, first = [], None
            while True:
                logits = out.logits[0, -1]
                logits[self.eos] = -math.inf
                gen.append(int(logits.argmax()))
                first = first or time.perf_counter()
                if len(gen) == max_tokens:
                    break
                out = self.hf(input_ids=torch.tensor([gen[-1:]]), past_key_values=out.past_key_values, use_cache=True)
        end = time.perf_counter()
        n = len(gen)
        return {"ttft": first - t0, "tok_s": (n - 1) / (end - first) if n > 1 else 0.0, "total": end - t0,
                "n_tok": n, "choice": choice, "tokens": gen}


def build_reference(hf_dir: Path, peft_dirs: list, k: int, routings: dict[str, dict]) -> LoGoTorch:
    """The HF base with every PEFT dir attached to one PeftModel (adapter name = dir name)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dirs = [Path(d) for d in peft_dirs]
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, dirs[0], adapter_name=dirs[0].name)
    for d in dirs[1:]:
        model.load_adapter(d, adapter_name=d.name)
    return LoGoTorch(model.eval(), [d.name for d in dirs], k, routings)


def attach(ref: LoGoTorch, peft_dirs: list, routings: dict[str, dict]) -> LoGoTorch:
    """Another pool on the same PeftModel: its own LoGoTorch view (routing among its adapters alone)."""
    dirs = [Path(d) for d in peft_dirs]
    clash = sorted(set(ref.peft.peft_config) & {d.name for d in dirs})
    if clash:
        raise ValueError(f"adapter names {clash} are already attached")
    for d in dirs:
        ref.peft.load_adapter(d, adapter_name=d.name)
    return LoGoTorch(ref.peft, [d.name for d in dirs], ref.k, routings)


# ---- the worker (torch side)


def _setup(threads: int) -> None:
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _hf_dir(spec: dict) -> Path:
    return Path(spec["hf_dir"]) if spec.get("hf_dir") else base_hf_dir()


def make_worker(spec: dict) -> dict:
    """The bench's PEFT pool; and with spec["twin"], the HF base as an f32 GGUF there (llama.cpp's converter; once)."""
    _setup(spec["threads"])
    t0 = time.perf_counter()
    hf_dir = _hf_dir(spec)
    dirs = make_peft_pool(hf_dir, Path(spec["out"]), spec["n"], spec.get("seed", 0))
    twin = Path(spec["twin"]) if spec.get("twin") else None
    if twin is not None and not twin.exists():
        from .convert.base import convert_base

        twin.parent.mkdir(parents=True, exist_ok=True)
        part = twin.with_name(twin.name + ".part")
        convert_base(hf_dir, part, "f32")
        part.replace(twin)
    return {"dirs": [str(d) for d in dirs], "make_s": time.perf_counter() - t0}


def run_worker(spec: dict) -> dict:
    """Rows 5 and 5b on the bench's PEFT pool: every case's prompts (repeat 0 warms up), both routings
    interleaved; then the rows' own pool (via gguf_to_peft) routed on the same prompts, untimed."""
    import torch

    from .bench import peak_rss_mb

    _setup(spec["threads"])
    hf_dir, routings = _hf_dir(spec), spec["routings"]
    t0 = time.perf_counter()
    ref = build_reference(hf_dir, spec["peft"], spec["k"], routings)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        cal_states = [ref.probe(torch.tensor([t])) for t in spec["calibration"]]
    ref.calibrate(cal_states)
    cal_s = time.perf_counter() - t0 - load_s
    cases, choices = [], {m: [] for m in MODES}
    for case in spec["cases"]:
        samples = {m: [] for m in MODES}
        for rep, tokens in enumerate(case["prompts"]):
            for mode in (MODES if rep % 2 == 0 else MODES[::-1]):  # alternate the order
                r = ref.request(tokens, case["g"], mode)
                choices[mode].append(r["choice"])
                if rep:
                    samples[mode].append({k: r[k] for k in ("ttft", "tok_s", "total", "n_tok")})
        print(f"[bench_torch] case {case['p']}p/{case['g']}g done", file=sys.stderr, flush=True)
        cases.append({"samples": samples})
    out = {"cases": cases, "choices": {"bench": choices}, "load_s": load_s, "calibrate_s": cal_s,
           "n_adapters": len(ref.names), "peak_mb": peak_rss_mb()}  # before the rows' pool is attached
    if spec.get("rows_pool"):
        from .gguf_files import BaseInfo

        info = BaseInfo.read(spec["model"])
        with tempfile.TemporaryDirectory(prefix="logo-edge-peft-") as tmp:
            view = attach(ref, [gguf_to_peft(p, info, Path(tmp))[1] for p in spec["rows_pool"]], routings)
        view.calibrate(cal_states)
        got = {m: [] for m in MODES}
        with torch.inference_mode():
            for case in spec["cases"]:
                for tokens in case["prompts"]:
                    states = view.probe(torch.tensor([tokens]))
                    for m in MODES:
                        got[m].append(view.choose(states, m))
        out["choices"]["rows"] = got
    return out


def main(argv: list[str]) -> int:
    """`python -m logo_edge.bench_torch --worker SPEC.json`: prints one JSON line (or why it skipped)."""
    spec = json.loads(Path(argv[argv.index("--worker") + 1]).read_text())
    missing = [m for m in ("torch", "transformers", "peft", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        print(json.dumps({"skipped": f"skipped: {', '.join(missing)} not installed (pip install -e '.[dev]')"}))
        return 0
    print(json.dumps({"make": make_worker, "run": run_worker}[spec["kind"]](spec)))
    return 0


# ---- the bench side (llama.cpp; no torch in this process)


def calibration_tokens(eng) -> list[list[int]]:
    """The calibration prompts as Engine.calibrate tokenizes them (the chat template's user turn)."""
    from .calibration import calibration_prompts

    fmt = (lambda p: eng.format_chat([{"role": "user", "content": p}])) if eng.model.info.chat_template \
        else (lambda p: p)
    return [eng.tokenize(fmt(p)) for p in calibration_prompts()]


def routing_settings(eng) -> dict[str, dict]:
    """Per mode, what the PyTorch reference must reproduce: the paper's, and the engine's own RouteConfig."""
    cfg, pool = eng.routing, eng.pool
    return {"paper": dict(signal="norm", calibration="raw", probe_input="residual", blocks=[pool.target_block],
                          shortlist=0, modules="target", sv_power=1.0),
            "logo-edge": dict(signal=cfg.signal, calibration=cfg.calibration, probe_input=cfg.probe_input,
                              blocks=list(pool.blocks), shortlist=cfg.shortlist, modules=pool.probe_modules,
                              sv_power=pool.sv_power)}


def engine_choices(eng, tokens: list[int], rec=None) -> dict[str, Choice]:
    """logo-edge's routing of a prompt by its own settings (`rec`: eng.route(tokens) when given), and the
    paper's (raw norm, last block alone)."""
    from .router import RouterConfig, route_signals

    rec, pool = rec or eng.route(tokens), eng.pool
    paper_pool = _paper_pool(eng)  # the paper's probe: q alone, its output norm (sv_power 1), the last block
    h = eng.probe(tokens, "residual", paper_pool.blocks, paper_pool.probe_reads)
    raw = route_signals(paper_pool.bank.norms(h), pool.names, RouterConfig("norm", eng.routing.k),
                        paper_pool.unprobeable)
    scored = [a for a in rec.adapters if a.score is not None]
    ours = {"names": [a.name for a in rec.selected], "weights": [a.weight for a in rec.selected],
            "signals": {a.name: a.signal for a in scored}, "scores": {a.name: a.score for a in scored}}
    ok = [i for i in range(len(pool.names)) if np.isfinite(raw.scores[i])]
    paper = {"names": [pool.names[i] for i in raw.selected], "weights": [float(raw.weights[i]) for i in raw.selected],
             "signals": {pool.names[i]: float(raw.signals[i]) for i in ok},
             "scores": {pool.names[i]: float(raw.scores[i]) for i in ok}}
    return {"logo-edge": ours, "paper": paper}


_PAPER_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> (its pool's key, paper pool)


def _paper_pool(eng):
    """The engine's adapters as the paper probes them (an AdapterPool of the last block's q alone, unweighed),
    built once per engine and pool."""
    from .pool import AdapterPool

    key = (tuple(str(a.path) for a in eng.pool.adapters), eng.pool.target_block, eng.pool.target_module)
    got = _PAPER_POOLS.get(eng)
    if got is None or got[0] != key:
        p = AdapterPool(eng.model, eng.pool.target_block, eng.pool.target_module, probe_blocks=1,
                        probe_modules="target")
        with warnings.catch_warnings():  # adapters without q: not routed by the paper's probe, as it says
            warnings.simplefilter("ignore")
            p.add_many([a.path for a in eng.pool.adapters])
        got = _PAPER_POOLS[eng] = (key, p)
    return got[1]


def agreement(got: list[Choice], want: list[Choice]) -> dict:
    """How far two routings of the same prompts agree: prompts with the same top-k (same order); the largest
    weight difference over those prompts, and over every prompt and adapter (0 where one is not selected);
    the largest relative difference of a raw signal, the largest difference of a calibrated score, and the
    largest gap between the scores `want` gave two adapters that the routings placed differently (relative
    when uncalibrated): a top-k that differs only where scores are that close is a near-tie."""
    same, dw_same, dw, ds, dz, swap = 0, 0.0, 0.0, 0.0, 0.0, 0.0
    for g, w in zip(got, want, strict=True):
        gw, ww = (dict(zip(map(peft_name, c["names"]), c["weights"])) for c in (g, w))
        d = max(abs(gw.get(n, 0.0) - ww.get(n, 0.0)) for n in gw | ww)
        if list(gw) == list(ww):
            same, dw_same = same + 1, max(dw_same, d)
        dw = max(dw, d)
        gs, ws = ({peft_name(n): v for n, v in c["signals"].items()} for c in (g, w))
        gz, wz = ({peft_name(n): v for n, v in c["scores"].items()} for c in (g, w))
        if set(gs) != set(ws):
            raise ValueError(f"the routings scored different adapters: {sorted(gs)} and {sorted(ws)}")
        ds = max(ds, *(abs(gs[n] - ws[n]) / abs(ws[n]) if ws[n] else abs(gs[n]) for n in ws))
        dz = max(dz, *(abs(gz[n] - wz[n]) for n in wz))
        raw = wz == ws  # uncalibrated: gaps relative, as signal differences are
        for a, b in zip(gw, ww):  # where the two put different adapters: how far apart logo-edge scored them
            if a != b:
                gap = abs(wz[a] - wz[b]) / (abs(wz[b]) if raw and wz[b] else 1.0)
                swap = max(swap, gap)
    return {"same_topk": same, "n_prompts": len(got), "max_weight_diff_same": dw_same, "max_weight_diff": dw,
            "max_signal_rel_diff": ds, "max_score_diff": dz, "max_swap_gap": swap}


def twin_path(model_path: Path) -> Path:
    """Where the f32 GGUF of the model's HF copy (the weights torch runs) is kept."""
    from .calibration import model_key
    from .native.build import cache_root

    return cache_root() / "bench-pools" / f"{model_path.stem}-{model_key(model_path)}-f32-twin.gguf"


def _engine_side(model_path: Path, ggufs: list[Path], cases: list[dict], k: int, threads: int, n_ctx: int):
    """logo-edge over the converted adapters: (calibration tokens, routing settings, choices per prompt)."""
    from .engine import Engine, RouteConfig

    with Engine(model_path, ggufs, n_ctx=n_ctx, n_threads=threads, flash_attn=False, routing=RouteConfig(k=k)) as eng:
        return (calibration_tokens(eng), routing_settings(eng),
                [engine_choices(eng, t) for case in cases for t in case["prompts"]])


def torch_rows(model_path: Path, cases: list[dict], k: int, threads: int, n_ctx: int, rows_pool=(),
               rows_expected=(), hf_dir: Path | None = None, n_adapters: int = PEFT_POOL_SIZE,
               twin: bool = True) -> dict:
    """Rows 5 and 5b: make a PEFT pool (a worker), convert it with logo-edge's converter, route every prompt
    of `cases` with logo-edge, run the PyTorch rows on the PEFT dirs (a worker), and compare.

    `twin`: compare also with logo-edge on an f32 GGUF of the HF weights torch runs (made once by the worker with
    llama.cpp's converter): the same arithmetic up to rounding, where the model itself is quantized.
    `rows_pool` / `rows_expected`: the other rows' adapters and logo-edge's choices for every prompt (per mode),
    checked too, through gguf_to_peft. Returns the run worker's result with "agreement" per pool and mode,
    or {"skipped"/"error": why}."""
    from .bench import call_worker
    from .convert.lora import convert_lora

    common = {"threads": threads, "k": k, "hf_dir": str(hf_dir) if hf_dir else None, "model": str(model_path)}
    with tempfile.TemporaryDirectory(prefix="logo-edge-peft-") as tmp:
        made = call_worker("logo_edge.bench_torch", {**common, "kind": "make", "out": f"{tmp}/peft", "n": n_adapters,
                                                     "twin": str(twin_path(model_path)) if twin else None}, timeout=600)
        if "dirs" not in made:
            return made
        (Path(tmp) / "gguf").mkdir()
        ggufs = [convert_lora(d, model_path, Path(tmp) / "gguf" / f"{Path(d).name}.gguf", "f32")
                 for d in made["dirs"]]
        cal, routings, want = _engine_side(model_path, ggufs, cases, k, threads, n_ctx)
        expected = {"bench": want}
        if twin:
            cal_twin, _, expected["twin"] = _engine_side(twin_path(model_path), ggufs, cases, k, threads, n_ctx)
            if cal_twin != cal:
                return {"error": "the f32 twin tokenizes the calibration prompts differently from the model"}
        expected["rows"] = list(rows_expected)
        out = call_worker("logo_edge.bench_torch", {**common, "kind": "run", "peft": made["dirs"], "cases": cases,
                                                    "calibration": cal, "routings": routings,
                                                    "rows_pool": [str(p) for p in rows_pool]}, timeout=1800)
    if "cases" not in out:
        return out
    out["make_s"], out["routings"] = made["make_s"], routings
    got = {"bench": out["choices"]["bench"], "twin": out["choices"]["bench"], "rows": out["choices"].get("rows")}
    out["agreement"] = {pool: {m: agreement(got[pool][m], [w[m] for w in want]) for m in MODES}
                        for pool, want in expected.items() if got[pool] is not None}
    return out


def report(info: dict, rows_desc: str) -> list[str]:
    """Lines under the tables: what rows 5 and 5b ran on, and how far their routing agrees with logo-edge's."""
    paper, ours, r = info["routings"]["paper"], info["routings"]["logo-edge"], PEFT_POOL
    weights = "softmax" if ours["calibration"] == "zscore" else "proportional"
    n = info["agreement"]["bench"]["paper"]["n_prompts"]
    lines = [f"rows 5, 5b: PyTorch/PEFT on {info['n_adapters']} PEFT adapters made here (peft LoraConfig r={r['r']}, "
             f"alpha {r['lora_alpha']}, {','.join(m[0] for m in r['target_modules'])}; seeded random A, B; "
             f"{info['make_s']:.1f} s),",
             f"  loaded by PeftModel.from_pretrained / load_adapter ({info['load_s']:.1f} s), calibrated in torch "
             f"({info['calibrate_s']:.1f} s); logo-edge routes the same adapters converted by convert-lora",
             f"  5  paper's routing: raw norm at block {paper['blocks'][-1]} ({paper['probe_input']} input), top-k, "
             "proportional weights",
             f"  5b our routing (logo-edge's defaults): {ours['calibration']} of the norm over blocks "
             f"{ours['blocks'][0]}-{ours['blocks'][-1]} ({ours['probe_input']} input), top-k, {weights} weights",
             f"\n{f'agreement with logo-edge, same {n} prompts':<70} {'same k':>9} {'max |dw| same k':>15} "
             f"{'all':>6} {'signal diff':>11}  {'score diff':>10}  {'swap gap':>8}"]
    pools = {"bench": "PEFT dirs made here (independent)",
             "twin": "PEFT dirs made here; logo-edge on an f32 GGUF of torch's weights",
             "rows": f"{rows_desc}, its GGUFs -> gguf_to_peft"}
    for pool, per in info["agreement"].items():
        for m in MODES:
            a, raw = per[m], info["routings"][m]["calibration"] == "raw"
            label = f"{'5 ' if m == 'paper' else '5b'} {pools[pool]}"
            same = f"{a['same_topk']}/{a['n_prompts']}"
            dw = f"{a['max_weight_diff_same']:15.4f} {a['max_weight_diff']:6.4f}"
            dz = f"{'= signal':>10}" if raw else f"{a['max_score_diff']:10.3f}"
            gap = f"{a['max_swap_gap']:8.2%}" if raw else f"{a['max_swap_gap']:8.3f}"
            lines.append(f"  {label:<68} {same:>9} {dw} {a['max_signal_rel_diff']:11.2%}  {dz}  {gap}")
    if "twin" in info["agreement"]:  # the same arithmetic up to rounding: anything but agreement is a defect
        twin = info["agreement"]["twin"]
        ok = all(a["same_topk"] == a["n_prompts"] and a["max_weight_diff"] <= TWIN_TOLERANCE for a in twin.values())
        lines.append(f"  check: on the f32 GGUF, rows 5 and 5b pick logo-edge's top-k on every prompt with weights "
                     f"within {TWIN_TOLERANCE}: {'PASS' if ok else 'FAIL'}")
    lines.append("  signal: relative; score: calibrated (z); swap gap: how close logo-edge scored two adapters that "
                 "the routings placed differently (relative for raw norms).\n  logo-edge probes llama.cpp's quantized "
                 "model (8-bit activations), torch its weights dequantized to f32, except on the f32 GGUF line; "
                 "the rows' pool is turned back into PEFT by our own gguf_to_peft: not an independent check")
    return lines


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
