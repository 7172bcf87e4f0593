"""Battery part "kills": writers killed (SIGKILL) at random moments leave the old file or the new one.

The files the runtime writes are written to a temporary file beside the target and renamed over it
(os.replace): an adapter conversion (convert_lora -> gguf_files.write_lora) and the calibration cache
(calibration.calibration_states: the states and their SHA-256); the pool index commits its meta.json
atomically over append-only data files (pool_index.py). Here a forked child runs the writer and
is killed at a random moment within its measured duration; what is left at the final path must be the old
file, the complete new one (read back and equal to a reference write), or nothing where there was nothing,
never a partial file. Leftover temporary files are allowed and counted.

Figures: kills, old_left, new_left, absent, partial (must be 0), temp_left, finished (the child
finished before its kill: not counted as a kill).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np

from .battery import Figures, restored_env


def _kill_at_random(job, window_s: float, rng: random.Random) -> bool:
    """Fork a child running `job()`, SIGKILL it after a random delay in [0, window_s]; True if it was
    killed (False: it finished first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (the child only writes files)
        pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            job()
        except BaseException:
            code = 3
        os._exit(code)
    # half the kills anywhere in the window, half near its end (the flush and rename)
    time.sleep(rng.uniform(0, window_s) if rng.random() < 0.5 else rng.uniform(0.55, 0.75) * window_s)
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        return False
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return True


def _timed(job, repeat: int = 3) -> float:
    """Median seconds from fork to exit of a child running `job()` (the window kills are spread over)."""
    best = []
    for _ in range(repeat):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            try:
                job()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        best.append(time.perf_counter() - t)
    return float(np.median(best))


def _writer(model: Path, adapters: Path):
    """(write(out), what): convert a PEFT adapter of the tiny fixture (peft/ beside the model), else
    re-write an existing GGUF adapter through write_lora."""
    from .gguf_files import BaseInfo, read_lora, write_lora

    peft = model.parent / "peft"
    hf = model.parent / "hf"
    names = sorted(p.name for p in peft.iterdir() if (p / "adapter_config.json").exists()) if peft.is_dir() else []
    if names:
        from .convert.lora import convert_lora

        src = peft / ("all7_r4" if "all7_r4" in names else names[0])
        base = hf if (hf / "config.json").exists() else model
        return (lambda out: convert_lora(src, base, out, "f32", name=src.name)), f"convert_lora({src.name})"
    info = BaseInfo.read(model)
    lora = read_lora(sorted(adapters.glob("*.gguf"))[0], info)
    return (lambda out: write_lora(out, info.arch, lora.alpha or 1.0, lora.pairs, "f32", name=lora.name)), \
        f"write_lora({lora.name})"


def _classify(fig: Figures, final: Path, old: bytes | None, new: bytes, loads) -> None:
    if not final.exists():
        fig.counts["absent" if old is None else "partial"] += 1
        if old is not None:
            fig.fail.append(("partial", f"{final.name}: the old file is gone and no new one is there", None))
        return
    data = final.read_bytes()
    if old is not None and data == old:
        fig.counts["old_left"] += 1
    elif data == new and loads(final):
        fig.counts["new_left"] += 1
    else:
        fig.counts["partial"] += 1
        fig.fail.append(("partial", f"{final.name}: {len(data)} bytes, neither the old ({len(old or b'')}) nor "
                         f"the new ({len(new)}) file; loads: {loads(final)}", None))


def kill_convert(model: Path, adapters: Path, kills: int, work: Path, seed: int = 0) -> Figures:
    """Kill an adapter conversion `kills` times while it writes over an older valid adapter."""
    from .errors import AdapterError
    from .gguf_files import BaseInfo, read_lora

    fig = Figures("kills: convert")
    t0 = time.monotonic()
    rng = random.Random(seed)
    write, what = _writer(model, adapters)
    info = BaseInfo.read(model)
    d = work / "kills-convert"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    ref_path = d / "reference.gguf"
    write(ref_path)
    duration = _timed(lambda: write(d / "timing.gguf"))
    new = ref_path.read_bytes()
    ref = read_lora(ref_path, info)
    old = sorted(adapters.glob("*.gguf"))[0].read_bytes()  # another valid adapter: the file being replaced
    fig.notes.append(f"{what}: {len(new)} bytes in {duration * 1e3:.0f} ms; kills within {1.5 * duration * 1e3:.0f}"
                     f" ms of the start")

    def loads(p: Path) -> bool:
        try:
            got = read_lora(p, info)
        except AdapterError:
            return False
        return got.alpha == ref.alpha and got.pairs.keys() == ref.pairs.keys() and all(
            np.array_equal(got.pairs[k][0], ref.pairs[k][0]) and np.array_equal(got.pairs[k][1], ref.pairs[k][1])
            for k in ref.pairs)

    final = d / "out" / "adapter.gguf"
    final.parent.mkdir()
    tries = 0
    while fig.counts["kills"] < kills and tries < 10 * kills:
        tries += 1
        for p in final.parent.iterdir():  # a fresh start: the old valid adapter at the final path
            p.unlink()
        final.write_bytes(old)
        if not _kill_at_random(lambda: write(final), 1.5 * duration, rng):
            fig.counts["finished"] += 1
            if final.read_bytes() != new:
                fig.counts["partial"] += 1
                fig.fail.append(("partial", "a conversion that finished left a file other than the reference", None))
            continue
        fig.counts["kills"] += 1
        fig.counts["tried"] += 1
        _classify(fig, final, old, new, loads)
        fig.counts["temp_left"] += sum(1 for p in final.parent.iterdir() if p != final)
    fig.seconds = time.monotonic() - t0
    return fig


def kill_calibration(kills: int, work: Path, seed: int = 0) -> Figures:
    """Kill calibration_states while it writes its cache (fresh, or over a stale cache that fails its hash)."""
    from . import calibration

    fig = Figures("kills: calib cache")
    t0 = time.monotonic()
    rng = random.Random(seed + 1)
    n = len(calibration.calibration_prompts())
    np_rng = np.random.default_rng(seed)
    blocks, d_in = [0, 1], 4096  # a few MB, so a write takes long enough to be hit in the middle
    good = np_rng.normal(size=(n, len(blocks), d_in)).astype(np.float32)
    stale = np_rng.normal(size=(n, len(blocks), d_in)).astype(np.float32)
    d = work / "kills-calibration"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    model = d / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(100))

    def job():
        rows = iter(good)
        calibration.calibration_states(model, blocks, "attn_q", "residual", lambda _p: next(rows))

    with restored_env("LOGO_EDGE_CACHE"):
        os.environ["LOGO_EDGE_CACHE"] = str(d / "ref")
        job()
        ref_path = calibration.states_path(model, blocks, "attn_q", "residual")
        duration = _timed(lambda: (shutil.rmtree(ref_path.parent, ignore_errors=True), job()))
        shutil.rmtree(ref_path.parent, ignore_errors=True)
        job()
        new, new_hash = ref_path.read_bytes(), calibration._hash_path(ref_path).read_bytes()
        os.environ["LOGO_EDGE_CACHE"] = str(d / "cache")
        final = calibration.states_path(model, blocks, "attn_q", "residual")
        fig.notes.append(f"calibration_states: {len(new)} bytes in {duration * 1e3:.0f} ms")
        tries = 0
        while fig.counts["kills"] < kills and tries < 10 * kills:
            tries += 1
            shutil.rmtree(d / "cache", ignore_errors=True)
            old = None
            if tries % 2 == 0:  # a stale cache whose hash does not match: it must be rebuilt
                final.parent.mkdir(parents=True)
                with open(final, "wb") as f:
                    np.save(f, stale)
                calibration._hash_path(final).write_text("0" * 64 + "\n")
                old = final.read_bytes()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", calibration.CacheWarning)
                killed = _kill_at_random(job, 1.5 * duration, rng)
            if not killed:
                fig.counts["finished"] += 1
                continue
            fig.counts["kills"] += 1
            fig.counts["tried"] += 1
            states, _why = calibration._load_cached(final, blocks) if final.exists() else (None, "absent")
            if states is not None and not np.array_equal(states, good):
                fig.counts["used_corrupt"] += 1
                fig.fail.append(("used_corrupt", "a killed write left a cache that loads with other states", None))
            hash_file = calibration._hash_path(final)
            if hash_file.exists() and hash_file.read_bytes() not in (new_hash, b"0" * 64 + b"\n"):
                fig.counts["partial"] += 1
                fig.fail.append(("partial", f"hash file holds {hash_file.read_bytes()[:80]!r}", None))
            # the data file by its bytes (whether it is used is the hash's business, checked above)
            _classify(fig, final, old, new, lambda p: np.array_equal(np.load(p, allow_pickle=False), good))
            if final.exists() and not hash_file.exists():
                fig.counts["hash_missing"] += 1  # killed between the two renames: rebuilt on the next call
            if final.parent.exists():
                fig.counts["temp_left"] += sum(1 for p in final.parent.iterdir() if ".part" in p.name)
            # the next call after any kill gives the right states (rebuilt when needed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", calibration.CacheWarning)
                rows = iter(good)
                again = calibration.calibration_states(model, blocks, "attn_q", "residual", lambda _p: next(rows))
            if not np.array_equal(again, good):
                fig.counts["used_corrupt"] += 1
                fig.fail.append(("used_corrupt", "after a kill, calibration_states returned other states", None))
    fig.seconds = time.monotonic() - t0
    return fig


def _index_read(rank: int = 4, n_blocks: int = 3, d_in: int = 256, d_out: int = 128):
    """A pool index `read` that folds nothing: deterministic rows per file name (seeded by it), so a recovered
    index can be compared with one built from scratch; every fourth file has no probe rows."""
    def read(p: Path) -> dict:
        seed = int.from_bytes(p.name.encode()[-8:].rjust(8, b"\0"), "little") % 2**32
        rng = np.random.default_rng(seed)
        base = dict(name=p.stem, alpha=8.0, stems=[f"blk.{b}.attn_q.weight" for b in range(n_blocks)],
                    ranks={"blk.0.attn_q.weight": rank}, rows=None, reason=None,
                    stats={"residual": {"norm": (1.0, 0.5)}}, calibrate_s=0.0)
        if seed % 4 == 0:
            return dict(base, reason="no rows")
        t = rng.normal(size=(rank, d_in)).astype(np.float32)
        w = [rng.normal(size=(rank, d_in)).astype(np.float32) for _ in range(n_blocks - 1)]
        q = rng.normal(size=(rank, d_out)).astype(np.float32)
        return dict(base, rows=(rank, t, w, q))
    return read, (n_blocks, d_in, d_out)


def kill_index(kills: int, work: Path, seed: int = 0, n_files: int = 400) -> Figures:
    """Kill a pool index while it indexes (new files, changed and removed ones); the next open must route as an
    index built from scratch on the same files (norms equal), never from a half-written state."""
    from .pool_index import PoolIndex

    fig = Figures("kills: pool index")
    t0 = time.monotonic()
    rng = random.Random(seed + 2)
    read, shape = _index_read()
    d = work / "kills-index"
    shutil.rmtree(d, ignore_errors=True)
    files = d / "pool"
    files.mkdir(parents=True)
    paths = []
    for i in range(n_files):
        p = files / f"a{i:04d}.gguf"
        p.write_bytes(i.to_bytes(4, "little"))
        paths.append(p)
    h = np.random.default_rng(seed).normal(size=(shape[0], shape[1])).astype(np.float32)

    def norms(index: PoolIndex, entries) -> dict[str, float]:
        bank = index.bank(entries)
        probed = [e for e in entries if e.offset is not None]
        return dict(zip((e.name for e in probed), bank.norms(h).tolist())) if probed else {}

    def scratch(sel: list[Path]) -> dict[str, float]:
        root = d / "scratch"
        shutil.rmtree(root, ignore_errors=True)
        ix = PoolIndex(root, *shape)
        return norms(ix, ix.sync(sel, read, progress=False))

    root = d / "index"

    def parts() -> list[Path]:
        """An index of a random part of the pool; the part a child then syncs it to (adds and drops)."""
        shutil.rmtree(root, ignore_errors=True)
        PoolIndex(root, *shape).sync([p for p in paths if rng.random() < 0.5], read, progress=False)
        return [p for p in paths if rng.random() < 0.7]

    # the window is what the killed job takes (a re-sync, fork to exit), not a sync from scratch: a few times
    # shorter, and kills spread over the longer one mostly came after the child had finished
    durations = []
    for _ in range(3):
        second = parts()
        durations.append(_timed(lambda: PoolIndex(root, *shape).sync(second, read, progress=False), repeat=1))
    duration = sorted(durations)[1]
    fig.notes.append(f"re-syncing an index of {n_files} files to another part: {duration * 1e3:.0f} ms; kills in it")
    tries = 0
    while fig.counts["kills"] < kills and tries < 10 * kills:
        tries += 1
        second = parts()
        if not _kill_at_random(lambda: PoolIndex(root, *shape).sync(second, read, progress=False), duration, rng):
            fig.counts["finished"] += 1
            continue
        fig.counts["kills"] += 1
        fig.counts["tried"] += 1
        try:
            ix = PoolIndex(root, *shape)
            got = norms(ix, ix.sync(second, read, progress=False))
        except Exception as e:  # noqa: BLE001 - any failure to recover is the figure
            fig.counts["unrecovered"] += 1
            fig.fail.append(("unrecovered", f"the index did not reopen after a kill: {type(e).__name__}: {e}", None))
            continue
        want = scratch(second)
        if got.keys() != want.keys() or any(abs(got[k] - want[k]) > 1e-5 * max(1.0, abs(want[k])) for k in want):
            fig.counts["used_corrupt"] += 1
            fig.fail.append(("used_corrupt", "after a kill the index routes differently from one built from "
                             "scratch on the same files", None))
        else:
            fig.counts["recovered"] += 1
    fig.seconds = time.monotonic() - t0
    return fig


def run_kills(model: Path, adapters: Path, kills: int, out: Path) -> list[Figures]:
    """Every writer, `kills` kills each."""
    return [kill_convert(model, adapters, kills, out), kill_calibration(kills, out), kill_index(kills, out)]
