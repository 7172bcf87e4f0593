"""Operations on a pool directory of GGUF LoRA adapters: list, add, remove, rename, verify.

One module for every surface: `logo-edge pool ...` and `logo-edge pull` (CLI), the Python API, and the
server's adapter listing. A pool is a directory of `*.gguf` adapters; an adapter's name in a pool
directory is its file name without `.gguf`. Beside them, `manifest.json` keeps what the files cannot
say about themselves: where each came from (`origin`: `hf://ORG/NAME@SHA`, `peft:DIR`, `mlx:DIR`,
`file:PATH`) and, for the shipped pools, how it was trained.

Every write is atomic (a temporary file in the pool directory, flushed, then renamed over the target),
so a process killed at any moment leaves the pool as it was or as it was meant to become.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from .defaults import other_input_modules, same_input_modules
from .errors import AdapterError
from .examples import examples_path, read_examples, write_examples
from .gguf_files import BaseInfo, _fsync_dir, read_lora

MANIFEST = "manifest.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")  # whole names only: fullmatch


def user_pool_dir() -> Path:
    """The user's own pool: $LOGO_EDGE_POOL, else $XDG_DATA_HOME/logo-edge/pool (~/.local/share/...)."""
    if os.environ.get("LOGO_EDGE_POOL"):
        return Path(os.environ["LOGO_EDGE_POOL"]).expanduser()
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "logo-edge" / "pool"


@dataclass
class PoolEntry:
    """One adapter of a pool directory, as `logo-edge pool list` shows it."""

    name: str
    path: Path
    origin: str
    rank: int  # the largest rank over its tensors
    modules: list[str]  # GGUF module names it adapts (attn_q, ffn_up, ...), sorted
    blocks: int  # how many blocks it adapts
    size: int  # file size in bytes
    probeable: bool | None = None  # has a LoRA on the probe target (None: not known without an engine)
    loaded: bool | None = None  # its llama.cpp handle is loaded now (None: no engine asked)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def check_name(name: str) -> str:
    """An adapter name usable as a file name and in requests; AdapterError saying what is allowed."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(".gguf"):
        raise AdapterError(f"adapter name {name!r} is not allowed: use 1-100 letters, digits, '.', '_', '+' "
                           "or '-', starting with a letter or digit, without the .gguf suffix")
    return name


def adapter_files(pool_dir: str | Path) -> list[Path]:
    """The pool's adapter files, sorted by name; AdapterError if the directory does not exist."""
    pool_dir = Path(pool_dir)
    if not pool_dir.is_dir():
        raise AdapterError(f"{pool_dir}: no such pool directory")
    return sorted(p for p in pool_dir.glob("*.gguf") if p.is_file())


# ---- the manifest


def read_manifest(pool_dir: str | Path) -> dict:
    """The pool's manifest ({"adapters": {name: {...}}}); empty when there is none. AdapterError names a
    manifest that is not valid JSON (it is never overwritten then: nothing the user wrote is lost)."""
    path = Path(pool_dir) / MANIFEST
    if not path.exists():
        return {"adapters": {}}
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: the pool manifest cannot be read ({e}); fix or remove it") from e
    if not isinstance(m, dict) or not isinstance(m.setdefault("adapters", {}), dict):
        raise AdapterError(f"{path}: the pool manifest must be an object with an 'adapters' object")
    for name, entry in m["adapters"].items():
        if not isinstance(entry, dict):
            raise AdapterError(f"{path}: the manifest entry of {name!r} is {type(entry).__name__} {entry!r}, not an "
                               "object; fix or remove it")
    return m


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _write_manifest(pool_dir: Path, m: dict) -> None:
    _write_atomic(pool_dir / MANIFEST, (json.dumps(m, indent=1, sort_keys=True) + "\n").encode())


def origin_of(pool_dir: str | Path, name: str, manifest: dict | None = None) -> str:
    m = manifest if manifest is not None else read_manifest(pool_dir)
    info = m["adapters"].get(name) or {}
    return str(info.get("origin") or ("shipped" if "recipe" in info else "local file"))


# ---- operations


def _base_info(base) -> BaseInfo:
    if isinstance(base, BaseInfo):
        return base
    from . import defaults

    return BaseInfo.read(base or defaults.default_model_path())


def describe(path: Path, base: BaseInfo, origin: str, probe: list[str] | None = None) -> PoolEntry:
    """A PoolEntry for one adapter file, validated against `base` (AdapterError if it does not fit);
    `probe`: the tensors the probe can score it on (probe_tensors), for `probeable`."""
    lora = read_lora(path, base, only=[])
    modules = sorted({s.split(".")[2] for s in lora.stems})
    blocks = len({s.split(".")[1] for s in lora.stems})
    probeable = None if probe is None else any(t in lora.stems for t in probe)
    return PoolEntry(path.stem, path, origin, max(lora.ranks.values(), default=0), modules, blocks,
                     path.stat().st_size, probeable)


def add_file(pool_dir: str | Path, src: str | Path, *, name: str | None = None, origin: str | None = None,
             base=None, move: bool = False, replace: bool = False) -> PoolEntry:
    """Validate a GGUF LoRA against the base model (default: the default model) and put it in the pool
    as NAME.gguf (name: given, else the adapter's own general.name, else the file's stem), recording
    `origin` in the manifest. The copy is atomic; `move` removes `src` after. AdapterError, with the pool
    unchanged, when the file is not a valid adapter for the base or the name is taken (unless `replace`)."""
    pool_dir, src = Path(pool_dir), Path(src)
    if not src.is_file():
        raise AdapterError(f"{src}: no such adapter file")
    info = _base_info(base)
    lora = read_lora(src, info, only=[])  # every tensor validated before anything is written
    # its example prompts (logo_edge.examples) go with it, checked before anything is written too
    examples = read_examples(examples_path(src)) if examples_path(src).is_file() else None
    name = check_name(name if name is not None else _safe_stem(lora.name) or src.stem)
    pool_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(pool_dir)  # before writing: a broken manifest stops the add
    dest = pool_dir / f"{name}.gguf"
    same = dest.exists() and dest.resolve() == src.resolve()  # a pool file added again: only its origin may change
    if dest.exists() and not replace and not same:
        raise AdapterError(f"{dest}: the pool already has an adapter named {name!r}; pass another name, "
                           "or replace it")
    if not same:
        tmp = pool_dir / f".{name}.gguf.{os.getpid()}-{threading.get_ident()}.part"
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(pool_dir)
    if not same:  # a new file: what the manifest said of the one it replaces no longer holds
        manifest["adapters"][name] = {}
    entry = manifest["adapters"].setdefault(name, {})
    if origin or not (same and entry.get("origin")):
        entry["origin"] = origin or f"file:{src.resolve()}"
    _write_manifest(pool_dir, manifest)
    if not same:  # a replaced adapter's examples do not stay with the new file
        if examples is not None:
            write_examples(examples_path(dest), examples)
        else:
            examples_path(dest).unlink(missing_ok=True)
    if move and not same:
        src.unlink(missing_ok=True)
        examples_path(src).unlink(missing_ok=True)
    return describe(dest, info, entry["origin"])


def add_source(pool_dir: str | Path, src: str | Path, *, name: str | None = None, base=None,
               replace: bool = False, outtype: str = "f16") -> PoolEntry:
    """Add a GGUF LoRA file, or convert a PEFT or mlx-lm adapter directory (to `outtype`) and add the result;
    the origin records which (`file:`, `peft:`, `mlx:`)."""
    src = Path(src)
    if not src.is_dir():
        return add_file(pool_dir, src, name=name, base=base, replace=replace)
    from . import defaults
    from .convert.lora import convert_lora
    from .convert.mlx import is_mlx_adapter

    base_path = base.path if isinstance(base, BaseInfo) else Path(base) if base else defaults.default_model_path()
    name = check_name(name if name is not None else src.resolve().name)
    pool_dir = Path(pool_dir)
    pool_dir.mkdir(parents=True, exist_ok=True)
    # not *.gguf: never taken for a pool adapter
    tmp = pool_dir / f".{name}.{os.getpid()}-{threading.get_ident()}.converting"
    kind = "mlx" if is_mlx_adapter(src) else "peft"
    try:
        convert_lora(src, base_path, tmp, outtype, name=name)
        return add_file(pool_dir, tmp, name=name, origin=f"{kind}:{src.resolve()}", base=base_path, move=True,
                        replace=replace)
    finally:
        tmp.unlink(missing_ok=True)


def _safe_stem(name: str) -> str | None:
    """A general.name turned into a file name (spaces -> '-'), or None when nothing usable is left."""
    s = re.sub(r"[^A-Za-z0-9._+-]+", "-", name or "").strip("-.")
    return s[:100] if s and _NAME.fullmatch(s[:100]) else None


def remove(pool_dir: str | Path, name: str) -> Path:
    """Delete NAME.gguf from the pool and its manifest entry; AdapterError if there is no such adapter."""
    pool_dir = Path(pool_dir)
    path = _existing(pool_dir, name)
    manifest = read_manifest(pool_dir)
    path.unlink()
    examples_path(path).unlink(missing_ok=True)
    _fsync_dir(pool_dir)
    if manifest["adapters"].pop(name, None) is not None:
        _write_manifest(pool_dir, manifest)
    return path


def rename(pool_dir: str | Path, old: str, new: str) -> Path:
    """Rename an adapter of the pool (its file and manifest entry); AdapterError if `new` is taken."""
    pool_dir = Path(pool_dir)
    path = _existing(pool_dir, old)
    dest = pool_dir / f"{check_name(new)}.gguf"
    if dest.exists():
        raise AdapterError(f"{dest}: the pool already has an adapter named {new!r}")
    manifest = read_manifest(pool_dir)
    try:  # a hard link, then the old name dropped: never overwrites a file that appeared since the check
        os.link(path, dest)
    except FileExistsError:
        raise AdapterError(f"{dest}: the pool already has an adapter named {new!r}") from None
    except OSError:  # a file system without hard links: the checked rename
        os.replace(path, dest)
    else:
        os.unlink(path)
    if examples_path(path).is_file():
        os.replace(examples_path(path), examples_path(dest))
    _fsync_dir(pool_dir)
    if old in manifest["adapters"]:
        manifest["adapters"][new] = manifest["adapters"].pop(old)
        _write_manifest(pool_dir, manifest)
    return dest


def _existing(pool_dir: Path, name: str) -> Path:
    path = pool_dir / f"{name}.gguf"
    if not isinstance(name, str) or not _NAME.fullmatch(name) or not path.is_file():
        have = ", ".join(p.stem for p in adapter_files(pool_dir)) or "none"
        raise AdapterError(f"{pool_dir}: no adapter named {name!r} (have: {have})")
    return path


def list_pool(pool_dir: str | Path, base=None) -> list[PoolEntry]:
    """Every adapter of a pool directory, each file read (validated) against the base; for a running
    engine's pool use `engine_entries`."""
    pool_dir = Path(pool_dir)
    manifest = read_manifest(pool_dir)
    files = adapter_files(pool_dir)
    info = _base_info(base)
    probe = probe_tensors(info)
    return [describe(p, info, origin_of(pool_dir, p.stem, manifest), probe) for p in files]


def probe_tensors(info: BaseInfo) -> list[str]:
    """What the default probe scores an adapter on (an engine's defaults, pool.PROBE_MODULES): the last block's
    query projection (fused q/k/v where there is no separate one), else the modules reading the same input,
    else those reading the FFN's input."""
    last = info.n_layer - 1
    target = "attn_q" if f"blk.{last}.attn_q.weight" in info.shapes or \
        f"blk.{last}.attn_qkv.weight" not in info.shapes else "attn_qkv"
    return [f"blk.{last}.{m}.weight" for m in same_input_modules(target) + other_input_modules(target)]


def engine_entries(engine) -> list[PoolEntry]:
    """The adapters of a running engine's pool (any directories), with `probeable` and `loaded` from it."""
    manifests: dict[Path, dict] = {}
    out = []
    for a in engine.pool.adapters:
        d = a.path.parent
        if d not in manifests:
            try:
                manifests[d] = read_manifest(d)
            except AdapterError:
                manifests[d] = {"adapters": {}}
        modules = sorted({s.split(".")[2] for s in a.modules})
        out.append(PoolEntry(a.name, a.path, origin_of(d, a.path.stem, manifests[d]), a.max_rank, modules,
                             len({s.split(".")[1] for s in a.modules}), a.nbytes, a.probeable,
                             a.handle is not None))
    return out


def verify(pool_dir: str | Path, base=None) -> list[tuple[str, str | None]]:
    """Read and validate every adapter file against the base: [(name, None if sound else what is wrong)].
    Also names manifest entries without a file (a broken manifest is an error of its own)."""
    pool_dir = Path(pool_dir)
    info = _base_info(base)
    out: list[tuple[str, str | None]] = []
    for p in adapter_files(pool_dir):
        try:
            read_lora(p, info, only=[])
            out.append((p.stem, None))
        except AdapterError as e:
            out.append((p.stem, str(e)))
    try:
        manifest = read_manifest(pool_dir)
    except AdapterError as e:
        return out + [(MANIFEST, str(e))]
    present = {p.stem for p in adapter_files(pool_dir)}
    out += [(n, f"listed in {MANIFEST} but {n}.gguf is missing") for n in sorted(manifest["adapters"])
            if n not in present]
    return out
