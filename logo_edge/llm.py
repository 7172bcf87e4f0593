"""Objects that own llama.cpp pointers and free them: model, context, LoRA handles, the probe capture.

This is the only module besides `_lib` that touches ctypes; the engine above it
works with token lists, numpy arrays and these objects.
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import _lib
from ._lib import llama_cpp
from .defaults import PROBE_INPUTS, same_input_modules  # noqa: F401  (the probe targets, here for the probe)
from .errors import AdapterError, ContextOverflowError, DecodeError, ModelLoadError, NativeCallError, ProbeError
from .gguf_files import BaseInfo

_internals = _lib._internals
llama_cpp._logger.set_verbose(False)  # llama.cpp errors only; our own checks say what is wrong


class Model:
    """A base model loaded by llama.cpp plus its GGUF metadata (architecture, shapes, template).

    `extra_bufts`: load weights into llama.cpp's extra CPU buffer types (AMX, weight repacking), the
    fast path; None asks the self-check whether that path is safe on this CPU (`selfcheck`)."""

    def __init__(self, path: str | Path, n_gpu_layers: int = 0, verbose: bool = False,
                 extra_bufts: bool | None = None):
        self.path = Path(path)
        self.info = BaseInfo.read(self.path)  # raises ModelLoadError naming the file
        if extra_bufts is None:
            from .selfcheck import use_extra_bufts

            extra_bufts = use_extra_bufts(self.path)
        self.extra_bufts = extra_bufts
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = extra_bufts
        try:
            with LogCapture() as log:
                self._m = _internals.LlamaModel(path_model=str(self.path), params=params, verbose=verbose)
        except ValueError as e:
            raise ModelLoadError(f"{self.path}: llama.cpp could not load the model: {e}") from e
        # where the weights went, from llama.cpp's load log: {"CPU_Mapped": MiB, "AMX": MiB, "CPU_REPACK": MiB}
        self.buffers = {m.group(1): float(m.group(2)) for m in re.finditer(
            r"(\S+) model buffer size\s*=\s*([\d.]+) MiB", "".join(log.lines))}
        self.ptr = self._m.model
        self.vocab = self._m.vocab
        self.n_embd = llama_cpp.llama_model_n_embd(self.ptr)
        self.n_layer = llama_cpp.llama_model_n_layer(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self._m.tokenize(text.encode("utf-8"), add_special, parse_special)

    def token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", "replace")

    def token_text(self, token: int) -> str:
        """The token's text with special tokens rendered (for the chat template's BOS/EOS)."""
        return self._m.token_to_piece(token, special=True).rstrip(b"\0").decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    @functools.cached_property
    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token (EOS, EOT, <|im_end|>, ...): one pass over the vocabulary, once."""
        return tuple(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))

    @property
    def bos(self) -> int:
        return llama_cpp.llama_vocab_bos(self.vocab)

    @property
    def eos(self) -> int:
        return llama_cpp.llama_vocab_eos(self.vocab)

    def load_lora(self, path: Path) -> "LoraHandle":
        ptr = llama_cpp.llama_adapter_lora_init(self.ptr, str(path).encode("utf-8"))
        if not ptr:
            raise AdapterError(f"{path}: llama.cpp refused the adapter (see its log above)")
        return LoraHandle(ptr, self)

    def close(self) -> None:
        self._m.close()


class LogCapture:
    """Collects llama.cpp's log lines for a while (all levels), still printing what llama-cpp-python would.

    One at a time in the process (`_LOCK`): llama.cpp's log callback is global, and a model load inside it
    (llama-cpp-python's suppress_stdout_stderr) dup2()s the process's stdout and stderr to /dev/null and back:
    two loads at once (engines started together: `serve --parallel`) would restore each other's /dev/null for
    good and take each other's load log."""

    _LOCK = threading.RLock()

    def __init__(self):
        self.lines: list[str] = []
        self._cb = llama_cpp.llama_log_callback(self._collect)

    def _collect(self, level, text, user_data) -> None:
        self.lines.append(text.decode("utf-8", "replace"))
        _lib.llama_cpp._logger.llama_log_callback(level, text, user_data)

    def __enter__(self) -> "LogCapture":
        self._LOCK.acquire()
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc) -> None:
        try:
            llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
        finally:
            self._LOCK.release()


class LoraHandle:
    """An adapter loaded into llama.cpp; freed explicitly or when the model goes."""

    def __init__(self, ptr, model: Model):
        self.ptr = ptr
        self._model = model

    @property
    def key(self) -> int | None:
        """The adapter's address: what identifies it in a context's mixture."""
        return self.ptr.value if hasattr(self.ptr, "value") else ctypes.cast(self.ptr, ctypes.c_void_p).value

    def free(self) -> None:
        if self.ptr is not None and self._model._m.model is not None:
            llama_cpp.llama_adapter_lora_free(self.ptr)
        self.ptr = None


KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16
_UNSURE = object()  # in Context._adapters after a failed llama_set_adapters_lora


@dataclass(frozen=True)
class ContextConfig:
    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int | None = None
    kv_type: str = "f16"  # "f32" makes the cache exact (reference checks), at twice the memory
    flash_attn: bool | None = None  # None = llama.cpp decides; on CPU its kernel rounds Q/K to f16

    def __post_init__(self) -> None:
        if self.n_ctx < 16 or self.n_batch < 1:
            raise ValueError(f"n_ctx must be >= 16 and n_batch >= 1 (got {self.n_ctx}, {self.n_batch})")
        if self.kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {self.kv_type!r}")


class Context:
    """A llama.cpp context holding one sequence. The probe gets a context of its own, with no adapters
    ever set, so probing never rebuilds the generation graph nor touches its KV cache."""

    def __init__(self, model: Model, config: ContextConfig = ContextConfig()):
        import os

        self.model = model
        self.config = config
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = config.n_ctx
        p.n_batch = config.n_batch
        p.n_ubatch = config.n_batch
        p.n_seq_max = 1
        p.no_perf = True
        p.type_k = p.type_v = KV_TYPES[config.kv_type]
        p.flash_attn_type = {None: -1, False: 0, True: 1}[config.flash_attn]  # auto / off / on
        threads = config.n_threads or max(1, os.cpu_count() or 1)
        p.n_threads = threads
        p.n_threads_batch = threads
        try:
            self._c = _internals.LlamaContext(model=model._m, params=p, verbose=False)
        except ValueError as e:
            raise ModelLoadError(f"could not create a llama.cpp context (n_ctx={config.n_ctx}): {e}") from e
        self.ptr = self._c.ctx
        self.memory = llama_cpp.llama_get_memory(self.ptr)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ptr)
        self._batch = llama_cpp.llama_batch_init(config.n_batch, 0, 1)
        self._adapters: tuple = ()

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        self._c.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- KV cache

    def cache_len(self) -> int:
        return int(llama_cpp.llama_memory_seq_pos_max(self.memory, 0)) + 1

    def cache_truncate(self, p0: int = 0, reset_ok: bool = False) -> int:
        """Drop cached positions >= p0; returns how many leading positions are kept: p0, or 0 after a reset.

        A memory that cannot drop the end of a sequence (recurrent or hybrid models: llama_memory_seq_rm
        returns false) has the whole sequence cleared instead; then with `reset_ok` this returns 0 (the
        caller must decode from position 0), without it NativeCallError says so. Either way the context
        is left usable: its cache is empty, never half-truncated."""
        if llama_cpp.llama_memory_seq_rm(self.memory, 0, p0, -1):
            return p0
        llama_cpp.llama_memory_clear(self.memory, False)  # one sequence per context: this clears it, always
        if reset_ok or p0 == 0:
            return 0
        raise NativeCallError(
            "llama_memory_seq_rm", False,
            f"this model's memory cannot drop the cached positions >= {p0} (a recurrent or hybrid "
            "model keeps no per-token state to roll back to); the whole sequence was cleared instead, "
            "nothing is kept. Call cache_truncate(p0, reset_ok=True) and decode from the position it returns")

    def save_sequence(self) -> bytes | None:
        """The cached sequence's state (its K/V, llama.cpp's own serialization), or None where it gives none."""
        n = llama_cpp.llama_state_seq_get_size(self.ptr, 0)
        if n == 0:
            return None
        buf = (ctypes.c_uint8 * n)()
        got = llama_cpp.llama_state_seq_get_data(self.ptr, buf, n, 0)
        return bytes(memoryview(buf)[:got]) if got else None

    def load_sequence(self, data: bytes) -> bool:
        """Replace the cached sequence by one `save_sequence` gave; False (the cache left empty) if llama.cpp
        refuses it."""
        llama_cpp.llama_memory_seq_rm(self.memory, 0, -1, -1)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(self.ptr, buf, len(data), 0) == 0:
            llama_cpp.llama_memory_clear(self.memory, False)
            return False
        return True

    # ---- adapters

    def set_adapters(self, handles: list[LoraHandle], scales: list[float]) -> bool:
        """Set the LoRA mixture; returns True if it changed (the caller must then drop caches)."""
        key = tuple((h.key, float(s)) for h, s in zip(handles, scales))
        if key == self._adapters:
            return False
        try:
            set_lora_mixture(self.ptr, [h.ptr for h in handles], scales)
        except AdapterError:
            # llama.cpp may hold the old mixture or the new: list both (adapter_keys, so none is freed while
            # maybe set) plus a marker no request equals, so the next set_adapters calls llama.cpp again
            self._adapters = self._adapters + key + ((_UNSURE, 0.0),)
            raise
        self._adapters = key
        return True

    @property
    def adapter_keys(self) -> set[int]:
        """Keys (LoraHandle.key) of the adapters set in this context."""
        return {k for k, _ in self._adapters if k is not _UNSURE}

    # ---- decoding

    def decode(self, tokens: list[int], pos0: int, what: str = "prefill") -> None:
        """Decode `tokens` at positions pos0.., logits for the last token only."""
        if pos0 + len(tokens) > self.n_ctx:
            raise ContextOverflowError(
                f"{pos0 + len(tokens)} tokens do not fit in the context of {self.n_ctx}; "
                "shorten the prompt or create the engine with a larger n_ctx")
        b = self._batch
        step = self.config.n_batch
        for start in range(0, len(tokens), step):
            chunk = tokens[start:start + step]
            b.n_tokens = len(chunk)
            for j, tok in enumerate(chunk):
                b.token[j] = tok
                b.pos[j] = pos0 + start + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = False
            b.logits[len(chunk) - 1] = start + step >= len(tokens)
            rc = llama_cpp.llama_decode(self.ptr, b)
            if rc != 0:
                raise DecodeError(rc, what)

    def logits(self) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()


def set_lora_mixture(ctx_ptr, adapter_ptrs: Sequence, scales: Sequence[float]) -> None:
    """llama_set_adapters_lora on a context pointer (ours or a llama_cpp.Llama's); AdapterError on failure."""
    n = len(adapter_ptrs)
    arr = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*adapter_ptrs)
    sc = (ctypes.c_float * max(n, 1))(*scales)
    rc = llama_cpp.llama_set_adapters_lora(ctx_ptr, arr if n else None, n, sc if n else None)
    if rc != 0:  # the pinned llama.cpp returns 0 or aborts: a code means a libllama with another contract
        raise AdapterError(f"llama_set_adapters_lora returned {rc}: llama.cpp did not set the mixture of {n} "
                           "adapter(s); the pinned llama.cpp only returns 0, so this libllama is another "
                           "version: rebuild it with `logo-edge build`")


_NORM_OPS = (_lib.GGML_OP_RMS_NORM, _lib.GGML_OP_NORM)


def _op_name(op: int) -> str:
    return _lib.ggml_op_name(op).decode() if 0 <= op < _lib.GGML_OP_COUNT else f"op {op}"


def _norm_input(attn_norm: _lib.GGMLTensor) -> int:
    """Address of the residual a norm reads, as x in NAME = MUL(RMS_NORM or NORM(x), w): the one entering block 0
    (attn_norm-0: the embeddings have no stable name) or the MLP (ffn_norm-b: not every family names it
    ffn_inp); ProbeError when the model builds that norm another way."""
    norm = _lib.GGMLTensor.from_address(attn_norm.src[0]) if attn_norm.src[0] else None
    if attn_norm.op == _lib.GGML_OP_MUL and norm is not None and norm.op in _NORM_OPS and norm.src[0]:
        return norm.src[0]
    found = _op_name(attn_norm.op) + (f"({_op_name(norm.op)}(...), ...)" if norm is not None else "()")
    raise ProbeError(
        f"the residual is read as x in {attn_norm.name.decode()} = MUL(RMS_NORM or NORM(x), weight), but "
        f"this model's graph has {found} there: another norm graph, which the probe does not know. Probe the "
        "normed input (probe_input='normed')" + (" or a window that starts at block 1"
                                                 if attn_norm.name.startswith(b"attn_norm") else ""))


def _columns(t: int, tensor: _lib.GGMLTensor, n_embd: int) -> np.ndarray:
    """Every token's column of an f32 (n_embd, n_tokens) activation: (n_tokens, n_embd)."""
    _last_column(t, tensor, n_embd)  # the same checks
    if tensor.nb[1] != 4 * n_embd:
        raise ProbeError(f"the probe reads contiguous columns, but {tensor.name.decode()} has nb={list(tensor.nb)}")
    out = np.empty((tensor.ne[1], n_embd), np.float32)
    _lib.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
    return out


def _last_column(t: int, tensor: _lib.GGMLTensor, n_embd: int) -> np.ndarray:
    """The last token's column of an f32 (n_embd, n_tokens) activation: h, (n_embd,)."""
    name = tensor.name.decode()
    if tensor.type != _lib.GGML_TYPE_F32:
        raise ProbeError(f"the probe reads f32 activations, but {name} is {_lib.ggml_type_name(tensor.type).decode()}")
    ne0, ne1 = tensor.ne[0], tensor.ne[1]
    if ne0 != n_embd or tensor.nb[0] != 4 or tensor.ne[2] * tensor.ne[3] != 1:
        raise ProbeError(f"the probe reads contiguous ({n_embd}, n_tokens) activations, but {name} has "
                         f"ne={list(tensor.ne)} nb={list(tensor.nb)}")
    h = np.empty(ne0, np.float32)
    _lib.ggml_backend_tensor_get(t, h.ctypes.data, tensor.nb[1] * (ne1 - 1), ne0 * 4)
    return h


class ProbeCapture:
    """Arms the eval callback for one decode and copies the last token's column of graph tensors.

    `block` is one block (run returns h, (n_embd,)) or an ascending window of blocks (run returns
    (len(window), n_embd), one row per block), all read in the same decode. `module` may be several modules
    reading distinct inputs (an attention module and an FFN one): the window's rows for each, in turn.
    The callback is set with the patch's llama_set_eval_callback only around `run`, so no Python runs per
    graph node during generation. With `stop_early` the callback returns false once the last row is read: ggml stops
    the graph split computing that block (all of a CPU-only graph); later splits of a partly offloaded
    model still run (ggml-backend.cpp, ggml_backend_sched_compute_splits). `nodes_asked` counts the
    graph nodes the last run's callback was asked about (what ran, with stop_early).
    """

    def __init__(self, ctx: Context, block: int | Sequence[int], module: str | Sequence[str], inp: str,
                 stop_early: bool = True, every_token: bool = False):
        # every_token: keep every prompt token's column, not the last one's (prompt-mean routers); run()
        # then returns (rows, n_tokens, n_embd) and reuses no cached token
        modules = [module] if isinstance(module, str) else list(module)
        for m in modules:
            if m not in PROBE_INPUTS:
                raise ValueError(f"probe target module {m!r} is not supported; choose one of "
                                 f"{sorted(PROBE_INPUTS)}")
        if len({PROBE_INPUTS[m] for m in modules}) != len(modules):
            raise ValueError(f"probe target modules {modules} must read distinct inputs")
        self._single = isinstance(block, (int, np.integer)) and len(modules) == 1
        blocks = [int(block)] if isinstance(block, (int, np.integer)) else [int(b) for b in block]
        if not blocks or blocks != sorted(set(blocks)):
            raise ValueError(f"probe blocks must be distinct and ascending, got {blocks}")
        for b in blocks:
            if not 0 <= b < ctx.model.n_layer:
                raise ValueError(f"target block {b} is out of range for a model with {ctx.model.n_layer} blocks")
        if inp not in ("residual", "normed"):
            raise ValueError(f"probe input must be 'residual' or 'normed', got {inp!r}")
        self.ctx = ctx
        self.stop_early = stop_early
        self.every_token = every_token
        self._targets: dict[bytes, int] = {}  # graph tensor name -> row of the window
        self._via_src: set[int] = set()  # rows read through their norm's input (_norm_input)
        # one row per (module, block), modules in the order given; an early stop comes after the row read last in
        # the graph (the last block's, the FFN input's where there is one: it follows the attention's), which
        # every ubatch of a long prompt reads again
        later = max(range(len(modules)), key=lambda i: PROBE_INPUTS[modules[i]][0] == "ffn_norm")
        self._last_row = later * len(blocks) + len(blocks) - 1
        # blocks computed for every token when the run stops early: those below the last block, and that block's
        # attention too where the FFN's input is read (it comes after); a kept cache serves a probe reaching no further
        self.complete_below = blocks[-1] + any(PROBE_INPUTS[m][0] == "ffn_norm" for m in modules)
        for mi, m in enumerate(modules):
            normed, residual = PROBE_INPUTS[m]
            for bi, b in enumerate(blocks):
                row = mi * len(blocks) + bi
                if inp == "normed":
                    name = f"{normed}-{b}"
                elif residual is None and b > 0:
                    name = f"l_out-{b - 1}"
                else:  # block 0's embeddings, the MLP's input (ffn_inp in some families): the norm's input
                    name = f"{normed}-{b}"
                    self._via_src.add(row)
                self._targets[name.encode()] = row
        blocks = blocks * len(modules)
        self._rows: list[np.ndarray | None] = [None] * len(blocks)
        self._error: ProbeError | None = None
        self.nodes_asked = 0
        self.n_reused = 0  # cached leading tokens the last run reused (n_keep, or 0 after a cache reset)
        self.states: np.ndarray | None = None  # what the last run returned
        self._cb = _lib.EvalCallback(self._callback)

    def _callback(self, t, ask, _ud):
        tensor = _lib.GGMLTensor.from_address(t)
        row = self._targets.get(tensor.name)
        if ask:
            self.nodes_asked += 1
            return row is not None
        if row is None:
            return True
        try:  # an exception must not escape: ctypes would print it and return false
            if row in self._via_src:
                t = _norm_input(tensor)
                tensor = _lib.GGMLTensor.from_address(t)
            if self.every_token:
                self._rows[row] = [*(self._rows[row] or []), _columns(t, tensor, self.ctx.model.n_embd)]
            else:
                self._rows[row] = _last_column(t, tensor, self.ctx.model.n_embd)
        except ProbeError as e:
            self._error = e
            return False  # nothing worth computing after: stop (run() raises it)
        return not (self.stop_early and row == self._last_row)

    def run(self, tokens: list[int], keep_cache: bool = False, n_keep: int = 0) -> np.ndarray:
        """Prefill `tokens` in the context, return h: (n_embd,) for one block, (n_blocks, n_embd) for a window.

        The cache is removed after unless `keep_cache`. With stop_early, a kept cache is complete only
        below the (last) target block, which is all a later probe at the same (or a lower) block reads;
        then `n_keep` cached leading tokens can be reused instead of decoded again."""
        self._rows = [None] * len(self._rows)
        self._error, self.nodes_asked, self.n_reused = None, 0, 0
        ctx = self.ctx
        _lib.llama_set_eval_callback(ctx.ptr, self._cb, None)
        ok = False
        try:
            n_keep = 0 if self.every_token else min(n_keep, len(tokens) - 1)  # the last token: h is read there
            n_keep = ctx.cache_truncate(n_keep, reset_ok=True)  # 0 when the memory cannot drop a tail
            ctx.decode(tokens[n_keep:], n_keep, what="probe")
            ok = self._error is None
        finally:
            _lib.llama_set_eval_callback(ctx.ptr, _lib.EvalCallback(), None)
            if not (keep_cache and ok):
                ctx.cache_truncate(0)
        if self._error is not None:
            raise self._error
        self.n_reused = n_keep
        missing = [name.decode() for name, row in self._targets.items() if self._rows[row] is None]
        if missing:
            raise ProbeError(f"the probe did not see tensor(s) {', '.join(missing)} in the model's graph")
        if self.every_token:  # each row: its ubatches' columns, in order
            self.states = np.stack([np.concatenate(r) for r in self._rows])
        else:
            self.states = self._rows[0] if self._single else np.stack(self._rows)
        return self.states
