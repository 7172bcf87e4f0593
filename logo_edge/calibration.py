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
    """A cheap content key of a model file: its size and its first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def states_path(model_path: Path, blocks: Sequence[int], module: str, probe_input: str) -> Path:
    from .native.build import cache_root

    window = f"b{blocks[0]}" if len(blocks) == 1 else f"b{blocks[0]}-{blocks[-1]}"
    name = f"{model_path.stem}-{model_key(model_path)}-{window}-{module}-{probe_input}-{prompts_key()}.npy"
    return cache_root() / "calibration" / name


def calibration_states(model_path: Path, blocks: Sequence[int], module: str, probe_input: str,
                       probe: Callable[[str], np.ndarray]) -> np.ndarray:
    """(n_prompts, n_blocks, d_in) probe states of the calibration prompts at a window of blocks, from the
    disk cache or `probe(prompt)` (which returns (n_blocks, d_in))."""
    path = states_path(Path(model_path), blocks, module, probe_input)
    if path.exists():
        try:
            states = np.load(path)
            if states.ndim == 3 and states.shape[:2] == (len(calibration_prompts()), len(blocks)):
                return states
        except (OSError, ValueError):
            pass
        path.unlink(missing_ok=True)  # a broken cache file is recomputed, not trusted
    states = np.stack([probe(p) for p in calibration_prompts()]).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npy")
    np.save(tmp, states)
    tmp.replace(path)
    return states
