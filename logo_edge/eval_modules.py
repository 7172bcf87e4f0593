"""Every adapter routable, measured: adapters without the probe target ranked first for their own tasks.

An adapter with no LoRA on the query projection (v-only, k/v, MLP-only) was never routed by the paper's probe.
By default (`probe_modules="target-first"`) such an adapter is scored over the modules it adapts that read the
same input as the target (the attention norm's output feeds q, k and v), in the same probe pass. The study
builds, from each shipped pool, pools whose adapters lost their query LoRA (every attn_q tensor removed; what
remains is what users train when they adapt v, or k and v, alone), and measures top-1 hit rates on held-out test
prompts of each task with bootstrap 95 % intervals:

- as shipped: the paper's probe (every shipped adapter has attn_q);
- q removed from every other adapter: stripped adapters, scored over their k/v, compete with adapters scored
  over their q in one pool (each z-scored by its own calibration statistics);
- q removed from every adapter;
- attention removed from every other adapter, or every adapter (q, k, v, o; one left with nothing keeps it all):
  MLP-only adapters, scored over gate and up on the FFN norm's input, read in the same probe pass;
- as shipped with probe_modules="input": every adapter scored over all of q, k and v.

An adapter whose only remaining modules read inputs the probe does not (o, down) is unroutable: its task counts
in 'all tasks' (as misses) and is named; 'stripped' is over the routable stripped adapters' tasks.
`logo-edge eval --modules` writes modules.md and modules.json.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .eval_approx import _interval
from .gguf_files import read_lora, write_lora

QUERY, ATTENTION = ("attn_q",), ("attn_q", "attn_k", "attn_v", "attn_output")
VARIANTS = {  # name -> (modules removed, from which adapters: "none", "odd" positions or "all"; probe_modules)
    "as shipped": ((), "none", "target-first"),
    "q removed from every other adapter": (QUERY, "odd", "target-first"),
    "q removed from every adapter": (QUERY, "all", "target-first"),
    "attention removed from every other adapter": (ATTENTION, "odd", "target-first"),
    "attention removed from every adapter": (ATTENTION, "all", "target-first"),
    "as shipped, probe_modules=input": ((), "none", "input"),
}


@dataclass
class Row:
    pool: str
    variant: str
    probe_modules: str
    all_tasks: tuple[float, float, float]
    stripped: tuple[float, float, float]  # tasks whose adapter lost modules and is routable (nan when none)
    kept: tuple[float, float, float]  # tasks whose adapter kept them
    unroutable: list[str]
    n: int  # prompts per task
    scored_over: dict[str, list[str]]
    bank_rows: int  # rows the probe banks hold (routing time and memory grow with them)


def strip_modules(src: Path, dst: Path, info, modules=QUERY) -> bool:
    """Write `src` without its tensors of `modules` to `dst` (f32); False when nothing else is left (not written)."""
    lora = read_lora(src, info)
    pairs = {k: v for k, v in lora.pairs.items() if k.split(".")[2] not in modules}
    if not pairs:
        return False
    write_lora(dst, info.arch, lora.alpha, pairs, "f32", name=lora.name)
    return True


def variant_pool(pool_dir: Path, out: Path, which: str, info, modules=QUERY) -> list[str]:
    """A copy of the pool in `out` with `modules` removed from `which` adapters (one left with nothing is copied
    whole); returns the stripped names."""
    out.mkdir(parents=True, exist_ok=True)
    stripped = []
    for i, p in enumerate(sorted(pool_dir.glob("*.gguf"))):
        if which == "all" or (which == "odd" and i % 2 == 1):
            if strip_modules(p, out / p.name, info, modules):
                stripped.append(p.stem)
                continue
        (out / p.name).write_bytes(p.read_bytes())
    return stripped


def hit_rates(model, pool_dir: Path, probe_modules: str, stripped: list[str], n: int, threads: int | None,
              seed: int = 0) -> tuple[dict, list[str], dict, int]:
    """Top-1 hits on n test prompts per task of the pool, all / stripped / kept, with the engine's defaults."""
    from .engine import Engine
    from .tasks import TASKS, splits

    hits: dict[str, list[bool]] = {"all": [], "stripped": [], "kept": []}
    with Engine(model, pool_dir, n_threads=threads, pool_index=False, probe_modules=probe_modules) as eng:
        unroutable = sorted(eng.pool.unprobeable)
        scored = {a.name: a.probed for a in eng.pool.adapters}
        rows = int(eng.pool.bank.ranks.sum() + eng.pool.other_bank.ranks.sum())
        for task in [t for t in eng.pool.names if t in TASKS]:
            for ex in splits(TASKS[task])["test"][:n]:
                rec = eng.route(eng.format_chat([{"role": "user", "content": ex.prompt}]))
                hit = rec.selected[0].name == task
                hits["all"].append(hit)
                if task not in unroutable:
                    hits["stripped" if task in stripped else "kept"].append(hit)
    rng = np.random.default_rng(seed)
    return {k: _interval(np.array(v, float), rng) for k, v in hits.items()}, unroutable, scored, rows


def modules_report(pools: dict[str, Path], n: int, out_dir: Path, model=None, threads: int | None = None,
                   progress=print) -> list[Row]:
    from . import defaults
    from .gguf_files import BaseInfo

    model = Path(model or defaults.default_model_path())
    info = BaseInfo.read(model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="logo-edge-modules-") as tmp:
        for pool_name, pool_dir in pools.items():
            for variant, (modules, which, probe_modules) in VARIANTS.items():
                d = Path(tmp) / f"{pool_name}-{which}-{'-'.join(modules)}"
                stripped = [] if d.exists() else variant_pool(pool_dir, d, which, info, modules)  # "none": once
                if which != "none" and not stripped:
                    progress(f"{pool_name}: {variant}: no adapter left with anything else (skipped)")
                    continue
                progress(f"{pool_name}: {variant}")
                rates, unroutable, scored, bank_rows = hit_rates(model, d, probe_modules, stripped, n, threads)
                rows.append(Row(pool_name, variant, probe_modules, rates["all"], rates["stripped"], rates["kept"],
                                unroutable, n, scored, bank_rows))
    write_report(rows, out_dir)
    return rows


def _ci(t) -> str:
    return "–" if np.isnan(t[0]) else f"{100 * t[0]:.1f} [{100 * t[1]:.1f}, {100 * t[2]:.1f}]"


def write_report(rows: list[Row], out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "modules.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1) + "\n")
    lines = [
        "# Every adapter routable: adapters without the query projection",
        "",
        f"Top-1 hit rate (the prompt's own task adapter ranked first, engine defaults: zscore over the probe "
        f"window), on {rows[0].n if rows else 0} held-out test prompts per task, [bootstrap 95 % interval]. "
        "'stripped' are the tasks whose adapter lost those modules and is still routable (scored over what it "
        "keeps: k/v, or gate/up on the FFN's input), 'kept' the others; an unroutable adapter's task counts in "
        "'all tasks' only. Bank rows: what routing reads (its time and memory grow with them). Reproduce: "
        f"`logo-edge eval --modules --adapters models/pool models/pool-mixed --n-route {rows[0].n if rows else 0} "
        "--out models/eval/modules`.",
        "",
        "| pool | variant | all tasks | stripped | kept | not routable | bank rows |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.pool} | {r.variant} | {_ci(r.all_tasks)} | {_ci(r.stripped)} | {_ci(r.kept)} | "
                     f"{', '.join(r.unroutable) or '–'} | {r.bank_rows} |")
    lines += ["", "Modules each adapter was scored over:", ""]
    for r in rows:
        if r.variant != "as shipped":
            lines.append(f"- {r.pool}, {r.variant}: " + "; ".join(
                f"{n} {'+'.join(m) or 'none'}" for n, m in r.scored_over.items()))
    (out_dir / "modules.md").write_text("\n".join(lines) + "\n")
