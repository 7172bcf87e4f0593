"""Is llama.cpp's fast CPU path safe here? Asked once per library, CPU and model, in a child process.

llama.cpp puts a model's weights in "extra buffer types" when the CPU has kernels for them (AMX on
Sapphire Rapids and later Xeons, the CPU repack of Q4_0/IQ4_NL on AVX2 and ARM). Those kernels are
fast, and they are also the code a user's CPU runs but the build machine's may never have: one such
path once crashed every prefill (NOTES-llama-cpp.md: the crash on CPUs with AMX). So before a model
is loaded with them, a child process loads it with and without them, prefills a real prompt, decodes
a few tokens and compares the logits. If the child dies, hangs or disagrees, the engine loads the
model without extra buffer types (the safe path) and says so once. The verdict is cached per library,
CPU and model file, so this costs nothing after the first time.

    python -m logo_edge.selfcheck [MODEL]      # run the check now (default model) and print the verdict

LOGO_EDGE_EXTRA_BUFTS=0|1 skips the check and forces the choice. LOGO_EDGE_SELFCHECK_FAULT=crash|wrong|hang
makes the child fail on purpose (tests prove the fallback with it on CPUs whose fast path works).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

FORCE_ENV = "LOGO_EDGE_EXTRA_BUFTS"
FAULT_ENV = "LOGO_EDGE_SELFCHECK_FAULT"
CACHE_ENV = "LOGO_EDGE_SELFCHECK_CACHE"
TIMEOUT_S = 300
# A prompt long enough that prefill takes the batched (matrix-matrix) kernels: the AMX crash needed
# more than a few tokens, a one-token prompt decoded fine.
PROMPT = ("The quick brown fox jumps over the lazy dog. " * 6).strip()
N_DECODE = 4
MIN_CORR = 0.99  # fast and safe logits: AMX quantizes activations its own way (max |d| 0.67 of ~20)
CPU_FLAGS_SHOWN = ("amx_tile", "amx_int8", "amx_bf16", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
                   "avx2", "fma", "f16c", "asimd", "asimddp", "i8mm", "sve", "sve2")


@dataclass(frozen=True)
class Verdict:
    extra_bufts: bool  # whether the fast path may be used
    reason: str  # what the child saw
    library: str
    cpu: str  # the CPU features that matter to the kernels
    model: str


def cpu_summary() -> str:
    from .native.build import cpu_features

    flags = set(cpu_features().split())
    shown = [f for f in CPU_FLAGS_SHOWN if f in flags]
    return " ".join(shown) if shown else cpu_features()[:80]


def _file_id(p: Path) -> str:
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _key(lib_dir: Path, model: Path) -> str:
    from .native.build import cpu_features

    h = hashlib.sha256()
    for lib in sorted(lib_dir.glob("lib*")):  # the library and the ggml backends it loads
        h.update(_file_id(lib).encode())
    h.update(cpu_features().encode())
    h.update(_file_id(model).encode())
    return h.hexdigest()[:20]


def _store() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    from .native.build import cache_root

    return cache_root() / "selfcheck"


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"the child died with {signal.Signals(-rc).name}"
        except ValueError:
            return f"the child died with signal {-rc}"
    return f"the child exited with status {rc}"


def run_child(model: Path, timeout_s: float = TIMEOUT_S) -> tuple[bool, str]:
    """Run the check in a child process; (fast path ok, what happened). Never raises for the child's fate."""
    cmd = [sys.executable, "-m", "logo_edge.selfcheck", "--child", str(model)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"the child hung (no answer in {timeout_s:.0f} s)"
    if res.returncode != 0:
        tail = res.stderr.strip().splitlines()[-1:] or [""]
        return False, f"{_describe_exit(res.returncode)} {tail[0][:200]}".strip()
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return False, f"the child gave no result: {res.stdout[-200:]!r}"
    return bool(out["ok"]), out["reason"]


def verdict(model: str | Path) -> Verdict:
    """The cached verdict for this library, CPU and model, computed in a child process the first time."""
    from ._lib import LIB_DIR

    model = Path(model)
    path = _store() / f"{_key(LIB_DIR, model)}.json"
    if path.exists():
        try:
            return Verdict(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            pass  # a damaged verdict is computed again
    ok, reason = run_child(model)
    v = Verdict(ok, reason, str(LIB_DIR), cpu_summary(), str(model))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(asdict(v), indent=1))
    os.replace(tmp, path)  # atomic: a concurrent checker writes the same verdict
    if not ok:
        warnings.warn(
            f"llama.cpp's extra CPU buffer types (AMX / weight repacking) failed a self-check with "
            f"{model.name} on this CPU ({v.cpu}) and library {LIB_DIR}: {reason}. They are turned off "
            f"for this model (safe path, slower prefill). Verdict cached in {path}; "
            f"{FORCE_ENV}=1 forces them on.", RuntimeWarning, stacklevel=3)
    return v


def use_extra_bufts(model: str | Path) -> bool:
    """Whether to load `model` with extra buffer types: forced by LOGO_EDGE_EXTRA_BUFTS, else the verdict."""
    forced = os.environ.get(FORCE_ENV)
    if forced is not None and forced.strip() != "":
        return forced.strip().lower() not in ("0", "false", "no", "off")
    return verdict(model).extra_bufts


# ---- the child


def _logits(model_path: Path, extra_bufts: bool, fault: str | None) -> list:
    import numpy as np

    from .llm import Context, ContextConfig, Model

    model = Model(model_path, extra_bufts=extra_bufts)
    ctx = Context(model, ContextConfig(n_ctx=256, n_batch=128))
    try:
        if fault == "crash" and extra_bufts:
            import ctypes

            ctypes.string_at(0)  # a segmentation fault, as the AMX path gave
        if fault == "hang" and extra_bufts:
            import time

            time.sleep(3600)
        tokens = model.tokenize(PROMPT)
        ctx.decode(tokens, 0)  # prefill: the batched kernels
        rows = [ctx.logits()]
        for i in range(N_DECODE):  # decode: the one-row kernels
            ctx.decode([int(np.argmax(rows[-1]))], len(tokens) + i, "decode")
            rows.append(ctx.logits())
        out = np.stack(rows)
        if fault == "wrong" and extra_bufts:
            out = out[:, ::-1].copy()
        return out
    finally:
        ctx.close()
        model.close()


def _child(model_path: Path) -> dict:
    import numpy as np

    fault = os.environ.get(FAULT_ENV) or None
    fast = _logits(model_path, True, fault)
    safe = _logits(model_path, False, fault)
    if not np.isfinite(fast).all():
        return {"ok": False, "reason": "the fast path gave non-finite logits"}
    corr = min(float(np.corrcoef(a, b)[0, 1]) for a, b in zip(fast, safe))
    same = bool((fast.argmax(1) == safe.argmax(1)).all())
    detail = f"prefill of {len(PROMPT.split())} words + {N_DECODE} decodes, min logit corr {corr:.4f}"
    if corr < MIN_CORR or not same:
        return {"ok": False, "reason": f"the fast path disagrees with the safe path ({detail}, "
                                       f"same argmax: {same})"}
    return {"ok": True, "reason": f"fast and safe paths agree ({detail})"}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF model (default: the default model)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model is None:
        from .defaults import default_model_path

        args.model = default_model_path()
    if args.child:
        print(json.dumps(_child(Path(args.model))), flush=True)
        return 0
    v = verdict(args.model)
    print(f"{'fast path on' if v.extra_bufts else 'fast path OFF'}: {v.reason}\n"
          f"  library {v.library}\n  cpu     {v.cpu}\n  model   {v.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
