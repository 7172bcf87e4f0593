"""A persisted index of a pool: what routing needs, memory-mapped at start-up instead of re-read.

Reading 1,000 adapter GGUFs (validating every tensor, folding the probe window) takes ~15 s; the index
keeps the result. It lives in the cache (`~/.cache/logo-edge/pool-index/<key>/`), keyed by the base
model's content, the probe window and module, the calibration prompts and the pool's directories, and
holds:

    meta.json       one entry per adapter file: its identity (path, size, mtime, SHA-256), what the
                    pool lists (name, modules, ranks, alpha, size, why it cannot be probed), its rows in
                    the bank, and its calibration statistics; the commit point, replaced atomically
    t.G.f32         the probe bank's target-block rows (rows, d_in), float32
    wJ.G.f2|f4      window block J's rows (rows, d_in), float16 (a pool of over 256 files when first
                    indexed) or float32, J < the target's position
    q.G.f32         the target block's Q rows (rows, d_out), float32

Data files only grow: adding an adapter appends its rows (truncating first whatever a killed writer
left past the committed length), then commits meta.json. A removed or changed adapter's entry is
dropped and its rows are left unread (never rewritten: another process may map them); when more than
half the rows are dead the live ones are copied into generation G+1's files and G's are unlinked.
Start-up stats every file: a file whose size and
mtime match is trusted, one whose content hash still matches is kept, anything else is re-indexed
alone. Writers hold an exclusive lock on the index; readers only map committed rows.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .router import ProbeBank

VERSION = 9  # 4: adapters without the probe target scored over the modules reading its input; 5: or the FFN input;
# 6: stacked modules keep the target's outputs (Q), and sv_power; 8: each adapter's leading rows (the shortlist's;
# 7 was a development build's); 9: an adapter whose update is zero is unprobeable (v8 gave it no rows, which
# shifted every later adapter's sums)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def index_key(model_path: Path, blocks: Sequence[int], module: str, query_rows: int | None,
              sources: Sequence[Path], probe_modules: str = "target-first", sv_power: float = 1.0) -> str:
    """What makes two pools share an index: the same base model content, probe window and module, the modules
    scored (AdapterPool's probe_modules) and how their rows are weighed (sv_power), the calibration prompts, and
    the same pool directories."""
    from .calibration import model_key, prompts_key

    parts = [f"v{VERSION}", model_key(Path(model_path)), ",".join(map(str, blocks)), module, str(query_rows),
             probe_modules, *([f"sv_power={float(sv_power)!r}"] if sv_power != 1.0 else []), prompts_key(),
             *sorted({str(Path(s).resolve()) for s in sources})]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass
class Entry:
    """One adapter file as the index knows it (meta.json's `entries` hold these as dicts)."""

    path: str
    name: str
    size: int
    mtime_ns: int
    sha256: str
    alpha: float | None
    modules: dict[str, list[int]]  # GGUF module -> blocks it adapts
    max_rank: int
    offset: int | None  # first row in the bank (None: no LoRA on a module the probe reads)
    rank: int | None  # rows in the bank
    reason: str | None  # why it cannot be probed
    stats: dict  # probe input -> signal -> [mean, sd]
    calibrate_s: float = 0.0
    lead: int | None = None  # of its rows, how many the shortlist's first stage reads (ProbeBank.lead_of)

    @property
    def stems(self) -> list[str]:
        return sorted(f"blk.{b}.{m}.weight" for m, blocks in self.modules.items() for b in blocks)


def _stems_to_modules(stems: Sequence[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for s in stems:
        _, b, m, _ = s.split(".", 3)
        out.setdefault(m, []).append(int(b))
    return {m: sorted(b) for m, b in sorted(out.items())}


class PoolIndex:
    """The index directory of one pool (see the module's docstring); `sync` brings it up to date."""

    def __init__(self, root: Path, n_blocks: int, d_in: int, d_out: int, window_dtype=np.float32):
        self.root = Path(root)
        self.n_blocks, self.d_in, self.d_out = n_blocks, d_in, d_out
        self.window_dtype = np.dtype(window_dtype)  # of a new index; an existing one keeps its own
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta = self._load_meta()

    # ---- files

    def _files(self, gen: int) -> list[tuple[Path, np.dtype, int]]:
        """(path, dtype, row width) of every data file of generation `gen`: T, W_0.., Q."""
        files = [(self.root / f"t.{gen}.f32", np.dtype(np.float32), self.d_in)]
        wt = np.dtype(self.meta_window_dtype)
        files += [(self.root / f"w{j}.{gen}.{wt.str[1:]}", wt, self.d_in) for j in range(self.n_blocks - 1)]
        return files + [(self.root / f"q.{gen}.f32", np.dtype(np.float32), self.d_out)]

    @property
    def meta_window_dtype(self) -> str:
        return getattr(self, "meta", None) and self.meta.get("window_dtype") or self.window_dtype.str

    def _empty_meta(self) -> dict:
        return {"version": VERSION, "shape": [self.n_blocks, self.d_in, self.d_out], "generation": 0, "rows": 0,
                "window_dtype": self.window_dtype.str, "entries": []}

    def _load_meta(self) -> dict:
        path = self.root / "meta.json"
        if not path.exists():
            return self._empty_meta()
        try:
            meta = json.loads(path.read_text())
            ok = meta.get("version") == VERSION and meta.get("shape") == [self.n_blocks, self.d_in, self.d_out]
            ok = ok and meta.get("window_dtype") in ("<f2", "<f4")
            self.meta = meta  # (the data files' names depend on its window dtype)
            for f, dt, width in self._files(meta["generation"]):
                ok = ok and f.exists() and f.stat().st_size >= meta["rows"] * width * dt.itemsize
            meta["entries"] = [Entry(**e) for e in meta["entries"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            _say(f"pool index {self.root} is unreadable ({type(e).__name__}: {e}); rebuilding it")
            return self._empty_meta()
        if not ok:
            _say(f"pool index {self.root} does not match its data files; rebuilding it")
            return self._empty_meta()
        return meta

    def _commit(self) -> None:
        for f, _, _ in self._files(self.meta["generation"]):
            if f.exists():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        data = dict(self.meta, entries=[vars(e) for e in self.meta["entries"]])
        tmp = self.root / f"meta.json.{os.getpid()}-{threading.get_ident()}.part"
        try:
            tmp.write_text(json.dumps(data, separators=(",", ":")))
            os.replace(tmp, self.root / "meta.json")
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / "lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                self.meta = self._load_meta()  # another process may have committed since
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- reading

    @property
    def entries(self) -> list[Entry]:
        return self.meta["entries"]

    def bank(self, entries: Sequence[Entry]) -> ProbeBank:
        """A read-only ProbeBank over the committed rows, memory-mapped; its adapters are the probeable
        `entries` in the order given."""
        rows, gen = self.meta["rows"], self.meta["generation"]
        arrays = []
        for f, dt, width in self._files(gen):
            arrays.append(np.memmap(f, dt, "r", shape=(rows, width)) if rows else np.zeros((0, width), dt))
        t, *w, q = arrays
        probed = [e for e in entries if e.offset is not None]
        return ProbeBank.from_arrays(t, w, q, [e.offset for e in probed], [e.rank for e in probed],
                                     leads=[e.lead or e.rank for e in probed])

    # ---- writing

    def sync(self, paths: Sequence[Path], read: Callable[[Path], dict], progress: bool = True) -> list[Entry]:
        """Bring the index up to date with `paths` (resolved adapter files, in pool order) and return their
        entries in that order. `read(path)` validates one file and returns a dict: name, alpha, stems,
        ranks, rows = (rank, T, W, Q) or None, reason (why it has no rows), stats, calibrate_s; it raises
        AdapterError for a bad file (the index stays committed as it was before that file)."""
        with self._locked():
            by_path = {e.path: e for e in self.entries}
            todo: list[Path] = []
            changed = False
            for p in paths:
                e, st = by_path.get(str(p)), p.stat()
                if e is not None and (e.size, e.mtime_ns) == (st.st_size, st.st_mtime_ns):
                    continue
                if e is not None and e.size == st.st_size and file_sha256(p) == e.sha256:
                    e.mtime_ns, changed = st.st_mtime_ns, True  # touched or copied, same content
                    continue
                todo.append(p)
            keep = {str(p) for p in paths} - {str(p) for p in todo}
            dead = [e for e in self.entries if e.path not in keep]
            if dead:
                self._drop(dead)
                changed = True
            if changed:
                self._commit()
            if todo:
                self._index(todo, read, progress)
            by_path = {e.path: e for e in self.entries}
            return [by_path[str(p)] for p in paths]

    def add(self, path: Path, read: Callable[[Path], dict]) -> Entry:
        """Index one more file (or re-index it if it changed); its entry."""
        with self._locked():
            old = [e for e in self.entries if e.path == str(path)]
            if old:
                self._drop(old)
            self._index([path], read, progress=False)
            return next(e for e in self.entries if e.path == str(path))

    def remove(self, path: Path) -> None:
        with self._locked():
            dead = [e for e in self.entries if e.path == str(path)]
            if dead:
                self._drop(dead)
                self._commit()

    def set_stats(self, stats: dict[str, dict]) -> None:
        """Store calibration statistics: {path: {probe input: {signal: (mean, sd)}}}."""
        with self._locked():
            for e in self.entries:
                for probe_input, s in stats.get(e.path, {}).items():
                    e.stats[probe_input] = {k: list(v) for k, v in s.items()}
            self._commit()

    def _drop(self, dead: Sequence[Entry]) -> None:
        """Forget `dead` entries (committed by the caller); their rows stay, unread, until most rows are dead
        and the files are compacted into a new generation. Rows are never rewritten in place: another process
        may have them mapped, routing over a pool that still holds those adapters."""
        ids = {id(e) for e in dead}
        self.meta["entries"] = [e for e in self.entries if id(e) not in ids]
        live = sum(e.rank for e in self.entries if e.offset is not None)
        if self.meta["rows"] > 256 and live < self.meta["rows"] // 2:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the live rows as the next generation (committed by the caller, then old files go)."""
        gen = self.meta["generation"]
        live = sorted((e for e in self.entries if e.offset is not None), key=lambda e: e.offset)
        for (src, dt, width), (dst, _, _) in zip(self._files(gen), self._files(gen + 1)):
            old = np.memmap(src, dt, "r", shape=(self.meta["rows"], width)) if self.meta["rows"] else None
            with open(dst, "wb") as out:
                for e in live:
                    out.write(np.ascontiguousarray(old[e.offset:e.offset + e.rank]).tobytes())
            del old
        o = 0
        for e in live:
            e.offset, o = o, o + e.rank
        self.meta.update(generation=gen + 1, rows=o)
        self._commit()
        for f, _, _ in self._files(gen):
            f.unlink(missing_ok=True)

    def _index(self, todo: Sequence[Path], read: Callable[[Path], dict], progress: bool) -> None:
        """Append the rows of `todo` and commit them (a bad file stops there; the ones before it are kept)."""
        gen = self.meta["generation"]
        files = self._files(gen)
        for f, dt, width in files:  # drop what an interrupted writer left past the committed rows
            with open(f, "ab") as fh:
                fh.truncate(self.meta["rows"] * width * dt.itemsize)
        bar = _progress(len(todo), f"indexing {len(todo)} adapter file(s) into {self.root}") if progress else None
        try:
            for p in todo:
                st = p.stat()
                got = read(p)
                offset = rank = None
                if got["rows"] is not None:
                    rank, t, w, q = got["rows"]
                    offset = self.meta["rows"]
                    for (f, dt, _), block in zip(files, [t, *w, q]):
                        with open(f, "ab") as fh:
                            fh.write(np.ascontiguousarray(block, dt).tobytes())
                    self.meta["rows"] += rank
                stats = {pi: {k: list(v) for k, v in s.items()} for pi, s in got["stats"].items()}
                self.entries.append(Entry(str(p), got["name"], st.st_size, st.st_mtime_ns, file_sha256(p),
                                          got["alpha"], _stems_to_modules(got["stems"]),
                                          max(got["ranks"].values(), default=0), offset, rank, got["reason"],
                                          stats, got["calibrate_s"], got.get("lead")))
                if bar:
                    bar.update(1)
        finally:  # what was read is kept, also when a bad file stops the run
            self._commit()
            if bar:
                bar.close()


def _say(msg: str) -> None:
    print(f"[logo-edge] {msg}", file=sys.stderr, flush=True)


class _Lines:
    """A plain progress line every ~2 s when tqdm is not installed."""

    def __init__(self, total: int, desc: str):
        self.total, self.n, self.desc, self.t = total, 0, desc, time.monotonic()
        _say(desc)

    def update(self, n: int) -> None:
        self.n += n
        if time.monotonic() - self.t > 2 or self.n == self.total:
            self.t = time.monotonic()
            _say(f"  {self.n}/{self.total}")

    def close(self) -> None:
        pass


def _progress(total: int, desc: str):
    if total < 20:
        return None  # a few files: not worth a bar
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total, desc)
    return tqdm(total=total, desc=desc, unit="file", file=sys.stderr, leave=False)


def index_root(key: str, keep: int = 64) -> Path:
    """The index directory for `key` in the cache; the least recently used beyond `keep` are removed."""
    import shutil

    from .native.build import cache_root

    base = cache_root() / "pool-index"
    root = base / key
    if base.is_dir():
        others = sorted((d for d in base.iterdir() if d.is_dir() and d.name != key),
                        key=lambda d: (d / "meta.json").stat().st_mtime if (d / "meta.json").exists() else 0)
        for d in others[:max(0, len(others) - keep + 1)]:
            shutil.rmtree(d, ignore_errors=True)
    return root
