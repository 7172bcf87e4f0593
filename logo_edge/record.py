"""The routing record every routed call returns beside its text (SPEC §1)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class AdapterScore:
    name: str
    signal: float | None  # None when the adapter was not scored (see `note`)
    weight: float  # 0 when not selected
    rank: int | None = None  # position in the selection, 1 = best; None if not selected
    note: str | None = None
    score: float | None = None  # the calibrated score the selection used (the raw signal when uncalibrated)


@dataclass
class Timings:
    probe_s: float = 0.0
    route_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    probe_cached_tokens: int = 0  # prompt tokens the probe did not process again (its cache held them)
    completion_tokens: int = 0

    @property
    def decode_tok_s(self) -> float:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class RoutingRecord:
    mode: str  # "routed", "manual" or "base"
    settings: dict
    adapters: list[AdapterScore]
    timings: Timings = field(default_factory=Timings)

    @property
    def selected(self) -> list[AdapterScore]:
        return sorted((a for a in self.adapters if a.rank is not None), key=lambda a: a.rank)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timings"]["decode_tok_s"] = self.timings.decode_tok_s
        return d

    def summary(self) -> str:
        """One line: the adapters that answered with their weights."""
        if not self.selected:
            return "base model (no adapter)"
        return ", ".join(f"{a.name} {a.weight:.2f}" for a in self.selected)

    def table(self) -> str:
        """Every adapter's signal and weight, selected first, for the CLI."""
        rows = self.selected + [a for a in self.adapters if a.rank is None]
        width = max([len(a.name) for a in rows] + [7])
        calibrated = self.settings.get("calibration", "raw") != "raw"
        head = f"{'adapter':<{width}}  {'raw signal':>10}"
        head += f"  {self.settings['calibration']:>10}" if calibrated else ""
        out = [head + f"  {'weight':>6}  note"]
        for a in rows:
            line = f"{a.name:<{width}}  {_num(a.signal):>10}"
            line += f"  {_num(a.score):>10}" if calibrated else ""
            out.append(f"{line}  {a.weight:6.3f}  {a.note or ''}".rstrip())
        return "\n".join(out)


def _num(x: float | None) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:10.4g}"
