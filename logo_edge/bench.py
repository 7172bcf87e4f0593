"""`logo-edge bench`: speed and memory side by side in one run, on the same prompts, with ratios to row 1.

Rows, per (prompt tokens, generated tokens), interleaved in one process (warm-up not counted, medians):
  1   llama-cpp-python's Llama, base model
  2   the same with the k adapters routing picked, set by hand (llama_set_adapters_lora)
  3   logo-edge routed, exact, the defaults: probe -> top-k -> mixture (merge="auto": packed for these
      small adapters) -> prefill -> decode   (3b: merge="mixture", per-adapter scales)
Every row generates exactly the tokens asked for (end-of-generation masked), so totals compare like with like.
  4   the approximate probe-cache mode (no second prefill); 4b fusion (parameter averaging); both change
      the output: their accuracy cost is in the eval report
  5   LoGo in PyTorch/PEFT, the paper's routing, on PEFT adapters the bench makes (bench_torch.py, in a
      subprocess on the same prompt tokens); 5b the same with logo-edge's routing settings. Both are checked
      against logo-edge routing the same adapters converted by convert-lora
Peak RSS per row comes from a fresh process per row that loads only what that row needs.
Sweeps: pool size N (start-up, probe and route time, memory; a process per N) and k (decode tok/s).
CPU paths: prefill and decode with llama.cpp's extra buffer types (AMX, repacking) on vs off (bench_cpu.py).
Chat: a scripted multi-turn conversation, TTFT per turn for base, routed and kept mixtures (bench_chat.py).

    logo-edge bench              # the full run (about 10 minutes on 2 cores)
    logo-edge bench --quick      # one small case and tiny sweeps, under 90 s
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import defaults
from .errors import AdapterError, LogoEdgeError

MB = 1024 * 1024
ROWS = {
    "base": "1  llama.cpp base model",
    "manual": "2  llama.cpp + k adapters by hand",
    "routed": "3  logo-edge routed, exact (defaults)",
    "mixture": "3b logo-edge routed, exact, mixture",
    "approx": "4  logo-edge probe-cache (approximate)",
    "fusion": "4b logo-edge fusion (not exact)",
    "torch": "5  PyTorch/PEFT LoGo (paper's routing)",
    "torch_le": "5b PyTorch/PEFT LoGo (our routing)",
}
MERGE_OF = {"routed": "auto", "mixture": "mixture", "approx": "mixture", "fusion": "fusion"}
PREFILL_OF = {"approx": "probe-cache"}  # the approximate mode skips the second prefill
POOL_MODULES = {"qkvo": ("attn_q", "attn_k", "attn_v", "attn_output"), "qv": ("attn_q", "attn_v"),
                "all7": ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
TARGET_CASE = (256, 128)
WORDS = ["river", "market", "proof", "energy", "garden", "letter", "signal", "theory", "harbor", "number"]


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory of this process now (VmRSS), MB."""
    return _status_mb("VmRSS") or peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB: VmHWM (ru_maxrss keeps the parent's peak across exec)."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MB if sys.platform == "darwin" else r / 1024


# ---- pools


def random_pool(model_path: Path, n: int, modules: str = "qkvo", rank: int = 8) -> list[Path]:
    """n random adapters of the model's real shapes (f16, alpha 2r), written once into the cache."""
    from .native.build import cache_root

    d = cache_root() / "bench-pools" / f"{model_path.stem}-{model_path.stat().st_size}-{modules}-r{rank}"
    d.mkdir(parents=True, exist_ok=True)
    paths = [d / f"rand{i:04d}.gguf" for i in range(n)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        from .gguf_files import BaseInfo

        info = BaseInfo.read(model_path)
        _log(f"writing {len(missing)} random {modules} rank-{rank} adapters to {d} (once)")
        for j, p in enumerate(missing):
            _write_random(info, p, POOL_MODULES[modules], rank, seed=int(p.stem[4:]))
            if (j + 1) % 100 == 0:
                _log(f"  {j + 1}/{len(missing)} adapters written")
    return paths


def _write_random(info, path: Path, modules, rank: int, seed: int) -> None:
    from .gguf_files import write_lora

    rng = np.random.default_rng(seed)
    pairs = {}
    for b in range(info.n_layer):
        for m in modules:
            n_in, n_out = info.shapes[f"blk.{b}.{m}.weight"][:2]
            pairs[f"blk.{b}.{m}.weight"] = (rng.standard_normal((rank, n_in), np.float32) * 0.02,
                                            rng.standard_normal((n_out, rank), np.float32) * 0.02)
    write_lora(path, info.arch, 2 * rank, pairs, "f16", name=path.stem)


def rows_pool(args, model_path: Path) -> tuple[list[Path], str]:
    """The pool rows 2-5 route over: --adapters, else the shipped pool, else 10 random adapters."""
    if args.adapters:
        paths = [p for a in map(Path, args.adapters) for p in (sorted(a.glob("*.gguf")) if a.is_dir() else [a])]
        return paths, f"{len(paths)} given adapters"
    shipped = sorted(defaults.DEFAULT_POOL.glob("*.gguf"))
    if args.model is None and len(shipped) >= 10:
        return shipped, f"the shipped pool ({len(shipped)} adapters)"
    why = "another model" if args.model else f"the shipped pool has {len(shipped)} < 10 adapters"
    return random_pool(model_path, 10), f"10 random q,k,v,o rank-8 adapters ({why})"


# ---- prompts and timing


def fit_prompt(eng, n_tokens: int, seed: int) -> list[int]:
    """Chat-formatted prompt tokens, as close to n_tokens as the filler words allow (usually exact)."""
    words = list(np.random.default_rng(seed).choice(WORDS, size=2 * n_tokens + 8))
    n = max(1, n_tokens - 30)
    best = None
    for _ in range(8):
        toks = eng.tokenize(eng.format_chat([{"role": "user", "content": "Summarize: " + " ".join(words[:n])}]))
        if best is None or abs(len(toks) - n_tokens) < abs(len(best) - n_tokens):
            best = toks
        if len(toks) == n_tokens:
            break
        n = max(1, n + n_tokens - len(toks))
    return best


@dataclass
class Sample:
    """One request timed from outside: time to first token, decode tok/s after it, total, tokens."""

    ttft: float
    tok_s: float
    total: float
    n_tok: int


def timed(chunks) -> Sample:
    """Time a stream of completion chunks; every chunk before the final one is one token."""
    t0 = time.perf_counter()
    first, n = None, 0
    for chunk in chunks:
        if chunk["choices"][0]["finish_reason"] is None:
            n += 1
            first = first or time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return Sample(first - t0, (n - 1) / (end - first) if n > 1 and end > first else 0.0, end - t0, n)


def median_sample(samples: list[Sample]) -> Sample:
    return Sample(*(statistics.median(getattr(s, f) for s in samples) for f in ("ttft", "tok_s", "total", "n_tok")))


# ---- rows 1-4


@dataclass
class Sel:
    """The adapters routing picked for a prompt, handed to row 2 to set by hand."""

    names: list[str]
    paths: list[str]
    weights: list[float]
    # logo-edge's routing and the paper's, with every adapter's signal and score: what row 5 checks (bench_torch)
    choices: dict = field(default_factory=dict)


class RowRunner:
    """A plain llama-cpp-python Llama and a logo-edge Engine on the same model, threads and settings."""

    def __init__(self, model_path: Path, adapters, k: int, n_ctx: int, threads: int, need=("llama", "engine")):
        from ._lib import llama_cpp
        from .engine import Engine, RouteConfig

        self.llm = self.eng = None
        self._loras: dict[str, object] = {}
        self._eog: list[int] | None = None  # the model's end-of-generation tokens, for the Llama rows
        if "llama" in need:  # llama-cpp-python's own defaults, except threads (its default is half)
            self.llm = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                       n_threads_batch=threads, verbose=False)
        if "engine" in need:  # flash attention off, as llama-cpp-python's Llama has it
            self.eng = Engine(model_path, adapters, n_ctx=n_ctx, n_threads=threads, flash_attn=False,
                              routing=RouteConfig(k=k))

    def select(self, tokens: list[int]) -> Sel:
        from .bench_torch import engine_choices

        rec = self.eng.route(tokens)
        pool = self.eng.pool
        return Sel([a.name for a in rec.selected], [str(pool.adapters[pool.index(a.name)].path) for a in rec.selected],
                   [a.weight for a in rec.selected], engine_choices(self.eng, tokens, rec))

    def run(self, row: str, tokens: list[int], gen: int, sel: Sel | None = None) -> Sample:
        if row == "base":
            return self._llama(tokens, gen, [], [])
        if row == "manual":
            return self._llama(tokens, gen, [self._lora(p) for p in sel.paths], sel.weights)
        self.eng.forget_prompts()  # a full probe and prefill every time, as for a new prompt
        return timed(self.eng.create_completion(tokens, max_tokens=gen, stream=True, merge=MERGE_OF[row],
                                                ignore_eos=True,
                                                prefill=PREFILL_OF.get(row, "exact")))

    def _llama(self, tokens, gen, loras, scales) -> Sample:
        from .llm import set_lora_mixture

        try:
            set_lora_mixture(self.llm._ctx.ctx, loras, scales)  # AdapterError naming the code if refused
        finally:
            self.llm.reset()  # it does not know the mixture changed: never reuse its cache
        from ._lib import llama_cpp

        if self._eog is None:  # llama-cpp-python has no ignore_eos: mask end-of-generation, as the engine does
            vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
            self._eog = [t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]

        def no_eog(_ids, scores):
            scores[self._eog] = -np.inf
            return scores

        return timed(self.llm.create_completion(tokens, max_tokens=gen, temperature=0.0, stream=True,
                                                logits_processor=llama_cpp.LogitsProcessorList([no_eog])))

    def _lora(self, path: str):
        from ._lib import llama_cpp

        if path not in self._loras:  # adapters belong to a model: load them on the Llama's own
            ptr = llama_cpp.llama_adapter_lora_init(self.llm._model.model, path.encode())
            if not ptr:
                raise AdapterError(f"{path}: llama.cpp refused the adapter")
            self._loras[path] = ptr
        return self._loras[path]

    def close(self) -> None:
        if self.eng is not None:
            self.eng.close()
        if self.llm is not None:
            self.llm.close()  # frees its adapters with the model


def measure_rows(runner: RowRunner, rows: list[str], cases, repeats: int):
    """Interleave the rows on the same prompts; returns samples[case][row] (or a skip note) and the plans."""
    samples = {c: {r: [] for r in rows} for c in cases}
    plans = {c: [] for c in cases}  # per repeat: (tokens, selection)
    for case in cases:
        for rep in range(repeats + 1):  # repeat 0 warms up and is not counted
            tokens = fit_prompt(runner.eng, case[0], seed=rep)
            sel = runner.select(tokens)
            plans[case].append((tokens, sel))
            for row in rows[rep % len(rows):] + rows[:rep % len(rows)]:  # rotate the order
                if isinstance(samples[case][row], str):
                    continue
                try:
                    s = runner.run(row, tokens, case[1], sel)
                except LogoEdgeError as e:  # e.g. fusion of adapters with different ranks
                    samples[case][row] = f"skipped: {e}"
                    continue
                if rep:
                    samples[case][row].append(s)
            _log(f"case {len(tokens)}p/{case[1]}g: repeat {rep}/{repeats} done")
    return samples, plans


# ---- subprocess workers


def call_worker(module: str, spec: dict, timeout: float = 1200) -> dict:
    """Run `python -m module --worker SPEC` in a fresh process; its last stdout line is a JSON result."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        r = subprocess.run([sys.executable, "-m", module, "--worker", f.name], stdout=subprocess.PIPE,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        os.unlink(f.name)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        return {"error": f"worker exited with {r.returncode} (see stderr)"}
    return json.loads(lines[-1])


def _row_worker(spec: dict) -> dict:
    """Memory of one row alone: load what it needs, run its request twice, report peak RSS."""
    row = spec["row"]
    need = ("llama",) if row in ("base", "manual") else ("engine",)
    runner = RowRunner(Path(spec["model"]), spec["adapters"], spec["k"], spec["n_ctx"], spec["threads"], need)
    sel = Sel(**spec["sel"])
    for _ in range(2):
        runner.run(row, spec["tokens"], spec["gen"], sel)
    out = {"peak_mb": peak_rss_mb(), "rss_mb": rss_mb()}
    runner.close()
    return out


def _route_times(eng, tokens) -> tuple[float, float, float]:
    """(probe, route, routing = whole eng.route() minus the probe) in s; with no pool, the probe alone."""
    eng.forget_prompts()  # every routed request is a new prompt
    t = time.perf_counter()
    if len(eng.pool) == 0:
        eng.probe(tokens)
        return time.perf_counter() - t, 0.0, 0.0
    rec = eng.route(tokens)
    wall = time.perf_counter() - t
    return rec.timings.probe_s, rec.timings.route_s, wall - rec.timings.probe_s


def worker_main(argv: list[str]) -> int:
    """`python -m logo_edge.bench --worker SPEC.json`: one measurement in a clean process."""
    spec = json.loads(Path(argv[argv.index("--worker") + 1]).read_text())
    from .bench_pool import pool_worker

    out = {"row": _row_worker, "pool": pool_worker}[spec["kind"]](spec)
    print(json.dumps(out))
    return 0


# ---- the command


def add_args(p) -> None:
    """The `logo-edge bench` arguments (the CLI calls this)."""
    from argparse import BooleanOptionalAction

    p.add_argument("--model", help="base model GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--adapters", nargs="+", help="adapter GGUFs or a directory (default: the shipped pool)")
    p.add_argument("-k", type=int, default=3, help="adapters per request (default 3)")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[64, 256], help="e.g. 64 256 1024")
    p.add_argument("--gen-tokens", type=int, nargs="+", default=[32, 128])
    p.add_argument("--repeats", type=int, default=3, help="counted repeats per case (plus one warm-up)")
    p.add_argument("--threads", type=int, help="threads for every row (default: all cores)")
    p.add_argument("--quick", action="store_true", help="one small case, tiny sweeps, no torch row (< 90 s)")
    p.add_argument("--sweeps", action=BooleanOptionalAction, default=True, help="pool-size and k sweeps")
    p.add_argument("--torch", action=BooleanOptionalAction, default=True, help="the PyTorch/PEFT row")
    p.add_argument("--chat", action=BooleanOptionalAction, default=True, help="a multi-turn chat, timed per turn "
                   "(bench_chat.py)")
    p.add_argument("--n-sizes", type=int, nargs="+", default=[10, 100, 1000], help="pool sizes to sweep")
    p.add_argument("--k-values", type=int, nargs="+", default=[1, 3, 8, 20], help="k values to sweep")
    p.add_argument("--pool-sweep", action="store_true", help="only the pool size sweep: start-up, add, routing "
                   "and memory against N (bench_pool.py)")
    p.add_argument("--server", action="store_true", help="logo-edge serve vs llama-cpp-python's server: req/s, "
                   "tok/s, p50/p95 at 1, 4, 8 clients (bench_server.py)")
    from .bench_server import add_server_args

    add_server_args(p)


def run_bench(args) -> int:
    if args.server:
        from .bench_server import run_server_bench

        return run_server_bench(args)
    from .engine import MERGES

    model_path = Path(args.model) if args.model else defaults.default_model_path()
    threads = args.threads or os.cpu_count() or 1
    if args.pool_sweep:
        from .bench_pool import sweep_pool, targets

        runner = RowRunner(model_path, None, args.k, 512, threads, need=("engine",))
        try:
            prompts = [fit_prompt(runner.eng, n, seed=0) for n in args.prompt_tokens]
        finally:
            runner.close()
        res = sweep_pool(model_path, args.n_sizes, prompts, threads, max(1, args.repeats))
        print("\ntargets")
        _print_checks([(name, value, None, None, op, limit) for name, value, op, limit in targets(res)])
        return 0
    repeats = 1 if args.quick else max(1, args.repeats)
    cases = [(64, 16)] if args.quick else [(p, g) for p in args.prompt_tokens for g in args.gen_tokens]
    n_ctx = max(p + g for p, g in cases) + 64
    adapters, pool_desc = rows_pool(args, model_path)
    rows = ["base", "manual", "routed"] + [r for r in ("mixture", "approx", "fusion") if MERGE_OF[r] in MERGES]
    print(f"model {model_path.name}; pool: {pool_desc}; k={args.k}; {threads} threads; median of {repeats} "
          f"(after a warm-up); greedy; flash attention off; rows interleaved in one process\n"
          "TTFT of routed rows includes the probe; of packed and fusion also building the merged adapter of a "
          "new mixture")
    runner = RowRunner(model_path, adapters, args.k, n_ctx, threads)
    try:
        samples, plans = measure_rows(runner, rows, cases, repeats)
    finally:
        runner.close()
    meds = {c: {r: (v if isinstance(v, str) else median_sample(v)) for r, v in samples[c].items()} for c in cases}
    common = dict(model=str(model_path), adapters=[str(p) for p in adapters], k=args.k, threads=threads, n_ctx=n_ctx)
    torch_note, torch_info = _torch_row(args, model_path, common, plans, repeats, meds)
    for c in cases:
        meds[c].setdefault("fusion", "skipped: fusion is not in this logo-edge")
        meds[c].setdefault("torch", torch_note)
        meds[c].setdefault("torch_le", torch_note)
    _print_rows(meds, plans, torch_info, pool_desc)
    _row_memory(common, [r for r in rows if isinstance(meds[max(cases)][r], Sample)], plans, max(cases), torch_info)
    sweep_n = None
    if args.sweeps:
        sweep_n = _sweep_n(model_path, [10] if args.quick else args.n_sizes, plans, cases, threads, repeats)
        _sweep_k(model_path, [1, 3] if args.quick else args.k_values, threads, repeats, 16 if args.quick else 64)
        from .bench_pack import QUICK_RECIPES, RECIPES, pack_section

        pack_section(model_path, threads, repeats, 16 if args.quick else 64, QUICK_RECIPES if args.quick else RECIPES)
    from .bench_cpu import cpu_paths_section, lora_fusion_section

    cpu_paths_section(model_path, 64 if args.quick else TARGET_CASE[0], 16 if args.quick else 64, threads, repeats)
    lora_fusion_section(model_path, adapters, args.k, threads, repeats, 16 if args.quick else 128)
    if args.chat:
        from .bench_chat import chat_section

        chat_section(model_path, adapters, threads, repeats=repeats, quick=args.quick)
    _print_targets(meds, sweep_n, cases, samples)
    return 0


# ---- row 5 and memory


def _torch_row(args, model_path, common, plans, repeats, meds) -> tuple[str | None, dict | None]:
    """Rows 5 and 5b (bench_torch.torch_rows, workers on the same prompt tokens); put their medians in meds.

    Returns (a note saying why the rows are missing, or None; the run worker's result with the agreement).
    """
    if args.quick or not args.torch:
        return ("skipped (--quick)" if args.quick else "skipped (--no-torch)"), None
    if model_path != defaults.default_model_path():
        return "skipped: the PyTorch reference loads the default model only (its HF weights)", None
    from .bench_torch import torch_rows

    cases = [{"p": c[0], "g": c[1], "prompts": [t for t, _ in plans[c]]} for c in plans]
    expected = [s.choices for c in plans for _, s in plans[c]]
    _log("rows 5, 5b: PyTorch/PEFT on PEFT adapters made here, in subprocesses")
    out = torch_rows(model_path, cases, common["k"], common["threads"], common["n_ctx"], common["adapters"],
                     expected)
    if "skipped" in out or "error" in out:
        return out.get("skipped") or f"failed: {out['error']}", None
    for c, res in zip(plans, out["cases"]):
        meds[c]["torch"] = median_sample([Sample(**s) for s in res["samples"]["paper"]])
        meds[c]["torch_le"] = median_sample([Sample(**s) for s in res["samples"]["logo-edge"]])
    return None, out


def _row_memory(common, rows, plans, case, torch_info) -> None:
    """Peak RSS of each row in a process of its own (loading only what the row needs), on one prompt."""
    tokens, sel = plans[case][min(1, len(plans[case]) - 1)]
    peak = {}
    for row in rows:
        _log(f"memory of row {row!r} in a fresh process")
        peak[row] = call_worker("logo_edge.bench", {**common, "kind": "row", "row": row, "tokens": tokens,
                                                    "gen": case[1], "sel": asdict(sel)}, timeout=600)
    peak["torch"] = torch_info or {"error": "not measured (row 5 skipped)"}
    print(f"\npeak RSS per row (a fresh process per row, loading only what it needs; one {len(tokens)}p/{case[1]}g "
          "request)")
    base = peak["base"].get("peak_mb")
    for row, r in peak.items():
        ratio = f"  x{r['peak_mb'] / base:.2f}" if base and "peak_mb" in r else ""
        print(f"{ROWS[row]:<38} " + (f"{r['peak_mb']:8.0f} MB{ratio}" if "peak_mb" in r else r["error"]))


# ---- sweeps


def _sweep_n(model_path, sizes, plans, cases, threads, repeats) -> dict:
    """Pool size N: start-up, add, routing and memory in fresh processes (bench_pool.py)."""
    from .bench_pool import sweep_pool

    prompts = [plans[c][0][0] for c in cases if c[1] == cases[0][1]]  # one prompt per prompt length
    return sweep_pool(model_path, sizes, prompts, threads, repeats)


def _sweep_k(model_path, ks, threads, repeats, gen) -> dict:
    """k adapters by hand (uniform weights): decode tok/s of mixture and packed against the base."""
    from .engine import MERGES

    paths = random_pool(model_path, max(ks), "qkvo")
    merges = ["mixture"] + (["packed"] if "packed" in MERGES else [])
    configs = [("base", 0)] + [(m, k) for k in ks for m in merges]
    runner = RowRunner(model_path, paths, 3, 64 + gen + 64, threads, need=("engine",))
    eng = runner.eng
    tokens = fit_prompt(eng, 64, seed=0)
    got = {c: [] for c in configs}
    try:
        for rep in range(repeats + 1):
            for merge, k in configs:
                adapters = "base" if k == 0 else {n: 1.0 / k for n in eng.pool.names[:k]}
                eng.forget_prompts()
                s = timed(eng.create_completion(tokens, adapters=adapters, max_tokens=gen, stream=True,
                                                merge="mixture" if k == 0 else merge))
                if rep:
                    got[(merge, k)].append(s.tok_s)
            _log(f"k sweep: repeat {rep}/{repeats} done")
    finally:
        runner.close()
    med = {c: statistics.median(v) for c, v in got.items()}
    base = med[("base", 0)]
    print(f"\nk sweep: decode tok/s, {len(tokens)}-token prompt, {gen} generated, random q,k,v,o rank-8 adapters "
          f"set by hand; base {base:.1f} tok/s" + ("" if "packed" in MERGES else "; packed: not available yet"))
    print(f"{'k':>4} " + " ".join(f"{m + ' tok/s':>15} {'x base':>7}" for m in merges))
    for k in ks:
        print(f"{k:>4} " + " ".join(f"{med[(m, k)]:15.1f} {med[(m, k)] / base:7.3f}" for m in merges))
    return med


# ---- report


def _print_rows(meds, plans, info, pool_desc: str = "the rows' pool") -> None:
    """One table per case: every row's medians (or why it is missing) and its ratios to row 1."""
    for case in plans:
        n_p = len(plans[case][0][0])
        print(f"\ncase {n_p}p/{case[1]}g: {n_p} prompt tokens, up to {case[1]} generated")
        print(f"{'row':<38} {'TTFT ms':>8} {'tok/s':>7} {'total ms':>9} {'tokens':>6} {'x TTFT':>7} "
              f"{'x tok/s':>7} {'x total':>7}")
        b = meds[case]["base"]
        for row, label in ROWS.items():
            m = meds[case][row]
            if isinstance(m, Sample):
                print(f"{label:<38} {m.ttft * 1e3:8.1f} {m.tok_s:7.1f} {m.total * 1e3:9.1f} {m.n_tok:6.0f} "
                      f"{m.ttft / b.ttft:7.3f} {_ratio(m.tok_s, b.tok_s):7.3f} {m.total / b.total:7.3f}")
            else:
                print(f"{label:<38} {m}")
            if row == "fusion":
                print(f"{'':<38} rows 4 and 4b change the output: their accuracy cost is in the eval report")
        r, m = meds[case]["routed"], meds[case]["manual"]
        if isinstance(r, Sample) and isinstance(m, Sample):
            print(f"decode tok/s, logo-edge routed / llama-cpp-python same adapters: {_ratio(r.tok_s, m.tok_s):.3f}")
    if info:
        from .bench_torch import report

        print("\n" + "\n".join(report(info, pool_desc)))


def paired_ratio(a: list[Sample], b: list[Sample], field: str, seed: int = 0) -> tuple[float, float, float]:
    """The median over repeats of a's field / b's field, each repeat's two runs on the same prompt and adjacent in
    time (measure_rows), so that the machine's drift between repeats cancels; and its 95 % bootstrap interval over
    the repeats."""
    r = np.array([getattr(x, field) / getattr(y, field) for x, y in zip(a, b) if getattr(y, field)])
    if len(r) == 0:
        return float("nan"), float("nan"), float("nan")
    boots = np.median(np.random.default_rng(seed).choice(r, (2000, len(r))), axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(np.median(r)), float(lo), float(hi)


def _print_targets(meds, sweep_n, cases, samples=None) -> None:
    """The issue's targets, PASS or FAIL, on the target case (or the largest measured one). Row-against-row targets
    take the median of per-repeat ratios (paired_ratio) with its interval; a verdict whose interval crosses the limit
    says so ("within noise"). Rows measured elsewhere (PyTorch) compare medians."""
    case = TARGET_CASE if TARGET_CASE in cases else max(cases)
    m = {r: v for r, v in meds[case].items() if isinstance(v, Sample)}
    paired = {r: v for r, v in (samples or {}).get(case, {}).items() if isinstance(v, list) and v}
    note = "" if case == TARGET_CASE else f" (measured on {case[0]}p/{case[1]}g, not the target 256p/128g)"
    print(f"\ntargets{note}: median of per-repeat ratios (same prompt, adjacent runs) [95 % bootstrap over repeats]")
    checks = [("routed TTFT / base TTFT (exact, k=3)", ("routed", "base", "ttft"), "<=", 2.1),
              ("routed decode tok/s / base (k=3)", ("routed", "base", "tok_s"), ">=", 0.93),
              ("routed total / base total", ("routed", "base", "total"), "<=", 1.25),
              ("routed decode tok/s / same adapters by hand", ("routed", "manual", "tok_s"), ">=", 0.97),
              ("mixture decode tok/s / base", ("mixture", "base", "tok_s"), ">=", 0.85),
              ("PyTorch/PEFT total / logo-edge routed total", ("torch", "routed", "total"), ">=", 5)]
    rows = []
    for name, (a, b, f), op, lim in checks:
        if a in paired and b in paired and len(paired[a]) == len(paired[b]):
            rows.append((name, *paired_ratio(paired[a], paired[b], f), op, lim))
        elif a in m and b in m:
            rows.append((name, _ratio(getattr(m[a], f), getattr(m[b], f)), None, None, op, lim))
    if sweep_n:
        from .bench_pool import targets

        rows += [(name, value, None, None, op, lim) for name, value, op, lim in targets(sweep_n)]
    _print_checks(rows)


def _print_checks(rows) -> None:
    """(name, value, interval low or None, high, op, limit): PASS or FAIL, "within noise" where the interval
    crosses the limit."""
    for name, value, lo, hi, op, limit in rows:
        ok = value <= limit if op == "<=" else value >= limit
        ci = f"[{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        noise = lo is not None and (lo <= limit <= hi)
        print(f"  {name:<48} {value:9.3f} {ci:<16} {op} {limit:<5} {'PASS' if ok else 'FAIL'}"
              f"{' (within noise)' if noise else ''}")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
