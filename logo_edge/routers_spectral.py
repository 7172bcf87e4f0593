"""Arrow and SpectR: training-free routers from each adapter's spectrum, on the same probe states as LoGo.

Both read x, the input of the adapted module (for `attn_q`: the attention norm's output, the engine's
`normed` probe input) and score every adapter from the right singular vectors of its update c B A:

- **Arrow** (Ostapenko et al. 2024, "Towards modular LLMs by building and reusing a library of LoRAs";
  PEFT `tuners/lora/arrow.py`, `ArrowLoraLinearLayer.top_right_singular_vec_from_BA` / `.forward`):
  the prototype v_i is the top right singular vector of B_i A_i (a unit vector, so the scale c_i and the
  sign do not matter), the score |x . v_i| (x not normalized), top-k, weights softmax(s / temperature)
  over the selected (`ArrowConfig(top_k=3, router_temperature=1.0)`).
- **SpectR** (Fleshman & Van Durme 2025; github wfleshman/spectr, `llm_merging/merging/SpectR.py`: `svd`
  and `RouteWrap.forward`): B_i A_i = U S V^T is refactored as A' = c_i V^T (`self.scaling * A` after
  `svd`), the score ||A' x|| = |c_i| ||V_i^T x||: neither scaled by S nor normalized by ||x||; top-k with
  uniform weights 1/k (the code's topk=4; here k is set).

Both were defined per token and per layer; a request is routed once here, from the last prompt token
(what the probe reads), and a layer's scores are combined over the probe window by their mean over the
blocks where the adapter has the module (`blocks="mean"`), or read at the target block alone
(`blocks="target"`). The singular vectors come from the adapter files (`read_lora`), once per pool
(cached in memory by file, size and mtime). llama.cpp's GGUF stores q/k rows RoPE-permuted: a row
permutation of B leaves the singular values and right singular vectors of B A unchanged, so the scores
equal those of the PEFT weights. c_i is the file's scale alpha / r, as llama.cpp applies it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import RoutingError
from .router import Entry, Routing, fold, select, weights_for

METHODS = ("arrow", "spectr")
BLOCKS = ("mean", "target")


@dataclass(frozen=True)
class SpectralConfig:
    """A spectral router: `method` (arrow | spectr), k, Arrow's softmax temperature, how blocks combine."""

    method: str = "arrow"
    k: int = 3
    temperature: float = 1.0  # Arrow's router_temperature; SpectR weights are uniform
    blocks: str = "mean"  # mean over the probe window's blocks, or the target block alone
    # "zscore": each adapter's score standardised by its mean and sd over the calibration prompts' states (as
    # LoGo's default calibration; SpectralBank.calibrate gives the bank those states); "raw": as published
    calibration: str = "raw"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RoutingError(f"unknown spectral router {self.method!r}: choose one of {list(METHODS)}")
        if not isinstance(self.k, (int, np.integer)) or isinstance(self.k, bool) or self.k < 1:
            raise RoutingError(f"k must be an integer >= 1, got {self.k!r}")
        if not self.temperature > 0:
            raise RoutingError(f"temperature must be > 0, got {self.temperature!r}")
        if self.blocks not in BLOCKS:
            raise RoutingError(f"blocks must be one of {list(BLOCKS)}, got {self.blocks!r}")
        if self.calibration not in ("raw", "zscore"):
            raise RoutingError(f"calibration must be 'raw' or 'zscore', got {self.calibration!r}")


def spectrum(a: np.ndarray, b: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """(S (r',), Vt (r', d_in)): the nonzero singular values of c B A, largest first, and their right
    singular vectors, without forming B A. From `fold`, c B A = Q M with Q's columns orthonormal (or zero,
    with M's row), so c B A and M share S and Vt; the SVD of M is r x d_in."""
    m, _ = fold(a, b, c)  # (r, d_in) float64
    _, s, vt = np.linalg.svd(m, full_matrices=False)
    keep = s > max(s.max(initial=0.0), 0.0) * 1e-6  # directions with no output: arbitrary, dropped
    return s[keep], vt[keep]


class SpectralBank:
    """Per probeable adapter and window block: Arrow's prototype v (its top right singular vector) and
    SpectR's rows |c| V^T, laid out like the probe bank (an adapter's rows contiguous, padded with zeros
    to its largest rank in the window; zero where it has no LoRA on a block).

    `names` are the pool's adapters in pool order; `unprobeable` (name -> reason) have no entry and are
    not ranked, as in the LoGo router."""

    def __init__(self, names: Sequence[str], entries: Sequence[Sequence[Entry | None]],
                 unprobeable: dict[str, str] | None = None):
        self.names = list(names)
        self.unprobeable = dict(unprobeable or {})
        if len(entries) != len(self.names) - len(self.unprobeable) or not entries:
            raise RoutingError(f"{len(entries)} spectral entries for {len(self.names)} adapters, "
                               f"{len(self.unprobeable)} unprobeable: one entry per probeable adapter is needed")
        n_blocks = len(entries[0])
        first = next((e for row in entries for e in row if e is not None), None)
        if first is None:
            raise RoutingError("the spectral bank is empty: no adapter has a LoRA in the probe window")
        d_in = first[0].shape[1]
        spectra = [[spectrum(*e) if e is not None else None for e in row] for row in entries]
        # at least one (zero) row each, so an adapter whose update is zero scores 0 rather than breaking reduceat
        self.ranks = np.array([max([s[1].shape[0] for s in row if s is not None] + [1]) for row in spectra])
        self.offsets = np.concatenate([[0], np.cumsum(self.ranks)[:-1]]).astype(np.intp)
        self.proto = np.zeros((n_blocks, len(entries), d_in), np.float32)  # Arrow: v_ib
        self.rows = np.zeros((n_blocks, int(self.ranks.sum()), d_in), np.float32)  # SpectR: |c| V_ib^T
        self.present = np.zeros((n_blocks, len(entries)), bool)
        for i, (row, spec) in enumerate(zip(entries, spectra)):
            for j, (e, s) in enumerate(zip(row, spec)):
                if s is None or not len(s[0]):
                    continue
                self.proto[j, i] = s[1][0]
                self.rows[j, self.offsets[i]:self.offsets[i] + len(s[0])] = abs(e[2]) * s[1]
                self.present[j, i] = True

    @property
    def probeable(self) -> list[str]:
        return [n for n in self.names if n not in self.unprobeable]

    @property
    def n_blocks(self) -> int:
        return self.proto.shape[0]

    @classmethod
    def from_pool(cls, pool) -> "SpectralBank":
        """The bank of an `AdapterPool`'s probe window and module, read from its adapter files once (cached
        by the files' paths, sizes and mtimes, the window tensors and the model)."""
        key = (str(pool.model.path), tuple(pool.window_tensors), pool.query_rows,
               tuple((a.name, str(a.path), *_stamp(a.path)) for a in pool.adapters))
        if key not in _CACHE:  # an adapter scored over other modules than the target (pool.norm_only) has none
            skip = {**pool.unprobeable, **{n: f"{why} (Arrow and SpectR read the target module)"
                                           for n, why in pool.norm_only.items()}}
            _CACHE[key] = cls(pool.names, [pool_entries(pool, a.path) for a in pool.adapters if a.name not in skip],
                              skip)
        return _CACHE[key]

    def block_scores(self, h: np.ndarray, method: str) -> np.ndarray:
        """Per window block, every probeable adapter's score: (n_blocks, N) float64. h: (n_blocks, d_in)."""
        x = np.asarray(h, np.float32)
        x = x[None] if x.ndim == 1 else x
        if x.shape == (2 * self.n_blocks, self.proto.shape[2]):
            x = x[:self.n_blocks]  # the probe read the FFN's input too (pool.probe_reads): the target's rows first
        if x.shape != (self.n_blocks, self.proto.shape[2]):
            raise RoutingError(f"probe state has shape {np.shape(h)}; the spectral bank reads {self.n_blocks} "
                               f"block(s) of {self.proto.shape[2]}")
        return SCORES[method](self, x)

    def scores(self, h: np.ndarray, method: str, blocks: str = "mean") -> np.ndarray:
        """Every probeable adapter's score, (N,): the mean of its block scores over the blocks where it has
        the module (a nonzero update), or the target block's (`blocks="target"`). With h of every prompt token
        (n_blocks, n_tokens, d_in: Engine.probe_tokens), the mean over the tokens (the prompt-mean variant: the
        routers were defined per token)."""
        if np.ndim(h) == 3:
            return np.mean([self.scores(h[:, t], method, blocks) for t in range(np.shape(h)[1])], axis=0)
        per_block = self.block_scores(h, method)  # (n_blocks, N)
        if blocks == "target":
            return per_block[-1]
        return (per_block * self.present).sum(axis=0) / np.maximum(self.present.sum(axis=0), 1)

    def calibrate(self, states) -> None:
        """Every method's and block rule's per-adapter mean and sd over the calibration prompts' states
        (n_prompts, n_blocks, d_in), or their every-token states (a list of (n_blocks, n_tokens, d_in): the
        prompt-mean variant's): what calibration="zscore" standardises by."""
        self._stats = {}
        for m in SCORES:
            for b in BLOCKS:
                c = np.stack([self.scores(x, m, b) for x in states])
                self._stats[(m, b)] = (c.mean(axis=0), np.maximum(c.std(axis=0), 1e-12))

    def route(self, h: np.ndarray, config: SpectralConfig) -> Routing:
        """Rank by `config`'s scores, keep the top k (k > N: N), weight them by the method's rule."""
        with np.errstate(all="ignore"):
            raw = self.scores(h, config.method, config.blocks)
            if config.calibration == "zscore":
                if not getattr(self, "_stats", None):
                    raise RoutingError("calibration='zscore' needs the calibration prompts' states: "
                                       "SpectralBank.calibrate(pool.calibration_states('normed'))")
                mean, sd = self._stats[(config.method, config.blocks)]
                raw = (raw - mean) / sd
        rows = np.array([i for i, n in enumerate(self.names) if n not in self.unprobeable], np.intp)
        signals = np.full(len(self.names), np.nan)
        signals[rows] = raw
        excluded = dict(self.unprobeable)
        eligible = np.zeros(len(self.names), bool)
        eligible[rows] = np.isfinite(raw)
        for i in rows[~np.isfinite(raw)]:
            excluded[self.names[i]] = "non-finite spectral score"
            warnings.warn(f"adapter {self.names[i]!r}: non-finite spectral score, excluded from routing",
                          RuntimeWarning, stacklevel=2)
        if not eligible.any():
            raise RoutingError("no adapter could be scored: " + "; ".join(f"{k}: {v}" for k, v in excluded.items()))
        selected = select(signals, config.k, eligible)
        return Routing(self.names, signals, weights_for(signals, selected, WEIGHTS[config.method](config)),
                       selected, excluded, signals.copy())


def pool_entries(pool, path: Path) -> list[Entry | None]:
    """One adapter's (A, B, c) per block of the pool's probe window, from its file (None: no LoRA there).
    A fused q/k/v keeps B's query rows, as the pool does."""
    from .gguf_files import read_lora

    lora = read_lora(path, pool.model.info, only=pool.window_tensors)
    out: list[Entry | None] = []
    for t in pool.window_tensors:
        if t not in lora.pairs:
            out.append(None)
            continue
        a, b = lora.pairs[t]
        out.append((a, b if pool.query_rows is None else b[:pool.query_rows], lora.scale(t)))
    return out


def _stamp(path: Path) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns


_CACHE: dict[tuple, SpectralBank] = {}


# ---- scores per block: (bank, x (n_blocks, d_in)) -> (n_blocks, N); a registry, extend by adding an entry


def arrow_scores(bank: SpectralBank, x: np.ndarray) -> np.ndarray:
    """|x_b . v_ib|: PEFT's `sim = torch.abs(tok @ self.prototypes.T)` at each block."""
    return np.abs(np.matmul(bank.proto, x[:, :, None])[..., 0]).astype(np.float64)  # (n_blocks, N)


def spectr_scores(bank: SpectralBank, x: np.ndarray) -> np.ndarray:
    """|c_i| ||V_ib^T x_b||: SpectR's `torch.norm(einsum('arh,bsh->absr', A, x), dim=-1)` at each block."""
    z = np.matmul(bank.rows, x[:, :, None])[..., 0].astype(np.float64)  # (n_blocks, rows)
    sq = np.add.reduceat(np.square(z), bank.offsets, axis=1)  # (n_blocks, N); every rank >= 1
    return np.sqrt(sq)


SCORES: dict[str, Callable[[SpectralBank, np.ndarray], np.ndarray]] = {
    "arrow": arrow_scores,
    "spectr": spectr_scores,
}


# ---- weights of the selected: config -> rule on the selected scores


def _arrow_weights(config: SpectralConfig) -> Callable[[np.ndarray], np.ndarray]:
    def softmax(s: np.ndarray) -> np.ndarray:  # PEFT: softmax(full_score / temperature), -inf off the top-k
        e = np.exp((s - s.max()) / config.temperature)
        return e / e.sum()
    return softmax


def _uniform(config: SpectralConfig) -> Callable[[np.ndarray], np.ndarray]:
    return lambda s: np.full(len(s), 1.0 / len(s))  # SpectR: routes.scatter_(0, idx, 1 / topk)


WEIGHTS: dict[str, Callable[[SpectralConfig], Callable[[np.ndarray], np.ndarray]]] = {
    "arrow": _arrow_weights,
    "spectr": _uniform,
}


# ---- routing time against N: python -m logo_edge.routers_spectral --pools DIR [DIR ...]


def route_times(pool_dirs, repeats: int = 20, threads: int | None = None, model=None) -> list[dict]:
    """Per pool directory: the LoGo default's route and Arrow's and SpectR's (window mean, k=3) from one probe of
    the same prompt, median ms over `repeats` (after one untimed route), and the spectral bank's one-off build."""
    import statistics
    import time

    from .engine import Engine, RouteConfig

    out = []
    for d in pool_dirs:
        with Engine(model, adapters=str(d), n_threads=threads) as eng:
            tokens = eng.tokenize(eng.format_chat([{"role": "user", "content": "Is 91 a prime number? Explain."}]))
            h_res, h_norm = eng.probe(tokens, "residual"), eng.probe(tokens, "normed")
            eng.calibrate("residual")
            t0 = time.perf_counter()
            bank = SpectralBank.from_pool(eng.pool)
            build = time.perf_counter() - t0
            row = {"pool": str(d), "N": len(eng.pool), "spectral build s": build,
                   "spectral MB": (bank.proto.nbytes + bank.rows.nbytes) / 2**20}
            runs = {"LoGo default": lambda: eng.route_state(h_res, RouteConfig()),
                    "Arrow": lambda: bank.route(h_norm, SpectralConfig("arrow", 3)),
                    "SpectR": lambda: bank.route(h_norm, SpectralConfig("spectr", 3))}
            for name, fn in runs.items():
                fn()
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                row[f"{name} ms"] = 1e3 * statistics.median(times)
            out.append(row)
    return out


def hit_rates(eng, n_route: int, seed: int = 0, prompt_mean: bool = True) -> dict:
    """Top-1 hit rate (the prompt's own task adapter ranked first) on n_route held-out test prompts per pool task,
    [bootstrap 95 % interval], for the LoGo default and Arrow and SpectR raw and z-score calibrated: each adapter's
    spectral score standardised by its mean and sd over the calibration prompts' states (what LoGo's zscore does).
    With `prompt_mean`, also Arrow and SpectR on the mean of their scores over every prompt token (as they were
    defined: per token), raw and calibrated on the calibration prompts' every-token states."""
    import copy

    from .calibration import calibration_prompts
    from .eval_approx import _interval
    from .tasks import TASKS, splits

    eng.calibrate("normed")
    eng.calibrate(eng.routing.probe_input)
    try:
        bank = SpectralBank.from_pool(eng.pool)
    except RoutingError:  # no adapter scored over the target alone (probe_modules="input"): the LoGo row alone
        bank, prompt_mean = None, False
    else:
        bank.calibrate(eng.pool.calibration_states("normed"))
    names = ["LoGo default"] + (["Arrow", "SpectR", "Arrow [zscore]", "SpectR [zscore]"] if bank else [])
    if prompt_mean:
        every = copy.copy(bank)  # its own calibration statistics: over the prompt-mean scores
        every.calibrate([eng.probe_tokens(eng.tokenize(eng.format_chat([{"role": "user", "content": p}])),
                                          "normed") for p in calibration_prompts()])
        names += [f"{m} [prompt mean{c}]" for c in ("", ", zscore") for m in ("Arrow", "SpectR")]
    hits: dict[str, list[bool]] = {k: [] for k in names}
    tasks = [t for t in eng.pool.names if t in TASKS]
    for task in tasks:
        for ex in splits(TASKS[task])["test"][:n_route]:
            tokens = eng.tokenize(eng.format_chat([{"role": "user", "content": ex.prompt}]))
            routed = eng.route_state(eng.probe(tokens, eng.routing.probe_input))[0]
            hits["LoGo default"].append(routed.names[routed.selected[0]] == task)
            if bank is None:
                continue
            h = eng.probe(tokens, "normed")
            for m, label in (("arrow", "Arrow"), ("spectr", "SpectR")):
                for name, calibration in ((label, "raw"), (f"{label} [zscore]", "zscore")):
                    r = bank.route(h, SpectralConfig(m, 1, calibration=calibration))
                    hits[name].append(r.names[r.selected[0]] == task)
            if prompt_mean:
                h_all = eng.probe_tokens(tokens, "normed")
                for m, label in (("arrow", "Arrow"), ("spectr", "SpectR")):
                    for name, calibration in ((f"{label} [prompt mean]", "raw"),
                                              (f"{label} [prompt mean, zscore]", "zscore")):
                        r = every.route(h_all, SpectralConfig(m, 1, calibration=calibration))
                        hits[name].append(r.names[r.selected[0]] == task)
    rng = np.random.default_rng(seed)
    return {k: _interval(np.array(v, float), rng) for k, v in hits.items()}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pools", nargs="+", help="routing time over these pool directories (e.g. the bench's random "
                   "pools)")
    p.add_argument("--hit-rates", type=int, metavar="N_ROUTE", help="top-1 hit rates of LoGo, Arrow and SpectR, raw "
                   "and calibrated, on N_ROUTE held-out prompts per task of the pool (--adapters)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int)
    p.add_argument("--model", help="base model GGUF (default: the default model)")
    p.add_argument("--adapters", help="with --hit-rates: this pool directory (default: the shipped pool)")
    p.add_argument("--probe-modules", default=None, help="with --hit-rates: the engine's probe_modules (the LoGo "
                   "row routes as that engine; default the shipped default)")
    p.add_argument("--sv-power", type=float, default=None, help="with --hit-rates: the engine's sv_power")
    p.add_argument("--probe-input", default=None, help="with --hit-rates: the engine's RouteConfig.probe_input")
    p.add_argument("--no-prompt-mean", dest="prompt_mean", action="store_false",
                   help="with --hit-rates: skip the prompt-mean variants (a probe per prompt token)")
    args = p.parse_args(argv)
    if args.hit_rates:
        from . import defaults
        from .engine import Engine, RouteConfig

        adapters = args.adapters or (defaults.shipped_pool() if args.model else None)
        over = {k: v for k, v in (("probe_modules", args.probe_modules), ("sv_power", args.sv_power)) if v is not None}
        routing = RouteConfig(probe_input=args.probe_input) if args.probe_input else None
        with Engine(args.model, adapters, n_threads=args.threads, routing=routing, **over) as eng:
            for k, (mean, lo, hi) in hit_rates(eng, args.hit_rates, prompt_mean=args.prompt_mean).items():
                print(f"{k:<30} top-1 {100 * mean:5.1f} [{100 * lo:5.1f}, {100 * hi:5.1f}]")
    if not args.pools:
        return 0
    rows = route_times(args.pools, args.repeats, args.threads, args.model)
    cols = ["N", "LoGo default ms", "Arrow ms", "SpectR ms", "spectral build s", "spectral MB"]
    print(" ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>16.2f}" if isinstance(r[c], float) else f"{r[c]:>16}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
