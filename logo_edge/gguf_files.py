"""Reading and validating GGUF files with gguf-py: the base model's shapes and LoRA adapters.

Every check here runs before llama.cpp sees a file, so a bad adapter gets an
error naming the file and the problem instead of a NULL from the C side.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from .errors import AdapterError, ModelLoadError

LORA_SUFFIXES = (".lora_a", ".lora_b")


GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # tensor names are shorter (llama.cpp's gguf parser refuses longer ones)
MAX_ELEMENTS = 1 << 40  # more elements in one tensor is a corrupt shape, not a model
# tensor types an adapter may use: what llama.cpp's and our converters write (f32, f16, bf16, q8_0)
LORA_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
              GGMLQuantizationType.Q8_0)


class _Corrupt(ValueError):
    """A structural problem found while parsing (wrapped into the caller's typed error by _open)."""


def check_tensor(name: str, shape: list[int], raw_type: int, offset: int, expected: int, data_start: int,
                 file_size: int, alignment: int) -> int:
    """Check one tensor's header entry as llama.cpp would need it (dimensions, type, block size, its data
    where the previous one ends and inside the file); the offset the next tensor must start at. _Corrupt."""
    if not 1 <= len(shape) <= GGML_MAX_DIMS:
        raise _Corrupt(f"tensor {name!r} has {len(shape)} dimensions (1-{GGML_MAX_DIMS} allowed)")
    n_elems = 1
    for d in shape:
        n_elems *= d
    if min(shape) < 1 or n_elems > MAX_ELEMENTS:
        raise _Corrupt(f"tensor {name!r} has an impossible shape {shape}")
    try:
        qtype = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Corrupt(f"tensor {name!r} has unknown type {raw_type}") from None
    if shape[0] % block:
        raise _Corrupt(f"tensor {name!r} of type {qtype.name} has rows of {shape[0]} values, not a "
                       f"multiple of its block size {block}")
    n_bytes = n_elems // block * type_size
    if offset != expected:
        raise _Corrupt(f"tensor {name!r} data starts at offset {offset}, expected {expected} "
                       "(tensors must follow each other, aligned)")
    if data_start + offset + n_bytes > file_size:
        raise _Corrupt(f"tensor {name!r} ({n_bytes} bytes at offset {offset}) ends past the end of the "
                       f"file ({file_size} bytes); the file is truncated or corrupt")
    return offset + -(-n_bytes // alignment) * alignment


class _StrictReader(GGUFReader):
    """gguf-py's reader with the checks llama.cpp's parser makes, made before anything is built.

    gguf-py slices its memory map without checking the result's length, so a declared length past
    the end of the file silently reads less (and a huge array count of fixed-size values loops without
    advancing: a hang that also grows memory). Here every read must lie inside the file, every count
    must fit in the bytes left, and tensor infos are checked (dims, type, offset, size) before a view
    is made, so a declared 10^12-element tensor or 2^40 KV entries is refused without allocating."""

    def _get(self, offset, dtype, count=1, override_order=None):
        count = int(count)
        itemsize = np.dtype(dtype).itemsize
        if offset < 0 or count < 0 or offset + itemsize * count > len(self.data):
            raise _Corrupt(f"a read of {count} x {np.dtype(dtype).name} at byte {offset} goes past the end of "
                           f"the file ({len(self.data)} bytes); truncated or a corrupt length")
        return super()._get(offset, dtype, count, override_order)

    def _left(self, offs: int) -> int:
        return len(self.data) - offs

    def _build_fields(self, offs, count):
        count = int(count)
        if count * 13 > self._left(offs):  # the smallest KV: 8-byte key length, 1-byte key, type, 1-byte value
            raise _Corrupt(f"the header declares {count} metadata keys, more than the file's "
                           f"{self._left(offs)} remaining bytes can hold")
        return super()._build_fields(offs, count)

    def _push_field(self, field, skip_sum=False):
        if field.name == "":
            raise _Corrupt(f"a metadata key at byte {field.offset} is empty")
        if field.name in self.fields:
            raise _Corrupt(f"duplicate metadata key {field.name!r} at byte {field.offset}")
        return super()._push_field(field, skip_sum)

    def _get_field_parts(self, orig_offs, raw_type):
        try:
            gtype = GGUFValueType(int(raw_type))
        except ValueError:
            raise _Corrupt(f"metadata value at byte {orig_offs} has unknown type {int(raw_type)}") from None
        if gtype == GGUFValueType.ARRAY:
            itype, alen = int(self._get(orig_offs, np.uint32)[0]), int(self._get(orig_offs + 4, np.uint64)[0])
            try:
                item = GGUFValueType(itype)
            except ValueError:
                raise _Corrupt(f"metadata array at byte {orig_offs} has unknown item type {itype}") from None
            if item == GGUFValueType.ARRAY:
                raise _Corrupt(f"metadata array at byte {orig_offs} holds arrays (not supported by llama.cpp)")
            size = 8 if item == GGUFValueType.STRING else np.dtype(self.gguf_scalar_to_np[item]).itemsize
            if alen * size > self._left(orig_offs + 12):
                raise _Corrupt(f"metadata array at byte {orig_offs} declares {alen} items, more than the file's "
                               f"{self._left(orig_offs + 12)} remaining bytes can hold")
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensor_info(self, offs, count):
        count = int(count)
        if count * 24 > self._left(offs):  # the smallest tensor info: name length, n_dims, type, offset
            raise _Corrupt(f"the header declares {count} tensors, more than the file's {self._left(offs)} "
                           "remaining bytes can hold")
        return super()._build_tensor_info(offs, count)

    def _build_tensors(self, start_offs, fields):
        expected, names = 0, set()
        for f in fields:
            _, name_data, n_dims, dims, raw_dtype, offset_tensor = f.parts
            name = str(bytes(name_data), encoding="utf-8")
            if not name or len(name_data) >= GGML_MAX_NAME:
                raise _Corrupt(f"tensor name {name!r} is empty or longer than {GGML_MAX_NAME - 1} bytes")
            if name in names:
                raise _Corrupt(f"duplicate tensor name {name!r}")
            names.add(name)
            shape = [int(x) for x in dims]
            expected = check_tensor(name, shape, int(raw_dtype[0]), int(offset_tensor[0]), expected, start_offs,
                                    len(self.data), self.alignment)
        super()._build_tensors(start_offs, fields)


def _open(path: Path, error: type[Exception], what: str) -> GGUFReader:
    if not path.exists():
        raise error(f"{what} file not found: {path}")
    if not path.is_file():
        raise error(f"{what} path is not a file: {path}")
    try:
        reader = _StrictReader(path)
    except _Corrupt as e:
        raise error(f"{path}: corrupt GGUF file: {e}") from None
    except Exception as e:  # gguf-py raises ValueError/IndexError/KeyError/UnicodeDecodeError... on bad files
        raise error(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if reader.byte_order != "I":
        raise error(f"{path}: a big-endian (byte-swapped) GGUF file; llama.cpp reads only this machine's order")
    return reader


def _typed(reader: GGUFReader, path: Path, key: str, gtype: GGUFValueType, error: type[Exception]):
    """The value of `key` if present and of type `gtype` (llama.cpp aborts on a wrongly typed key it reads)."""
    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types != [gtype]:
        raise error(f"{path}: metadata key {key} is of type {'/'.join(t.name for t in f.types) or '?'}, "
                    f"expected {gtype.name}")
    try:
        return f.contents()
    except UnicodeDecodeError:
        raise error(f"{path}: metadata key {key} is not valid UTF-8") from None


def _field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tensor_array(t) -> np.ndarray:
    """A reader tensor as float32 in numpy layout (rows = ne1, cols = ne0)."""
    qtype = GGMLQuantizationType(int(t.tensor_type))
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return np.asarray(t.data, np.float32)
    return np.asarray(dequantize(np.asarray(t.data), qtype), np.float32)


@dataclass
class BaseInfo:
    """What adapters are checked against: architecture, block count, weight shapes (ne0=in, ne1=out)."""

    path: Path
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    shapes: dict[str, tuple[int, ...]]
    chat_template: str | None

    @classmethod
    def read(cls, path: str | Path) -> "BaseInfo":
        """The base's header alone (metadata scalars and tensor shapes; the vocabulary arrays are skipped,
        not decoded: gguf-py's reader takes ~2 s on a 49k-token vocabulary, this ~50 ms). llama.cpp reads
        and checks the whole file when it loads the model."""
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"model file not found: {path}")
        if not path.is_file():
            raise ModelLoadError(f"model path is not a file: {path}")
        try:
            kv, shapes = scan_header(path)
        except _Corrupt as e:
            raise ModelLoadError(f"{path}: corrupt GGUF file: {e}") from None
        except (ValueError, struct.error, UnicodeDecodeError, OSError) as e:
            raise ModelLoadError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                                 f"{type(e).__name__}: {e}") from e
        arch = kv.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(f"{path}: no general.architecture key; is this a model GGUF?")
        if kv.get("general.type", "model") != "model":
            raise ModelLoadError(f"{path}: general.type is {kv.get('general.type')!r}, not a model "
                                 "(did you pass an adapter as the model?)")
        try:
            n_layer = int(kv.get(f"{arch}.block_count", 0))
            n_head = int(kv.get(f"{arch}.attention.head_count", 0))
            n_head_kv = int(kv.get(f"{arch}.attention.head_count_kv", n_head))
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{path}: a block or head count is not a number: {e}") from None
        _check_hparams(path, arch, kv, n_layer)
        template = kv.get("tokenizer.chat_template")
        return cls(path, arch, n_layer, n_head, n_head_kv, shapes, template if isinstance(template, str) else None)


LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS = 512, 1024  # the pinned llama.cpp's limits (src/llama-hparams.h)


def _check_hparams(path: Path, arch: str, kv: dict, n_layer: int) -> None:
    """The hyperparameters llama.cpp GGML_ASSERTs on while loading (llama_model::load_hparams: an abort of the
    whole process, not an error): ModelLoadError naming the key instead. An array value (a per-layer count) is
    skipped here (scan_header does not read arrays)."""
    def num(key: str) -> int:
        v = kv.get(f"{arch}.{key}", 0)
        if v is None:
            return 0
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v < 0:
            raise ModelLoadError(f"{path}: {arch}.{key} is {v!r}, not a count")
        return int(v)

    def bad(what: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: {what}: llama.cpp would abort loading this model")

    if not 0 < n_layer <= LLAMA_MAX_LAYERS:
        raise bad(f"{arch}.block_count is {n_layer}, not 1 to {LLAMA_MAX_LAYERS}")
    if num("nextn_predict_layers") > n_layer:
        raise bad(f"{arch}.nextn_predict_layers {num('nextn_predict_layers')} is over block_count {n_layer}")
    experts, used = num("expert_count"), num("expert_used_count")
    per_layer = kv.get(f"{arch}.expert_used_count", 0) is None  # an array: its largest is not read here
    groups, group_used = num("expert_group_count"), num("expert_group_used_count")
    if arch in ("hunyuan_vl", "hunyuan-dense") and experts <= 1:
        experts, used, per_layer = 0, 0, False
    if experts > LLAMA_MAX_EXPERTS or used > experts:
        raise bad(f"{arch}.expert_count {experts}, expert_used_count {used} (needs used <= count <= "
                  f"{LLAMA_MAX_EXPERTS})")
    if experts and ((used == 0 and not per_layer) or groups >= experts
                    or (groups > 1 and (experts % groups or not 0 < group_used < groups))):
        raise bad(f"{arch}.expert_count {experts}, expert_used_count {used}, expert_group_count {groups}, "
                  f"expert_group_used_count {group_used} do not fit together")
    if not experts and groups:
        raise bad(f"{arch}.expert_group_count {groups} without experts")


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def scan_header(path: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(metadata key -> value, tensor name -> shape (ne0, ne1, ...)) of a little-endian GGUF (v2/v3), read
    from its header only. Arrays are skipped (their value is None); ValueError on anything malformed."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        size = len(buf)
        pos = 0

        def take(fmt: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise ValueError(f"the header ends past the end of the file ({size} bytes)")
            v = struct.unpack_from(fmt, buf, pos)[0]
            pos += n
            return v

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            if pos + n > size:
                raise ValueError(f"a string of {n} bytes runs past the end of the file")
            v = bytes(buf[pos:pos + n]).decode("utf-8")
            pos += n
            return v

        def skip_value(t: int) -> None:
            nonlocal pos
            if t in _SCALARS:
                pos += struct.calcsize(_SCALARS[t])
            elif t == 8:
                n = take("<Q")  # (not `pos += take(...)`: that reads pos before take moves it)
                pos += n
            elif t == 9:
                et, count = take("<I"), take("<Q")
                if et in _SCALARS:
                    pos += struct.calcsize(_SCALARS[et]) * count
                else:
                    for _ in range(count):
                        skip_value(et)
            else:
                raise ValueError(f"unknown metadata value type {t}")
            if pos > size:
                raise ValueError("a metadata value runs past the end of the file")

        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("GGUF magic invalid")
        pos = 4
        version = take("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (big-endian, or not supported)")
        n_tensors, n_kv = take("<Q"), take("<Q")
        kv: dict = {}
        for _ in range(n_kv):
            key, t = string(), take("<I")
            if t in _SCALARS:
                kv[key] = take(_SCALARS[t])
            elif t == 8:
                kv[key] = string()
            else:
                skip_value(t)
                kv[key] = None
        entries, seen = [], set()
        for _ in range(n_tensors):
            name, n_dims = string(), take("<I")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (1-{GGML_MAX_DIMS} allowed)")
            dims = [take("<Q") for _ in range(n_dims)]
            if name in seen:
                raise ValueError(f"duplicate tensor name {name!r}")
            seen.add(name)
            entries.append((name, dims, take("<I"), take("<Q")))
        alignment = kv.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-pos // alignment) * alignment
        expected = 0
        for name, dims, raw_type, offset in entries:
            expected = check_tensor(name, dims, raw_type, offset, expected, data_start, size, alignment)
    return kv, {name: tuple(dims) for name, dims, _, _ in entries}


@dataclass
class LoraFile:
    """A validated GGUF LoRA adapter: its metadata and its tensors by base weight name."""

    path: Path
    name: str
    alpha: float | None
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)  # base name -> (A (r,in), B (out,r))
    stems: list[str] = field(default_factory=list)  # every adapted base weight (pairs may hold fewer)
    ranks: dict[str, int] = field(default_factory=dict)  # every adapted base weight -> its rank
    a_f16: frozenset[str] = frozenset()  # the weights whose A the file holds in f16 (pairs has them exactly)

    def scale(self, base_name: str) -> float:
        """c = alpha / r as llama.cpp applies it (1 when the file has no alpha)."""
        r = self.pairs[base_name][0].shape[0]
        return float(self.alpha) / r if self.alpha else 1.0

    @property
    def modules(self) -> list[str]:
        return sorted(self.pairs)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.pairs.values())


def _finite(t) -> bool:
    """Whether a reader tensor holds only finite values (f32/f16 checked on the raw data, no conversion)."""
    qtype = GGMLQuantizationType(int(t.tensor_type))
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return bool(np.isfinite(t.data).all())
    return bool(np.isfinite(tensor_array(t)).all())


def read_lora(path: str | Path, base: BaseInfo, only: str | Collection[str] | None = None) -> LoraFile:
    """Read an adapter GGUF and check it against `base`; AdapterError names the file and the problem.

    Every tensor is validated (shapes, finiteness); with `only` (a base weight name or several), just
    those pairs are converted to float32 and kept in `pairs` (the pool needs its probe window alone),
    and `stems` still lists every adapted weight."""
    path = Path(path)
    keep = {only} if isinstance(only, str) else None if only is None else set(only)
    r = _open(path, AdapterError, "adapter")
    try:
        return _read_lora(r, path, base, keep)
    except AdapterError:
        raise
    except Exception as e:  # anything else a corrupt file can cause is still the file's fault
        raise AdapterError(f"{path}: corrupt adapter file: {type(e).__name__}: {e}") from e


def _read_lora(r: GGUFReader, path: Path, base: BaseInfo, keep: set[str] | None) -> LoraFile:
    def string(key):
        return _typed(r, path, key, GGUFValueType.STRING, AdapterError)

    gtype, atype = string("general.type"), string("adapter.type")
    if gtype != "adapter" or atype != "lora":
        raise AdapterError(f"{path}: not a LoRA adapter (general.type={gtype!r}, adapter.type={atype!r}); "
                           "convert PEFT adapters with `logo-edge convert-lora`")
    arch = string("general.architecture")
    if arch != base.arch:
        raise AdapterError(f"{path}: adapter is for architecture {arch!r} but the base model "
                           f"{base.path.name} is {base.arch!r}")
    alpha = _typed(r, path, "adapter.lora.alpha", GGUFValueType.FLOAT32, AdapterError)
    if alpha is not None and not np.isfinite(alpha):
        raise AdapterError(f"{path}: adapter.lora.alpha is {alpha}; it must be a finite number")
    name = str(string("general.name") or "") or path.stem
    halves: dict[str, dict[str, object]] = {}
    for t in r.tensors:
        stem, suffix = t.name[:-7], t.name[-7:]
        if suffix not in LORA_SUFFIXES:
            raise AdapterError(f"{path}: tensor {t.name!r} is not a LoRA tensor (.lora_a/.lora_b)")
        qtype = GGMLQuantizationType(int(t.tensor_type))
        if qtype not in LORA_TYPES:
            raise AdapterError(f"{path}: tensor {t.name!r} is of type {qtype.name}; adapters hold "
                               + "/".join(q.name for q in LORA_TYPES))
        halves.setdefault(stem, {})[suffix] = t
    if not halves:
        raise AdapterError(f"{path}: the adapter has no tensors")
    pairs, ranks = {}, {}
    for stem, h in sorted(halves.items()):
        if set(h) != set(LORA_SUFFIXES):
            raise AdapterError(f"{path}: {stem} has only {sorted(h)}; both .lora_a and .lora_b are needed")
        if stem not in base.shapes:
            raise AdapterError(f"{path}: {stem} is not a weight of the base model {base.path.name} "
                               f"({base.n_layer} blocks); the adapter was made for another model")
        # numpy layout (rows = ne1, cols = ne0) from the metadata, without reading the data
        a_shape, b_shape = (tuple(int(x) for x in reversed(h[sfx].shape)) for sfx in LORA_SUFFIXES)
        n_in, n_out = base.shapes[stem][0], base.shapes[stem][1]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != n_in or b_shape[0] != n_out \
                or a_shape[0] != b_shape[1]:
            raise AdapterError(f"{path}: {stem}: A {a_shape} and B {b_shape} do not fit the base weight "
                               f"(in={n_in}, out={n_out}); the adapter was made for another model size")
        if not (_finite(h[".lora_a"]) and _finite(h[".lora_b"])):
            raise AdapterError(f"{path}: {stem} holds NaN or infinite values; the adapter is corrupt")
        ranks[stem] = a_shape[0]
        if keep is None or stem in keep:
            pairs[stem] = (tensor_array(h[".lora_a"]), tensor_array(h[".lora_b"]))
    a_f16 = frozenset(stem for stem, h in halves.items()
                      if GGMLQuantizationType(int(h[".lora_a"].tensor_type)) == GGMLQuantizationType.F16)
    return LoraFile(path, name, float(alpha) if alpha is not None else None, pairs, sorted(halves), ranks, a_f16)


# ---- writing

WRITE_TYPES = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0,
               "exact": GGMLQuantizationType.F32}  # exact: f16 where a tensor's values are all f16 values, else f32


def write_lora(path: str | Path, arch: str, alpha: float, pairs: dict[str, tuple[np.ndarray, np.ndarray]],
               outtype: str = "f32", name: str | None = None, extra: dict[str, str] | None = None,
               durable: bool = True) -> Path:
    """Write a GGUF LoRA adapter: `pairs` maps base weight name -> (A (r, in), B (out, r)).

    q8_0 needs rows divisible by the block size (32); other tensors fall back to f16, as
    llama.cpp's converter does. "exact" writes a tensor in f16 where every value is an f16 value
    (A of a packed mixture of f16 adapters; a float16 array is one), else in f32: nothing is rounded.
    `durable=False` skips the fsyncs: a scratch file read back and deleted at once (a packed mixture)
    needs the atomic rename, not the disk.
    """
    if outtype not in WRITE_TYPES:
        raise ValueError(f"unknown outtype {outtype!r}: choose one of {sorted(WRITE_TYPES)}")
    path = Path(path)
    # a temporary file of this process beside the target, flushed to disk, then renamed over it (os.replace,
    # atomic on POSIX): a writer killed at any moment leaves the old file or the new one, never a partial one
    # at `path` (a stale NAME.<pid>.part may remain); concurrent writers never share a temporary file
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.part")
    try:
        _write_lora_to(tmp, arch, alpha, pairs, outtype, name, extra)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        _fsync_dir(path.parent)
    return path


def _f16_exact(arr: np.ndarray) -> bool:
    """Whether every value of a float32 array is an f16 value; a few leading values first (a scaled B fails
    there, at no cost)."""
    flat = arr.reshape(-1)
    head = flat[:64]
    if not np.array_equal(head.astype(np.float16).astype(np.float32), head):
        return False
    return bool(np.array_equal(flat.astype(np.float16).astype(np.float32), flat))


def _fsync_dir(d: Path) -> None:
    """Make a rename in `d` durable (where the platform lets a directory be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_lora_to(tmp: Path, arch, alpha, pairs, outtype, name, extra) -> None:
    from gguf import GGUFWriter
    from gguf.quants import quantize

    w = GGUFWriter(tmp, arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    if name:
        w.add_name(name)
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    for stem in sorted(pairs):
        for suffix, arr in zip(LORA_SUFFIXES, pairs[stem]):
            qtype = WRITE_TYPES[outtype]
            if outtype == "exact" and np.asarray(arr).dtype == np.float16:
                w.add_tensor(stem + suffix, np.ascontiguousarray(arr))  # f16 values already: written as they are
                continue
            arr = np.ascontiguousarray(arr, np.float32)
            if outtype == "exact" and _f16_exact(arr):
                qtype = GGMLQuantizationType.F16
            if qtype == GGMLQuantizationType.Q8_0 and arr.shape[-1] % 32 != 0:
                qtype = GGMLQuantizationType.F16
            if qtype == GGMLQuantizationType.F32:
                w.add_tensor(stem + suffix, arr)
            elif qtype == GGMLQuantizationType.F16:
                w.add_tensor(stem + suffix, arr.astype(np.float16))
            else:
                w.add_tensor(stem + suffix, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
