"""The engine: one path per request — tokenize, probe, signals, select, set scales, prefill, decode, record.

    eng = Engine(adapters="models/pool")
    out = eng.create_chat_completion([{"role": "user", "content": "Is 17 prime?"}])
    out["choices"][0]["message"]["content"], out["routing"]
"""

from __future__ import annotations

import codecs
import contextlib
import math
import random
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from . import defaults
from ._lib import _internals, llama_cpp
from .errors import AdapterError, ContextOverflowError, EngineBusyError, RequestError, RoutingError
from .examples import Prototypes, pool_prototypes
from .gguf_files import LoraFile, read_lora, write_lora
from .llm import Context, ContextConfig, LoraHandle, Model, ProbeCapture
from .pool import AdapterPool
from .record import AdapterScore, RoutingRecord, Timings
from .router import (
    LEAD_NORM,
    TARGET_NORM,
    RouterConfig,
    Routing,
    one_blas_thread,
    route_signals,
    select,
    shortlist_norms,
)

PROBE_INPUTS = ("residual", "normed")
# mixture: each selected adapter set with scale w_i (the paper's); packed: the same sum built as one
# adapter of rank sum(r_i) with B_i scaled by w_i c_i (exact, fewer graph nodes); fusion: parameter
# averaging A = sum w_i A_i, B = sum w_i B_i (not the same function; for comparison). auto (the default): the
# faster exact one for the mixture at hand: packed for two or more adapters whose tensors (as their files hold
# them) total at most PACK_MAX_BYTES, else mixture. Building a packed adapter costs 5-15 ms per MB of files per
# new mixture (kept for the next 8); it decodes faster (bench.txt's pack-cost section, 2 cores: 3 rank-8 q,k,v,o
# adapters, 5 MB, 0.88 of base vs 0.80; 20 of them, 36 MB, 0.74 vs 0.38 and prefill 2.3x faster, repaid after ~50
# tokens; 3 rank-64 all-module adapters, 112 MB, 0.51 vs 0.49, repaid only after hundreds of tokens: mixture).
# Built (warm: files read) in 26, 540 and 540 ms: a scratch file written without fsync, A copied in f16 from f16
# files, B scaled into the padded arrays.
MERGES = ("auto", "mixture", "packed", "fusion")
PACK_MAX_BYTES = 64 << 20
# a packed adapter's rank is padded with zeros (exact: zero terms) to a multiple of 16, the inner dimension
# llama.cpp's tiled matrix kernels (llamafile sgemm) need on every CPU they cover; the B product of rank 24
# otherwise falls back to the generic dot loop. Prefill under 3 rank-8 adapters: 1.023x the base model's
# instead of 1.075x (256 tokens, 2 cores, AVX-512; decode unchanged within noise, 0.87-0.89 of base).
PACK_RANK_MULTIPLE = 16
# exact: the prompt is prefilled again under the mixture (SPEC §1.6). probe-cache (approximate, opt-in):
# the probe runs in the generation context and its base-model K/V of the prompt are kept; only the last
# prompt token is decoded again under the mixture, saving the second prefill.
PREFILLS = ("exact", "probe-cache")
KEEP_PROBES = ("base", "mixture")  # what a continuing turn's keep decision routes on (RouteConfig.keep_probe)
FALLBACKS = ("base", "uniform")  # what a request below min_score gets (RouteConfig.fallback)
MAX_UNIFORM = 128  # fallback="uniform" mixes at most this many adapters (the best-ranked), equally
LORA_CACHE_BYTES = 64 << 20  # adapter tensors kept in memory for packing (Engine._lora_file)
MAX_STOPS, MAX_STOP_CHARS = 16, 1000  # stop strings a request may give (each is matched on every token)
KEEP_MIN_PREFIX = 48  # tokens of cached history below which a request is not a continuing conversation
# K/V kept per mixture: when a request changes the mixture, the history computed under the old one is saved
# (llama.cpp's sequence state), most recent last, within KV_KEEP_BYTES; a request that returns to a saved mixture
# (set by hand, or routed within `keep` of it) gets its K/V back and prefills only what follows (exact: computed
# under that very mixture). Engine(kv_keep_mb=0) turns it off.
KV_KEEP_BYTES = 256 << 20


@dataclass(frozen=True)
class RouteConfig:
    """How requests are routed. Target block and module belong to the pool (they fix the probe bank)."""

    signal: str = "norm"
    k: int = 3
    probe_input: str = defaults.PROBE_INPUT
    merge: str = "auto"
    calibration: str = "zscore"  # chosen by the evaluation (models/eval/README.md); "raw" is the paper's
    prefill: str = "exact"
    # A conversation keeps its mixture while a new turn's routing agrees with it: the total variation
    # distance between the new weights and the kept ones (half the sum of |w_new - w_kept| over both sets
    # of adapters) is at most `keep`. The cached history is then reused, exact under the kept mixture,
    # instead of prefilled again under slightly different weights. 0 re-routes every turn.
    keep: float = 0.25
    # Over a pool larger than `shortlist`, the norm signal is routed in two stages: the target block alone
    # (one float32 product over every adapter) ranks all, and the whole window is computed for the best
    # `shortlist` of them. 0 computes the window for every adapter. Exact whenever the pool is no larger.
    shortlist: int = 32
    # What a continuing turn's keep decision routes on. "mixture" (the default): the states the new tokens reach
    # under the mixture kept so far, captured while they are prefilled for the answer: a kept turn makes one
    # pass, not two (the rule: keep_score, keep_drop below). "base": the base-model probe, as every route (a
    # separate pass over the new tokens). The answer is exact under the mixture the record names either way.
    keep_probe: str = "mixture"
    # keep_probe="mixture" with calibrated routing: the mixture is kept when, on the new tokens' states under it,
    # its leading adapter is still ranked first, its calibrated score (a z-score) at most `keep_drop` below what
    # it scored on the states of the turn that chose the mixture (read, under the mixture, while that turn was
    # prefilled) and, with `keep_score`, at least keep_score. Under a mixture its own adapters' signals grow, so
    # the new turn is compared with the turn that chose it, like with like. Both None: the weights rule (within
    # `keep`) on those states. When this rule does not keep, the turn is routed from the base probe as
    # keep_probe="base" does (which may still keep, at the cost of both passes). Chosen on validation chats,
    # reported on test chats: logo-edge eval --keep-rules (models/eval/keep/).
    keep_score: float | None = 1.218
    keep_drop: float | None = 1.621
    # Knowing when not to route: with calibrated routing, a request whose best adapter's calibrated score is
    # below `min_score` (a cosine where every adapter has example prompts, see below) is answered by `fallback`:
    # "base", the base model (no adapter fits it well enough), or "uniform", every adapter the router ranked, with
    # equal weights (at most MAX_UNIFORM of them, the best-ranked). None: always route.
    min_score: float | None = None
    fallback: str = "base"
    # Adapters that ship example prompts (NAME.examples.jsonl beside NAME.gguf; logo_edge.examples) are ranked by
    # the cosine of the request's probe state with their examples' prototype, with calibrated routing. False:
    # LoGo's calibrated signal alone. A pool without example files routes the same either way.
    examples: bool = True

    def __post_init__(self) -> None:
        RouterConfig(self.signal, self.k, self.calibration)  # validates signal, k and calibration
        if not isinstance(self.shortlist, int) or isinstance(self.shortlist, bool) or self.shortlist < 0:
            raise RoutingError(f"shortlist must be an integer >= 0 (0 = off), got {self.shortlist!r}")
        if 0 < self.shortlist < self.k:
            raise RoutingError(f"shortlist ({self.shortlist}) must be 0 or at least k ({self.k})")
        if self.probe_input not in PROBE_INPUTS:
            raise RoutingError(f"probe_input must be one of {PROBE_INPUTS}, got {self.probe_input!r}")
        if self.merge not in MERGES:
            raise RoutingError(f"merge must be one of {MERGES}, got {self.merge!r}")
        if self.prefill not in PREFILLS:
            raise RoutingError(f"prefill must be one of {PREFILLS}, got {self.prefill!r}")
        if self.fallback not in FALLBACKS:
            raise RoutingError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.keep_probe not in KEEP_PROBES:
            raise RoutingError(f"keep_probe must be one of {KEEP_PROBES}, got {self.keep_probe!r}")
        if not (isinstance(self.keep, (int, float)) and 0 <= self.keep <= 1):
            raise RoutingError(f"keep must be a weight tolerance in [0, 1], got {self.keep!r}")
        for name in ("keep_score", "keep_drop", "min_score"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise RoutingError(f"{name} must be a finite number or None, got {v!r}")


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # end-of-generation tokens are masked out: exactly max_tokens (benchmarks)

    def __post_init__(self) -> None:
        for name, kinds in (("max_tokens", int), ("temperature", (int, float)), ("top_p", (int, float)),
                            ("top_k", int), ("seed", (int, type(None)))):
            v = getattr(self, name)
            if not isinstance(v, kinds) or isinstance(v, bool):
                raise RequestError(f"{name} must be a number, got {type(v).__name__} {v!r}")
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0) or not 0 < self.top_p <= 1:
            raise RequestError(f"temperature must be >= 0 and top_p in (0, 1] (got {self.temperature}, "
                               f"{self.top_p})")
        if self.top_k < 0:  # (larger than the vocabulary: off; llama-server clamps it to 32 bits, so do we)
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        # seed: any integer, taken modulo 2**32 as llama-server reads it; 2**32 - 1 (and -1) is a random seed
        if not all(isinstance(x, str) for x in self.stop):
            raise RequestError(f"stop must be a string or a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(x for x in self.stop if x))  # empty ones dropped, as llama-server
        if len(self.stop) > MAX_STOPS or any(len(x) > MAX_STOP_CHARS for x in self.stop):
            raise RequestError(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters each, got "
                               f"{len(self.stop)} of up to {max(map(len, self.stop))}")


Step = tuple[str, str | None, RoutingRecord]  # (text piece, finish reason or None, record)

# Which adapters to use for a request: "auto" routes; "base" uses none; a mapping name -> weight
# or a list of names (equal weights) fixes them by hand.
AdapterChoice = str | Mapping[str, float] | Sequence[str] | None


class Engine:
    """A base model, an adapter pool and a context; routes and generates one request at a time.

    `Engine()` is the default model with the shipped pool; with a `model` given, the pool holds what
    `adapters` names (a directory of GGUF adapters, a file, or a list of either; none when omitted)."""

    def __init__(self, model: str | Path | None = None, adapters=None, *, n_ctx: int = 2048,
                 n_batch: int = 512, n_threads: int | None = None, n_gpu_layers: int = 0, kv_type: str = "f16",
                 flash_attn: bool | None = None,
                 target_block: int = -1, target_module: str = "attn_q", probe_blocks: int = defaults.PROBE_BLOCKS,
                 routing: RouteConfig | None = None, max_loaded_mb: float = 1024, verbose: bool = False,
                 extra_bufts: bool | None = None, pool_index: bool = True, rpc: list[str] | None = None,
                 probe_modules: str = defaults.PROBE_MODULES, sv_power: float = defaults.SV_POWER,
                 kv_keep_mb: float = KV_KEEP_BYTES / 2**20):
        # extra_bufts: llama.cpp's fast CPU weight layouts (AMX, repacking); None = on where the
        # self-check found them safe on this CPU (logo_edge.selfcheck), off where they crash or disagree.
        # pool_index: keep the pool's probe bank and calibration in a persisted index (logo_edge.pool_index),
        # mapped at the next start instead of re-reading every adapter file
        # rpc: llama.cpp rpc-servers ("host:port") the model's layers are placed across (every layer unless
        # n_gpu_layers says otherwise); needs the GGML_RPC=ON libllama, loaded with LOGO_EDGE_RPC=1
        # probe_modules: how adapters are scored (pool.PROBE_MODULES): by default over the target module, and an
        # adapter without it over the modules it adapts that read the same input (k, v); "target": the paper's
        # probe; "input": every module reading the target's input. sv_power: the norm signal's power of each
        # update's singular values (router.reweigh; 1 = LoGo's output norm, 0 = SpectR's projection norm)
        if rpc:
            from ._lib import add_rpc_servers

            add_rpc_servers(list(rpc))
            n_gpu_layers = n_gpu_layers or 999
        self.model = Model(model or defaults.default_model_path(), n_gpu_layers=n_gpu_layers, verbose=verbose,
                           extra_bufts=extra_bufts)
        self.routing = routing or RouteConfig()
        self._cfg = ContextConfig(n_ctx, n_batch, n_threads, kv_type, flash_attn)
        self._probe_ctx: Context | None = None
        self._probe_cache: tuple[list[int], int] = ([], 0)  # tokens in the probe context, blocks complete
        self._probe_memo: dict[tuple, np.ndarray] = {}  # recent probes' h by (tokens, block, module, input)
        self._probe_reused = 0  # prompt tokens the last probe found in its cache
        self._protos: tuple[tuple, Prototypes | None] | None = None  # (pool key, its example prototypes)
        self.pool = AdapterPool(self.model, target_block, target_module, max_loaded_mb, probe_blocks,
                                use_index=pool_index, probe_modules=probe_modules, sv_power=sv_power)
        self.pool.other_states = lambda probe_input: self._calibration_states(self.pool, probe_input, other=True)
        if self.routing.calibration != "raw":  # calibrate adapters as they enter the pool
            self.calibrate(self.routing.probe_input)
        if adapters is None and model is None:  # Engine(): the default model with the shipped pool
            adapters = defaults.shipped_pool()
        if adapters is not None:
            self.pool.add_many(adapters)
        self.ctx = Context(self.model, self._cfg)
        self._cache: list[int] = []  # tokens whose K/V sit in self.ctx under its current mixture
        self._cache_approx = False  # True when those K/V came from the base model (probe-cache mode)
        # keep_probe="mixture": (mixture, its leading adapter's calibrated score on the states of the turn that
        # chose it, read under it); None when no routed turn set the mixture now in the context
        self._keep_ref: tuple[dict, float] | None = None
        self._logits_for: int | None = None  # the context's logits are those of the last of this many cached tokens
        self._active: set[int] = set()  # pool indices set in self.ctx
        self._mixture: tuple[str, dict[int, float]] = ("mixture", {})  # merge and {pool index: weight} set now
        self._merged: dict[tuple, LoraHandle] = {}  # packed / fused adapters built for recent mixtures
        self._merged_bytes: dict[tuple, int] = {}  # their sizes, counted in the loaded-adapter budget
        # the adapters' tensors as read for packing (file identity -> LoraFile), most recent last, at most
        # LORA_CACHE_BYTES: a chat that returns to its tasks packs a new mixture without reading the files again
        self._lora_files: dict[tuple, LoraFile] = {}
        # K/V saved per mixture (see KV_KEEP_BYTES): mixture key -> (tokens, sequence state, keep reference, length of
        # the prompt answered under it)
        self._kv_saved: OrderedDict[tuple, tuple[list[int], bytes, tuple | None, int]] = OrderedDict()
        self._kv_keep_bytes = int(kv_keep_mb * 2**20)
        self._kv_restored: tuple | None = None  # (keep reference, tokens) when this request's mixture came back
        self._prompt_len = 0  # the prompt of the last request answered in self.ctx
        self._tmp = tempfile.TemporaryDirectory(prefix="logo-edge-")
        self._busy = threading.Lock()  # held by the one generation running (stream)

    def close(self) -> None:
        for h in self._merged.values():
            h.free()
        self.pool.close()
        if self._probe_ctx is not None:
            self._probe_ctx.close()
        self.ctx.close()
        self.model.close()
        self._tmp.cleanup()

    def forget_prompts(self) -> None:
        """Drop every cached prompt (generation K/V, the probe's K/V and its recent results), so the next
        request is computed from scratch (benchmarks; bit-exact reruns: reusing a cached prefix can
        change the logits' low-order bits, as in llama.cpp)."""
        self.ctx.cache_truncate(0)
        self._cache, self._cache_approx = [], False
        self._probe_cache = ([], 0)
        self._probe_memo.clear()
        self._keep_ref, self._logits_for = None, None
        self._kv_saved.clear()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the live pool

    def add_adapter(self, path: str | Path, name: str | None = None):
        """Add one GGUF adapter to the pool, validated, folded into the probe bank and calibrated; the next
        request may route to it. AdapterError leaves the pool as it was."""
        with self._exclusive("add an adapter"):
            adapter = self.pool.add(path, name)
            if self.routing.calibration != "raw":
                self.calibrate(self.routing.probe_input)
            return adapter

    def remove_adapter(self, name: str):
        """Take an adapter out of the pool and free it. Refused (EngineBusyError) while a generation runs."""
        with self._exclusive("remove an adapter"):
            self.pool.index(name)  # AdapterError naming an unknown adapter, before anything changes
            self.ctx.set_adapters([], [])  # nothing of the old mixture stays set, nor its K/V
            self._active, self._mixture = set(), ("mixture", {})
            self.ctx.cache_truncate(0)
            self._cache, self._cache_approx = [], False
            self._kv_saved.clear()  # pool indices move
            for h in self._merged.values():
                h.free()
            self._merged.clear()
            self._merged_bytes.clear()
            self.pool.extra_bytes = 0
            return self.pool.remove(name)

    @contextlib.contextmanager
    def _exclusive(self, what: str):
        if not self._busy.acquire(blocking=False):
            raise EngineBusyError(f"cannot {what} while this Engine is generating; finish or close the stream first")
        try:
            yield
        finally:
            self._busy.release()

    # ---- prompts

    def format_chat(self, messages: list[dict]) -> str:
        """The chat prompt as the model's own template (from the GGUF) renders it."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.model.info.chat_template
        if not template:
            raise RoutingError(f"{self.model.path.name} has no chat template; pass a plain prompt instead")
        _check_messages(messages)
        fmt = Jinja2ChatFormatter(template, eos_token=self.model.token_text(self.model.eos),
                                  bos_token=self.model.token_text(self.model.bos))
        try:
            return fmt(messages=messages).prompt
        except Exception as e:  # the template's raise_exception (roles it refuses) or its own errors
            raise RequestError(f"{self.model.path.name}'s chat template refused these messages: {e}") from None

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            if not isinstance(prompt, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.model.n_vocab for t in prompt):
                raise RequestError(f"prompt must be text or a list of token ids in [0, {self.model.n_vocab}), "
                                   f"got {type(prompt).__name__} {str(prompt)[:60]}")
            return list(prompt)
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(f"prompt is not valid Unicode ({e.reason} at character {e.start})") from None
        toks = self.model.tokenize(prompt)
        if len(toks) >= 2 and toks[0] == toks[1] == self.model.bos:  # template already had a BOS
            toks = toks[1:]
        return toks

    def _check_fits(self, tokens: list[int]) -> None:
        if not tokens:
            raise RequestError("the prompt is empty")
        if len(tokens) >= self.ctx.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(tokens)} tokens but the context holds {self.ctx.n_ctx}; "
                "shorten the prompt or create the Engine with a larger n_ctx")

    # ---- routing

    def probe(self, tokens: list[int], probe_input: str | None = None, blocks: list[int] | None = None,
              module: str | tuple[str, ...] | None = None) -> np.ndarray:
        """h for the last prompt token from the base model alone at each block of the pool's probe window
        (or the given blocks): (n_blocks, d_in), in one prefill that stops at the last of them. probe_input:
        the engine's routing's by default."""
        probe_input = probe_input or self.routing.probe_input
        if self._probe_ctx is None:
            self._probe_ctx = Context(self.model, self._cfg)
        blocks = list(self.pool.blocks if blocks is None else blocks)
        module = module or self.pool.probe_reads
        key = (tuple(tokens), tuple(blocks), module, probe_input)
        if key in self._probe_memo:  # the same request routes the same way, bit for bit
            self._probe_reused = len(tokens)
            return self._probe_memo[key]
        cap = ProbeCapture(self._probe_ctx, blocks, module, probe_input)
        # the probe context keeps its cache: complete below the last block read, so a later probe that
        # stops at the same or a lower block reuses the common prefix (a chat's earlier turns, the system prompt)
        cached, depth = self._probe_cache
        reach = cap.complete_below
        n_keep = _common_prefix(cached, tokens) if reach <= depth else 0
        self._probe_cache = ([], 0)
        h = cap.run(tokens, keep_cache=True, n_keep=n_keep)
        self._probe_reused = cap.n_reused  # (0 where the model's memory could not drop a suffix)
        self._probe_cache = (list(tokens), min(reach, depth) if cap.n_reused else reach)
        if len(self._probe_memo) >= 16:
            self._probe_memo.pop(next(iter(self._probe_memo)))
        self._probe_memo[key] = h
        return h

    def probe_tokens(self, tokens: list[int], probe_input: str | None = None) -> np.ndarray:
        """h at every prompt token and window block, (n_blocks, n_tokens, d_in), from the base model alone (the
        prompt-mean routers; evaluation only: no cache is reused or kept)."""
        probe_input = probe_input or self.routing.probe_input
        if self._probe_ctx is None:
            self._probe_ctx = Context(self.model, self._cfg)
        self._probe_cache = ([], 0)
        cap = ProbeCapture(self._probe_ctx, self.pool.blocks, self.pool.target_module, probe_input, every_token=True)
        return cap.run(tokens)

    def _probe_in_place(self, tokens: list[int], probe_input: str) -> np.ndarray:
        """probe-cache mode: probe in the generation context and keep the base K/V of tokens[:-1].

        A continuing conversation reuses what the context holds from the previous turn in this mode (its
        prompt's base K/V and its answer's, computed under that turn's mixture: the approximation this
        mode makes), so a turn prefills only its new tokens."""
        n_keep = min(_common_prefix(self._cache, tokens), len(tokens) - 1) if self._cache_approx else 0
        self.ctx.set_adapters([], [])
        self._active, self._mixture = set(), ("mixture", {})
        cap = ProbeCapture(self.ctx, self.pool.blocks, self.pool.probe_reads, probe_input, stop_early=False)
        self._cache = []
        h = cap.run(tokens, keep_cache=True, n_keep=n_keep)
        self._probe_reused = cap.n_reused
        kept = self.ctx.cache_truncate(len(tokens) - 1, reset_ok=True)  # the last token is decoded again, mixed
        self._cache, self._cache_approx = list(tokens[:kept]), True
        return h

    def calibrate(self, probe_input: str | None = None, pool: AdapterPool | None = None) -> None:
        """Give the pool (the engine's, or another over the same model) the calibration prompts' states for
        `probe_input` (the routing's by default) at its probe window (cached on disk per model and window)."""
        probe_input = probe_input or self.routing.probe_input
        pool = pool or self.pool
        if probe_input in pool.calibrated_inputs:
            return
        pool.set_calibration_states(probe_input, self._calibration_states(pool, probe_input))

    def _calibration_states(self, pool: AdapterPool, probe_input: str, other: bool = False) -> np.ndarray:
        """The calibration prompts' states at the pool's window: of the target's input, or the other one's."""
        from .calibration import calibration_states

        module = pool.other_modules[0] if other else pool.target_module
        return calibration_states(self.model.path, pool.blocks, module, probe_input,
                                  lambda text: self._probe_message(text, probe_input, pool.blocks, module))

    def _probe_message(self, text: str, probe_input: str, blocks=None, module=None) -> np.ndarray:
        """`probe` of one user message, in the chat template where the model has one (calibration and example
        prompts are probed as a request is)."""
        prompt = self.format_chat([{"role": "user", "content": text}]) if self.model.info.chat_template else text
        return self.probe(self.tokenize(prompt), probe_input, blocks, module)

    def route(self, prompt: str | list[int] | list[dict], **overrides) -> RoutingRecord:
        """Route a prompt (text, tokens, or chat messages) without generating."""
        cfg = replace(replace(self.routing, **overrides), prefill="exact")  # routing alone never prefills
        tokens = self.tokenize(self.format_chat(prompt) if _is_messages(prompt) else prompt)
        self._check_fits(tokens)
        return self._route(tokens, cfg)[1]

    def _route(self, tokens: list[int], cfg: RouteConfig) -> tuple[Routing, RoutingRecord]:
        if len(self.pool) == 0:
            raise RoutingError("the adapter pool is empty: load adapters to route among, or use adapters='base'")
        t0 = time.perf_counter()
        if cfg.prefill == "probe-cache":
            h = self._probe_in_place(tokens, cfg.probe_input)
        else:
            h = self.probe(tokens, cfg.probe_input)
        t1 = time.perf_counter()
        if cfg.calibration != "raw":
            self.calibrate(cfg.probe_input)
        routing, considered = self.route_state(h, cfg)
        t2 = time.perf_counter()
        rec = self._record(routing, considered, cfg, tokens)
        rec.timings.probe_s, rec.timings.route_s = t1 - t0, t2 - t1
        rec.timings.probe_cached_tokens = self._probe_reused
        return routing, rec

    def _record(self, routing: Routing, considered, cfg: RouteConfig, tokens: list[int]) -> RoutingRecord:
        rank = {i: r + 1 for r, i in enumerate(routing.selected)}
        signals, calibrated = _finite_list(routing.signals), _finite_list(routing.scores)
        probed = [a.probed for a in self.pool.adapters]
        notes = [routing.excluded.get(n) or (f"scored over {', '.join(p)}" if p and p != [self.pool.target_module]
                                             else None) for n, p in zip(routing.names, probed)]
        scores = [AdapterScore(n, signals[i], w, rank.get(i), notes[i], calibrated[i])
                  for i, (n, w) in enumerate(zip(routing.names, routing.weights.tolist()))]
        settings = dict(signal=cfg.signal, k=cfg.k, k_used=len(routing.selected), calibration=cfg.calibration,
                        shortlist=None if considered is None else int(considered.sum()),
                        target_block=self.pool.target_block, probe_blocks=len(self.pool.blocks),
                        target_module=self.pool.target_module, probe_modules=self.pool.probe_modules,
                        sv_power=self.pool.sv_power, probe_input=cfg.probe_input, merge=cfg.merge,
                        prefill=cfg.prefill)
        protos = self._examples_for(cfg)
        if protos is not None:  # ranked by example prompts: how many adapters have them
            settings["examples"] = len(protos.index)
        return RoutingRecord("routed", settings, scores, Timings(prompt_tokens=len(tokens)))

    def route_state(self, h: np.ndarray, cfg: RouteConfig | None = None) -> tuple[Routing, np.ndarray | None]:
        """Route from probe states h (n_blocks, d_in; twice the rows while adapters are scored over the other
        input, pool.probe_reads) as a request would: (routing, the shortlist's mask or None when every adapter's
        window was read)."""
        cfg = cfg or self.routing
        pool = self.pool
        h_all = np.asarray(h)
        h, h_other = pool.split_states(h_all)
        calibrated = cfg.calibration != "raw"
        stats = pool.stats(cfg.probe_input, cfg.signal) if calibrated else None
        considered = None
        with one_blas_thread():
            bank = pool._bank
            if len(bank) == 0:
                raw = np.zeros(0)
            elif cfg.signal == "norm" and 0 < cfg.shortlist < len(bank) and bank.n_blocks > 1:
                stats1 = pool.stats(cfg.probe_input, TARGET_NORM, bank_only=True) if calibrated else None
                raw, considered = shortlist_norms(bank, h, cfg.shortlist, cfg.calibration, stats1)
                stats = pool.stats(cfg.probe_input, LEAD_NORM) if calibrated else None  # leading rows read
            else:
                raw = bank.signals(h, cfg.signal)
            if len(pool.other_bank):  # MLP-only adapters: the norm over the other input (others: norm_only)
                other = pool.other_bank.norms(h_other, lead=considered is not None) if h_other is not None \
                    else np.full(len(pool.other_bank), np.nan)
                raw = pool.merge(raw, other)
                considered = None if considered is None else pool.merge(considered, np.ones(len(other), bool))
        unprobeable = pool.unprobeable
        if cfg.signal != "norm" and pool.norm_only:  # no target outputs in the bank for these
            keep = np.array([a.name not in pool.norm_only for a in pool.adapters if a.probeable])
            raw, stats = raw[keep], None if stats is None else (stats[0][keep], stats[1][keep])
            unprobeable = {**unprobeable, **pool.norm_only}
        rcfg = RouterConfig(cfg.signal, cfg.k, cfg.calibration)
        routing = route_signals(raw, pool.names, rcfg, unprobeable, stats, considered)
        protos = self._examples_for(cfg)
        if protos is not None:
            with one_blas_thread():
                routing = protos.route(routing, h_all, cfg.k)
        return routing, considered

    def _examples_for(self, cfg: RouteConfig) -> Prototypes | None:
        """The prototypes `cfg` routes with: the pool's, where it has example prompts and routing is calibrated."""
        return self.prototypes(cfg.probe_input) if cfg.examples and cfg.calibration != "raw" else None

    def prototypes(self, probe_input: str | None = None) -> Prototypes | None:
        """The prototypes of the pool's adapters that ship example prompts (logo_edge.examples) at the probe
        window for `probe_input`; None when none does. Built again when the pool changes (an examples file edited
        meanwhile counts from the next pool change); each adapter's example states are cached on disk."""
        from .calibration import model_key

        probe_input = probe_input or self.routing.probe_input
        pool = self.pool
        key = (id(pool), probe_input, pool.probe_reads, pool.changes)
        if self._protos is not None and self._protos[0] == key:
            return self._protos[1]
        self.calibrate(probe_input)
        generic = pool.calibration_states(probe_input)
        if len(pool.other_bank):
            generic = np.concatenate([generic, pool._other_states_for(probe_input)], axis=1)
        reads = pool.probe_reads if isinstance(pool.probe_reads, str) else "+".join(pool.probe_reads)
        cache_name = (f"{self.model.path.stem}-{model_key(self.model.path)}-b{pool.blocks[0]}-{pool.blocks[-1]}-"
                      f"{reads}-{probe_input}")
        protos = pool_prototypes([(i, a.path) for i, a in enumerate(pool.adapters)], cache_name, generic,
                                 lambda text: self._probe_message(text, probe_input))
        self._protos = (key, protos)
        return protos

    def _plan(self, tokens: list[int], adapters: AdapterChoice, cfg: RouteConfig):
        """Decide the mixture: (pool indices, weights, record)."""
        if adapters is None or adapters == "auto":
            fast = self._keep_on_mixture_states(tokens, cfg) if cfg.keep_probe == "mixture" else None
            if fast is not None:
                return fast
            routing, rec = self._route(tokens, cfg)
            idx, weights = [i for i, _ in routing.mixture()], [w for _, w in routing.mixture()]
            kept = self._keepable(tokens, idx, weights, cfg)
            rec.settings["mixture"] = "kept" if kept else "new"
            rec.settings["keep_rule"] = "base probe"
            best = max((float(routing.scores[i]) for i in idx), default=float("-inf"))
            unsure = cfg.min_score is not None and cfg.calibration != "raw" and best < cfg.min_score
            if not kept and not unsure:  # (a request the confidence rule sends to the base model stays there)
                kept = self._returning(tokens, idx, weights, cfg)
                if kept:
                    rec.settings.update(mixture="returned", keep_rule="base probe, saved K/V")
            if not kept and unsure:
                why = f"best calibrated score {best:.3g} < min_score {cfg.min_score}"
                idx = select(routing.scores, MAX_UNIFORM, np.isfinite(routing.scores)) if cfg.fallback == "uniform" \
                    else []
                weights = [1.0 / len(idx)] * len(idx) if idx else []
                rec.settings["fallback"] = (f"uniform over {len(idx)} adapters: " if idx else "base model: ") + why
                rank = {i: r + 1 for r, i in enumerate(idx)}
                for j, a in enumerate(rec.adapters):
                    a.weight, a.rank = (weights[0], rank[j]) if j in rank else (0.0, None)
            if kept:  # the record shows the mixture that answered; signals and scores are this turn's
                idx, weights = list(kept), list(kept.values())
                order = {i: r + 1 for r, i in enumerate(sorted(kept, key=lambda i: -kept[i]))}
                for j, a in enumerate(rec.adapters):  # the record lists the pool in order
                    a.weight, a.rank = kept.get(j, 0.0), order.get(j)
            return idx, weights, rec
        if adapters == "base" or (not isinstance(adapters, str) and len(adapters) == 0):
            chosen: dict[str, float] = {}
            mode = "base"
        else:
            if isinstance(adapters, str):
                adapters = [adapters]
            chosen = dict(adapters) if isinstance(adapters, Mapping) else {n: 1.0 / len(adapters) for n in adapters}
            mode = "manual"
        idx = [self.pool.index(n) for n in chosen]  # raises naming an unknown adapter
        weights = [float(w) for w in chosen.values()]
        if not all(np.isfinite(weights)):
            raise RoutingError(f"adapter weights must be finite, got {chosen}")
        order = {i: r + 1 for r, i in enumerate(idx)}
        scores = [AdapterScore(a.name, None, chosen.get(a.name, 0.0), order.get(j)) for j, a in
                  enumerate(self.pool.adapters)]
        settings = dict(merge=cfg.merge, target_block=self.pool.target_block,
                        target_module=self.pool.target_module)
        return idx, weights, RoutingRecord(mode, settings, scores, Timings(prompt_tokens=len(tokens)))

    def _keep_on_mixture_states(self, tokens: list[int], cfg: RouteConfig):
        """keep_probe="mixture": prefill a continuing turn's new tokens under the mixture set now, reading the
        probe window's states on the way, and route on them; (idx, weights, record) when `mixture_keeps` says
        the mixture holds (kept: the tokens stay in the cache for the answer), else None (routed afresh)."""
        current = self._mixture[1]
        ref = self._keep_ref[1] if self._keep_ref and self._keep_ref[0] == current else None
        if self._examples_for(cfg) is not None:
            return None  # the score rule was chosen for LoGo's z-scores: route afresh (the weights rule may keep)
        if _uses_score_rule(cfg) and ref is None:
            return None  # no turn of this conversation chose the mixture on its states: route afresh
        got = self._mixture_states(tokens, cfg)
        if got is None:
            return None
        routing, considered, reused, t_prefill, t_route = got
        if not mixture_keeps(routing, current, cfg, ref):
            return None
        rec = self._record(routing, considered, cfg, tokens)
        rec.settings.update(mixture="kept", keep_rule="mixture states")
        order = {i: r + 1 for r, i in enumerate(sorted(current, key=lambda i: -current[i]))}
        for j, a in enumerate(rec.adapters):  # the record shows the mixture that answered
            a.weight, a.rank = current.get(j, 0.0), order.get(j)
        tm = rec.timings
        tm.route_s, tm.prefill_s, tm.cached_tokens = t_route, t_prefill, reused
        return list(current), list(current.values()), rec

    def _mixture_states(self, tokens: list[int], cfg: RouteConfig):
        """A continuing turn's new tokens prefilled under the mixture set now, routed on the probe window's states
        they reach: (routing, shortlist mask, cached tokens reused, prefill s, route s), the tokens left in the
        cache; None when the request does not continue the conversation under this merge (nothing is run)."""
        reused = self._continuing(tokens, cfg)
        if reused is None or len(self.pool) == 0:
            return None
        n_keep = self.ctx.cache_truncate(min(reused, len(tokens) - 1), reset_ok=True)
        self._cache = self._cache[:n_keep]
        if n_keep == 0:  # the model's memory could not keep the history: route afresh
            return None
        if cfg.calibration != "raw":
            self.calibrate(cfg.probe_input)
        t0 = time.perf_counter()
        cap = ProbeCapture(self.ctx, self.pool.blocks, self.pool.probe_reads, cfg.probe_input, stop_early=False)
        try:
            h = cap.run(tokens, keep_cache=True, n_keep=n_keep)  # under the mixture: the answer's own K/V
        except Exception:
            self.ctx.cache_truncate(0)  # leave the engine usable
            self._cache = []
            raise
        self._cache = list(tokens)
        self._logits_for = len(tokens)  # the context holds the last token's logits: the answer starts from them
        t1 = time.perf_counter()
        routing, considered = self.route_state(h, cfg)
        return routing, considered, reused, t1 - t0, time.perf_counter() - t1

    def _keepable(self, tokens: list[int], idx: list[int], weights: list[float], cfg: RouteConfig) -> dict | None:
        """The mixture set now, if this request continues its conversation and routes close to it again (total
        variation distance of the weights <= cfg.keep); else None. "Continues" means at least half of the prompt (and
        more than the chat template's header) is the cached history."""
        current = self._mixture[1]
        if self._continuing(tokens, cfg) is None:
            return None
        return dict(current) if weight_distance(dict(zip(idx, weights)), current) <= cfg.keep else None

    def _returning(self, tokens: list[int], idx: list[int], weights: list[float], cfg: RouteConfig) -> dict | None:
        """A saved mixture (K/V kept per mixture) this request returns to: one whose conversation it continues (the
        prompt answered under it is this prompt's prefix), routed within `keep` of it again; the closest, else None."""
        if cfg.keep <= 0 or cfg.prefill != "exact":
            return None
        new, best, now = dict(zip(idx, weights)), None, self._mixture_key(*self._mixture)
        for (merge, named), (saved, _, _, n_prompt) in self._kv_saved.items():
            if (merge, named) == now:  # set already (by a request that kept its cache): nothing to bring back
                continue
            # it continues that conversation: the whole prompt answered under the mixture is this one's prefix
            if not named or merge != cfg.merge or _common_prefix(saved, tokens) < max(n_prompt, KEEP_MIN_PREFIX):
                continue
            mixture = {self.pool.index(n): w for n, w in named}
            d = weight_distance(new, mixture)
            if d <= cfg.keep and (best is None or d < best[0]):
                best = (d, mixture)
        return best[1] if best else None

    def _mixture_key(self, merge: str, mixture: Mapping[int, float]) -> tuple:
        return merge, tuple(sorted((self.pool.adapters[i].name, float(w)) for i, w in mixture.items()))

    def _swap_kv(self, old: tuple, new: tuple, tokens: list[int] | None) -> None:
        """The mixture changed from `old` to `new` (keys): save the history cached under the old one, and bring
        back what was saved under the new one if the request continues it; else the cache is empty."""
        if self._kv_keep_bytes <= 0:
            self._cache, self._logits_for = [], None
            return
        if self._cache and not self._cache_approx and old != new:
            data = self.ctx.save_sequence()
            if data is not None and len(data) <= self._kv_keep_bytes:
                ref = self._keep_ref if self._keep_ref and self._keep_ref[0] == self._mixture[1] else None
                self._kv_saved.pop(old, None)
                self._kv_saved[old] = (list(self._cache), data, ref, min(self._prompt_len, len(self._cache)))
                while sum(len(x[1]) for x in self._kv_saved.values()) > self._kv_keep_bytes:
                    self._kv_saved.popitem(last=False)
        self._cache, self._logits_for = [], None
        saved = self._kv_saved.get(new)
        if tokens is not None and saved is not None and _common_prefix(saved[0], tokens) > 0 and old != new:
            del self._kv_saved[new]
            if self.ctx.load_sequence(saved[1]):
                self._cache = list(saved[0])
                self._kv_restored = (saved[2], len(saved[0]))
            else:
                self.ctx.cache_truncate(0)

    def _continuing(self, tokens: list[int], cfg: RouteConfig) -> int | None:
        """The cached tokens this request reuses if it continues the conversation under the mixture set now (keep
        on, exact prefill, the same merge; at least half of the prompt, and more than the chat template's header,
        cached); else None."""
        merge, current = self._mixture
        if cfg.keep <= 0 or cfg.prefill != "exact" or merge != cfg.merge or not current:
            return None
        reused = _common_prefix(self._cache, tokens)
        return reused if reused >= max(KEEP_MIN_PREFIX, len(tokens) // 2) else None

    def _apply(self, idx: list[int], weights: list[float], merge: str, keep_cache: bool = False,
               tokens: list[int] | None = None) -> str:
        """Set the mixture in the context; returns how it was applied (merge="auto" resolved). When it changes,
        the old mixture's K/V are saved and the new one's brought back for `tokens` (K/V kept per mixture)."""
        how = self._merge_for(idx) if merge == "auto" else merge
        if how in ("packed", "fusion") and len(idx) > 1:
            handles, scales = [self._merged_handle(idx, weights, how)], [1.0]
            active: set[int] = set()
        else:
            pinned = self._active | set(idx)  # adapters set in the context are never freed under it
            handles, scales = [self.pool.handle(i, pinned) for i in idx], list(weights)
            active = set(idx)
        old = self._mixture_key(*self._mixture)
        if self.ctx.set_adapters(handles, scales) and not keep_cache:
            # never reuse K/V computed under another mixture; keep them for a request that returns to it
            self._swap_kv(old, self._mixture_key(merge, dict(zip(idx, weights))), tokens)
        self._active = active
        self._mixture = (merge, dict(zip(idx, weights)))
        self.pool.trim(active)  # the pool's own adapters first (what the last mixture set), then packed ones
        self._trim_merged()
        return how

    def _merge_for(self, idx: list[int]) -> str:
        """merge="auto": packed for two or more adapters whose tensors total at most PACK_MAX_BYTES."""
        if len(idx) < 2:
            return "mixture"
        return "packed" if sum(self.pool.adapters[i].nbytes for i in idx) <= PACK_MAX_BYTES else "mixture"

    def _lora_file(self, path: Path) -> LoraFile:
        """An adapter file's tensors (float32), read once while it is unchanged and recently used."""
        st = Path(path).stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        lora = self._lora_files.pop(key, None) or read_lora(path, self.model.info)
        self._lora_files[key] = lora
        while sum(x.nbytes for x in self._lora_files.values()) > LORA_CACHE_BYTES and len(self._lora_files) > 1:
            self._lora_files.pop(next(iter(self._lora_files)))
        return lora

    def _merged_handle(self, idx: list[int], weights: list[float], merge: str) -> LoraHandle:
        """A packed or fused adapter for this mixture, built once and kept for a few mixtures."""
        key = (merge, *zip(idx, (float(w) for w in weights)))  # exact: a mixture is never answered by a neighbour
        if key in self._merged:
            self._merged[key] = self._merged.pop(key)  # most recently used last
            self._merged_bytes[key] = self._merged_bytes.pop(key)
            return self._merged[key]
        for i in idx:
            self.pool.check_file(i)
        loras = [self._lora_file(self.pool.adapters[i].path) for i in idx]
        alpha, pairs = (_pack if merge == "packed" else _fuse)(loras, weights)
        path = Path(self._tmp.name) / f"{merge}-{uuid.uuid4().hex[:8]}.gguf"
        # "exact": a tensor whose values are all f16 values is written in f16, else in f32 (nothing rounded):
        # the stacked A of f16 adapters stays f16 (half the bytes a decoded token reads; llama.cpp rounds x to
        # f16 for the adapters themselves too); B scaled by w_i c_i is f32 unless that scaling was exact
        write_lora(path, self.model.info.arch, alpha, pairs, "exact", durable=False)  # read back and deleted
        handle = self.model.load_lora(path)
        self._merged_bytes[key] = path.stat().st_size  # what llama.cpp holds of it (its tensors as written)
        path.unlink()
        self._merged[key] = handle
        self._trim_merged(keep=key)
        return handle

    def _trim_merged(self, keep: tuple | None = None) -> None:
        """Keep a few packed / fused adapters (at most 8), within the loaded-adapter budget with the pool's,
        oldest freed first; never `keep` or one set in the context (trimmed again once the context moves on)."""
        in_use = self.ctx.adapter_keys
        for old in [k for k in self._merged if k != keep]:
            over = self.pool.loaded_bytes - self.pool.extra_bytes + sum(self._merged_bytes.values()) \
                > self.pool.max_loaded_bytes
            if (len(self._merged) > 8 or over) and self._merged[old].key not in in_use:
                self._merged.pop(old).free()
                del self._merged_bytes[old]
        self.pool.extra_bytes = sum(self._merged_bytes.values())

    # ---- generation

    def _prefill(self, tokens: list[int], capture: ProbeCapture | None = None) -> int:
        """Bring the KV cache to `tokens` reusing the common prefix; returns how many were reused. With a
        capture, its window's states at the last token are read on the way (capture.states)."""
        fresh, self._logits_for = self._logits_for, None
        if capture is None and fresh == len(tokens) and self._cache == tokens:
            return len(tokens)  # prefilled while routed (a kept turn on its mixture's states): logits are there
        n_keep = min(_common_prefix(self._cache, tokens), len(tokens) - 1)  # the last one gives the logits
        n_keep = self.ctx.cache_truncate(n_keep, reset_ok=True)  # 0 where the memory cannot drop a suffix
        self._cache = self._cache[:n_keep]
        if capture is not None:
            capture.run(tokens, keep_cache=True, n_keep=n_keep)  # its own decode leaves the last token's logits
        else:
            self.ctx.decode(tokens[n_keep:], n_keep)
        self._cache = list(tokens)
        return n_keep

    def _sampler(self, s: SamplingConfig):
        smp = _internals.LlamaSampler()
        if s.ignore_eos:  # first in the chain: no later step (greedy, top-k, dist) can pick an EOG token
            smp.add_logit_bias(self.model.n_vocab, {t: float("-inf") for t in self.model.eog_tokens})
        if s.temperature == 0:
            smp.add_greedy()
            return smp
        if s.top_k > 0:
            smp.add_top_k(min(s.top_k, 2**31 - 1))
        if s.top_p < 1:
            smp.add_top_p(s.top_p, 1)
        smp.add_temp(s.temperature)
        seed = None if s.seed is None else s.seed % 2**32
        smp.add_dist(random.getrandbits(32) if seed in (None, 2**32 - 1) else seed)
        return smp

    def stream(self, prompt: str | list[int], adapters: AdapterChoice = "auto",
               sampling: SamplingConfig = SamplingConfig(), **route_overrides) -> Iterator[Step]:
        """The step generator every API is built on: yields (text piece, finish reason or None, record).

        One generation at a time per engine: a second one started while a stream is unfinished (interleaved
        generators, or another thread) raises EngineBusyError instead of sharing the context's cache and
        mixture. Finishing, closing or dropping the first stream frees the engine."""
        if not self._busy.acquire(blocking=False):
            raise EngineBusyError("this Engine is already generating (an unfinished stream, or another thread): "
                                  "finish or close() that stream first, or give each thread its own Engine")
        try:
            yield from self._stream(prompt, adapters, sampling, route_overrides)
        finally:
            self._busy.release()

    def _stream(self, prompt, adapters: AdapterChoice, sampling: SamplingConfig, route_overrides: dict):
        cfg = replace(self.routing, **route_overrides)
        tokens = self.tokenize(prompt)
        self._check_fits(tokens)
        if self._cache_approx and cfg.prefill == "exact":  # never let base K/V into an exact answer
            self._cache, self._cache_approx = [], False
        idx, weights, rec = self._plan(tokens, adapters, cfg)
        tm = rec.timings
        try:
            self._kv_restored = None
            how = self._apply(idx, weights, cfg.merge, keep_cache=rec.settings.get("prefill") == "probe-cache",
                              tokens=tokens)
            if self._kv_restored is not None:  # a saved mixture's K/V came back: its keep reference with them
                self._keep_ref = self._kv_restored[0]
                rec.settings["kv_restored_tokens"] = self._kv_restored[1]
            if idx:
                rec.settings["merge_applied"] = how if len(idx) > 1 else "mixture"
            t0 = time.perf_counter()
            # a mixture routed afresh for a chat that may keep it: read the turn's states under it while prefilling
            chose = (rec.settings.get("mixture") == "new" and cfg.keep_probe == "mixture" and _uses_score_rule(cfg)
                     and bool(idx) and self._examples_for(cfg) is None)
            cap = ProbeCapture(self.ctx, self.pool.blocks, self.pool.probe_reads, cfg.probe_input,
                               stop_early=False) if chose else None
            reused = self._prefill(tokens, cap)
            self._prompt_len = len(tokens)
            if chose:
                current = self._mixture[1]
                routing = self.route_state(cap.states, cfg)[0]
                self._keep_ref = (dict(current), float(routing.scores[max(current, key=current.get)]))
            elif rec.settings.get("mixture") not in ("kept", "returned"):
                self._keep_ref = None
            # a turn kept on its mixture's states was prefilled while routed: the record has its figures already
            tm.cached_tokens = min(reused, tm.cached_tokens) if tm.cached_tokens else reused
            tm.prefill_s += time.perf_counter() - t0
            yield from self._decode(sampling, rec)
        except Exception:
            self.ctx.cache_truncate(0)  # leave the engine usable after any failure
            self._cache, self._cache_approx = [], False
            raise

    def _decode(self, s: SamplingConfig, rec: RoutingRecord) -> Iterator[tuple[str, str | None, RoutingRecord]]:
        tm = rec.timings
        smp = self._sampler(s)
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        pending, finish = "", "length"
        t0 = time.perf_counter()
        try:
            for _ in range(s.max_tokens):
                tok = llama_cpp.llama_sampler_sample(smp.sampler, self.ctx.ptr, -1)
                if self.model.is_eog(tok):
                    finish = "stop"
                    break
                tm.completion_tokens += 1
                pending += utf8.decode(self.model.token_bytes(tok))
                emit, pending, hit = _split_stop(pending, s.stop)
                if emit:
                    tm.decode_s = time.perf_counter() - t0
                    yield emit, None, rec
                if hit:
                    finish = "stop"
                    break
                if len(self._cache) >= self.ctx.n_ctx:
                    break  # context full: finish "length"
                if tm.completion_tokens == s.max_tokens:
                    break
                self.ctx.decode([tok], len(self._cache), what="decode")
                self._cache.append(tok)
        finally:
            smp.close()
        if pending:  # held back for a stop string that did not come (a hit leaves none; a cut character stays out)
            yield pending, None, rec
        tm.decode_s = time.perf_counter() - t0
        yield "", finish, rec

    # ---- llama-cpp-python style API

    def create_completion(self, prompt: str | list[int], *, adapters: AdapterChoice = "auto", max_tokens: int = 128,
                          temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                          stop: str | Sequence[str] = (), stream: bool = False, ignore_eos: bool = False,
                          **route_overrides):
        """Like llama_cpp.Llama.create_completion; the response (or last chunk) carries `routing`.
        ignore_eos: never stop at end-of-generation, so exactly max_tokens are generated (benchmarks)."""
        s = _sampling(max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        steps = self.stream(prompt, adapters, s, **route_overrides)
        chunks = _completion_chunks(steps, "text_completion", self.model.path.name)
        return chunks if stream else _collect(chunks, "text_completion")

    def create_chat_completion(self, messages: list[dict], *, adapters: AdapterChoice = "auto",
                               max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                               top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] = (),
                               stream: bool = False, ignore_eos: bool = False, **route_overrides):
        """Like llama_cpp.Llama.create_chat_completion; the response (or last chunk) carries `routing`."""
        s = _sampling(max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        steps = self.stream(self.format_chat(messages), adapters, s, **route_overrides)
        chunks = _completion_chunks(steps, "chat.completion", self.model.path.name)
        return chunks if stream else _collect(chunks, "chat.completion")


# ---- helpers


def weight_distance(a: Mapping[int, float], b: Mapping[int, float]) -> float:
    """Total variation distance between two mixtures (adapter index -> weight): half the sum of |a_i - b_i|."""
    return 0.5 * sum(abs(a.get(i, 0.0) - b.get(i, 0.0)) for i in set(a) | set(b))


def _uses_score_rule(cfg: RouteConfig) -> bool:
    return (cfg.keep_score is not None or cfg.keep_drop is not None) and cfg.calibration != "raw"


def mixture_keeps(routing: Routing, current: Mapping[int, float], cfg: RouteConfig, ref: float | None) -> bool:
    """The keep rule on the mixture's own states (keep_probe="mixture"; RouteConfig.keep_score, keep_drop).
    `routing` is the new turn's route on the states its tokens reach under `current`; `ref` the calibrated score
    current's leading adapter had on the states of the turn that chose it (also under it)."""
    if not _uses_score_rule(cfg):
        return weight_distance(dict(routing.mixture()), current) <= cfg.keep
    lead = max(current, key=current.get)
    score = float(routing.scores[lead])
    return (routing.selected[:1] == [lead] and (cfg.keep_score is None or score >= cfg.keep_score)
            and (cfg.keep_drop is None or (ref is not None and ref - score <= cfg.keep_drop)))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _finite(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _finite_list(x: np.ndarray) -> list[float | None]:
    """x as Python floats, None where not finite (one pass in numpy: a record lists every adapter)."""
    x = np.asarray(x, np.float64)
    return [v if ok else None for ok, v in zip(np.isfinite(x).tolist(), x.tolist())]



def _pack(loras, weights) -> tuple[float, dict]:
    """One adapter computing sum_i w_i c_i B_i A_i x on every module: A stacked, B scaled and joined, the
    rank padded with zeros to a multiple of PACK_RANK_MULTIPLE.

    alpha 0 makes llama.cpp apply the tensors as they are (scale = the user scale, 1)."""
    pairs = {}
    for m in sorted({m for lo in loras for m in lo.pairs}):
        have = [(lo, w) for lo, w in zip(loras, weights) if m in lo.pairs]
        r = sum(lo.pairs[m][0].shape[0] for lo, _ in have)
        r_pad = r + -r % PACK_RANK_MULTIPLE
        # A stacked (in f16 where every file holds it in f16: the same values, written as they are), B scaled
        # and joined, into zeroed arrays of the padded rank
        f16 = all(m in lo.a_f16 for lo, _ in have)
        a = np.zeros((r_pad, have[0][0].pairs[m][0].shape[1]), np.float16 if f16 else np.float32)
        b = np.zeros((have[0][0].pairs[m][1].shape[0], r_pad), np.float32)
        at = 0
        for lo, w in have:
            la, lb = lo.pairs[m]
            a[at:at + len(la)] = la
            np.multiply(lb, np.float32(w * lo.scale(m)), out=b[:, at:at + len(la)])
            at += len(la)
        pairs[m] = (a, b)
    return 0.0, pairs


def _fuse(loras, weights) -> tuple[float, dict]:
    """Parameter averaging: A = sum w_i A_i, B = sum w_i B_i (same modules, ranks and alpha)."""
    first = loras[0]
    for lo in loras[1:]:
        if lo.modules != first.modules or lo.alpha != first.alpha or any(
                lo.pairs[m][0].shape != first.pairs[m][0].shape for m in first.modules):
            raise AdapterError(f"fusion needs the same modules, ranks and alpha: {first.name} and "
                               f"{lo.name} differ; use merge='mixture'")
    pairs = {m: (sum(w * lo.pairs[m][0] for w, lo in zip(weights, loras)),
                 sum(w * lo.pairs[m][1] for w, lo in zip(weights, loras))) for m in first.modules}
    return first.alpha or first.pairs[first.modules[0]][0].shape[0], pairs


def _check_messages(messages) -> None:
    """Chat messages as OpenAI shapes them: a non-empty list of {"role": str, "content": str}."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, "
                           f"got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}] must be a dict with string 'role' and 'content', got {str(m)[:80]}")


def _is_messages(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def _sampling(max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos=False) -> SamplingConfig:
    if stop is not None and not isinstance(stop, (str, list, tuple)):
        raise RequestError(f"stop must be a string or a list of strings, got {type(stop).__name__} {stop!r}")
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return SamplingConfig(max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)


def _split_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str, bool]:
    """(text safe to emit, text held back, whether a stop string was hit)."""
    if not stops:
        return text, "", False
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    hold = max((n for s in stops for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])), default=0)
    return text[:len(text) - hold], text[len(text) - hold:], False


def _completion_chunks(steps, kind: str, model_name: str) -> Iterator[dict]:
    cid = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:12]}"
    created = int(time.time())
    first = True
    for piece, finish, rec in steps:
        if kind.startswith("chat"):
            delta = {"role": "assistant", "content": piece} if first else {"content": piece}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece, "finish_reason": finish}
        first = False
        chunk = {"id": cid, "object": kind + ".chunk", "created": created, "model": model_name, "choices": [choice]}
        if finish is not None:
            chunk["routing"] = rec.to_dict()
            chunk["usage"] = _usage(rec)
        yield chunk


def _usage(rec: RoutingRecord) -> dict:
    t = rec.timings
    return {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
            "total_tokens": t.prompt_tokens + t.completion_tokens}


def _collect(chunks: Iterator[dict], kind: str) -> dict:
    text, last = [], None
    for c in chunks:
        ch = c["choices"][0]
        text.append(ch["delta"].get("content", "") if "delta" in ch else ch["text"])
        last = c
    content = "".join(text)
    finish = last["choices"][0]["finish_reason"]
    choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
              if kind.startswith("chat") else {"index": 0, "text": content, "finish_reason": finish})
    return {"id": last["id"], "object": kind, "created": last["created"], "model": last["model"],
            "choices": [choice], "usage": last["usage"], "routing": last["routing"]}
