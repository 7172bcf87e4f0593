"""The adapter pool: validated GGUF LoRAs, their probe bank, and their llama.cpp handles.

Only the target module's A/B of each adapter stay in memory (the probe bank);
the full adapter is loaded into llama.cpp when a mixture first needs it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import AdapterError
from .gguf_files import read_lora
from .llm import PROBE_INPUTS, LoraHandle, Model
from .router import ProbeBank


@dataclass
class PoolAdapter:
    """One adapter of the pool. `probe` holds (A, B, c) of the target module, or None with a reason."""

    name: str
    path: Path
    modules: list[str]
    alpha: float | None
    probe: tuple[np.ndarray, np.ndarray, float] | None = field(repr=False)
    unprobeable_reason: str | None = None
    handle: LoraHandle | None = field(default=None, repr=False)

    @property
    def rank(self) -> int | None:
        return None if self.probe is None else self.probe[0].shape[0]


class AdapterPool:
    """Adapters checked against one base model, probed at one target block and module."""

    def __init__(self, model: Model, target_block: int = -1, target_module: str = "attn_q"):
        if target_module not in PROBE_INPUTS:
            raise AdapterError(f"target module {target_module!r} cannot be probed; choose one of "
                               f"{sorted(PROBE_INPUTS)}")
        n_layer = model.info.n_layer
        block = target_block + n_layer if target_block < 0 else target_block
        if not 0 <= block < n_layer:
            raise AdapterError(f"target block {target_block} is out of range for a model with {n_layer} blocks")
        self.model = model
        self.target_block = block
        self.target_module = target_module
        self.target_tensor = f"blk.{block}.{target_module}.weight"
        self.adapters: list[PoolAdapter] = []
        self._bank: ProbeBank | None = None

    # ---- loading

    def add(self, path: str | Path, name: str | None = None) -> PoolAdapter:
        """Validate one GGUF LoRA against the base and add it; AdapterError leaves the pool unchanged."""
        lora = read_lora(path, self.model.info)
        name = name or lora.name
        if any(a.name == name for a in self.adapters):
            raise AdapterError(f"{lora.path}: an adapter named {name!r} is already in the pool; "
                               "rename the file or pass another name")
        probe, reason = None, None
        if self.target_tensor in lora.pairs:
            a, b = lora.pairs[self.target_tensor]
            probe = (a.copy(), b.copy(), lora.scale(self.target_tensor))
        else:
            reason = f"no LoRA on {self.target_tensor} (the probe target); it has {len(lora.pairs)} other tensors"
            warnings.warn(f"adapter {name!r} ({lora.path.name}) cannot be probed: {reason}; it will not be "
                          "routed to, but can still be used by name", UserWarning, stacklevel=2)
        adapter = PoolAdapter(name, lora.path, lora.modules, lora.alpha, probe, reason)
        self.adapters.append(adapter)
        self._bank = None
        return adapter

    def add_many(self, sources: Iterable[str | Path] | str | Path) -> list[PoolAdapter]:
        """Add a directory of *.gguf adapters (sorted by name) or a list of files."""
        if isinstance(sources, (str, Path)):
            src = Path(sources)
            if src.is_dir():
                files = sorted(src.glob("*.gguf"))
                if not files:
                    raise AdapterError(f"{src}: no *.gguf adapters in this directory")
                sources = files
            else:
                sources = [src]
        return [self.add(p) for p in sources]

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
        return {a.name: a.unprobeable_reason for a in self.adapters if a.probe is None}

    @property
    def bank(self) -> ProbeBank:
        if self._bank is None:
            self._bank = ProbeBank([a.probe for a in self.adapters if a.probe is not None])
        return self._bank

    # ---- llama.cpp handles

    def handle(self, i: int) -> LoraHandle:
        """The adapter's llama.cpp handle, loading the full adapter on first use."""
        a = self.adapters[i]
        if a.handle is None:
            a.handle = self.model.load_lora(a.path)
        return a.handle

    def close(self) -> None:
        for a in self.adapters:
            if a.handle is not None:
                a.handle.free()
                a.handle = None
