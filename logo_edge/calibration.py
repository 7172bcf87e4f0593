"""Calibrated signals: every adapter's signal statistics over a fixed set of generic prompts.

Raw LoGo signals track an adapter's update size as much as its relevance, so pools that mix ranks,
alphas, modules and training lengths rank badly. Each adapter's signal is compared with its own
mean (and spread) over generic, task-neutral prompts. The prompts' hidden states at the probe
target are computed once per base model and probe setting and cached on disk, so calibrating an
adapter is one small matrix product, not a prefill:

    H = calibration_states(...)          # (n_prompts, n_blocks, d_in), cached
    O_j = c * (H[:, j] @ A_j.T) @ B_j.T  # (n_prompts, d_out) the adapter's outputs at window block j
    mean, sd of each signal              # norm over the window, entropy at the target: ProbeBank.stats
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

PROMPTS_FILE = Path(__file__).with_name("data") / "calibration_prompts.json"

Stats = dict[str, tuple[float, float]]  # signal -> (mean, sd)


@lru_cache(maxsize=1)
def calibration_prompts() -> tuple[str, ...]:
    """The shipped generic prompts (user messages)."""
    return tuple(json.loads(PROMPTS_FILE.read_text())["prompts"])


def prompts_key() -> str:
    return hashlib.sha256("\n".join(calibration_prompts()).encode()).hexdigest()[:10]


def model_key(path: Path) -> str:
    """The content key of a model file: the SHA-256 of every byte (two models that differ anywhere, a base with an
    adapter merged into some of its layers among them, never share calibration states or a pool index).

    Hashing a file of several GB takes seconds, so the digest is remembered under the file's device, inode, size
    and modification and change times (`cache_root()/model-keys/`, one small file each, written atomically): a
    file rewritten or replaced is hashed again, an unchanged one costs a stat."""
    from .native.build import cache_root

    path = Path(path)
    st = path.stat()
    # ctime too: it changes with every write and cannot be set back by hand (rsync -t, tar keep mtimes)
    memo = cache_root() / "model-keys" / f"{st.st_dev}-{st.st_ino}-{st.st_size}-{st.st_mtime_ns}-{st.st_ctime_ns}"
    try:
        key = memo.read_text().strip()
        if len(key) == 12 and all(c in "0123456789abcdef" for c in key):
            return key
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    key = h.hexdigest()[:12]
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(memo, lambda tmp: tmp.write_text(key + "\n"))
    except OSError:  # a read-only cache: the key is still right, only computed again next time
        pass
    return key


def states_path(model_path: Path, blocks: Sequence[int], module: str, probe_input: str) -> Path:
    from .native.build import cache_root

    window = f"b{blocks[0]}" if len(blocks) == 1 else f"b{blocks[0]}-{blocks[-1]}"
    name = f"{model_path.stem}-{model_key(model_path)}-{window}-{module}-{probe_input}-{prompts_key()}.npy"
    return cache_root() / "calibration" / name


class CacheWarning(UserWarning):
    """A calibration cache file was unreadable or failed its hash check, and is being rebuilt."""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hash_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _load_cached(path: Path, blocks: Sequence[int]) -> tuple[np.ndarray | None, str | None]:
    """(states, None) from a cache file whose SHA-256 matches the one stored beside it, else (None, why)."""
    hash_file = _hash_path(path)
    if not hash_file.exists():
        return None, "it has no stored hash"
    try:
        if hash_file.read_text().strip() != _digest(path):
            return None, "its SHA-256 does not match the stored one (truncated or tampered)"
        states = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        return None, f"it cannot be read ({type(e).__name__}: {e})"
    want = (len(calibration_prompts()), len(blocks))
    if states.ndim != 3 or states.shape[:2] != want or states.dtype != np.float32 or not np.isfinite(states).all():
        return None, f"it holds {states.dtype} {states.shape}, not finite float32 {want} + (d_in,)"
    return states, None


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.part")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write an array atomically (its directory made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    _atomic_write(path, save)


def calibration_states(model_path: Path, blocks: Sequence[int], module: str, probe_input: str,
                       probe: Callable[[str], np.ndarray]) -> np.ndarray:
    """(n_prompts, n_blocks, d_in) probe states of the calibration prompts at a window of blocks, from the
    disk cache or `probe(prompt)` (which returns (n_blocks, d_in)).

    The cache file's SHA-256 is stored beside it (NAME.npy.sha256); a file that is missing its hash,
    fails it, or does not hold what it should is never used: it is recomputed (with a CacheWarning)
    and rewritten. Both files are written atomically (a temporary file, then os.replace), the data first,
    so a reader never sees a half-written file, and a crash between the two leaves a mismatch (rebuilt)."""
    path = states_path(Path(model_path), blocks, module, probe_input)
    if path.exists():
        states, why = _load_cached(path, blocks)
        if states is not None:
            return states
        warnings.warn(f"calibration cache {path} is not used: {why}; recomputing it", CacheWarning, stacklevel=2)
    states = np.stack([probe(p) for p in calibration_prompts()]).astype(np.float32)
    save_npy(path, states)
    digest = _digest(path)
    _atomic_write(_hash_path(path), lambda tmp: tmp.write_text(digest + "\n"))
    return states
