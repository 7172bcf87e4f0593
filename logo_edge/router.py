"""LoGo routing in pure numpy: adapter outputs from one hidden state, signals, top-k, weights.

Nothing here needs llama.cpp; the engine hands in h (the probe's hidden state)
and a ProbeBank of every adapter's target-module A/B.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import RoutingError


class ProbeBank:
    """Target-module A/B of every adapter, padded to the largest rank so one einsum serves all.

    Zero-padding the rank does not change o_i = c_i * B_i (A_i h).
    """

    def __init__(self, mats: Sequence[tuple[np.ndarray, np.ndarray, float]]):
        if not mats:
            raise RoutingError("the probe bank is empty: load at least one adapter with the target module")
        r_max = max(a.shape[0] for a, _, _ in mats)
        d_in = mats[0][0].shape[1]
        d_out = mats[0][1].shape[0]
        n = len(mats)
        self.A = np.zeros((n, r_max, d_in), np.float32)  # (N, r, d_in)
        self.Bt = np.zeros((n, r_max, d_out), np.float32)  # (N, r, d_out): B transposed, rows contiguous
        self.scale = np.zeros(n, np.float64)
        for i, (a, b, c) in enumerate(mats):
            r = a.shape[0]
            if a.shape[1] != d_in or b.shape != (d_out, r):
                raise RoutingError(f"probe bank entry {i}: A {a.shape} / B {b.shape} do not match "
                                   f"d_in={d_in}, d_out={d_out}")
            self.A[i, :r] = a
            self.Bt[i, :r] = b.T
            self.scale[i] = c
        # ||c B z||^2 = c^2 z^T (B^T B) z: the norm signal needs only these r x r Gram matrices
        self.gram = np.einsum("nro,nso->nrs", self.Bt, self.Bt, dtype=np.float64)  # (N, r, r)

    def __len__(self) -> int:
        return self.A.shape[0]

    @property
    def nbytes(self) -> int:
        return self.A.nbytes + self.Bt.nbytes + self.gram.nbytes

    def _z(self, h: np.ndarray) -> np.ndarray:
        n, r_max, d_in = self.A.shape
        return (self.A.reshape(n * r_max, d_in) @ np.asarray(h, np.float32)).reshape(n, r_max)  # (N, r)

    def norms(self, h: np.ndarray) -> np.ndarray:
        """||o_i||_2 for every adapter without forming o: O(N r^2) after A h instead of O(N r d_out)."""
        z = self._z(h).astype(np.float64)
        sq = np.einsum("nr,nrs,ns->n", z, self.gram, z)  # (N,)
        return np.abs(self.scale) * np.sqrt(np.maximum(sq, 0.0))

    def outputs(self, h: np.ndarray) -> np.ndarray:
        """o_i = c_i * B_i (A_i h) for every adapter; h is (d_in,), the result (N, d_out) float64."""
        z = self._z(h)  # (N, r): one matrix-vector product
        o = z[:, 0, None] * self.Bt[:, 0]  # (N, d_out), accumulated over the rank: r_max wide vector ops
        for j in range(1, z.shape[1]):
            o += z[:, j, None] * self.Bt[:, j]
        return o.astype(np.float64) * self.scale[:, None]


# ---- signals: (N, d_out) adapter outputs -> (N,) scores; a registry, extend by adding an entry


def norm_signal(o: np.ndarray) -> np.ndarray:
    """s_i = ||o_i||_2."""
    return np.linalg.norm(o, axis=-1)


def entropy_signal(o: np.ndarray) -> np.ndarray:
    """s_i = 1 / (H(softmax(o_i)) + 1e-6), H(p) = -sum p log(p + 1e-8)."""
    z = o - o.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    ent = -(p * np.log(p + 1e-8)).sum(axis=-1)
    return 1.0 / (ent + 1e-6)


SIGNALS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "norm": norm_signal,
    "entropy": entropy_signal,
}


# ---- calibration: raw signal -> comparable score, and the positive weight of each selected score.
# `mean`/`sd` are each adapter's signal statistics over generic calibration prompts (logo_edge.calibration).


def _raw(s, mean, sd):
    return s


def _ratio(s, mean, sd):
    return s / mean  # "how much more than usual"; positive, so it also weights


def _zscore(s, mean, sd):
    return (s - mean) / sd


def _proportional(scores: np.ndarray) -> np.ndarray:
    total = scores.sum()
    return scores / total if total > 0 else np.full(len(scores), 1.0 / len(scores))


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max())
    return e / e.sum()


# mode -> (score from raw signal and stats, weights of the selected scores)
CALIBRATIONS: dict[str, tuple[Callable, Callable[[np.ndarray], np.ndarray]]] = {
    "raw": (_raw, _proportional),  # the paper's, exactly
    "ratio": (_ratio, _proportional),
    "zscore": (_zscore, _softmax),  # z can be negative: weights are a softmax over the selected
}


@dataclass(frozen=True)
class RouterConfig:
    """How to rank and weight adapters: the signal, how many to keep, and how signals are calibrated."""

    signal: str = "norm"
    k: int = 3
    calibration: str = "raw"

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise RoutingError(f"unknown signal {self.signal!r}: choose one of {sorted(SIGNALS)}")
        if not isinstance(self.k, (int, np.integer)) or isinstance(self.k, bool) or self.k < 1:
            raise RoutingError(f"k must be an integer >= 1, got {self.k!r}")
        if self.calibration not in CALIBRATIONS:
            raise RoutingError(f"unknown calibration {self.calibration!r}: choose one of {list(CALIBRATIONS)}")


@dataclass
class Routing:
    """Result of routing one request: a signal and a weight per pool adapter (weight 0 if not selected)."""

    names: list[str]
    signals: np.ndarray  # (N,) raw signal; nan where the adapter could not be scored
    weights: np.ndarray  # (N,) sums to 1 over `selected`
    selected: list[int]  # pool indices, best first
    excluded: dict[str, str] = field(default_factory=dict)  # name -> why it was not ranked
    scores: np.ndarray | None = None  # (N,) calibrated score the selection used (= signals when raw)

    def mixture(self) -> list[tuple[int, float]]:
        """(pool index, weight) of the selected adapters, best first."""
        return [(i, float(self.weights[i])) for i in self.selected]


def select(signals: np.ndarray, k: int, eligible: np.ndarray | None = None) -> list[int]:
    """Indices of the top-k eligible signals, highest first; ties go to the lower index."""
    s = np.asarray(signals, np.float64)
    idx = np.arange(len(s)) if eligible is None else np.flatnonzero(eligible)
    order = idx[np.argsort(-s[idx], kind="stable")]  # stable sort keeps lower index first on ties
    return [int(i) for i in order[: min(k, len(order))]]


def weights_for(signals: np.ndarray, selected: list[int], rule=_proportional) -> np.ndarray:
    """w_i = s_i / sum_S s_j on the selected set (uniform if every selected signal is 0), or `rule`'s."""
    w = np.zeros(len(signals), np.float64)
    if selected:
        w[selected] = rule(np.asarray(signals, np.float64)[selected])
    return w


def route(outputs: np.ndarray, names: Sequence[str], config: RouterConfig,
          unprobeable: dict[str, str] | None = None,
          stats: tuple[np.ndarray, np.ndarray] | None = None) -> Routing:
    """Rank adapters by the configured signal on their outputs (N, d_out) and weight the top-k.

    Adapters named in `unprobeable` (name -> reason) have no output row; their signal is nan.
    Non-finite outputs or scores exclude that adapter with a warning naming it. Calibrated modes
    need `stats`: (mean, sd) of the configured signal per output row, over the calibration prompts.
    """
    outputs = np.asarray(outputs, np.float64)
    with np.errstate(all="ignore"):
        raw = SIGNALS[config.signal](outputs)  # (N_probed,)
    raw[~np.isfinite(outputs).all(axis=1)] = np.nan
    return route_signals(raw, names, config, unprobeable, stats)


def route_signals(raw: np.ndarray, names: Sequence[str], config: RouterConfig,
                  unprobeable: dict[str, str] | None = None,
                  stats: tuple[np.ndarray, np.ndarray] | None = None) -> Routing:
    """`route` from raw signals already computed, one per probeable adapter (nan = not usable)."""
    unprobeable = dict(unprobeable or {})
    names = list(names)
    rows = np.array([i for i, n in enumerate(names) if n not in unprobeable], int)
    if len(rows) != len(raw):
        raise RoutingError(f"{len(raw)} signals for {len(rows)} probeable adapters")
    to_score, rule = CALIBRATIONS[config.calibration]
    if config.calibration != "raw" and (stats is None or len(stats[0]) != len(raw)):
        raise RoutingError(f"calibration {config.calibration!r} needs the adapters' calibration statistics")
    signals = np.full(len(names), np.nan)
    scores = np.full(len(names), np.nan)
    with np.errstate(all="ignore"):
        mean, sd = stats if stats is not None else (np.ones(len(raw)), np.ones(len(raw)))
        signals[rows] = raw
        scores[rows] = to_score(np.asarray(raw, np.float64), np.asarray(mean, np.float64),
                                np.asarray(sd, np.float64))
    excluded = dict(unprobeable)
    eligible = np.zeros(len(names), bool)
    ok = np.isfinite(signals[rows]) & np.isfinite(scores[rows])  # (N_probed,)
    eligible[rows[ok]] = True
    for i in rows[~ok]:  # rare: name each excluded adapter
        excluded[names[i]] = "non-finite adapter output or signal"
        warnings.warn(f"adapter {names[i]!r}: non-finite output or signal, excluded from routing",
                      RuntimeWarning, stacklevel=3)
        signals[i] = scores[i] = np.nan
    if not eligible.any():
        raise RoutingError("no adapter could be scored: " + "; ".join(f"{k}: {v}" for k, v in excluded.items()))
    selected = select(scores, config.k, eligible)
    return Routing(names, signals, weights_for(scores, selected, rule), selected, excluded, scores)
