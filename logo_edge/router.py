"""LoGo routing in pure numpy: adapter outputs from one hidden state, signals, top-k, weights.

Nothing here needs llama.cpp; the engine hands in h (the probe's hidden state)
and a ProbeBank of every adapter's probe-module A/B over the probe window (folded).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import RoutingError


@contextmanager
def one_blas_thread():
    """numpy's BLAS on one thread for the routing products: they are small (the largest reads 18 MB), and
    waking BLAS threads right after the probe, while llama.cpp's own threads still hold the cores, cost
    up to 3 ms a product (threadpoolctl; a no-op without it)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _CONTROLLER = False
        else:
            _CONTROLLER = ThreadpoolController()
    if not _CONTROLLER:
        yield
        return
    with _CONTROLLER.limit(limits=1, user_api="blas"):
        yield


_CONTROLLER = None

Entry = tuple[np.ndarray, np.ndarray, float]  # (A (r, d_in), B (d_out, r), c) of one adapted weight


class ZeroUpdateError(RoutingError):
    """An adapter whose update c B A is zero at every probed block: it has no row to read (ProbeBank refuses it,
    the pool makes it unprobeable)."""


def fold(a: np.ndarray, b: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """(M, Q) with c*B*A = Q*M, Q's columns orthonormal (or zero): then ||c*B*A*h|| = ||M*h||.

    From B^T B = V diag(lam) V^T: M = |c| sqrt(lam) V^T A and Q = sign(c) B V lam^-1/2. Directions
    with lam ~ 0 carry no output and are dropped (their rows of M and columns of Q are zero)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    lam, v = np.linalg.eigh(b64.T @ b64)
    keep = lam > max(lam.max(initial=0.0), 0.0) * 1e-12
    root = np.sqrt(np.where(keep, lam, 0.0))
    m = abs(c) * root[:, None] * (v.T @ a64)
    q = np.sign(c) * (b64 @ v) / np.where(keep, root, np.inf)
    return m, q


def reweigh(m: np.ndarray, q: np.ndarray, power: float) -> tuple[np.ndarray, np.ndarray]:
    """(M', Q') with Q' M' = Q M and ||M' h|| = ||S^power V^T h||, where M = U S V^T: the norm signal with the
    update's singular values raised to `power`. power=1 is M itself (||M h||: the adapter's output norm,
    LoGo); power=0 leaves ||V^T h||, the size of h's projection onto the directions the adapter reads
    (SpectR's score up to the constant |c|, which calibration cancels). The outputs Q' M' h are unchanged."""
    if power == 1.0 or not m.size:
        return m, q
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    keep = s > max(s.max(initial=0.0), 0.0) * 1e-6  # directions with no output carry none in either form
    u, s, vt = u[:, keep], s[keep], vt[keep]
    return (s ** power)[:, None] * vt, (q @ u) * s ** (1.0 - power)


class ProbeBank:
    """Every adapter's probe-module A/B over a window of blocks, folded so one matrix product serves all.

    `add(entries)` takes one adapter: its (A, B, c) at each block of the window (the last is the target
    block), or None where it has no LoRA. Each is stored folded (`fold`): adapter i's rows of M_j give
    ||o_ij|| = ||M_ij h_j|| directly, and Q (target block only) turns those rows into o_i itself.
    Rows of all adapters are concatenated (no padding to the largest rank) in arrays that grow by
    doubling; `shrink` drops the spare capacity. The bank is the only copy the pool keeps.

    Storage: the target block's M and Q in float32 (`T`, `Q`: the first routing stage reads T for every
    adapter; Q serves the entropy signal), the other window blocks' M (`W`: read for a shortlist, or for
    every adapter when the pool is small) in float32, or float16 for a large pool (`window_dtype`; products
    accumulate in float32). At 1,000 rank-8 adapters of a 576-wide model over 8 blocks float16 makes it
    101 MB instead of 166 MB, of which the norm signal reads 18 MB per request plus its shortlist's rows.
    A bank can also sit over memory-mapped arrays (`from_arrays`, the pool index), read-only: it is then
    changed through the index, not `add`.

    The norm signal over a window is the norm of the adapter's outputs at every window block stacked,
    sqrt(sum_j ||o_ij||^2); a window of one block is the paper's ||o_i||. Outputs (for the entropy
    signal) are the target block's.
    """

    WINDOW_DTYPE = np.float32  # float16 for large pools (the index chooses; `window_dtype`)

    def __init__(self, n_blocks: int, d_in: int, d_out: int, window_dtype=WINDOW_DTYPE, sv_power: float = 1.0):
        # window_dtype=np.float16 halves the earlier blocks' memory (large pools, pool_index.py); the cost is
        # measured by `logo-edge eval --approx`
        self.window_dtype = np.dtype(window_dtype)
        self.sv_power = float(sv_power)  # the norm signal's power of each update's singular values (`reweigh`)
        self._T = np.zeros((0, d_in), np.float32)  # target block rows of M
        self._W = [np.zeros((0, d_in), self.window_dtype) for _ in range(n_blocks - 1)]  # earlier blocks' M
        self._Q = np.zeros((0, d_out), np.float32)  # target block: Q transposed, rows contiguous
        self._rows = 0
        self.offsets = np.zeros(0, np.intp)  # first row of each adapter
        self.ranks = np.zeros(0, np.intp)
        self.leads = np.zeros(0, np.intp)  # of each adapter's target-block rows, how many lead (`lead_of`)
        self._lead_rows: tuple[np.ndarray, np.ndarray] | None = None  # `lead_norms`: (the rows, copied; starts)
        self.writable = True

    @classmethod
    def of(cls, entries: Sequence[Sequence[Entry | None]], sv_power: float = 1.0) -> "ProbeBank":
        """A bank of several adapters at once (each a list of per-block entries)."""
        first = next((e[0] if isinstance(e, list) else e for row in entries for e in row if e is not None), None)
        if first is None:
            raise RoutingError("the probe bank is empty: load at least one adapter with the target module")
        bank = cls(len(entries[0]), first[0].shape[1], first[1].shape[0], sv_power=sv_power)
        for row in entries:
            bank.add(row)
        bank.shrink()
        return bank

    @classmethod
    def from_arrays(cls, t: np.ndarray, w: Sequence[np.ndarray], q: np.ndarray, offsets, ranks,
                    sv_power: float = 1.0, leads=None) -> "ProbeBank":
        """A read-only bank over arrays laid out as this class stores them (T (rows, d_in) float32, W one
        (rows, d_in) float16 array per earlier window block, Q (rows, d_out) float32), e.g. memory-mapped
        from a pool index.
        Rows outside every adapter's [offset, offset + rank) must be zero (they are summed, not read)."""
        bank = cls.__new__(cls)
        # plain ndarray views of memory maps: numpy's memmap subclass adds overhead to every slice
        bank._T, bank._W, bank._Q = (np.asarray(t).view(np.ndarray), [np.asarray(x).view(np.ndarray) for x in w],
                                     np.asarray(q).view(np.ndarray))
        bank.window_dtype = w[0].dtype if len(w) else np.dtype(cls.WINDOW_DTYPE)
        bank._rows = t.shape[0]
        bank.offsets = np.asarray(offsets, np.intp)
        bank.ranks = np.asarray(ranks, np.intp)
        bank.leads = bank.ranks.copy() if leads is None else np.asarray(leads, np.intp)
        bank._lead_rows = None
        bank.writable = False
        bank.sv_power = float(sv_power)  # what the rows were folded with
        return bank

    @staticmethod
    def fold_entries(entries: Sequence[Entry | list[Entry] | None], d_in: int, d_out: int, sv_power: float = 1.0):
        """One adapter's window entries folded: (rank, [(block j, M_j, Q_j)]); RoutingError if they do not fit.
        With sv_power != 1 each block's rows are `reweigh`ed (the norm signal over S^sv_power V^T).

        An entry may be a list of (A, B, c) or (A, B, c, is_target), one per module that reads the probe's input
        (an adapter scored over several modules, or over others than the target): their folded rows are
        stacked, so the norm is sqrt(sum over modules of ||c B A h||^2), and Q reads the target's rows alone
        (o = Q M h is the target module's output; zero without it: signals other than the norm cannot read
        those)."""
        if entries[-1] is None:
            raise RoutingError(f"a probe bank entry needs one (A, B, c) or None per window block ({len(entries)}), "
                               "and its target (last) block")
        folded = []
        for j, e in enumerate(entries):
            if e is None:
                continue
            several = isinstance(e, list)
            parts = []
            for a, b, c, *target in (e if several else [e]):
                target = bool(target and target[0])
                if a.shape[1] != d_in or b.shape[1] != a.shape[0] or ((not several or target) and b.shape[0] != d_out):
                    raise RoutingError(f"probe bank entry for block {j}: A {a.shape} / B {b.shape} do not match "
                                       f"d_in={d_in}" + ("" if several and not target else f", d_out={d_out}"))
                parts.append((*fold(a, b, c), target))
            if several:
                m = np.concatenate([p[0] for p in parts])
                q = np.concatenate([qj if target else np.zeros((d_out, mj.shape[0])) for mj, qj, target in parts],
                                   axis=1)
            else:
                m, q, _ = parts[0]
            folded.append((j, *reweigh(m, q, sv_power)))
        rank = max(m.shape[0] for _, m, _ in folded)
        if not any(np.any(m) for _, m, _ in folded):  # B, A or c zero, or B A = 0: no row says anything (and a
            # range of 0 rows, as `reweigh` leaves, would shift its neighbours' sums in np.add.reduceat)
            raise ZeroUpdateError("the adapter's update is zero at every window block: it has nothing to probe")
        return rank, folded

    @staticmethod
    def lead_of(entries: Sequence[Entry | list[Entry] | None], rank: int, sv_power: float = 1.0) -> int:
        """How many of an adapter's target-block rows lead: where several modules are stacked and `reweigh`
        ordered the rows by singular value (sv_power != 1), as many as the largest module's rank (the stack's
        top singular directions); otherwise all of them. The shortlist's first stage reads these rows alone, so
        stacking modules does not multiply what it reads over a large pool (q and v: 8 rows of 16)."""
        target = entries[-1]
        if isinstance(target, list) and len(target) > 1 and sv_power != 1.0:
            return min(rank, max(a.shape[0] for a, *_ in target))
        return rank

    @staticmethod
    def rows_of(r: int, folded, n_blocks: int, d_in: int, d_out: int, window_dtype=WINDOW_DTYPE):
        """The (T, W, Q) rows one folded adapter occupies, in the bank's dtypes (zero where it has no LoRA)."""
        t = np.zeros((r, d_in), np.float32)
        w = [np.zeros((r, d_in), window_dtype) for _ in range(n_blocks - 1)]
        q = np.zeros((r, d_out), np.float32)
        for j, m, qj in folded:
            if j == n_blocks - 1:
                t[:m.shape[0]], q[:m.shape[0]] = m, qj.T
            else:
                w[j][:m.shape[0]] = m
        return t, w, q

    def add(self, entries: Sequence[Entry | None]) -> int:
        """Fold one adapter's window entries into the bank; returns its index. RoutingError leaves it unchanged."""
        if not self.writable:
            raise RoutingError("this probe bank is read-only (memory-mapped from a pool index); add through the pool")
        n_blocks, d_in, d_out = self.n_blocks, self._T.shape[1], self._Q.shape[1]
        if len(entries) != n_blocks:
            raise RoutingError(f"a probe bank entry needs one (A, B, c) or None per window block ({n_blocks}), "
                               "and its target (last) block")
        r, folded = self.fold_entries(entries, d_in, d_out, self.sv_power)
        lead = self.lead_of(entries, r, self.sv_power)
        if self._rows + r > self._T.shape[0]:  # grow by doubling: adding N adapters copies O(N) rows
            cap = max(2 * self._T.shape[0], self._rows + r, 64)
            t = np.zeros((cap, d_in), np.float32)
            w = [np.zeros((cap, d_in), self.window_dtype) for _ in range(n_blocks - 1)]
            q = np.zeros((cap, d_out), np.float32)
            t[:self._rows], q[:self._rows] = self.T, self.Q
            for new, old in zip(w, self.W):
                new[:self._rows] = old
            self._T, self._W, self._Q = t, w, q
        o = self._rows
        t, w, q = self.rows_of(r, folded, n_blocks, d_in, d_out, self.window_dtype)
        self._T[o:o + r], self._Q[o:o + r] = t, q
        for j in range(n_blocks - 1):
            self._W[j][o:o + r] = w[j]
        self._rows += r
        self.offsets = np.append(self.offsets, o)
        self.ranks = np.append(self.ranks, r)
        self.leads = np.append(self.leads, lead)
        self._lead_rows = None
        return len(self.offsets) - 1

    def remove(self, i: int) -> None:
        """Drop adapter i's rows; later adapters move down one index."""
        if not self.writable:
            raise RoutingError("this probe bank is read-only (memory-mapped from a pool index); remove through "
                               "the pool")
        o, r = int(self.offsets[i]), int(self.ranks[i])
        keep = np.r_[0:o, o + r:self._rows]
        self._T, self._W, self._Q = self.T[keep].copy(), [w[keep].copy() for w in self.W], self.Q[keep].copy()
        self._rows -= r
        self.offsets = np.delete(self.offsets, i)
        self.offsets[i:] -= r
        self.ranks = np.delete(self.ranks, i)
        self.leads = np.delete(self.leads, i)
        self._lead_rows = None

    def shrink(self) -> None:
        """Release the spare capacity left by growing."""
        if self.writable and self._T.shape[0] > self._rows:
            self._T, self._W, self._Q = self.T.copy(), [w.copy() for w in self.W], self.Q.copy()

    @property
    def T(self) -> np.ndarray:  # (rows, d_in) float32: the target block's M
        return self._T[:self._rows]

    @property
    def W(self) -> list[np.ndarray]:  # per earlier window block, (rows, d_in) float16: its M
        return [w[:self._rows] for w in self._W]

    @property
    def M(self) -> np.ndarray:  # (n_blocks, rows, d_in) float32, the whole window (a copy: for tests)
        return np.stack([w.astype(np.float32) for w in self.W] + [self.T])

    @property
    def Q(self) -> np.ndarray:  # (rows, d_out) float32
        return self._Q[:self._rows]

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def n_blocks(self) -> int:
        return len(self._W) + 1

    @property
    def d_in(self) -> int:
        return self._T.shape[1]

    @property
    def nbytes(self) -> int:
        """Memory held (or mapped), spare capacity included."""
        return (self._T.nbytes + sum(w.nbytes for w in self._W) + self._Q.nbytes + self.offsets.nbytes
                + self.ranks.nbytes + (self._lead_rows[0].nbytes if self._lead_rows is not None else 0))

    def _window(self, h: np.ndarray) -> np.ndarray:
        h = np.asarray(h, np.float32)
        window = h[None] if h.ndim == 1 else h
        if window.shape != (self.n_blocks, self.d_in):
            raise RoutingError(f"probe state has shape {h.shape}; the bank reads {self.n_blocks} block(s) of "
                               f"{self.d_in}")
        return window

    def _row_index(self, among: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Bank rows of adapters `among` (concatenated) and where each adapter's rows start in them; with
        `counts`, only each adapter's first counts[i] rows."""
        ranks = self.ranks[among] if counts is None else counts[among]
        starts = np.concatenate([[0], np.cumsum(ranks)[:-1]]).astype(np.intp)
        rows = np.repeat(self.offsets[among] - starts, ranks) + np.arange(int(ranks.sum()))
        return rows, starts

    def _squares(self, states: np.ndarray, rows=slice(None), first: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """For states (n, n_blocks, d_in): the sum over window blocks j >= first of (M_j h_j)^2 per bank row
        (`rows`: a slice or index array), and the target block's M h; both (n, rows) float64. One matrix
        product per block, float32 accumulation; float16 rows are converted in the product's operand only."""
        def product(m: np.ndarray, h: np.ndarray) -> np.ndarray:  # (rows, d_in) x (n, d_in) -> (n, rows)
            m = m.astype(np.float32, copy=False)
            return (m @ h[0] if len(h) == 1 else h @ m.T).reshape(len(h), -1).astype(np.float64)  # one h: gemv

        z = product(self.T[rows], states[:, -1])
        sq = np.square(z)
        for j in range(first, self.n_blocks - 1):
            sq += np.square(product(self._W[j][:self._rows][rows], states[:, j]))
        return sq, z

    def norms(self, h: np.ndarray, last: int | None = None, among=None, lead: bool = False) -> np.ndarray:
        """sqrt(sum over window blocks of ||o_ij||^2) per adapter, without forming o: h is (n_blocks, d_in).
        With `last`, only the window's last `last` blocks count (last=1: the paper's signal, the target
        block alone: one float32 product over T). With `among` (adapter indices), only those adapters,
        in that order: the cost is theirs alone. With `lead`, each adapter's leading rows alone at every
        block (`leads`: a stack's top singular directions; a large pool's shortlist reads these)."""
        first = 0 if last is None else max(0, self.n_blocks - last)
        window = self._window(h)[None]
        lead = lead and not np.array_equal(self.leads, self.ranks)
        if among is None and not lead:
            sq, _ = self._squares(window, slice(None), first)
            return np.sqrt(self._per_adapter(sq[0]))
        among = np.arange(len(self)) if among is None else np.asarray(among, np.intp)
        if len(among) == 0:
            return np.zeros(0)
        rows, starts = self._row_index(among, self.leads if lead else None)
        sq, _ = self._squares(window, rows, first)
        return np.sqrt(np.add.reduceat(sq[0], starts))

    def lead_norms(self, h: np.ndarray) -> np.ndarray:
        """The target block's norm over each adapter's leading rows (`leads`): the shortlist's first stage. The
        same as norms(h, last=1) where every adapter's rows all lead; otherwise over a float32 copy of the
        leading rows, gathered once (they are contiguous there: one product reads them and nothing else)."""
        if not len(self) or np.array_equal(self.leads, self.ranks):
            return self.norms(h, last=1)
        if self._lead_rows is None:
            rows, starts = self._row_index(np.arange(len(self)), self.leads)
            self._lead_rows = (np.ascontiguousarray(self.T[rows]), starts)
        t, starts = self._lead_rows
        z = (t @ self._window(h)[-1]).astype(np.float64)
        return np.sqrt(np.add.reduceat(np.square(z), starts))

    def outputs(self, h: np.ndarray) -> np.ndarray:
        """o_i = c_i B_i (A_i h) at the target block for every adapter: (N, d_out) float64."""
        z = self.T @ self._window(h)[-1]  # (rows,)
        return self._per_adapter(z[:, None] * self.Q).astype(np.float64)

    def _per_adapter(self, x: np.ndarray) -> np.ndarray:
        """Sums of x's rows (rows, ...) per adapter -> (N, ...). Offsets need not increase (an index appends
        in its own order) and rows of no adapter may lie between (a removed adapter's, in an index: never
        rewritten in place, since other processes may map them): those form segments of their own."""
        if not len(self):
            return np.zeros((0, *x.shape[1:]), x.dtype)
        order = np.argsort(self.offsets, kind="stable")
        starts = self.offsets[order]
        ends = starts + self.ranks[order]
        gaps = ends[ends < np.r_[starts[1:], x.shape[0]]]  # the first row of each run of rows of no adapter
        bounds = np.sort(np.r_[starts, gaps])
        sums = np.add.reduceat(x, bounds, axis=0)[np.searchsorted(bounds, starts)]
        out = np.empty_like(sums)
        out[order] = sums
        return out

    def signals(self, h: np.ndarray, signal: str) -> np.ndarray:
        """The raw `signal` of every adapter (nan where its output is not finite): the norm over the
        window without forming outputs, any other signal from the target block's outputs."""
        with np.errstate(all="ignore"):
            if signal == "norm":
                return self.norms(h)
            o = self.outputs(h)
            s = SIGNALS[signal](o)
        s[~np.isfinite(o).all(axis=1)] = np.nan
        return s

    def stats(self, i: int, states: np.ndarray) -> dict[str, tuple[float, float]]:
        """Mean and standard deviation of every signal of adapter i over `states` (n_prompts, n_blocks, d_in)
        (calibration prompts), as routing takes them: the norm over the window, the others at the target
        block, `norm@target` (the target block's norm over the adapter's leading rows alone: the shortlist's
        first stage, `lead_norms`) and `norm@lead` (the window's norm over its leading rows: the second)."""
        states = np.asarray(states, np.float32)
        if states.ndim != 3 or states.shape[1:] != (self.n_blocks, self.d_in):
            raise RoutingError(f"calibration states of shape {states.shape} do not fit the bank's "
                               f"{self.n_blocks} block(s) of {self.d_in}")
        rows = slice(self.offsets[i], self.offsets[i] + self.ranks[i])
        sq, z = self._squares(states, rows)  # (n_prompts, r)
        o = z @ self.Q[rows].astype(np.float64)  # the target block's outputs (n_prompts, d_out)
        signals = {name: np.sqrt(sq.sum(axis=1)) if name == "norm" else fn(o) for name, fn in SIGNALS.items()}
        signals[TARGET_NORM] = np.sqrt(np.square(z[:, :self.leads[i]]).sum(axis=1))
        signals[LEAD_NORM] = np.sqrt(sq[:, :self.leads[i]].sum(axis=1))
        return {name: (float(v.mean()), float(v.std())) for name, v in signals.items()}


TARGET_NORM = "norm@target"  # the calibration statistic of the shortlist's first stage (`lead_norms`)
LEAD_NORM = "norm@lead"  # and of its second: the window's norm over each adapter's leading rows


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
STATISTICS = frozenset([*SIGNALS, TARGET_NORM, LEAD_NORM])  # every calibration statistic `ProbeBank.stats` gives


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


NOT_SHORTLISTED = "not shortlisted (below the shortlist at the target block)"


def shortlist_norms(bank: ProbeBank, h: np.ndarray, size: int, calibration: str,
                    stats1: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """The window norm of the `size` adapters that score best on the target block alone, nan for the rest:
    (raw signals (N,), shortlisted (N,) bool). Stage one reads the target block's float32 leading rows of
    every adapter (`lead_norms`; calibrated like the window's, with their own statistics `stats1`); stage two
    reads the whole window for the shortlist only, each adapter's leading rows at every block (`norms(lead=True)`:
    where modules are stacked, their top singular directions; its calibration statistic is LEAD_NORM). Over a
    pool larger than the shortlist the rows read per adapter stay its largest module's rank however many modules
    are stacked: q and v read 8 rows of 16 (1,000 adapters: 4.4 ms a request, not 6.2)."""
    s1 = bank.lead_norms(h)
    to_score, _ = CALIBRATIONS[calibration]
    with np.errstate(all="ignore"):
        mean, sd = stats1 if stats1 is not None else (np.ones(len(s1)), np.ones(len(s1)))
        score = to_score(s1, np.asarray(mean, np.float64), np.asarray(sd, np.float64))
    score = np.where(np.isfinite(score), score, -np.inf)
    top = np.argpartition(-score, size - 1)[:size] if size < len(score) else np.arange(len(score))
    top = np.sort(top)
    raw = np.full(len(s1), np.nan)
    raw[top] = bank.norms(h, among=top, lead=True)
    considered = np.zeros(len(s1), bool)
    considered[top] = True
    return raw, considered


def route_signals(raw: np.ndarray, names: Sequence[str], config: RouterConfig,
                  unprobeable: dict[str, str] | None = None,
                  stats: tuple[np.ndarray, np.ndarray] | None = None,
                  considered: np.ndarray | None = None) -> Routing:
    """`route` from raw signals already computed, one per probeable adapter (nan = not usable).

    `considered` (bool per probeable adapter): a shortlist; the others are not ranked, and their nan
    signal is not a fault (no warning)."""
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
    if considered is not None:
        for i in rows[~considered]:
            excluded[names[i]] = NOT_SHORTLISTED
        rows = rows[considered]  # only the considered ones are ranked, or can be faulty
    eligible = np.zeros(len(names), bool)
    ok = np.isfinite(signals[rows]) & np.isfinite(scores[rows])
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
