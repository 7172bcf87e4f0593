"""Example prompts: an adapter that ships a few inputs of its task is routed to by the nearest prototype.

An adapter in a pool directory may have, beside NAME.gguf, a file NAME.examples.jsonl: one JSON object
{"prompt": "..."} (a user message) per line, a few inputs of the task it was trained for (its training
data's, never the prompts it will be measured on). Each example is probed once, like any request (the
base model's states at the probe window's last token, `Engine.probe`), and cached on disk; the adapter's
prototype is the mean of its examples' states, each centred on the generic calibration prompts' mean and
scaled to unit length. A request is then scored by the cosine of its own centred state with each
prototype: no training, the same single probe pass, and an adapter is routable whatever modules it adapts.

Why (models/eval/large/examples/README.md): on the 78-adapter pool the LoGo default ranks the right adapter
first for 87.7 % of test prompts, held down by tasks of the same answer format whose adapters' updates
respond alike; the probe state itself tells those tasks apart, and five examples per adapter rank the right
one first for about 98 %.

How the scores combine:
- every adapter the router may rank has examples: the score is the cosine; the top k are mixed with weights
  softmax(cosine / TEMPERATURE);
- some do not: every score is a z-score over the generic calibration prompts (the cosine's for those with
  examples, LoGo's calibrated signal for the rest), and the top k are mixed by softmax, as the zscore
  calibration does (a prototype's raw cosine and LoGo's z-score are not on one scale).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import AdapterError
from .router import NOT_SHORTLISTED, Routing, _softmax, select, weights_for

SUFFIX = ".examples.jsonl"
MAX_EXAMPLES = 64  # read at most this many per adapter (a prototype needs a few; probing each costs a prefill)
MAX_PROMPT_CHARS = 8000
TEMPERATURE = 0.1  # of the cosine weights (the generic prompts' cosines spread by about 0.2 per prototype)


def examples_path(adapter_path: str | Path) -> Path:
    """NAME.examples.jsonl beside NAME.gguf."""
    p = Path(adapter_path)
    return p.with_name(p.name.removesuffix(".gguf") + SUFFIX)


def read_examples(path: str | Path) -> list[str]:
    """The prompts of an examples file; AdapterError naming the file and line of anything malformed (an empty
    file, a line that is not a JSON object with a non-empty string "prompt", a prompt over MAX_PROMPT_CHARS)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: cannot read the adapter's example prompts ({type(e).__name__}: {e})") from None
    prompts = []
    for n, line in enumerate(text.split("\n"), 1):  # JSON Lines: only \n ends a line (not \x85, \u2028)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AdapterError(f"{path}, line {n}: not JSON ({e.msg}); each line must be "
                               '{"prompt": "..."}') from None
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise AdapterError(f"{path}, line {n}: each line must be a JSON object with a non-empty string "
                               '"prompt", got ' + line[:80])
        if len(prompt) > MAX_PROMPT_CHARS:
            raise AdapterError(f"{path}, line {n}: the prompt has {len(prompt)} characters, more than "
                               f"{MAX_PROMPT_CHARS}")
        prompts.append(prompt)
        if len(prompts) == MAX_EXAMPLES:
            break
    if not prompts:
        raise AdapterError(f"{path}: no example prompts (one JSON object {{\"prompt\": \"...\"}} per line)")
    return prompts


def write_examples(path: str | Path, prompts: list[str]) -> None:
    """Write an examples file atomically (a temporary file beside it, then renamed over it)."""
    from .calibration import _atomic_write

    lines = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)
    _atomic_write(Path(path), lambda tmp: tmp.write_text(lines, encoding="utf-8"))


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


@dataclass
class Prototypes:
    """The pool's prototypes: unit rows (n, D) for the adapters at pool indices `index`, the generic prompts'
    mean state `center` (D,), and each prototype's cosine statistics over the generic prompts (mean, sd)."""

    index: np.ndarray
    rows: np.ndarray
    center: np.ndarray
    mean: np.ndarray
    sd: np.ndarray

    @classmethod
    def build(cls, index: list[int], example_states: list[np.ndarray], generic: np.ndarray) -> "Prototypes":
        """From each adapter's example states (n_examples, ...) and the generic prompts' states (n_prompts, ...),
        laid out as the probe returns them."""
        g = generic.reshape(len(generic), -1).astype(np.float64)
        center = g.mean(0)
        rows = _unit(np.stack([_unit(s.reshape(len(s), -1) - center).mean(0) for s in example_states]))
        cos = _unit(g - center) @ rows.T  # (n_prompts, n)
        sd = cos.std(0)
        return cls(np.asarray(index, int), rows, center, cos.mean(0), np.where(sd > 0, sd, 1.0))

    def cosines(self, h: np.ndarray) -> np.ndarray:
        """(n,) cosine of a request's centred probe state with each prototype."""
        return self.rows @ _unit(np.asarray(h, np.float64).reshape(-1) - self.center)

    def route(self, routing: Routing, h: np.ndarray, k: int) -> Routing:
        """`routing` (LoGo's, calibrated, over the same pool) re-ranked with the prototypes (see the module's
        docstring for how the two combine)."""
        names, n = routing.names, len(routing.names)
        cos = self.cosines(h)
        has = np.zeros(n, bool)
        has[self.index] = True
        logo = np.asarray(routing.scores if routing.scores is not None else np.full(n, np.nan), np.float64)
        # every adapter that could be ranked has examples (those without are unprobeable, not merely unshortlisted)
        every = all(routing.excluded.get(names[i], NOT_SHORTLISTED) != NOT_SHORTLISTED for i in np.flatnonzero(~has))
        scores = np.where(has, np.nan, logo)
        scores[self.index] = cos if every else (cos - self.mean) / self.sd
        ok = np.isfinite(scores)
        selected = select(scores, k, ok)
        w = weights_for(scores / (TEMPERATURE if every else 1.0), selected, _softmax)
        at = {name: i for i, name in enumerate(names)}
        excluded = {name: why for name, why in routing.excluded.items() if not ok[at[name]]}
        return Routing(names, routing.signals, w, selected, excluded, scores)


def example_states(cache_name: str, prompts: list[str], probe: Callable[[str], np.ndarray]) -> np.ndarray:
    """(n_prompts, ...) probe states of an adapter's examples, from the disk cache or `probe(prompt)`.
    `cache_name` says what the states depend on besides the prompts (model key, window, reads, probe input);
    a cache file that does not hold finite float32 states for every prompt is recomputed and rewritten."""
    from .calibration import save_npy
    from .native.build import cache_root

    path = cache_root() / "examples" / f"{cache_name}-{prompts_digest(prompts)}.npy"
    try:
        states = np.load(path, allow_pickle=False)
        if states.dtype == np.float32 and len(states) == len(prompts) and np.isfinite(states).all():
            return states
    except (OSError, ValueError, EOFError):
        pass
    states = np.stack([np.asarray(probe(p), np.float32) for p in prompts])
    save_npy(path, states)
    return states


def pool_prototypes(adapters: list[tuple[int, Path]], cache_name: str, generic: np.ndarray,
                    probe: Callable[[str], np.ndarray]) -> Prototypes | None:
    """The prototypes of the adapters (pool index, file) that have an examples file beside them; None when
    none has. An unreadable examples file warns, naming it, and that adapter is routed as if it had none."""
    from .pool_index import _progress

    found = []
    for i, path in adapters:
        ex = examples_path(path)
        if not ex.is_file():
            continue
        try:
            found.append((i, read_examples(ex)))
        except AdapterError as e:
            warnings.warn(f"{e}; the adapter is routed without its examples", UserWarning, stacklevel=3)
    if not found:
        return None
    bar = _progress(len(found), f"example prompts of {len(found)} adapter(s) (probed once, then cached)")
    states = []
    for _, prompts in found:
        states.append(example_states(cache_name, prompts, probe))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return Prototypes.build([i for i, _ in found], states, generic)
