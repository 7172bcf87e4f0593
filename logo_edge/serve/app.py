"""The HTTP edge: FastAPI handlers over the workers' engines, each a few lines; errors mapped in one place.

    app = create_app(ServeConfig(...), workers)      # `logo-edge serve` runs it with uvicorn
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from ..errors import AdapterError, ContextOverflowError, ConversionError, EngineBusyError, LogoEdgeError, RoutingError
from ..errors import RequestError as EngineRequestError
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
    _Generation,
    error_body,
)
from .workers import QueueFullError, Workers

API_KEY_ENV = "LOGO_EDGE_API_KEY"
ROUTED_ALIASES = ("logo-edge", "auto")  # model names that mean "route automatically", beside the base's
OPEN_PATHS = ("/health", "/", "/favicon.ico")  # no key needed: liveness and the chat page itself
PAGE = Path(__file__).with_name("static") / "chat.html"


@dataclass(frozen=True)
class ServeConfig:
    model_name: str  # what /v1/models calls the base model
    adapter_dirs: tuple[Path, ...] = ()  # where load_lora_adapter may read from
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens: int = 2048  # the most a request may ask for
    default_max_tokens: int = 256
    cors_origins: tuple[str, ...] = ()
    convert_dir: Path | None = None  # where PEFT adapters loaded over HTTP are converted to
    started: int = field(default_factory=lambda: int(time.time()))


class Refusal(LogoEdgeError):
    """A request the server refuses: (status, message, code)."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


STATUS = [  # error type -> HTTP status, first match wins
    (Refusal, None),
    (EngineRequestError, 400),
    (ContextOverflowError, 400),
    (RoutingError, 400),
    (AdapterError, 400),
    (ConversionError, 400),
    (EngineBusyError, 503),
    (QueueFullError, 503),
    (LogoEdgeError, 500),
]


class LoraIds:
    """The ids `/lora-adapters` lists and requests name adapters by (`lora: [{"id": ...}]`). llama-server numbers
    adapters by position and never unloads one; here adapters come and go, so an id is given once per loaded
    adapter, in load order (at start: positions, as llama-server's), and never given again while the server runs:
    a request by id never reaches an adapter other than the one listed under it."""

    def __init__(self):
        self._ids: dict[str, int] = {}
        self._next = 0
        self._lock = threading.Lock()

    def of(self, names: list[str]) -> dict[str, int]:
        """name -> id for the adapters loaded now (ids for new names given here)."""
        with self._lock:
            for n in names:
                if n not in self._ids:
                    self._ids[n], self._next = self._next, self._next + 1
            return {n: self._ids[n] for n in names}

    def retire(self, name: str) -> None:
        """An unloaded adapter's id is not given to the next one (a name loaded again gets a new id)."""
        with self._lock:
            self._ids.pop(name, None)


def create_app(cfg: ServeConfig, workers: Workers) -> FastAPI:
    app = FastAPI(title="logo-edge", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.cfg, app.state.workers = cfg, workers
    ids = app.state.lora_ids = LoraIds()
    ids.of(workers.engine.pool.names)
    _install_errors(app)
    _install_guards(app, cfg)

    @app.get("/health")
    async def health():
        out = {"status": "ok", "engines": len(workers), "adapters": len(workers.engine.pool)}
        fleet = getattr(workers.engine, "fleet", None)  # --generate-on: the llama-server backends, up or not
        if fleet is not None:
            out["backends"] = fleet.status()
            up = sum(b["up"] for b in out["backends"])
            out["status"] = "ok" if up == len(out["backends"]) else "degraded" if up else "unavailable"
        return out

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": _model_cards(cfg, workers)}

    @app.get("/lora-adapters")
    async def lora_adapters():
        adapters = workers.engine.pool.adapters
        now = ids.of([a.name for a in adapters])
        return [_adapter_card(now[a.name], a) for a in adapters]

    @app.get("/v1/pool")
    async def pool():  # the same rows as `logo-edge pool list`, from the running pool (pool_ops)
        from ..pool_ops import engine_entries

        return {"object": "list", "data": [e.to_dict() for e in engine_entries(workers.engine)]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        kwargs = _generation_kwargs(req, cfg, workers, ids, req.max_completion_tokens)
        messages = req.chat()
        return await _respond(req, cfg, workers, lambda eng, stream: eng.create_chat_completion(
            messages, stream=stream, **kwargs))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        kwargs = _generation_kwargs(req, cfg, workers, ids)
        prompt = req.text()
        return await _respond(req, cfg, workers,
                              lambda eng, stream: eng.create_completion(prompt, stream=stream, **kwargs))

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoraRequest):
        return await run_in_threadpool(_load_adapter, cfg, workers, req)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoraRequest):
        if req.lora_name not in workers.engine.pool.names:
            raise Refusal(404, f"no adapter named {req.lora_name!r} is loaded", "lora_not_found", "lora_name")
        await run_in_threadpool(workers.on_every_engine, lambda eng: eng.remove_adapter(req.lora_name))
        ids.retire(req.lora_name)
        return {"status": "ok", "lora_name": req.lora_name, "adapters": len(workers.engine.pool)}

    return app


# ---- generation


def _generation_kwargs(req: _Generation, cfg: ServeConfig, workers: Workers, ids: LoraIds,
                       max_tokens: int | None = None) -> dict:
    """The engine's keyword arguments for a request, or Refusal naming what is wrong."""
    bad = req.unsupported()
    if bad:
        raise Refusal(400, "unsupported: " + "; ".join(bad), "unsupported_parameter")
    n = max_tokens or req.max_tokens or min(cfg.default_max_tokens, cfg.max_tokens)
    if n > cfg.max_tokens:
        raise Refusal(400, f"max_tokens={n} is over this server's limit of {cfg.max_tokens}", param="max_tokens")
    eng = workers.engine
    names = eng.pool.names
    kwargs = dict(adapters=_adapters(req, cfg, names, ids.of(names)), max_tokens=n, temperature=req.temperature,
                  top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=req.stops())
    if req.logo is not None:
        overrides = req.logo.overrides()
        try:
            replace(eng.routing, **overrides)  # RouteConfig validates: RoutingError names the setting
        except TypeError as e:
            raise Refusal(400, f"logo: {e}", param="logo") from e
        kwargs.update(overrides)
    return kwargs


def _adapters(req: _Generation, cfg: ServeConfig, names: list[str], ids: dict[str, int]):
    """Which adapters: routed (the base name), one by name (vLLM's adapter-as-model), or `lora` by hand."""
    model = req.model
    single = model if model in names else None
    if model is not None and single is None and model not in (cfg.model_name, *ROUTED_ALIASES):
        raise Refusal(404, f"model {model!r} does not exist; serve one of: "
                           + ", ".join([cfg.model_name, *names]), "model_not_found", "model")
    if req.lora is None:
        return {single: 1.0} if single else "auto"
    if single:
        raise Refusal(400, f"model {model!r} is an adapter; give either it or `lora`, not both", param="lora")
    if not req.lora:
        return "base"  # llama-server: an empty list means no adapter
    chosen: dict[str, float] = {}
    by_id = {i: n for n, i in ids.items()}
    for item in req.lora:
        if item.id is not None and item.id not in by_id:
            raise Refusal(400, f"lora id {item.id} is not loaded (ids: {', '.join(map(str, sorted(by_id)))}; see "
                               "/lora-adapters)", "lora_not_found", "lora")
        name = by_id[item.id] if item.id is not None else item.name
        if name not in names:
            raise Refusal(400, f"lora name {name!r} is not loaded (have: {', '.join(names)})",
                               "lora_not_found", "lora")
        if name in chosen:
            raise Refusal(400, f"adapter {name!r} appears twice in lora", param="lora")
        chosen[name] = item.scale
    return chosen


async def _respond(req: _Generation, cfg: ServeConfig, workers: Workers, run):
    name = req.model or cfg.model_name  # responses name the model the client asked for
    if not req.stream:
        return {**await workers.call(lambda eng: run(eng, False)), "model": name}
    chunks = workers.stream(lambda eng: run(eng, True))
    first = await chunks.__anext__()  # errors before the first token become a plain 4xx, not a broken stream

    async def events():
        try:
            yield {"data": json.dumps({**first, "model": name})}
            async for chunk in chunks:
                yield {"data": json.dumps({**chunk, "model": name})}
            yield {"data": "[DONE]"}
        finally:
            await chunks.aclose()  # a client that left: cancels the generation

    return EventSourceResponse(events(), ping=15)


# ---- the live pool


def _confine(cfg: ServeConfig, raw: str) -> Path:
    """The adapter path, resolved, if it lies inside a directory the server was given; else Refusal."""
    if not cfg.adapter_dirs:
        raise Refusal(403, "this server loads adapters only from directories given with --adapter-dir "
                           "(none given)", "forbidden", "lora_path")
    p = Path(raw)
    if ".." in p.parts:
        raise Refusal(400, f"lora_path {raw!r} may not contain '..'", param="lora_path")
    candidates = [p] if p.is_absolute() else [d / p for d in cfg.adapter_dirs]
    for c in candidates:
        if not os.path.lexists(c):
            continue
        real = c.resolve()
        if any(real == d.resolve() or real.is_relative_to(d.resolve()) for d in cfg.adapter_dirs):
            return real
        raise Refusal(403, f"lora_path {raw!r} resolves outside the adapter directories "
                           f"({', '.join(map(str, cfg.adapter_dirs))})", "forbidden", "lora_path")
    raise Refusal(404, f"lora_path {raw!r} does not exist in the adapter directories", "not_found", "lora_path")


def _load_adapter(cfg: ServeConfig, workers: Workers, req: LoadLoraRequest) -> dict:
    if req.lora_name in workers.engine.pool.names or req.lora_name in (cfg.model_name, *ROUTED_ALIASES):
        raise Refusal(400, f"an adapter or model named {req.lora_name!r} is already served", param="lora_name")
    path = _confine(cfg, req.lora_path)
    if path.is_dir():  # a PEFT adapter: converted once, next to nothing the user owns
        path = _convert_peft(cfg, workers, path)
    from ..gguf_files import read_lora

    read_lora(path, workers.engine.model.info)  # validate once, before any engine changes
    ours = []  # engines this request added the adapter to (another request may load the same name meanwhile)

    def add(eng):
        if req.lora_name in eng.pool.names:  # checked again where no other load can run
            raise Refusal(400, f"an adapter or model named {req.lora_name!r} is already served", param="lora_name")
        a = eng.add_adapter(path, req.lora_name)
        ours.append(id(eng))
        return a

    try:
        added = workers.on_every_engine(add)
    except Exception:
        workers.on_every_engine(lambda eng: id(eng) in ours and eng.remove_adapter(req.lora_name))
        raise
    return {"status": "ok", "lora_name": req.lora_name, "lora_path": str(path),
            "probeable": added[0].probeable, "adapters": len(workers.engine.pool)}


def _convert_peft(cfg: ServeConfig, workers: Workers, peft_dir: Path) -> Path:
    from ..calibration import model_key
    from ..convert.lora import CONVERTER_VERSION, convert_lora

    files = sorted(p for p in peft_dir.iterdir() if p.is_file())
    h = hashlib.sha256()  # the base model and the converter too: a file converted for another, or before a fix, is not
    h.update(f"{model_key(workers.engine.model.path)}:{CONVERTER_VERSION}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    out_dir = cfg.convert_dir or peft_dir
    out = out_dir / f"{peft_dir.name}-{h.hexdigest()[:12]}.gguf"
    if not out.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
        convert_lora(peft_dir, workers.engine.model.path, tmp, "f16", name=peft_dir.name)
        os.replace(tmp, out)
    return out


# ---- listings


def _adapter_card(i: int, a) -> dict:
    # rank: the LoRA's (the largest over its tensors), not its rows in the probe bank (several modules stacked)
    return {"id": i, "path": str(a.path), "scale": 0.0, "name": a.name, "rank": a.max_rank, "modules": a.modules,
            "probeable": a.probeable, "unprobeable_reason": a.unprobeable_reason}


def _model_cards(cfg: ServeConfig, workers: Workers) -> list[dict]:
    base = {"id": cfg.model_name, "object": "model", "created": cfg.started, "owned_by": "logo-edge",
            "root": str(workers.engine.model.path), "parent": None}
    return [base] + [{"id": a.name, "object": "model", "created": cfg.started, "owned_by": "logo-edge",
                      "root": str(a.path), "parent": cfg.model_name} for a in workers.engine.pool.adapters]


# ---- errors, keys, limits


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return JSONResponse(error_body(_describe(exc.errors()), code="invalid_request"), status_code=400)

    @app.exception_handler(LogoEdgeError)
    async def engine_error(_, exc: LogoEdgeError):
        # an error's own status (Refusal, FleetError) first, then its type's
        status = getattr(exc, "status", None) or next(s for t, s in STATUS if isinstance(exc, t)) or 400
        code = getattr(exc, "code", type(exc).__name__)
        return JSONResponse(error_body(str(exc), _type(status), code, getattr(exc, "param", None)), status)

    @app.exception_handler(QueueFullError)
    async def busy(_, exc: QueueFullError):
        return JSONResponse(error_body(str(exc), "server_busy", "queue_full"), status_code=503)


def _type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")


def _describe(errors: list[dict]) -> str:
    """Pydantic's errors as one sentence per field: what is wrong, and where."""
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "json_invalid":
            parts.append(f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
        elif e.get("type") == "extra_forbidden":
            parts.append(f"unsupported field `{loc}`")
        elif e.get("type") == "missing":
            parts.append(f"missing field `{loc}`")
        else:
            value = e.get("input")
            shown = "NaN" if isinstance(value, float) and math.isnan(value) else repr(value)[:80]
            parts.append(f"`{loc}`: {e.get('msg')} (got {shown})")
    return "; ".join(parts) or "invalid request"


def _install_guards(app: FastAPI, cfg: ServeConfig) -> None:
    key = cfg.api_key

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            given = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), key.encode()):
                return JSONResponse(error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                               "authentication_error", "invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            return JSONResponse(error_body(f"request body of {length} bytes is over the limit of "
                                           f"{cfg.max_body_bytes}", code="body_too_large"), status_code=413)
        return await call_next(request)

    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes)
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])


class _BodyLimit:
    """ASGI middleware: the body is read up to the limit before the app sees it (also a chunked body with no
    Content-Length); past the limit the answer is 413 and the app is never called."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                resp = JSONResponse(error_body(f"request body is over the limit of {self.limit} bytes",
                                               code="body_too_large"), status_code=413)
                return await resp(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later: disconnects, for streaming responses

        await self.app(scope, replay, send)
