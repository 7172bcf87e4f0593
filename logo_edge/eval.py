"""`logo-edge eval`: LoGo against base, oracle, uniform and random mixtures on held-out BIG-bench data.

Per example the prompt is probed once per probe configuration (the signals of every k and signal type
come from the same probe), and each distinct mixture is generated once (greedy), so methods that pick
the same adapters share a generation. Outputs: report.md (tables like the paper's), results.csv (every
example x method), signals.csv and heatmap.png (task x adapter mean signal, min-max normalized per
adapter, as the paper's Figure 2). Arrow and SpectR (routers_spectral.py) route from the same probe
states (the `normed` ones: q_proj's input), and a side-by-side table gives every router's hit rates and
scores with bootstrap 95 % intervals.
"""

from __future__ import annotations

import csv
import pickle
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import AdapterError
from .router import CALIBRATIONS, RouterConfig, route_signals
from .routers_spectral import SpectralBank, SpectralConfig
from .tasks import LARGE_TASKS, POOL_TASKS, TASKS, UNSEEN_TASKS, Example, score, splits

LOGO_GRID = [(s, k) for s in ("norm", "entropy") for k in (1, 3, 5)]
SIGNAL_NAMES = ("norm", "entropy")
# Arrow and SpectR on the normed probe over the engine's window: method name -> (config, hit-rate row name);
# the first two are also generated (GENERATED_SPECTRAL), the target-block ones are hit rates only
SPECTRAL = {"Arrow k=3": (SpectralConfig("arrow", 3), "arrow [window mean]"),
            "SpectR k=3": (SpectralConfig("spectr", 3), "spectr [window mean]"),
            "Arrow k=3 [target block]": (SpectralConfig("arrow", 3, blocks="target"), "arrow [target block]"),
            "SpectR k=3 [target block]": (SpectralConfig("spectr", 3, blocks="target"), "spectr [target block]"),
            "Arrow k=3 [zscore]": (SpectralConfig("arrow", 3, calibration="zscore"), "arrow [zscore]"),
            "SpectR k=3 [zscore]": (SpectralConfig("spectr", 3, calibration="zscore"), "spectr [zscore]")}
EXAMPLES_HIT = "examples [zscore]"  # the hit-rate row of the router over the adapters' example prompts
GENERATED_SPECTRAL = ("Arrow k=3", "SpectR k=3", "Arrow k=3 [zscore]", "SpectR k=3 [zscore]")
BOOTSTRAP = 2000  # resamples for the 95 % intervals of the routers table


@dataclass
class ProbeSetting:
    label: str
    probe_input: str
    block: int  # last block of the window; -1 = the model's last
    window: int = 0  # blocks read up to `block`; 0 = the engine's probe window
    generate: bool = True  # False: routing statistics only (hit rates), no generated method


@dataclass
class EvalState:
    rows: list[dict] = field(default_factory=list)
    signals: dict[tuple[str, str], list[np.ndarray]] = field(default_factory=dict)  # (setting, task) -> rows
    hits: dict[tuple[str, str, str], list[tuple[bool, bool]]] = field(default_factory=dict)
    route_s: dict[str, list[float]] = field(default_factory=dict)  # router -> seconds to route one request

    def hit(self, key: tuple[str, str, str], routing, own: int) -> None:
        """Record whether a routing (ranked over the whole pool) put adapter `own` first / in its top 3."""
        rank = routing.selected.index(own) if own in routing.selected else None
        self.hits.setdefault(key, []).append((rank == 0, rank is not None and rank < 3))


def _progress(i: int, n: int, t0: float, what: str) -> None:
    el = time.time() - t0
    eta = el / max(i, 1) * (n - i)
    print(f"\r[eval] {i}/{n} examples, {el:.0f} s elapsed, ~{eta:.0f} s left  {what[:40]:<40}", end="",
          file=sys.stderr, flush=True)


class Evaluator:
    """Probe settings over one engine: a pool (probe bank + calibration) per setting, routing per request.

    The first setting should be the engine's own (what `Engine` routes with); `paper` names the setting
    of the paper's probe (residual, last block alone), which the uncalibrated LoGo methods use."""

    def __init__(self, eng, settings: list[ProbeSetting], default_signal: str = "norm", default_k: int = 3):
        from .pool import AdapterPool

        self.eng = eng
        self.settings = settings
        self.pools = {}
        for s in settings:  # one probe bank per window; generation always uses the engine's pool
            block = s.block % eng.model.n_layer
            window = s.window or len(eng.pool.blocks)
            if (block, window) == (eng.pool.target_block, len(eng.pool.blocks)):
                self.pools[s.label] = eng.pool
            else:  # the paper's probe reads the target alone; other windows score adapters as the engine does
                paper = (s.probe_input, block, window) == ("residual", eng.model.n_layer - 1, 1)
                p = AdapterPool(eng.model, block, eng.pool.target_module, probe_blocks=window,
                                probe_modules="target" if paper else eng.pool.probe_modules,
                                sv_power=1.0 if paper else eng.pool.sv_power)
                p.other_states = lambda inp, p=p: eng._calibration_states(p, inp, other=True)
                p.add_many([a.path for a in eng.pool.adapters])
                self.pools[s.label] = p
            eng.calibrate(s.probe_input, self.pools[s.label])
        self.default = (default_signal, default_k)
        self.names = eng.pool.names
        paper = [s.label for s in settings if s.probe_input == "residual" and s.window == 1
                 and s.block % eng.model.n_layer == eng.model.n_layer - 1]
        self.paper = paper[0] if paper else (settings[0].label if settings else None)
        normed = [s.label for s in settings if s.probe_input == "normed" and self.pools[s.label] is eng.pool]
        self.normed = normed[0] if normed else None  # the probe Arrow and SpectR read: q_proj's input
        self.spectral = SpectralBank.from_pool(eng.pool) if self.normed else None
        # adapters that ship example prompts (logo_edge.examples): their router is reported beside LoGo's
        self.examples = eng.prototypes(settings[0].probe_input) is not None if settings else False

    def route_spectral(self, states: dict[str, np.ndarray], method: str, k: int | None = None):
        """Arrow / SpectR (`SPECTRAL[method]`) on the normed probe states; k overrides the config's."""
        cfg = SPECTRAL[method][0]
        if k is not None:
            cfg = SpectralConfig(cfg.method, k, cfg.temperature, cfg.blocks, cfg.calibration)
        if cfg.calibration == "zscore" and not getattr(self.spectral, "_stats", None):
            self.eng.calibrate("normed")
            self.spectral.calibrate(self.eng.pool.calibration_states("normed"))
        return self.spectral.route(self.eng.pool.split_states(states[self.normed])[0], cfg)

    def route(self, h, label: str, signal: str, k: int, calibration: str = "raw", examples: bool = False):
        """Route one setting's states. The engine's pool routes as a request does (Engine.route_state: both
        banks while MLP-only adapters are scored over the FFN input); another window's pool leaves adapters of
        the other input unranked (nan) rather than reading a second input for a study setting. `examples`: the
        engine's pool ranked by its adapters' example prompts (the "examples" router), else by LoGo alone."""
        from .engine import RouteConfig

        pool = self.pools[label]
        s = next(s for s in self.settings if s.label == label)
        if pool is self.eng.pool:  # calibrated: with the engine's shortlist (ranked to its length at most)
            short = self.eng.routing.shortlist if calibration != "raw" else 0
            cfg = RouteConfig(signal, min(k, short) if 0 < short < len(pool.names) else k, s.probe_input,
                              calibration=calibration, shortlist=short, examples=examples)
            return self.eng.route_state(h, cfg)[0]
        stats = pool.stats(s.probe_input, signal) if calibration != "raw" else None
        raw = pool.bank.signals(h, signal)
        if len(pool.other_bank):
            raw = pool.merge(raw, np.full(len(pool.other_bank), np.nan))
        return route_signals(raw, pool.names, RouterConfig(signal, k, calibration), pool.unprobeable, stats)

    def routing(self, tokens: list[int]) -> dict[str, np.ndarray]:
        """The probe states of every setting: one probe per probe input and last block, read over the
        union of the windows that end there, then sliced per setting."""
        groups: dict[tuple[str, int], set[int]] = {}
        for s in self.settings:
            pool = self.pools[s.label]
            groups.setdefault((s.probe_input, pool.target_block), set()).update(pool.blocks)
        states, other = {}, {}
        eng_pool = self.eng.pool
        reads = eng_pool.probe_reads  # the target's input, and the FFN's while MLP-only adapters are pooled
        for (inp, last), blocks in groups.items():
            order = sorted(blocks)
            h = self.eng.probe(tokens, inp, order, reads if last == eng_pool.target_block else eng_pool.target_module)
            states[(inp, last)] = dict(zip(order, h[:len(order)]))
            other[(inp, last)] = dict(zip(order, h[len(order):]))
        out = {}
        for s in self.settings:
            pool = self.pools[s.label]
            rows = states[(s.probe_input, pool.target_block)]
            out[s.label] = np.stack([rows[b] for b in pool.blocks])
            if pool is eng_pool and len(eng_pool.other_bank):  # the engine's layout: then the FFN input's rows
                rows = other[(s.probe_input, pool.target_block)]
                out[s.label] = np.concatenate([out[s.label], np.stack([rows[b] for b in pool.blocks])])
        return out

    def methods(self, ex: Example, states: dict[str, np.ndarray], rng: random.Random, in_pool: bool,
                spectral: bool = True) -> dict:
        """method name -> mixture ({name: weight} or 'base'); with `spectral`, Arrow and SpectR too."""
        n = len(self.names)
        m: dict[str, object] = {"base": "base", "uniform": {a: 1.0 / n for a in self.names}}
        m["random k=3"] = {a: 1 / 3 for a in rng.sample(self.names, 3)}
        if in_pool:
            m["oracle"] = {ex.task: 1.0}
        main, paper = self.settings[0].label, self.paper
        for sig, k in LOGO_GRID:  # the paper's: raw signals at the last block
            m[f"LoGo-{sig} k={k}"] = self._mix(states[paper], paper, sig, k)
        sig, k = self.default
        for cal in list(CALIBRATIONS)[1:]:  # calibrated signals on the engine's window: both signals at k, top-1
            for ss, kk in [(s2, k) for s2 in SIGNAL_NAMES] + [("norm", 1)]:
                m[f"LoGo-{ss} k={kk} [{cal}]"] = self._mix(states[main], main, ss, kk, cal)
        for s in self.settings[1:]:
            if s.generate:
                m[f"LoGo-{sig} k={k} [zscore, {s.label}]"] = self._mix(states[s.label], s.label, sig, k, "zscore")
        if self.examples:
            m[f"examples k={k}"] = self._mix(states[main], main, sig, k, "zscore", examples=True)
        if spectral and self.spectral is not None:
            for name in GENERATED_SPECTRAL:
                m[name] = {self.names[i]: w for i, w in self.route_spectral(states, name).mixture()}
        return m

    def _mix(self, h, label, signal, k, calibration="raw", examples=False) -> dict[str, float]:
        r = self.route(h, label, signal, k, calibration, examples)
        return {self.pools[label].names[i]: w for i, w in r.mixture()}

    def generate(self, ex: Example, mixture, merge: str = "mixture", **route) -> tuple[str, float]:
        task = TASKS[ex.task]
        t0 = time.perf_counter()
        out = self.eng.create_chat_completion([{"role": "user", "content": ex.prompt}], adapters=mixture,
                                              max_tokens=task.max_tokens, merge=merge, **route)
        return out["choices"][0]["message"]["content"], time.perf_counter() - t0


def run_eval(eng, n_per_task: int, out_dir: Path, quick: bool = False, tasks: list[str] | None = None,
             seed: int = 0, n_route: int = 0, windows: list[int] | None = None,
             spectral: bool | None = None, methods: list[str] | None = None,
             shard: tuple[int, int] | None = None) -> dict:
    """Evaluate; returns a summary dict (also written as report.md / results.csv / heatmap.png).

    Generation runs on the first `n_per_task` test examples of each task; routing statistics (hit rates,
    signals) on the first max(n_per_task, n_route), since a probe costs far less than a generation.
    `windows` adds probe windows (the engine's probe input, ending at the last block) to the hit-rate table only.
    `spectral`: Arrow and SpectR are generated (GENERATED_SPECTRAL) when True, or when None and not
    `quick`; their hit rates are reported unless False. `methods`: generate only these (names as in
    results.csv; a large pool's run cannot afford every method on every example), hit rates as ever.
    `shard` (k, n): only every n-th example from the k-th, for n processes on n cores; `merge_eval` joins their
    output directories (each keeps its state in state.pkl) into one report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mid = eng.model.n_layer // 2
    w = len(eng.pool.blocks)
    own = eng.routing.probe_input  # the engine's probe first (what the default methods route on), then the other
    other = "residual" if own == "normed" else "normed"
    settings = [ProbeSetting(f"{own}, last {w} blocks", own, -1),
                ProbeSetting("residual, last block", "residual", -1, 1),
                ProbeSetting(f"{other}, last {w} blocks", other, -1),
                ProbeSetting(f"{own}, {w} blocks to block {mid}", own, mid)]
    if w == 1:
        settings = [settings[0], settings[2], settings[3]]
    settings += [ProbeSetting(f"{own}, last {n} blocks", own, -1, n, generate=False)
                 for n in windows or () if n not in (1, w)]
    ev = Evaluator(eng, settings)
    gen_spectral = (not quick if spectral is None else spectral) and ev.spectral is not None
    only = set(methods or ())  # (`methods` names the loop's dict below)
    gen_spectral = gen_spectral or bool(only & set(GENERATED_SPECTRAL))
    hit_spectral = spectral is not False and ev.spectral is not None
    pool_names = set(ev.names)
    chosen = [TASKS[t] for t in tasks] if tasks else \
        [t for t in POOL_TASKS + LARGE_TASKS if t.name in pool_names] + UNSEEN_TASKS
    def n_of(t):  # hit rates need the extra probed examples only where the task has its own adapter
        return max(n_per_task, n_route) if t.name in pool_names else n_per_task

    data = [(t, j, ex) for t in chosen for j, ex in enumerate(splits(t)["test"][:n_of(t)])]
    st = EvalState()
    rng = random.Random(seed)
    t0 = time.time()
    for i, (task, j, ex) in enumerate(data):
        if shard and i % shard[1] != shard[0]:
            continue
        _progress(i, len(data), t0, f"{task.name}")
        in_pool = task.name in pool_names
        tokens = eng.tokenize(eng.format_chat([{"role": "user", "content": ex.prompt}]))
        tp = time.perf_counter()
        states = ev.routing(tokens)
        probe_s = (time.perf_counter() - tp) / len(settings)
        for s in settings:
            pool = ev.pools[s.label]
            for sig in SIGNAL_NAMES:
                for cal in CALIBRATIONS:
                    r = ev.route(states[s.label], s.label, sig, len(pool.names), cal)
                    if cal == "raw":
                        st.signals.setdefault((f"{sig}, {s.label}", task.name), []).append(r.signals)
                    if in_pool:
                        st.hit((f"{sig} [{cal}]", s.label, task.name), r, pool.names.index(task.name))
        if ev.examples and in_pool:
            main = settings[0].label
            r = ev.route(states[main], main, "norm", len(ev.names), "zscore", examples=True)
            st.hit((EXAMPLES_HIT, main, task.name), r, ev.names.index(task.name))
        if hit_spectral:
            _spectral_hits(ev, st, states, task.name if in_pool else None)
        if j >= n_per_task:
            continue
        done: dict[tuple, tuple[str, float]] = {}
        methods = every = ev.methods(ex, states, rng, in_pool, gen_spectral)
        if only:
            methods = {m: v for m, v in every.items() if m in only}
        elif quick:  # the pipeline end to end on a few methods
            methods = {m: v for m, v in methods.items() if m in ("base", "oracle", "LoGo-norm k=3",
                                                                  "LoGo-norm k=3 [zscore]", "examples k=3")
                       or (gen_spectral and m in GENERATED_SPECTRAL)}
        sig, k = ev.default
        approx = f"LoGo-{sig} k={k} [zscore, probe-cache]"
        if (not quick and not only) or approx in only:  # the approximate mode: the probe's base K/V kept
            methods[approx] = every[f"LoGo-{sig} k={k} [zscore]"]
        for method, mix in methods.items():
            key = ("base",) if mix == "base" else tuple(sorted((a, round(w, 6)) for a, w in mix.items()))
            if method.endswith("probe-cache]"):
                key = ("probe-cache",)
                done[key] = ev.generate(ex, "auto", signal=sig, k=k, prefill="probe-cache",
                                       probe_input=settings[0].probe_input, calibration="zscore")
            if key not in done:
                done[key] = ev.generate(ex, mix)
            pred, secs = done[key]
            # routed methods count the probe; probe-cache's generation timed it whole
            routed = method.startswith(("LoGo", "Arrow", "SpectR", "examples")) and not method.endswith("probe-cache]")
            st.rows.append(dict(idx=i, task=task.name, group="in-pool" if in_pool else "unseen", method=method,
                                score=score(task, pred, ex.refs), seconds=secs + (probe_s if routed else 0.0),
                                adapters=";".join(f"{a}:{w:.3f}" for a, w in mix.items()) if mix != "base" else "",
                                pred=pred.strip()[:200], ref=ex.answer[:200]))
    _progress(len(data), len(data), t0, "done")
    print(file=sys.stderr)
    if not quick and not only:
        _fusion_pass(ev, st, data)
    with open(out_dir / "state.pkl", "wb") as f:
        pickle.dump(dict(st=st, settings=settings, tasks=[t.name for t in chosen], n=n_per_task, n_route=n_route,
                         quick=quick, elapsed=time.time() - t0), f)
    return _write(st, out_dir, ev, chosen, n_per_task, time.time() - t0, quick, n_route)


def merge_eval(eng, dirs: list[Path], out_dir: Path) -> dict:
    """One report from the output directories of `run_eval` shards (run on the same engine settings and pool)."""
    parts = []
    for d in dirs:
        try:
            with open(Path(d) / "state.pkl", "rb") as f:
                parts.append(pickle.load(f))
        except FileNotFoundError:
            raise AdapterError(f"{d}: no state.pkl (not a logo-edge eval output directory)") from None
    first = parts[0]
    if any((p["tasks"], p["n"], p["n_route"]) != (first["tasks"], first["n"], first["n_route"]) for p in parts):
        raise AdapterError(f"{', '.join(map(str, dirs))}: the shards were run with different tasks or sizes")
    st = EvalState()
    for p in parts:
        st.rows += p["st"].rows
        for field_name in ("signals", "hits", "route_s"):
            merged = getattr(st, field_name)
            for k, v in getattr(p["st"], field_name).items():
                merged.setdefault(k, []).extend(v)
    st.rows.sort(key=lambda r: r["idx"])
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = Evaluator(eng, first["settings"])
    return _write(st, out_dir, ev, [TASKS[t] for t in first["tasks"]], first["n"],
                  max(p["elapsed"] for p in parts), first["quick"], first["n_route"])


def _routers(ev) -> dict[str, tuple[str, str, object]]:
    """The side-by-side table's routers: name (as its generated method) -> (hit-rate row, probe label,
    route(states) at k=3). LoGo as the paper (raw, residual, last block), the default (zscore on the engine's
    window) and the default on the other probe input, then Arrow and SpectR (normed probe)."""
    main, paper = ev.settings[0].label, ev.paper
    other = next((s.label for s in ev.settings if s.probe_input != ev.settings[0].probe_input and s.block == -1
                  and s.window == 0), None)  # the engine's window on the other probe input
    out = {}
    logo = [("LoGo-norm k=3", "norm", "raw", paper), ("LoGo-entropy k=3", "entropy", "raw", paper),
            ("LoGo-norm k=3 [zscore]", "norm", "zscore", main),
            ("LoGo-entropy k=3 [zscore]", "entropy", "zscore", main),
            (f"LoGo-norm k=3 [zscore, {other}]", "norm", "zscore", other)]
    for name, sig, cal, label in logo:
        if label is not None:
            out[name] = (f"{sig} [{cal}]", label, lambda st, lab=label, sg=sig, c=cal: ev.route(st[lab], lab, sg, 3, c))
    if ev.spectral is not None:
        for name, (_, hit) in SPECTRAL.items():
            out[name] = (hit, ev.normed, lambda st, m=name: ev.route_spectral(st, m))
    if ev.examples:
        out["examples k=3"] = (EXAMPLES_HIT, main, lambda st: ev.route(st[main], main, "norm", 3, "zscore", True))
    return out


def _spectral_hits(ev, st: EvalState, states: dict[str, np.ndarray], own: str | None) -> None:
    """Arrow and SpectR hit rates on one prompt (`own`: its task's adapter, None if unseen), and every
    router's routing time (signals, selection, weights; not the probe)."""
    n = len(ev.names)
    if own is not None:
        for name, (_, hit) in SPECTRAL.items():
            st.hit((hit, ev.normed, own), ev.route_spectral(states, name, n), ev.names.index(own))
    for name, (_, _, route) in _routers(ev).items():
        t0 = time.perf_counter()
        route(states)
        st.route_s.setdefault(name, []).append(time.perf_counter() - t0)


def _fusion_pass(ev, st: EvalState, data) -> None:
    """Fusion vs mixture for the best LoGo setting on the main probe."""
    logo = [r for r in st.rows if r["method"].startswith("LoGo") and ("[" not in r["method"] or any(
        f"[{c}]" in r["method"] for c in CALIBRATIONS))]
    if not logo:
        return
    means = {}
    for r in logo:
        means.setdefault(r["method"], []).append(r["score"])
    best = max(means, key=lambda m: np.mean(means[m]))
    print(f"[eval] fusion pass for {best}", file=sys.stderr)
    for r in [r for r in st.rows if r["method"] == best]:
        mix = {a.split(":")[0]: float(a.split(":")[1]) for a in r["adapters"].split(";")}
        task, _, ex = data[r["idx"]]
        try:
            pred, secs = ev.generate(ex, mix, merge="fusion")
        except AdapterError as e:  # pools of mixed recipes cannot be averaged
            print(f"[eval] fusion skipped: {e}", file=sys.stderr)
            return
        st.rows.append({**r, "method": f"{best} (fusion)", "score": score(task, pred, ex.refs),
                        "seconds": secs, "pred": pred.strip()[:200]})


def _table(rows: list[dict], tasks: list[str], methods: list[str]) -> str:
    if len(tasks) > 16:  # a large pool: a row per task
        return _table_by_task(rows, tasks, methods)
    head = "| method | " + " | ".join(tasks) + " | mean | s/example |\n|---|" + "---|" * (len(tasks) + 2)
    lines = [head]
    for m in methods:
        cells, allv, secs = [], [], []
        for t in tasks:
            v = [r["score"] for r in rows if r["method"] == m and r["task"] == t]
            secs += [r["seconds"] for r in rows if r["method"] == m and r["task"] == t]
            cells.append(f"{100 * np.mean(v):.1f}" if v else "–")
            if v:
                allv.append(np.mean(v))
        mean = f"**{100 * np.mean(allv):.1f}**" if allv else "–"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean} | {np.mean(secs):.2f} |")
    return "\n".join(lines)


def _table_by_task(rows: list[dict], tasks: list[str], methods: list[str]) -> str:
    lines = ["| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    means: dict[str, list[float]] = {m: [] for m in methods}
    for t in tasks:
        cells = []
        for m in methods:
            v = [r["score"] for r in rows if r["method"] == m and r["task"] == t]
            cells.append(f"{100 * np.mean(v):.1f}" if v else "–")
            if v:
                means[m].append(float(np.mean(v)))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{100 * np.mean(v):.1f}**" if v else "–" for v in means.values())
                 + " |")
    return "\n".join(lines)


def _by_scored_modules(st: EvalState, ev) -> str:
    """Top-1 hit rate of each router over the tasks whose adapter is scored over the same modules (the probe
    target, or what an adapter without it is scored over: v, k and v, the FFN's gate and up)."""
    groups: dict[str, list[str]] = {}
    for a in ev.eng.pool.adapters:
        groups.setdefault("+".join(a.probed) or "unprobeable", []).append(a.name)
    if len(groups) < 2:
        return ""
    routers = _routers(ev)
    md = ["## Top-1 hit rate by what the adapter is scored over (95 % bootstrap intervals)\n",
          "| scored over | adapters | " + " | ".join(routers) + " |", "|---|---|" + "---|" * len(routers)]
    for g, names in groups.items():
        cells = []
        for hit, label, _ in routers.values():
            hits = [np.array(st.hits[(hit, label, t)], float)[:, :1] for t in names if (hit, label, t) in st.hits]
            t1 = _boot(hits) if hits else None
            cells.append(f"{100 * t1[0]:.1f} [{100 * t1[1]:.1f}, {100 * t1[2]:.1f}]" if t1 else "–")
        md.append(f"| {g} | {len(names)} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def _write(st: EvalState, out: Path, ev, chosen, n, elapsed, quick, n_route) -> dict:
    summary: dict = {"hit_rates": {}, "n_per_task": n, "elapsed_s": round(elapsed)}
    md = [f"# logo-edge evaluation\n\n{n} held-out test examples per task (the first {n} of each task's "
          f"fixed test split; in-pool routing hit rates and signals on the first {max(n, n_route)}), greedy "
          f"decoding, "
          f"pool of {len(ev.names)} adapters ({', '.join(ev.names)}). Metrics: exact match "
          "(normalized) for classification and short answers, ROUGE-L F1 for generation (qasc, sql, e2e, "
          f"wikidata, word_sorting). Total time {elapsed / 60:.1f} min.\n"]
    if st.rows:
        with open(out / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(st.rows[0]))
            w.writeheader()
            w.writerows(st.rows)
        methods = list(dict.fromkeys(r["method"] for r in st.rows))
        for group in ("in-pool", "unseen"):
            rows = [r for r in st.rows if r["group"] == group]
            if rows:
                tasks = list(dict.fromkeys(r["task"] for r in rows))
                ms = [m for m in methods if any(r["method"] == m for r in rows)]
                md.append(f"## {group} tasks (score x100)\n\n" + _table(rows, tasks, ms) + "\n")
                summary[group] = {m: float(np.mean([np.mean([r["score"] for r in rows if r["method"] == m
                                                              and r["task"] == t]) for t in tasks
                                                     if any(r["method"] == m and r["task"] == t for r in rows)]))
                                  for m in ms}
    if st.hits:
        md.append("## In-pool routing hit rate (own adapter ranked first / within top 3)\n")
        md.append("| signal [calibration] | probe | top-1 | top-3 |\n|---|---|---|---|")
        for sig in dict.fromkeys(g for g, _, _ in st.hits):
            for s in ev.settings:
                v = [h for (g, lab, _), hs in st.hits.items() if g == sig and lab == s.label for h in hs]
                if v:
                    t1, t3 = np.mean([a for a, _ in v]), np.mean([b for _, b in v])
                    summary["hit_rates"][f"{sig}, {s.label}"] = (float(t1), float(t3))
                    md.append(f"| {sig} | {s.label} | {100 * t1:.1f} | {100 * t3:.1f} |")
        md.append(f"\nChance: top-1 {100 / len(ev.names):.1f}, top-3 {300 / len(ev.names):.1f}.\n")
    if st.route_s:
        md.append(_routers_table(st, ev, summary))
        md.append(_by_scored_modules(st, ev))
    _heatmap(st, ev, chosen, out)
    md.append("![signals](heatmap.png)\n")
    (out / "report.md").write_text("\n".join(md))
    return summary


def _boot(per_task: list[np.ndarray], ratio: bool = False, seed: int = 0) -> tuple[float, float, float]:
    """The mean over tasks of each task's mean, and its 95 % bootstrap interval (examples resampled within
    each task, BOOTSTRAP times). Each array is (n, m); with `ratio`, the statistic is column 0 over column 1
    (paired: the same examples resampled for both)."""
    rng = np.random.default_rng(seed)
    point = np.mean([a.mean(axis=0) for a in per_task], axis=0)  # (m,)
    boot = np.mean([a[rng.integers(0, len(a), (BOOTSTRAP, len(a)))].mean(axis=1) for a in per_task], axis=0)
    with np.errstate(all="ignore"):  # (BOOTSTRAP, m); a resample can have a zero denominator
        stat, dist = (point[0] / point[1], boot[:, 0] / boot[:, 1]) if ratio else (point[0], boot[:, 0])
    lo, hi = np.nanpercentile(np.where(np.isfinite(dist), dist, np.nan), [2.5, 97.5])
    return float(stat), float(lo), float(hi)


def _scores_by_task(rows: list[dict], group: str, methods: tuple[str, ...]) -> list[np.ndarray]:
    """Per task, (n, len(methods)) scores of the examples every method was generated on."""
    by: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        if r["group"] == group and r["method"] in methods:
            by.setdefault((r["task"], r["idx"]), {})[r["method"]] = r["score"]
    tasks: dict[str, list[list[float]]] = {}
    for (task, _), v in by.items():
        if len(v) == len(methods):
            tasks.setdefault(task, []).append([v[m] for m in methods])
    return [np.array(v) for v in tasks.values()]


def _routers_table(st: EvalState, ev, summary: dict) -> str:
    """Every router side by side: hit rates, task scores (in-pool, relative to the oracle, unseen) with
    bootstrap intervals, and routing time; reference rows (base, uniform, oracle) for the scores."""
    def ci(t):
        return f"{100 * t[0]:.1f} [{100 * t[1]:.1f}, {100 * t[2]:.1f}]" if t else "–"

    def boot(groups, ratio=False):
        return _boot(groups, ratio) if groups else None

    pool_tasks = [t for t in dict.fromkeys(t for _, _, t in st.hits)]
    md = ["## Routers side by side (95 % bootstrap intervals)\n",
          "Every router from the same probe pass at k=3: hit rates on the in-pool routing prompts, scores "
          "(x100) on the generated examples, the mean over tasks with examples resampled within each task "
          f"({BOOTSTRAP} resamples); `/ oracle` is the in-pool score over the oracle's on the same examples. "
          "Routing time: signals, selection and weights for one request, the probe excluded. Arrow and SpectR "
          "read the normed probe (q_proj's input); `window mean` averages a block's scores over the window.\n",
          "| router | probe | top-1 | top-3 | in-pool score | / oracle | unseen score | routing ms |",
          "|---|---|---|---|---|---|---|---|"]
    out = summary.setdefault("routers", {})
    for name in ["base", "uniform", "oracle"]:
        sc, un = boot(_scores_by_task(st.rows, "in-pool", (name,))), boot(_scores_by_task(st.rows, "unseen", (name,)))
        if sc or un:
            md.append(f"| {name} | – | – | – | {ci(sc)} | – | {ci(un)} | – |")
            out[name] = {"in-pool": sc, "unseen": un}
    for name, (hit, label, _) in _routers(ev).items():
        hits = [np.array(st.hits[(hit, label, t)], float) for t in pool_tasks if (hit, label, t) in st.hits]
        t1, t3 = boot([h[:, :1] for h in hits]), boot([h[:, 1:] for h in hits])
        sc, un = boot(_scores_by_task(st.rows, "in-pool", (name,))), boot(_scores_by_task(st.rows, "unseen", (name,)))
        rel = boot(_scores_by_task(st.rows, "in-pool", (name, "oracle")), ratio=True)
        ms = 1000 * float(np.mean(st.route_s[name])) if st.route_s.get(name) else None
        md.append(f"| {name} | {label} | {ci(t1)} | {ci(t3)} | {ci(sc)} | {ci(rel)} | {ci(un)} | "
                  + (f"{ms:.2f} |" if ms is not None else "– |"))
        out[name] = {"top1": t1, "top3": t3, "in-pool": sc, "vs_oracle": rel, "unseen": un, "route_ms": ms}
    return "\n".join(md) + "\n"


def _heatmap(st: EvalState, ev, chosen, out: Path) -> None:
    key = f"norm, {ev.paper}"
    tasks = [t.name for t in chosen if (key, t.name) in st.signals]
    if not tasks:
        return
    mat = np.array([np.nanmean(np.stack(st.signals[(key, t)]), axis=0) for t in tasks])  # (tasks, adapters)
    lo, hi = np.nanmin(mat, axis=0), np.nanmax(mat, axis=0)
    norm = (mat - lo) / np.where(hi > lo, hi - lo, 1)
    with open(out / "signals.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task"] + ev.names)
        for t, row in zip(tasks, mat):
            w.writerow([t] + [f"{x:.5g}" for x in row])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(ev.names), 1 + 0.4 * len(tasks)))
    ax.imshow(norm, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(ev.names)), ev.names, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_title("LoGo norm signal (residual, last block), min-max per adapter")
    fig.tight_layout()
    fig.savefig(out / "heatmap.png", dpi=110)
    plt.close(fig)


def score_alone(eng, n_per_task: int, out_dir: Path, manifest: Path | None = None) -> dict:
    """Every adapter alone (weight 1) against the base model on its own task's held-out test examples.

    Writes alone.md; with `manifest` (a pool's manifest.json) records score_alone / score_base there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = Evaluator(eng, [])
    res: dict[str, dict] = {}
    names = [n for n in eng.pool.names if n in TASKS]
    t0 = time.time()
    for i, name in enumerate(names):
        task, scores = TASKS[name], {"alone": [], "base": []}
        for ex in splits(task)["test"][:n_per_task]:
            _progress(i, len(names), t0, name)
            for method, mix in (("alone", {name: 1.0}), ("base", "base")):
                scores[method].append(score(task, ev.generate(ex, mix)[0], ex.refs))
        res[name] = {m: round(float(np.mean(v)), 4) for m, v in scores.items()} | {"n_test": n_per_task,
                                                                                  "metric": task.metric}
    print(file=sys.stderr)
    md = [f"# Each adapter alone vs the base model on its own task\n\n{n_per_task} held-out test examples per "
          "task (the first of its fixed test split), greedy.\n", "| adapter | metric | alone | base | beats base |",
          "|---|---|---|---|---|"]
    md += [f"| {n} | {r['metric']} | {100 * r['alone']:.1f} | {100 * r['base']:.1f} | "
           f"{'yes' if r['alone'] > r['base'] else '**no**'} |" for n, r in res.items()]
    (out_dir / "alone.md").write_text("\n".join(md) + "\n")
    if manifest is not None and manifest.exists():
        import json

        m = json.loads(manifest.read_text())
        for n, r in res.items():
            m["adapters"].setdefault(n, {}).update(score_alone=r["alone"], score_base=r["base"],
                                                   score_n_test=n_per_task, score_metric=r["metric"])
        manifest.write_text(json.dumps(m, indent=1, sort_keys=True))
    return res
