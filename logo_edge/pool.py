"""The adapter pool: validated GGUF LoRAs, their probe bank, calibration and llama.cpp handles.

Only the probe module's A/B of each adapter over the probe window (the last `probe_blocks` blocks up
to the target block) stay in memory (the probe bank) with its calibration statistics; the full
adapter is loaded into llama.cpp when a mixture needs it and kept in an LRU under a memory budget,
so memory does not grow with the pool.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from .calibration import Stats
from .defaults import PROBE_BLOCKS, other_input_modules
from .errors import AdapterError, AdapterFileChangedError, RoutingError
from .gguf_files import read_lora
from .llm import PROBE_INPUTS, LoraHandle, Model, same_input_modules
from .pool_index import Entry, PoolIndex, file_sha256, index_key, index_root
from .router import STATISTICS, ProbeBank, ZeroUpdateError

LARGE_POOL = 256  # adapter files beyond which a new index stores the earlier window blocks in float16
# How an adapter is scored (AdapterPool's probe_modules): "target-first" over the target module where it has a
# LoRA there, else over every module it adapts that reads the same input (a v-only adapter over its v), else over
# those reading the other sub-block's input (an MLP-only adapter over its gate and up: the FFN norm's output, read
# in the same probe pass); "target" the paper's probe (an adapter without the target is not routed); "input" over
# every module reading the target's input (q, k and v), else as "target-first"
PROBE_MODULES = ("target-first", "target", "input")


@dataclass
class PoolAdapter:
    """One adapter of the pool: its row of the pool's probe bank (None, with a reason, when it has no
    LoRA on a module the probe reads) and its calibration statistics."""

    name: str
    path: Path
    modules: list[str]
    alpha: float | None
    bank_index: int | None
    rank: int | None  # its rows in the probe bank: the rank on the probe target (summed over `probed`)
    unprobeable_reason: str | None = None
    handle: LoraHandle | None = field(default=None, repr=False)
    nbytes: int = 0  # size of the full adapter's tensors (what loading it into llama.cpp costs)
    stats: dict[str, Stats] = field(default_factory=dict, repr=False)  # probe input -> signal stats
    calibrate_s: float = 0.0  # time spent computing `stats` (the matrix products)
    max_rank: int = 0  # the largest rank over all its tensors
    probed: list[str] = field(default_factory=list)  # the modules it is scored over (empty: unprobeable)
    other_index: int | None = None  # its row of the other input's bank (scored over gate/up: no attention LoRA)
    file_id: tuple[int, int] | None = None  # the file's (size, mtime_ns) when the pool read it
    sha256: str | None = None  # and its content's hash (a touched file with the same content is the same file)

    @property
    def probeable(self) -> bool:
        return self.bank_index is not None or self.other_index is not None


def _file_id(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, None when it is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def _resolve_target(info, target_module: str, block: int) -> tuple[str, int | None]:
    """The probe tensor for `target_module` in this base, and how many of its output rows are the query.

    A family with no separate query projection (phi3: fused q/k/v, GGUF attn_qkv with rows [q; k; v])
    is probed on the query rows of the fused projection: attn_q resolves to attn_qkv, and so does attn_qkv
    itself. Returns (module, None) when every output row is read."""
    shapes = info.shapes
    if target_module == "attn_q" and f"blk.{block}.attn_q.weight" not in shapes \
            and f"blk.{block}.attn_qkv.weight" in shapes:
        target_module = "attn_qkv"
    tensor = f"blk.{block}.{target_module}.weight"
    if target_module.startswith("ffn") and f"blk.{block}.ffn_gate.weight" not in shapes:
        raise AdapterError(f"the {info.arch} base model {info.path.name} fuses its MLP projections (no ffn_gate): "
                           f"target module {target_module!r} cannot be probed; use attn_q")
    if tensor not in shapes:
        raise AdapterError(f"the {info.arch} base model {info.path.name} has no {tensor} to probe "
                           f"(target module {target_module!r})")
    if target_module != "attn_qkv":
        return target_module, None
    n_out = shapes[tensor][1]
    n_heads = info.n_head + 2 * info.n_head_kv
    if not info.n_head or n_out % n_heads:
        raise AdapterError(f"the {info.arch} base model {info.path.name}: {tensor} has {n_out} output rows, "
                           f"not (n_head + 2 n_head_kv) = {n_heads} heads; its query rows cannot be found")
    return target_module, n_out // n_heads * info.n_head


class AdapterPool:
    """Adapters checked against one base model, probed at one target block and module.

    With a fused q/k/v projection (phi3), the attn_q target is the query rows of attn_qkv (`query_rows`).

    With `use_index`, `add_many` keeps what routing needs in a persisted index (pool_index.py) and maps
    it at the next start instead of re-reading every file; the probe bank is then memory-mapped. In a
    pool directory an adapter's name is its file name (without .gguf); a file given alone is named by
    its general.name."""

    def __init__(self, model: Model, target_block: int = -1, target_module: str = "attn_q",
                 max_loaded_mb: float = 1024, probe_blocks: int = PROBE_BLOCKS, use_index: bool = False,
                 window_dtype=ProbeBank.WINDOW_DTYPE, probe_modules: str = "target-first", sv_power: float = 1.0):
        if target_module not in PROBE_INPUTS:
            raise AdapterError(f"target module {target_module!r} cannot be probed; choose one of "
                               f"{sorted(PROBE_INPUTS)}")
        if probe_modules not in PROBE_MODULES:
            raise AdapterError(f"probe_modules must be one of {list(PROBE_MODULES)}, got {probe_modules!r}")
        if isinstance(sv_power, bool) or not isinstance(sv_power, (int, float, np.floating, np.integer)) \
                or not 0.0 <= sv_power <= 1.0:
            raise AdapterError(f"sv_power must be a number in [0, 1], got {sv_power!r}")
        self.sv_power = float(sv_power)
        n_layer = model.info.n_layer
        block = target_block + n_layer if target_block < 0 else target_block
        if not 0 <= block < n_layer:
            raise AdapterError(f"target block {target_block} is out of range for a model with {n_layer} blocks")
        self.model = model
        target_module, self.query_rows = _resolve_target(model.info, target_module, block)
        if not isinstance(probe_blocks, (int, np.integer)) or isinstance(probe_blocks, bool) or probe_blocks < 1:
            raise AdapterError(f"probe_blocks must be an integer >= 1, got {probe_blocks!r}")
        self.target_block = block
        self.target_module = target_module
        self.blocks = list(range(max(0, block - probe_blocks + 1), block + 1))  # the probe window, target last
        self.window_tensors = [f"blk.{b}.{target_module}.weight" for b in self.blocks]
        self.target_tensor = self.window_tensors[-1]
        self.probe_modules = probe_modules
        self.input_modules = (target_module,) if probe_modules == "target" else same_input_modules(target_module)
        self.other_modules = () if probe_modules == "target" else other_input_modules(target_module)
        self.read_tensors = [f"blk.{b}.{m}.weight" for b in self.blocks
                             for m in self.input_modules + self.other_modules]
        # adapters with no LoRA reading the target's input but some reading the other one (MLP-only): a bank of
        # their own over that input's states (the probe reads both only while it holds an adapter)
        d_out = self.query_rows or model.info.shapes[self.target_tensor][1]
        # laid out as the bank (index files)
        self._other = ProbeBank(len(self.blocks), model.n_embd, d_out, sv_power=self.sv_power)
        self._other_states: dict[str, np.ndarray] = {}  # probe input -> calibration states of the other input
        self.other_states = None  # callable(probe input) -> those states; set by the engine that probes
        self.adapters: list[PoolAdapter] = []
        self._bank = ProbeBank(len(self.blocks), model.n_embd, d_out, window_dtype, self.sv_power)
        self._states: dict[str, np.ndarray] = {}  # probe input -> calibration states (n_prompts, n_blocks, d_in)
        # what is derived once per pool change (every change clears it): stats() per bank, and the banks' layout
        self._stats: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.changes = 0  # adapters added, removed or re-read so far: what is derived from the pool keys on it
        self.max_loaded_bytes = int(max_loaded_mb * 2**20)
        self._loaded: OrderedDict[int, None] = OrderedDict()  # indices with a llama.cpp handle, LRU first
        self.extra_bytes = 0  # other adapters llama.cpp holds for this model (the engine's packed/fused ones)
        self.use_index = use_index
        self._index: PoolIndex | None = None
        self._entries: list[Entry] = []  # with an index: each adapter's entry, in pool order

    # ---- loading

    def add(self, path: str | Path, name: str | None = None) -> PoolAdapter:
        """Validate one GGUF LoRA against the base and add it; AdapterError leaves the pool unchanged."""
        if self._index is not None:
            return self._add_indexed([Path(path)], [name])[0]
        file_id = _file_id(Path(path))  # before reading: a file rewritten meanwhile then fails check_file
        sha256 = file_sha256(Path(path)) if file_id else None
        lora = read_lora(path, self.model.info, only=self.read_tensors)  # validates all, keeps the window
        name = name or lora.name
        if any(a.name == name for a in self.adapters):
            raise AdapterError(f"{lora.path}: an adapter named {name!r} is already in the pool; "
                               "rename the file or pass another name")
        index, rank, other = None, None, None
        entries, probed, reason = self._probe_entries(lora)
        try:
            if entries is not None and probed[0] in self.other_modules:
                other = self._other.add(entries)
                rank = int(self._other.ranks[other])
            elif entries is not None:  # folded into the bank: the pool keeps no other copy
                index = self._bank.add(entries)
                rank = int(self._bank.ranks[index])
        except ZeroUpdateError:  # nothing to read
            entries, probed, reason = None, [], self._zero_reason(probed)
        if entries is None:
            warnings.warn(f"adapter {name!r} ({lora.path.name}) cannot be probed: {reason}; it will not be "
                          "routed to, but can still be used by name", UserWarning, stacklevel=2)
        adapter = PoolAdapter(name, lora.path, lora.stems, lora.alpha, index, rank, reason,
                              nbytes=lora.path.stat().st_size, max_rank=max(lora.ranks.values(), default=0),
                              probed=probed, other_index=other, file_id=file_id, sha256=sha256)
        for probe_input, states in self._states.items():
            self._calibrate(adapter, probe_input, states)
        self.adapters.append(adapter)
        self._stats.clear()
        self.changes += 1
        return adapter

    def _entry(self, lora, tensor: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(A, B, c) of one probe-window tensor; a fused q/k/v keeps B's query rows: o = c B[:n_q] A h."""
        a, b = lora.pairs[tensor]
        return (a, b if self.query_rows is None else b[:self.query_rows], lora.scale(tensor))

    def scored_modules(self, at_target: Iterable[str]) -> list[str]:
        """The modules an adapter is scored over, from the modules it adapts at the target block (empty: it
        cannot be probed; the other input's modules: it is scored over that input). See PROBE_MODULES."""
        at_target = set(at_target)
        have = [m for m in self.input_modules if m in at_target]
        if self.target_module in have and self.probe_modules != "input":
            return [self.target_module]
        return have or [m for m in self.other_modules if m in at_target]

    def _probe_entries(self, lora) -> tuple[list | None, list[str], str | None]:
        """(its probe bank entries, the modules scored, None) or (None, [], why it cannot be probed)."""
        at_target = {t.split(".")[2] for t in lora.pairs if t.startswith(f"blk.{self.target_block}.")}
        modules = self.scored_modules(at_target)
        if not modules:
            return None, [], self._unprobeable_reason(lora.stems)
        if modules == [self.target_module]:  # the paper's probe
            entries = [self._entry(lora, t) if t in lora.pairs else None for t in self.window_tensors]
        else:
            entries = []
            for b in self.blocks:
                here = [f"blk.{b}.{m}.weight" for m in modules if f"blk.{b}.{m}.weight" in lora.pairs]
                entries.append([(*lora.pairs[t], lora.scale(t), t.split(".")[2] == self.target_module)
                                for t in here] or None)  # the target's rows flagged: its outputs stay readable
        return entries, modules, None

    @staticmethod
    def _zero_reason(modules: list[str]) -> str:
        """Why an adapter whose update the bank refuses (ZeroUpdateError) is not probed."""
        return (f"its update c B A is zero on {', '.join(modules)} at every probed block (all-zero B or A, alpha 0, "
                "or B A = 0: an untrained adapter?)")

    def _scored(self, e: Entry) -> list[str]:
        return self.scored_modules(m for m, blocks in e.modules.items() if self.target_block in blocks)

    def _is_other(self, e: Entry) -> bool:
        """Whether an indexed adapter's rows are the other input's (it has no LoRA reading the target's)."""
        return e.offset is not None and self._scored(e)[0] in self.other_modules

    def _other_states_for(self, probe_input: str) -> np.ndarray:
        """The other input's calibration states for `probe_input`, asked of the engine once."""
        if probe_input not in self._other_states:
            if self.other_states is None:
                raise AdapterError("an adapter is scored over the FFN's input, and no engine gives this pool that "
                                   "input's calibration states")
            self._other_states[probe_input] = np.asarray(self.other_states(probe_input), np.float32)
        return self._other_states[probe_input]

    def _unprobeable_reason(self, stems: list[str]) -> str:
        adapts = sorted({s.split(".")[2] for s in stems})
        if self.probe_modules == "target":
            return f"no LoRA on {self.target_tensor} (the probe target); it adapts {', '.join(adapts)}"
        return (f"no LoRA at block {self.target_block} on {' or '.join(self.input_modules + self.other_modules)} "
                f"(the modules reading what the probe reads); it adapts {', '.join(adapts)}")

    @property
    def norm_only(self) -> dict[str, str]:
        """Adapters scored without the target module (over k/v, or gate/up): the bank has no target outputs for
        them, so only the norm signal ranks them (name -> why)."""
        return {a.name: f"scored over {', '.join(a.probed)}: only the norm signal reads them"
                for a in self.adapters if a.probed and self.target_module not in a.probed}

    def add_many(self, sources: Iterable[str | Path] | str | Path) -> list[PoolAdapter]:
        """Add a directory of *.gguf adapters (sorted by name, each named by its file name), a file, or a
        list of either."""
        if isinstance(sources, (str, Path)):
            sources = [sources]
        files: list[Path] = []
        names: list[str | None] = []
        dirs: list[Path] = []
        for src in map(Path, sources):
            if src.is_dir():
                found = sorted(p for p in src.glob("*.gguf") if p.is_file())
                if not found:
                    raise AdapterError(f"{src}: no *.gguf adapters in this directory")
                files += found
                names += [p.stem for p in found]
                dirs.append(src)
            else:
                if not src.is_file():
                    raise AdapterError(f"{src}: no such adapter file or pool directory")
                files.append(src)
                names.append(None)
                dirs.append(src.parent)
        if self.use_index:
            if self._index is None and not self.adapters:
                key = index_key(self.model.path, self.blocks, self.target_module, self.query_rows, dirs,
                                self.probe_modules, self.sv_power)
                # a large pool keeps its earlier window blocks in float16 (half the memory; the cost in
                # hit rate: `logo-edge eval --approx`), a small one exactly
                dtype = np.float16 if len(files) > LARGE_POOL else np.float32
                self._index = PoolIndex(index_root(key), len(self.blocks), self.model.n_embd, self._bank.Q.shape[1],
                                        dtype)
            return self._add_indexed(files, names)
        added = [self.add(p, n) for p, n in zip(files, names)]
        self._bank.shrink()
        return added

    # ---- the persisted index

    def _read(self, path: Path) -> dict:
        """What the index keeps of one file: validated (AdapterError), folded, calibrated."""
        lora = read_lora(path, self.model.info, only=self.read_tensors)
        out = dict(name=lora.name, alpha=lora.alpha, stems=lora.stems, ranks=lora.ranks, rows=None, reason=None,
                   stats={}, calibrate_s=0.0)
        entries, probed, out["reason"] = self._probe_entries(lora)
        if entries is None:
            return out
        other = probed[0] in self.other_modules  # the other input's rows: in the same files, a bank of their own
        bank = self._bank
        try:
            r, folded = ProbeBank.fold_entries(entries, bank.d_in, bank.Q.shape[1], self.sv_power)
        except ZeroUpdateError:  # nothing to read: not probed
            out["reason"] = self._zero_reason(probed)
            return out
        lead = ProbeBank.lead_of(entries, r, self.sv_power)
        t, w, q = ProbeBank.rows_of(r, folded, len(self.blocks), bank.d_in, bank.Q.shape[1],
                                    np.dtype(self._index.meta_window_dtype))
        one = ProbeBank.from_arrays(t, w, q, [0], [r], leads=[lead])
        t0 = time.perf_counter()
        out["stats"] = {pi: one.stats(0, self._other_states_for(pi) if other else states)
                        for pi, states in self._states.items()}
        out.update(rows=(r, t, w, q), lead=lead, calibrate_s=time.perf_counter() - t0)
        return out

    def _add_indexed(self, files: list[Path], names: list[str | None]) -> list[PoolAdapter]:
        """Add files through the index (new or changed ones are read, the others mapped); the pool is
        unchanged on AdapterError."""
        for p in files:
            if not p.is_file():
                raise AdapterError(f"{p}: adapter file not found")
        files = [p.resolve() for p in files]
        have = {Path(e.path) for e in self._entries}
        for p in files:
            if p in have:
                raise AdapterError(f"{p}: this file is already in the pool")
        if len(set(files)) != len(files):
            raise AdapterError("the same adapter file is given twice: "
                               + ", ".join(sorted({str(p) for p in files if files.count(p) > 1})))
        if len(files) == 1 and self._entries:
            entries = [self._index.add(files[0], self._read)]
        else:
            entries = self._index.sync([Path(e.path) for e in self._entries] + files, self._read)[len(self._entries):]
        names = [n or e.name for n, e in zip(names, entries)]
        taken = set(self.names)
        for n, p in zip(names, files):
            if n in taken:  # the index keeps the file's rows; the pool does not take it
                raise AdapterError(f"{p}: an adapter named {n!r} is already in the pool; rename the file or pass "
                                   "another name")
            taken.add(n)
        self._rebind(self._entries + entries, self.names + names)
        added = self.adapters[-len(entries):]
        for probe_input, states in self._states.items():  # an index calibrated for other probe inputs than ours
            self._calibrate_missing(probe_input, states)
        for a in added:
            if a.unprobeable_reason:
                warnings.warn(f"adapter {a.name!r} ({a.path.name}) cannot be probed: {a.unprobeable_reason}; it "
                              "will not be routed to, but can still be used by name", UserWarning, stacklevel=3)
        return added

    def _current(self, entries: list[Entry]) -> list[Entry]:
        """The index's entries for these files as last committed: every write reloads the index's metadata, so
        entries held from before it are stale (a compaction moves every row to a new generation: old offsets
        would read other adapters' rows; statistics stored since are only in the reloaded entries). A file that
        another process's pool dropped from the shared index is indexed again."""
        by_path = {e.path: e for e in self._index.entries}
        if all(e.path in by_path for e in entries):
            return [by_path[e.path] for e in entries]
        here = [e for e in entries if e.path in by_path or Path(e.path).is_file()]
        fresh = {e.path: e for e in self._index.sync([Path(e.path) for e in here], self._read)}
        # a file gone since the pool read it (and dropped from the index by another pool): kept by name, not
        # probed (its rows may have moved); using it is refused by check_file, naming it
        return [fresh.get(e.path) or replace(e, offset=None, rank=None, lead=None,
                                             reason="its file is gone since the pool read it") for e in entries]

    def _rebind(self, entries: list[Entry], names: list[str]) -> None:
        """Make the pool's adapters and bank those of `entries` (kept handles and LRU follow their files)."""
        entries = self._current(entries)
        old = {a.path: a for a in self.adapters}
        loaded = [self.adapters[i].path for i in self._loaded]
        main = [e for e in entries if e.offset is not None and not self._is_other(e)]
        others = [e for e in entries if e.offset is not None and self._is_other(e)]
        probed = {id(e): i for i, e in enumerate(main)}
        other_index = {id(e): i for i, e in enumerate(others)}
        adapters = []
        for e, name in zip(entries, names):
            path = Path(e.path)
            a = old.get(path)
            stats = {pi: {k: tuple(v) for k, v in s.items()} for pi, s in e.stats.items()}
            if a is None:
                a = PoolAdapter(name, path, e.stems, e.alpha, None, e.rank, e.reason, nbytes=e.size,
                                calibrate_s=e.calibrate_s, max_rank=e.max_rank,
                                probed=[] if e.offset is None else self._scored(e), file_id=(e.size, e.mtime_ns),
                                sha256=e.sha256)
            a.name, a.bank_index, a.other_index, a.stats = name, probed.get(id(e)), other_index.get(id(e)), stats
            if e.offset is None and a.unprobeable_reason is None:  # no longer probed (its file is gone)
                a.unprobeable_reason, a.rank, a.probed = e.reason, None, []
            adapters.append(a)
        self._bank = self._index.bank(main)
        self._other = self._index.bank(others)
        self._bank.sv_power = self._other.sv_power = self.sv_power  # the rows the index folded for this pool
        self._entries, self.adapters = entries, adapters
        where = {a.path: i for i, a in enumerate(adapters)}
        self._loaded = OrderedDict((where[p], None) for p in loaded if p in where)
        self._stats.clear()
        self.changes += 1

    def remove(self, name: str, in_use: set[int] = frozenset()) -> PoolAdapter:
        """Take an adapter out of the pool and free its llama.cpp handle; later adapters move down one index.

        `in_use`: pool indices set in a context; removing one of those is refused (AdapterError)."""
        i = self.index(name)
        if i in in_use:
            raise AdapterError(f"adapter {name!r} is set in a context that is generating; remove it after")
        if self._index is not None:
            a = self.adapters[i]
            if a.handle is not None:
                a.handle.free()
                a.handle = None
            self._index.remove(a.path)
            self._loaded.pop(i, None)
            self._rebind(self._entries[:i] + self._entries[i + 1:], self.names[:i] + self.names[i + 1:])
            return a
        a = self.adapters.pop(i)
        if a.handle is not None:
            a.handle.free()
            a.handle = None
        self._loaded = OrderedDict((j - (j > i), None) for j in self._loaded if j != i)
        if a.bank_index is not None:
            self._bank.remove(a.bank_index)
            for b in self.adapters:
                if b.bank_index is not None and b.bank_index > a.bank_index:
                    b.bank_index -= 1
        if a.other_index is not None:
            self._other.remove(a.other_index)
            for b in self.adapters:
                if b.other_index is not None and b.other_index > a.other_index:
                    b.other_index -= 1
        self._stats.clear()
        self.changes += 1
        return a

    # ---- views

    def __len__(self) -> int:
        return len(self.adapters)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def index(self, name: str) -> int:
        for i, a in enumerate(self.adapters):
            if a.name == name:
                return i
        raise AdapterError(f"no adapter named {name!r} in the pool (have: {', '.join(self.names) or 'none'})")

    @property
    def unprobeable(self) -> dict[str, str]:
        return {a.name: a.unprobeable_reason for a in self.adapters if not a.probeable}

    @property
    def bank(self) -> ProbeBank:
        """The probe bank: one entry per adapter scored over the target's input, in pool order."""
        if len(self._bank) == 0:
            raise RoutingError("the probe bank is empty: load at least one adapter with the target module")
        return self._bank

    @property
    def other_bank(self) -> ProbeBank:
        """The bank of adapters scored over the other input (MLP-only ones), in pool order; may be empty."""
        return self._other

    @property
    def probe_reads(self) -> str | tuple[str, str]:
        """What the probe reads (ProbeCapture's module): the target's input, and the other input's too while
        an adapter is scored over it (the states then hold the window's rows for each, in turn)."""
        return (self.target_module, self.other_modules[0]) if len(self._other) else self.target_module

    def split_states(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probe states (as probe_reads says) -> (the target input's window, the other input's or None)."""
        n = len(self.blocks)
        if len(self._other) and h.ndim >= 2 and h.shape[-2] == 2 * n:
            return h[..., :n, :], h[..., n:, :]
        return h, None

    def merge(self, main: np.ndarray, other: np.ndarray) -> np.ndarray:
        """One value per probeable adapter in pool order, from the bank's (`main`) and the other bank's."""
        in_bank, index = self._layout()
        return np.where(in_bank, np.asarray(main)[np.where(in_bank, index, 0)] if len(main) else 0,
                        np.asarray(other)[np.where(in_bank, 0, index)] if len(other) else 0)

    def _layout(self) -> tuple[np.ndarray, np.ndarray]:
        """For each probeable adapter in pool order: whether it is in the (target input's) bank, and its index
        in its bank; derived once per pool change."""
        if ("layout",) not in self._stats:
            probeable = [a for a in self.adapters if a.probeable]
            self._stats[("layout",)] = (np.array([a.bank_index is not None for a in probeable], bool),
                                        np.array([a.bank_index if a.bank_index is not None else a.other_index
                                                  for a in probeable], np.intp))
        return self._stats[("layout",)]

    # ---- calibration

    @property
    def calibrated_inputs(self) -> list[str]:
        return list(self._states)

    def calibration_states(self, probe_input: str) -> np.ndarray | None:
        """The calibration prompts' states for a probe input (n_prompts, n_blocks, d_in), if given."""
        return self._states.get(probe_input)

    def set_calibration_states(self, probe_input: str, states: np.ndarray) -> None:
        """Give the pool the calibration prompts' states (n_prompts, n_blocks, d_in) for a probe input;
        every adapter is calibrated."""
        states = np.asarray(states, np.float32)
        if states.ndim != 3 or states.shape[1:] != (len(self.blocks), self.model.n_embd):
            raise AdapterError(f"calibration states of shape {states.shape} do not fit the probe window "
                               f"({len(self.blocks)} blocks of {self.model.n_embd})")
        self._states[probe_input] = states
        self._calibrate_missing(probe_input, states, every=self._index is None)

    def _calibrate_missing(self, probe_input: str, states: np.ndarray, every: bool = False) -> None:
        """Calibrate the adapters without statistics for `probe_input` (`every`: all of them), and keep what was
        computed in the index: one built while other probe inputs were calibrated lacks this one's."""
        self._stats.clear()
        computed = [a for a in self.adapters if every or (a.probeable and not STATISTICS <= set(a.stats.get(
            probe_input, ())))]  # indexed: kept (a statistic added since the index was written: computed now)
        for a in computed:
            self._calibrate(a, probe_input, states)
        if self._index is not None and computed:
            self._index.set_stats({str(a.path): {probe_input: a.stats[probe_input]} for a in computed
                                   if probe_input in a.stats})

    def _calibrate(self, adapter: PoolAdapter, probe_input: str, states: np.ndarray) -> None:
        if adapter.other_index is not None:
            adapter.stats[probe_input] = self._other.stats(adapter.other_index, self._other_states_for(probe_input))
            return
        if adapter.bank_index is None:
            return
        t0 = time.perf_counter()
        adapter.stats[probe_input] = self._bank.stats(adapter.bank_index, states)
        adapter.calibrate_s = time.perf_counter() - t0

    def stats(self, probe_input: str, signal: str, bank_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(mean, sd) of `signal` per probeable adapter in pool order (`bank_only`: per row of the target input's
        bank); AdapterError if the pool is not calibrated."""
        if probe_input not in self._states:
            raise AdapterError(f"the pool has no calibration for probe input {probe_input!r}")
        key = (probe_input, signal, bank_only)
        if key not in self._stats:  # built once per pool change, not per request
            rows = [a.stats[probe_input][signal] for a in self.adapters
                    if (a.bank_index is not None if bank_only else a.probeable)]
            self._stats[key] = tuple(np.array(rows, np.float64).reshape(len(rows), 2).T)  # (means, sds), even of none
        return self._stats[key]

    # ---- llama.cpp handles, in an LRU under a memory budget

    def check_file(self, i: int) -> None:
        """AdapterFileChangedError unless adapter i's file is still the one the pool read (its weights are about
        to be read again: a llama.cpp handle, a packed mixture)."""
        a = self.adapters[i]
        now = _file_id(a.path)
        if now is None:
            raise AdapterFileChangedError(f"adapter {a.name!r}: its file {a.path} is gone since the pool read it "
                                          "(removed or renamed); load it again, or remove the adapter")
        if a.file_id is not None and now != a.file_id:
            if now[0] == a.file_id[0] and a.sha256 is not None and file_sha256(a.path) == a.sha256:
                a.file_id = now  # touched or copied over with the same content: the same weights
                return
            raise AdapterFileChangedError(f"adapter {a.name!r}: its file {a.path} changed since the pool read it; "
                                          "remove the adapter and add it again, so that routing and answers use the "
                                          "same weights")

    def handle(self, i: int, pinned: set[int] = frozenset()) -> LoraHandle:
        """The adapter's llama.cpp handle, loading the full adapter on first use.

        Loading may evict least recently used adapters over the budget, never `pinned` ones
        (those set in a context) nor `i` itself.
        """
        a = self.adapters[i]
        if a.handle is None:
            self.check_file(i)
            a.handle = self.model.load_lora(a.path)
        self._loaded[i] = None
        self._loaded.move_to_end(i)
        self.trim(pinned | {i})
        return a.handle

    @property
    def loaded_bytes(self) -> int:
        """What llama.cpp holds of this pool's adapters, plus `extra_bytes` (merged adapters built from them)."""
        return sum(self.adapters[i].nbytes for i in self._loaded) + self.extra_bytes

    def trim(self, pinned: set[int] = frozenset()) -> None:
        """Free least recently used adapters until the loaded ones fit the budget (pinned ones stay)."""
        for i in list(self._loaded):
            if self.loaded_bytes <= self.max_loaded_bytes:
                break
            if i in pinned:
                continue
            self.adapters[i].handle.free()
            self.adapters[i].handle = None
            del self._loaded[i]

    def close(self) -> None:
        for a in self.adapters:
            if a.handle is not None:
                a.handle.free()
                a.handle = None
        self._loaded.clear()
