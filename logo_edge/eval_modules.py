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
- as shipped with probe_modules="input": every adapter scored over all of q, k and v.

An adapter whose only remaining modules read other inputs (o, MLP) stays unroutable and is counted apart.
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

VARIANTS = {  # name -> (which adapters lose attn_q: "none", "odd" positions or "all"; probe_modules)
    "as shipped": ("none", "target-first"),
    "q removed from every other adapter": ("odd", "target-first"),
    "q removed from every adapter": ("all", "target-first"),
    "as shipped, probe_modules=input": ("none", "input"),
}


@dataclass
class Row:
    pool: str
    variant: str
    probe_modules: str
    all_tasks: tuple[float, float, float]
    stripped: tuple[float, float, float]  # tasks whose adapter lost attn_q (nan when none)
    kept: tuple[float, float, float]  # tasks whose adapter kept it
    unroutable: list[str]
    n: int  # prompts per task
    scored_over: dict[str, list[str]]


def strip_query(src: Path, dst: Path, info) -> bool:
    """Write `src` without its attn_q tensors to `dst` (f32); False when nothing else is left (not written)."""
    lora = read_lora(src, info)
    pairs = {k: v for k, v in lora.pairs.items() if ".attn_q." not in k}
    if not pairs:
        return False
    write_lora(dst, info.arch, lora.alpha, pairs, "f32", name=lora.name)
    return True


def variant_pool(pool_dir: Path, out: Path, which: str, info) -> list[str]:
    """A copy of the pool in `out` with attn_q removed from `which` adapters; returns the stripped names."""
    out.mkdir(parents=True, exist_ok=True)
    stripped = []
    for i, p in enumerate(sorted(pool_dir.glob("*.gguf"))):
        if which == "all" or (which == "odd" and i % 2 == 1):
            if strip_query(p, out / p.name, info):
                stripped.append(p.stem)
                continue
        (out / p.name).write_bytes(p.read_bytes())
    return stripped


def hit_rates(model, pool_dir: Path, probe_modules: str, stripped: list[str], n: int, threads: int | None,
              seed: int = 0) -> tuple[dict, list[str], dict]:
    """Top-1 hits on n test prompts per task of the pool, all / stripped / kept, with the engine's defaults."""
    from .engine import Engine
    from .tasks import TASKS, splits

    hits: dict[str, list[bool]] = {"all": [], "stripped": [], "kept": []}
    with Engine(model, pool_dir, n_threads=threads, pool_index=False, probe_modules=probe_modules) as eng:
        unroutable = sorted(eng.pool.unprobeable)
        scored = {a.name: a.probed for a in eng.pool.adapters}
        for task in [t for t in eng.pool.names if t in TASKS]:
            for ex in splits(TASKS[task])["test"][:n]:
                rec = eng.route(eng.format_chat([{"role": "user", "content": ex.prompt}]))
                hit = rec.selected[0].name == task
                hits["all"].append(hit)
                hits["stripped" if task in stripped else "kept"].append(hit)
    rng = np.random.default_rng(seed)
    return {k: _interval(np.array(v, float), rng) for k, v in hits.items()}, unroutable, scored


def modules_report(pools: dict[str, Path], n: int, out_dir: Path, model=None, threads: int | None = None,
                   progress=print) -> list[Row]:
    from . import defaults
    from .gguf_files import BaseInfo

    model = Path(model or defaults.default_model_path())
    info = BaseInfo.read(model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="logo-edge-modules-") as tmp:
        for pool_name, pool_dir in pools.items():
            for variant, (which, probe_modules) in VARIANTS.items():
                progress(f"{pool_name}: {variant}")
                d = Path(tmp) / f"{pool_name}-{which}"
                stripped = [] if d.exists() else variant_pool(pool_dir, d, which, info)  # "none" is made once
                rates, unroutable, scored = hit_rates(model, d, probe_modules, stripped, n, threads)
                rows.append(Row(pool_name, variant, probe_modules, rates["all"], rates["stripped"], rates["kept"],
                                unroutable, n, scored))
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
        "'stripped' are the tasks whose adapter lost every attn_q tensor (scored over the k/v it keeps), "
        "'kept' the others. Reproduce: `logo-edge eval --modules --n "
        f"{rows[0].n if rows else 0} --out models/eval/modules`.",
        "",
        "| pool | variant | all tasks | stripped | kept | not routable |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.pool} | {r.variant} | {_ci(r.all_tasks)} | {_ci(r.stripped)} | {_ci(r.kept)} | "
                     f"{', '.join(r.unroutable) or '–'} |")
    lines += ["", "Modules each adapter was scored over:", ""]
    for r in rows:
        if r.variant != "as shipped":
            lines.append(f"- {r.pool}, {r.variant}: " + "; ".join(
                f"{n} {'+'.join(m) or 'none'}" for n, m in r.scored_over.items()))
    (out_dir / "modules.md").write_text("\n".join(lines) + "\n")
