"""Generation on a fleet of llama-server processes; the probe stays here (`logo-edge serve --generate-on`).

The front process keeps the base GGUF for the probe and the router (cheap: one prefill of the base model and
O(N r d) per adapter); every generation goes to a llama-server that holds the same base and the pool's
adapters, loaded with `--lora ... --lora-init-without-apply`. The chosen mixture travels as the request's
`lora`, listing EVERY adapter of that backend with its scale (0 for the unchosen), never an empty list.

    fleet = Fleet.spawn(model, pool_paths, n=2)            # or Fleet.connect(["http://h1:8080", ...], pool_paths)
    eng = FleetEngine(Engine(model, pool_paths), fleet)   # what the server's workers own instead of an Engine
    eng.create_chat_completion(messages)                   # probe here, generate there, record as usual

A backend that stops answering (its process died, the connection is refused or cut) is taken out of rotation and
the request goes to another before anything was streamed; a backend started here is restarted in the background
with the same command and comes back once /health answers and it holds the pool again; one connected to is tried
again after a backoff (1 s, doubling to 30 s). `Fleet.status()` (the server's /health) says which are up.

Two llama-server defects are defeated here, never shown to the user (tests/test_fleet.py shows both):
- #28674: `--lora-init-without-apply` leaves the global scales at 1.0 and `"lora": []` falls back to them.
  Every request lists every adapter explicitly; on connecting, non-zero global scales are set to 0.
- #26207: the RAM prompt cache (`--cache-ram`, on by default) is keyed by tokens only, so a slot can load K/V
  computed under another adapter set. Backends started here run with `--cache-ram 0` (the slot's own cache
  is cleared by the server when the scales change, as `lora` is never empty); a backend we did not start may
  have it on, so its requests go with `cache_prompt: false` (full prefill, always the right answer).
And one more: when an answer ends at n_predict with a stop string's prefix at its end, llama-server drops that held
back text; stop strings are matched here, on the front, and the stream is closed at a hit.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from ..errors import LogoEdgeError, RoutingError

HEALTH_TIMEOUT_S = 120
STICKY_SIZE = 1024  # mixtures remembered for prefix affinity
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0  # a down backend is tried again after this backoff (doubling per failure)


class FleetError(LogoEdgeError):
    """A generation backend could not be started, reached, or does not hold the pool's adapters."""

    status = 502
    code = "backend_error"


class FleetUnavailable(FleetError):
    """No backend of the fleet can take a request now (all down or restarting)."""

    status = 503
    code = "backend_unavailable"


class _Unreachable(Exception):
    """A backend failed in a way another backend would not (connection refused or cut, the stream ended early)."""


@dataclass
class Backend:
    """One llama-server: its URL, its adapter ids by pool name, and whether its prompt cache is safe to use."""

    url: str
    ids: dict[str, int]  # pool adapter name -> this server's adapter id
    cache_prompt: bool  # True only where the RAM prompt cache is off (started here with --cache-ram 0)
    proc: subprocess.Popen | None = None
    log: Path | None = None
    inflight: int = 0
    served: int = 0
    cmd: list[str] | None = None  # how it was started here: what restarts it
    down: str | None = None  # why it is out of rotation; None while it serves
    retry_at: float = 0.0  # (monotonic) when a down backend that is not restarting may be tried again
    fails: int = 0  # failures in a row
    restarting: bool = False
    restarts: int = 0

    def state(self) -> dict:
        return {"url": self.url, "up": self.down is None, "down": self.down, "restarting": self.restarting,
                "restarts": self.restarts, "inflight": self.inflight, "served": self.served}

    def lora(self, mixture: dict[str, float]) -> list[dict]:
        """Every adapter with its scale: the mixture's weight, 0 for the rest (#28674: never an empty list)."""
        return [{"id": i, "scale": float(mixture.get(name, 0.0))} for name, i in sorted(self.ids.items(),
                                                                                     key=lambda kv: kv[1])]


def server_command(exe: Path, model: Path, adapters: list[Path], port: int, *, threads: int = 1, slots: int = 1,
                   n_ctx: int = 2048, n_batch: int = 512, kv_type: str = "f16", flash_attn: bool = False,
                   rpc: list[str] | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """The llama-server command line of one backend (loopback, the pool's adapters at scale 0, no RAM cache)."""
    cmd = [str(exe), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-tb", str(threads), "-np", str(slots), "-c", str(n_ctx * slots), "-b", str(n_batch), "-ub", str(n_batch),
           "-ctk", kv_type, "-ctv", kv_type, "-fa", "on" if flash_attn else "off", "--cache-ram", "0",
           "--no-webui", "--no-warmup", "-ngl", "999" if rpc else "0", "--lora-init-without-apply"]
    if any("," in str(a) for a in adapters):  # the pinned llama-server takes one comma-separated --lora list
        raise FleetError("adapter paths may not contain ',' with --generate-on: "
                         + ", ".join(str(a) for a in adapters if "," in str(a)))
    if adapters:
        cmd += ["--lora", ",".join(str(a) for a in adapters)]
    if rpc:  # the model's layers placed across these rpc-servers (ggml-rpc-server), the adapters with them
        cmd += ["--rpc", ",".join(rpc)]
    return cmd + list(extra)


def _wait_health(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise FleetError(f"llama-server for {url} exited with {proc.returncode} before it was ready:\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise FleetError(f"llama-server at {url} did not answer /health within {timeout:.0f} s")
        time.sleep(0.2)


def map_adapters(url: str, pool: dict[str, Path]) -> dict[str, int]:
    """Pool name -> the server's adapter id, from its /lora-adapters (by resolved path, else by file stem);
    FleetError naming what is missing. Non-zero global scales (#28674) are set to 0 and checked."""
    import httpx

    listed = httpx.get(url + "/lora-adapters", timeout=10).raise_for_status().json()
    by_path = {str(Path(a["path"]).resolve()): a["id"] for a in listed}
    stems: dict[str, list[int]] = {}
    for a in listed:
        stems.setdefault(Path(a["path"]).stem, []).append(a["id"])
    by_stem = {s: i[0] for s, i in stems.items() if len(i) == 1}  # a stem two files share names neither
    ids, missing = {}, []
    for name, path in pool.items():
        i = by_path.get(str(Path(path).resolve()), by_stem.get(name, by_stem.get(Path(path).stem)))
        if i is None:
            missing.append(name)
        else:
            ids[name] = i
    shared = {i: [n for n in ids if ids[n] == i] for i in set(ids.values())}
    shared = {i: names for i, names in shared.items() if len(names) > 1}
    if shared:  # two pool adapters sent as one backend adapter: one would get the other's weight
        raise FleetError(f"llama-server at {url}: pool adapters " + "; ".join(
            f"{', '.join(n)} all map to its adapter {i}" for i, n in shared.items())
            + " (matched by file name); give the backend the pool's files by the same paths")
    if missing:
        raise FleetError(f"llama-server at {url} lacks adapter(s) {', '.join(missing)} of the pool (it has: "
                         f"{', '.join(Path(a['path']).name for a in listed) or 'none'}); start it with --lora FILE "
                         "for every pool adapter and --lora-init-without-apply")
    if any(a.get("scale", 0) != 0 for a in listed):
        zero = [{"id": a["id"], "scale": 0.0} for a in listed]
        httpx.post(url + "/lora-adapters", json=zero, timeout=10).raise_for_status()
        again = httpx.get(url + "/lora-adapters", timeout=10).json()
        if any(a.get("scale", 0) != 0 for a in again):
            raise FleetError(f"llama-server at {url} keeps non-zero global adapter scales after POST /lora-adapters")
    return ids


class Fleet:
    """Backends and the choice among them: sticky by mixture (the backend whose cache holds that mixture's
    prefixes, LRU-remembered), else the least busy."""

    def __init__(self, backends: list[Backend], sticky_size: int = STICKY_SIZE, pool: dict[str, Path] | None = None,
                 health_timeout: float = HEALTH_TIMEOUT_S):
        if not backends:
            raise FleetError("a fleet needs at least one backend")
        self.backends = backends
        self._sticky: OrderedDict[tuple, int] = OrderedDict()
        self._sticky_size = sticky_size
        self._lock = threading.Lock()
        self._pool, self._health_timeout = pool, health_timeout  # what a restarted backend must hold again
        self._closed = False
        # restarts run on one thread that lives as long as the fleet: a child started with PR_SET_PDEATHSIG (no
        # orphan servers) is killed when the thread that started it ends, not the process
        self._restart_queue: queue.SimpleQueue[Backend | None] = queue.SimpleQueue()
        self._restarter: threading.Thread | None = None
        import httpx

        self._http = httpx.Client(timeout=httpx.Timeout(600, connect=10))

    @classmethod
    def connect(cls, urls: list[str], pool: dict[str, Path], health_timeout: float = HEALTH_TIMEOUT_S) -> "Fleet":
        """Backends already running (started by someone else): their prompt cache may be on, so no cache_prompt."""
        backends = []
        for u in urls:
            u = u.rstrip("/")
            _wait_health(u, None, None, health_timeout)
            backends.append(Backend(u, map_adapters(u, pool), cache_prompt=False))
        return cls(backends, pool=pool, health_timeout=health_timeout)

    @classmethod
    def spawn(cls, model: Path, pool: dict[str, Path], n: int = 1, *, exe: Path | None = None,
              logdir: Path | None = None, health_timeout: float = HEALTH_TIMEOUT_S, **server_kw) -> "Fleet":
        """Start n llama-server processes on free loopback ports with the pool's adapters; stopped by close()."""
        import tempfile

        from .process import _die_with_parent, free_port

        if exe is None:
            from ..native.build import build_tools

            exe = build_tools() / "llama-server"
        logdir = Path(logdir or tempfile.mkdtemp(prefix="logo-edge-fleet-"))
        backends: list[Backend] = []
        fleet = None
        try:
            for k in range(n):
                port = free_port()
                log = logdir / f"llama-server-{k}.log"
                cmd = server_command(Path(exe), Path(model), list(pool.values()), port, **server_kw)
                with open(log, "w") as out:
                    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
                backends.append(Backend(f"http://127.0.0.1:{port}", {}, cache_prompt=True, proc=proc, log=log,
                                        cmd=cmd))
            for b in backends:
                _wait_health(b.url, b.proc, b.log, health_timeout)
                b.ids = map_adapters(b.url, pool)
            fleet = cls(backends, pool=pool, health_timeout=health_timeout)
            return fleet
        finally:
            if fleet is None:
                _stop([b.proc for b in backends])

    def close(self) -> None:
        with self._lock:
            self._closed = True  # a restart under way stops its new process itself
        self._restart_queue.put(None)
        self._http.close()
        _stop([b.proc for b in self.backends])

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- choosing a backend

    def status(self) -> list[dict]:
        """Every backend's state: up or why not, restarts, requests in flight and served."""
        self._notice_exits()
        with self._lock:
            return [b.state() for b in self.backends]

    def _notice_exits(self) -> None:
        """Take a backend started here whose process has exited out of rotation (and restart it) before a request
        is sent its way."""
        now = time.monotonic()
        for b in self.backends:
            if b.proc is None or b.proc.poll() is None:
                continue
            if b.down is None:
                self._mark_down(b, f"its process exited with {b.proc.returncode}")
            elif not b.restarting and now >= b.retry_at:  # a restart that failed: try again after the backoff
                self._mark_down(b, b.down)

    def _acquire(self, key: tuple, tried: set[int]) -> tuple[int, Backend]:
        self._notice_exits()
        with self._lock:
            now = time.monotonic()
            ok = [j for j, b in enumerate(self.backends) if j not in tried
                  and (b.down is None or (not b.restarting and now >= b.retry_at))]
            if not ok:
                raise FleetUnavailable("no generation backend can take the request now: " + "; ".join(
                    f"{b.url} {'failed this request' if j in tried and b.down is None else 'is down'}"
                    f"{f' ({b.down})' if b.down else ''}{', restarting' if b.restarting else ''}"
                    for j, b in enumerate(self.backends)))
            i = self._sticky.get(key)
            if i in ok:
                self._sticky.move_to_end(key)
            else:  # a new mixture, or its backend is down: the least busy that is up (a down one on probation last)
                i = min(ok, key=lambda j: (self.backends[j].down is not None, self.backends[j].inflight,
                                           self.backends[j].served))
                self._sticky[key] = i
                self._sticky.move_to_end(key)
                while len(self._sticky) > self._sticky_size:
                    self._sticky.popitem(last=False)
            b = self.backends[i]
            b.inflight += 1
            b.served += 1
            return i, b

    def _release(self, b: Backend) -> None:
        with self._lock:
            b.inflight -= 1

    def _mark_up(self, b: Backend) -> None:
        with self._lock:
            b.down, b.fails = None, 0

    def _mark_down(self, b: Backend, why: str) -> None:
        with self._lock:
            b.fails += 1
            b.down = why
            b.retry_at = time.monotonic() + min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (b.fails - 1))
            restart = (b.cmd is not None and b.proc is not None and b.proc.poll() is not None and not b.restarting
                       and not self._closed and self._pool is not None)
            if restart:
                b.restarting = True
                if self._restarter is None:
                    self._restarter = threading.Thread(target=self._restart_loop, name="fleet-restarts", daemon=True)
                    self._restarter.start()
                self._restart_queue.put(b)

    def _restart_loop(self) -> None:
        while (b := self._restart_queue.get()) is not None:
            self._restart(b)

    def _restart(self, b: Backend) -> None:
        """Start a backend's process again with its command (same port), wait for /health, check it holds the pool
        with the same ids, and put it back in rotation; on failure it stays down until a later failure retries."""
        from .process import _die_with_parent

        proc = None
        try:
            with self._lock:
                if self._closed:
                    return
            with open(b.log, "a") if b.log else open("/dev/null", "w") as out:
                out.write(f"\n[logo-edge] restarting llama-server (it exited with {b.proc.returncode})\n")
                out.flush()
                proc = subprocess.Popen(b.cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            with self._lock:
                closed = self._closed
                if not closed:
                    b.proc = proc
            if closed:
                _stop([proc])
                return
            _wait_health(b.url, proc, b.log, self._health_timeout)
            ids = map_adapters(b.url, self._pool)
            if ids != b.ids:
                raise FleetError(f"after its restart llama-server at {b.url} numbers the adapters otherwise")
            with self._lock:
                b.down, b.fails, b.restarting = None, 0, False
                b.restarts += 1
        except Exception as e:  # noqa: BLE001  (whatever stopped the restart is what /health shows)
            if proc is not None and proc.poll() is None:  # up but unusable (no /health in time, other ids): stop it
                _stop([proc])
            with self._lock:
                b.down = f"restart failed: {type(e).__name__}: {str(e)[:300]}"
                b.restarting = False
                b.retry_at = time.monotonic() + RETRY_MAX_S

    # ---- generating

    def generate(self, tokens: list[int], mixture: dict[str, float], body: dict) -> Iterator[tuple[str, dict | None]]:
        """Stream (text piece, event) from the backend chosen for `mixture`, every event llama-server sends (with
        `backend` and `cache_prompt` added), the last one with `stop` true (stop_type, timings). Closing the generator
        closes the connection, and llama-server stops generating. A backend that cannot be
        reached, or ends the stream before its first piece, is taken out of rotation and the request goes to the
        next; one that fails after streaming part of the answer ends the request with FleetError."""
        import httpx

        key = tuple(sorted(mixture.items()))
        tried: set[int] = set()
        while True:
            i, b = self._acquire(key, tried)
            sent = False
            try:
                req = {**body, "prompt": list(tokens), "stream": True, "lora": b.lora(mixture),
                       "cache_prompt": b.cache_prompt}
                with self._http.stream("POST", b.url + "/completion", json=req) as r:
                    if r.status_code != 200:
                        r.read()
                        if r.status_code == 503:  # loading, or shutting down
                            raise _Unreachable(f"it answered 503: {r.text[:200]}")
                        raise FleetError(f"llama-server at {b.url} answered {r.status_code}: {r.text[:500]}")
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        ev = {**json.loads(line[6:]), "backend": b.url, "cache_prompt": b.cache_prompt}
                        if "error" in ev:  # the request's own failure, sent in the stream: no other backend helps
                            err = ev["error"] if isinstance(ev["error"], dict) else {"message": str(ev["error"])}
                            raise FleetError(f"llama-server at {b.url} failed the request: "
                                             f"{str(err.get('message', err))[:500]}")
                        if b.down is not None:
                            self._mark_up(b)  # it answers: back in rotation
                        sent = sent or bool(ev.get("content"))
                        yield ev.get("content") or "", ev
                        if ev.get("stop"):
                            return
                raise _Unreachable("it closed the stream before its last event")
            except (_Unreachable, httpx.TransportError) as e:
                if isinstance(e, httpx.PoolTimeout):  # this process's own connection limit, not the backend
                    raise FleetError(f"no connection to llama-server at {b.url} was free in time") from e
                why = str(e) if isinstance(e, _Unreachable) else f"{type(e).__name__}: {e}"
                self._mark_down(b, why)
                if sent:
                    raise FleetError(f"llama-server at {b.url} failed in the middle of the answer: {why}") from e
                tried.add(i)
            finally:
                self._release(b)


def _stop(procs: list[subprocess.Popen | None]) -> None:
    """Terminate llama-server processes (all first, then wait for each; killed after 20 s)."""
    procs = [p for p in procs if p is not None]
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def sampling_body(s) -> dict:
    """llama-server's sampling fields for the engine's SamplingConfig: the engine's chain (top-k, top-p,
    temperature, dist; greedy at temperature 0) and nothing else (min-p, penalties, DRY, XTC off); no stop strings."""
    body = {"n_predict": s.max_tokens, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
            "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0,
            "samplers": ["top_k", "top_p", "temperature"], "ignore_eos": s.ignore_eos,
            # stop strings are applied on the front (FleetEngine.stream): llama-server drops the text it holds back
            # for a stop string's prefix when the answer ends at n_predict; per-token timings and counts so that an
            # answer cut on the front still reports them
            "timings_per_token": True}
    if s.seed is not None:
        body["seed"] = s.seed
    return body


class FleetEngine:
    """An Engine's face for the server: routes with the local engine (probe only), generates on the fleet.

    Adapters are fixed when the fleet starts: loading or unloading over HTTP is refused (restart the
    backends with the new --lora list)."""

    def __init__(self, engine, fleet: Fleet):
        if engine.routing.merge == "fusion":
            raise RoutingError("merge='fusion' is not available with --generate-on: llama-server applies "
                               "adapters as a mixture (use merge='mixture')")
        self.engine, self.fleet = engine, fleet
        missing = [n for n in engine.pool.names if any(n not in b.ids for b in fleet.backends)]
        if missing:
            raise FleetError(f"the fleet's backends lack pool adapter(s): {', '.join(missing)}")

    def __getattr__(self, name):  # pool, model, routing, format_chat, tokenize, route ...
        return getattr(self.engine, name)

    def close(self) -> None:
        self.engine.close()

    def add_adapter(self, path, name=None):
        from ..errors import AdapterError

        raise AdapterError("with --generate-on the adapters are those the llama-server backends were started "
                           "with; restart them with --lora for the new adapter")

    remove_adapter = add_adapter

    def stream(self, prompt, adapters="auto", sampling=None, **route_overrides):
        """(text piece, finish reason or None, record), like Engine.stream; generation on the fleet."""
        from ..engine import SamplingConfig, _split_stop

        eng = self.engine
        sampling = sampling or SamplingConfig()
        cfg = replace(eng.routing, **route_overrides)
        if cfg.merge == "fusion":
            raise RoutingError("merge='fusion' is not available with --generate-on (use merge='mixture')")
        tokens = eng.tokenize(prompt)
        eng._check_fits(tokens)
        with eng._exclusive("route"):
            idx, weights, rec = eng._plan(tokens, adapters, replace(cfg, keep_probe="base", prefill="exact"))
        mixture = {eng.pool.adapters[i].name: float(w) for i, w in zip(idx, weights)}
        t0 = time.perf_counter()
        last: dict = {}
        pending, hit = "", False
        events = self.fleet.generate(tokens, mixture, sampling_body(sampling))
        try:
            for piece, last in events:
                pending += piece
                emit, pending, hit = _split_stop(pending, sampling.stop)  # as Engine._decode does
                if emit:
                    yield emit, None, rec
                if hit:
                    break  # closing the stream below stops the backend's generation
        finally:
            events.close()
        if pending:  # held back for a stop string that did not come
            yield pending, None, rec
        tm, t = rec.timings, last.get("timings", {})
        tm.prefill_s = t.get("prompt_ms", 0.0) / 1000
        tm.decode_s = t.get("predicted_ms", 0.0) / 1000
        tm.cached_tokens = int(t.get("cache_n", 0))
        tm.completion_tokens = int(last.get("tokens_predicted", t.get("predicted_n", 0)))
        if last.get("stop_type") == "eos" and tm.completion_tokens > 0:
            tm.completion_tokens -= 1  # llama-server counts the end-of-generation token; the engine does not
        rec.settings.update(backend=last["backend"], backend_cache_prompt=last["cache_prompt"],
                            backend_s=round(time.perf_counter() - t0, 4))
        yield "", "length" if not hit and last.get("stop_type") == "limit" else "stop", rec

    def create_completion(self, prompt, *, adapters="auto", max_tokens=128, temperature=0.0, top_p=1.0, top_k=0,
                          seed=None, stop=(), stream=False, ignore_eos=False, **route_overrides):
        from ..engine import _collect, _completion_chunks, _sampling

        s = _sampling(max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        chunks = _completion_chunks(self.stream(prompt, adapters, s, **route_overrides), "text_completion",
                                    self.engine.model.path.name)
        return chunks if stream else _collect(chunks, "text_completion")

    def create_chat_completion(self, messages, *, adapters="auto", max_tokens=128, temperature=0.0, top_p=1.0,
                               top_k=0, seed=None, stop=(), stream=False, ignore_eos=False, **route_overrides):
        from ..engine import _collect, _completion_chunks, _sampling

        s = _sampling(max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        chunks = _completion_chunks(self.stream(self.engine.format_chat(messages), adapters, s, **route_overrides),
                                    "chat.completion", self.engine.model.path.name)
        return chunks if stream else _collect(chunks, "chat.completion")


def pool_paths(engine) -> dict[str, Path]:
    """The pool as the fleet needs it: adapter name -> its GGUF file."""
    return {a.name: Path(a.path) for a in engine.pool.adapters}


class FleetEngines:
    """The server's engine factory with --generate-on: each worker's probe engine wrapped over one shared fleet,
    started (spawn:N) or connected (URLs) when the first engine exists; closed with the last engine."""

    def __init__(self, make_engine, spec: str, model: Path, **server_kw):
        self.make_engine, self.spec, self.model, self.server_kw = make_engine, spec, Path(model), server_kw
        self.fleet: Fleet | None = None
        self._open = 0
        self._lock = threading.Lock()

    def __call__(self) -> FleetEngine:
        engine = self.make_engine()
        try:
            with self._lock:
                if self.fleet is None:
                    self.fleet = self._start(pool_paths(engine))
                self._open += 1
            wrapped = FleetEngine(engine, self.fleet)
        except BaseException:
            engine.close()
            raise
        wrapped.close = lambda: self._closed(engine)
        return wrapped

    def _start(self, pool: dict[str, Path]) -> Fleet:
        if self.spec.startswith("spawn:"):
            n = int(self.spec.split(":", 1)[1])
            return Fleet.spawn(self.model, pool, n, **self.server_kw)
        return Fleet.connect([u.strip() for u in self.spec.split(",") if u.strip()], pool)

    def _closed(self, engine) -> None:
        engine.close()
        with self._lock:
            self._open -= 1
            if self._open == 0 and self.fleet is not None:
                self.fleet.close()
                self.fleet = None
