"""`logo-edge bench --server`: `logo-edge serve` against llama-cpp-python's own server, side by side in one run.

Both servers run as child processes on loopback ports, on the same model, llama.cpp build, threads, n_ctx and
prompts; clients send non-streaming POST /v1/chat/completions (greedy, max_tokens G, no stop words) at 1, 4
and 8 at once, and each row reports requests/s, generated tokens/s (from each response's usage) and latency
p50/p95, with the ratio logo-edge / llama-cpp-python for each comparable pair:

  base     llama-cpp-python server, no adapter         vs  logo-edge, "lora": []
  adapter  llama-cpp-python server --lora_path A       vs  logo-edge, "lora": [{"name": A, "scale": 1.0}]
  routed   logo-edge, model = the base name (routing over the pool, top-k): llama-cpp-python's server has
           no counterpart (one adapter per process, fixed at start-up); its ratios are against the
           llama-cpp-python adapter row

    logo-edge bench --server            # the full run (about 2 minutes on 2 cores)
    logo-edge bench --server --quick    # levels 1 and 2, 2 requests each, 8 tokens: about 10 s
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import defaults
from .bench import _log, rows_pool
from .serve.process import child_server, free_port

N_CTX = 1024
LCP, LE = "llama-cpp-python", "logo-edge"
TOPICS = ["a lighthouse keeper who finds an old map", "a robot learning to paint", "a city under the sea",
          "two friends crossing a desert", "a clockmaker's last invention", "a dragon who is afraid of heights",
          "a village where it never stops raining", "a letter delivered fifty years late",
          "a girl who can talk to rivers", "the first day on a space station", "a lost dog finding its way home",
          "a musician who hears colours", "a king who trades places with a baker",
          "a train that only runs at midnight", "a garden that grows memories", "an island that moves"]
PROMPTS = [f"Write a long story about {t}." for t in TOPICS]  # long answers: few stop early at EOS


def add_server_args(p) -> None:
    """The `--server` options (bench's add_args calls this)."""
    p.add_argument("--server-levels", type=int, nargs="+", help="concurrent clients (default 1 4 8; --quick: 1 2)")
    p.add_argument("--server-requests", type=int, help="requests per level (default 8 at 1 client, 16 above; "
                   "--quick: 2)")
    p.add_argument("--server-max-tokens", type=int, help="max_tokens of every request (default 64; --quick: 8)")
    p.add_argument("--server-parallel", type=int, default=1, help="also a logo-edge serve --parallel N (N > 1; "
                   "default: --parallel 1 only, like llama-cpp-python's one model behind a lock); each engine "
                   "gets --threads threads, so N engines on few cores compete")
    p.add_argument("--server-adapter", help="the one adapter both servers set by hand (default: the pool's first)")


# ---- child servers (started and stopped by logo_edge.serve.process)


def wait_ready(servers: dict, timeout: float = 240) -> None:
    """Wait until every server answers GET /v1/models (they load at the same time)."""
    import httpx

    deadline = time.monotonic() + timeout
    pending = dict(servers)
    while pending:
        for name, (url, proc, log) in list(pending.items()):
            if proc.poll() is not None:
                raise RuntimeError(f"the {name} server exited with {proc.returncode} before answering:\n"
                                   + log.read_text()[-3000:])
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    del pending[name]
            except httpx.HTTPError:
                pass
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"{', '.join(pending)} did not answer /v1/models within {timeout:.0f} s")
        time.sleep(0.2)


# ---- rows and measurement


@dataclass
class Row:
    key: str  # base / adapter / routed
    server: str  # which child server
    label: str
    body: dict  # request fields beside messages, max_tokens, temperature
    ref: str | None = None  # the llama-cpp-python row its ratios are against
    levels: dict = field(default_factory=dict)  # concurrency -> Level
    texts: dict = field(default_factory=dict)  # prompt index -> answer (greedy: the same at every level)


@dataclass
class Level:
    wall: float
    lat: list[float]
    completion: list[int]
    prompt: list[int]
    cpu: tuple[float, float] = (float("nan"), float("nan"))  # cores busy: the server under test, everything else

    @property
    def rps(self) -> float:
        return len(self.lat) / self.wall

    @property
    def tps(self) -> float:
        return sum(self.completion) / self.wall

    def pct(self, q: float) -> float:
        return float(np.percentile(self.lat, q)) * 1e3


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, all threads
    except (OSError, IndexError, ValueError):
        return 0


def _busy_ticks() -> int:
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(v[:8]) - v[3] - v[4]  # all but idle and iowait (guest time is inside user)
    except (OSError, ValueError, IndexError):
        return 0


def cpu_snapshot(pid: int) -> tuple[float, int, int]:
    """(time, CPU ticks of process pid, CPU ticks busy on the whole machine), for cpu_use."""
    return time.perf_counter(), _cpu_ticks(pid), _busy_ticks()


def cpu_use(a, b) -> tuple[float, float]:
    """Cores busy between two snapshots: the process, and everything else on the machine (Linux; else NaN)."""
    if not (a[2] and b[2]):
        return float("nan"), float("nan")
    hz, wall = os.sysconf("SC_CLK_TCK"), b[0] - a[0]
    mine = (b[1] - a[1]) / hz / wall
    return mine, max(0.0, (b[2] - a[2]) / hz / wall - mine)


def _post(client, url: str, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=body)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:500]}")
    return dt, r.json()


def _body(row: Row, prompt: str, gen: int) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": gen, "temperature": 0.0,
            "top_p": 1.0, "stream": False, **row.body}


def run_level(client, url: str, row: Row, conc: int, n: int, gen: int, offset: int) -> Level:
    """n requests, conc at a time, prompts offset.. (mod the list); wall time from the first send to the last answer."""
    idx = [(offset + i) % len(PROMPTS) for i in range(n)]
    pool = ThreadPoolExecutor(max_workers=conc)
    try:
        t0 = time.perf_counter()
        results = list(pool.map(lambda i: _post(client, url, _body(row, PROMPTS[i], gen)), idx))
        wall = time.perf_counter() - t0
    finally:  # on an error or a signal, do not wait for the requests in flight: the servers are stopped next
        pool.shutdown(wait=False, cancel_futures=True)
    for i, (_, r) in zip(idx, results):
        row.texts.setdefault(i, r["choices"][0]["message"]["content"])
    return Level(wall, [dt for dt, _ in results], [r["usage"]["completion_tokens"] for _, r in results],
                 [r["usage"]["prompt_tokens"] for _, r in results])


def _plan(args) -> tuple[list[int], dict[int, int], int]:
    levels = args.server_levels or ([1, 2] if args.quick else [1, 4, 8])
    if any(c < 1 for c in levels):
        raise SystemExit("error: --server-levels must be >= 1")
    if args.server_requests:
        reqs = {c: max(args.server_requests, 1) for c in levels}
    else:
        reqs = {c: 2 if args.quick else (8 if c == 1 else 16) for c in levels}
    gen = args.server_max_tokens or (8 if args.quick else 64)
    return levels, reqs, gen


# ---- the command


def run_server_bench(args) -> int:
    from ._lib import LIB_DIR

    model_path = Path(args.model) if args.model else defaults.default_model_path()
    threads = args.threads or os.cpu_count() or 1
    levels, reqs, gen = _plan(args)
    adapters, pool_desc = rows_pool(args, model_path)
    pick = next((a for a in adapters if a.stem == args.server_adapter), None) if args.server_adapter else adapters[0]
    if pick is None:
        raise SystemExit(f"error: --server-adapter {args.server_adapter}: no such adapter file in the pool "
                         f"({', '.join(a.stem for a in adapters)})")
    par = max(1, args.server_parallel)
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(LIB_DIR)}  # llama-cpp-python on the same (patched) build
    lcp = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
           "--n_ctx", str(N_CTX), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--flash_attn", "true", "--logits_all", "false", "--verbose", "false"]
    le = [sys.executable, "-m", "logo_edge.cli", "serve", "--host", "127.0.0.1", "--model", str(model_path),
          "--adapters", *map(str, adapters), "--n-ctx", str(N_CTX), "--threads", str(threads), "-k", str(args.k)]
    specs = {"lcp-base": lcp, "lcp-adapter": [*lcp, "--lora_path", str(pick)], "le": [*le, "--parallel", "1"]}
    if par > 1:
        specs[f"le-x{par}"] = [*le, "--parallel", str(par)]

    _print_header(model_path, pool_desc, pick, threads, levels, reqs, gen, args.k, par)
    load = os.getloadavg()
    old = signal.signal(signal.SIGTERM, _terminate)  # a killed bench still stops its servers
    try:
        rows = _run(specs, env, pick, par, levels, reqs, gen)
    finally:
        signal.signal(signal.SIGTERM, old)
    _print_table(rows, levels)
    print(f"\nload average (1 min) at start {load[0]:.2f}, at the end {os.getloadavg()[0]:.2f} (the bench's own "
          f"servers count in the latter)")
    return 0


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def _run(specs, env, pick, par, levels, reqs, gen) -> list[Row]:
    import httpx

    with tempfile.TemporaryDirectory(prefix="logo-edge-bench-server-") as tmp, ExitStack() as stack:
        _log(f"starting {len(specs)} servers: {', '.join(specs)}")
        t0 = time.perf_counter()
        servers = {}
        for name, cmd in specs.items():
            port = free_port()
            servers[name] = stack.enter_context(child_server(name, [*cmd, "--port", str(port)], port, env, Path(tmp)))
        wait_ready(servers)
        _log(f"all servers up in {time.perf_counter() - t0:.1f} s")
        client = stack.enter_context(httpx.Client(timeout=900, limits=httpx.Limits(max_connections=64)))
        rows = _rows(client, servers, pick, par)
        try:
            _measure(client, servers, rows, levels, reqs, gen)
        except Exception:
            for name, (_, _, log) in servers.items():
                _log(f"--- {name} log (tail) ---\n{log.read_text()[-1500:]}")
            raise
    return rows


def _rows(client, servers, pick: Path, par: int) -> list[Row]:
    """The rows, with logo-edge's names for the base model and the hand-set adapter (from its own listing)."""
    url = servers["le"][0]
    base_name = client.get(url + "/v1/models").json()["data"][0]["id"]
    cards = client.get(url + "/lora-adapters").json()
    name = next((c["name"] for c in cards if Path(c["path"]).resolve() == pick.resolve()), None)
    if name is None:
        raise RuntimeError(f"logo-edge does not list {pick} in /lora-adapters")
    # llama-cpp-python's defaults are a repeat penalty of 1.1, top_k 40, min_p 0.05: neutral here, so both greedy
    neutral = {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}
    rows = [Row("base", "lcp-base", f"{LCP} (no adapter)", neutral),
            Row("base", "le", f"{LE} lora=[]", {"lora": []}, ref="lcp-base"),
            Row("adapter", "lcp-adapter", f"{LCP} --lora_path {name}", neutral),
            Row("adapter", "le", f"{LE} lora={name}", {"lora": [{"name": name, "scale": 1.0}]}, ref="lcp-adapter"),
            Row("routed", "le", f"{LE} routed", {"model": base_name}, ref="lcp-adapter")]
    if par > 1:
        rows += [Row(r.key, f"le-x{par}", r.label.replace(LE, f"{LE} x{par}"), r.body, r.ref)
                 for r in rows if r.server == "le"]
    return rows


def _measure(client, servers, rows: list[Row], levels, reqs, gen) -> None:
    for r in rows:  # one warm-up request per row (not counted): model pages, adapters, the router's bank
        _post(client, servers[r.server][0], _body(r, "Say hello.", min(gen, 8)))
    _log("warm-up done")
    offset = 0
    for j, conc in enumerate(levels):
        order = rows[j % len(rows):] + rows[:j % len(rows)]  # rotate the order from level to level
        for r in order:
            url, proc, _ = servers[r.server]
            a = cpu_snapshot(proc.pid)
            m = r.levels[conc] = run_level(client, url, r, conc, reqs[conc], gen, offset)
            m.cpu = cpu_use(a, cpu_snapshot(proc.pid))
            _log(f"c={conc} {r.label}: {reqs[conc]} requests in {m.wall:.1f} s; cores busy: server {m.cpu[0]:.2f}, "
                 f"the rest {m.cpu[1]:.2f}")
        offset += reqs[conc]


# ---- report


def _print_header(model_path, pool_desc, pick, threads, levels, reqs, gen, k, par) -> None:
    print(f"logo-edge serve vs llama-cpp-python's server (python -m llama_cpp.server), both child processes on "
          f"loopback, run side by side\nmodel {model_path.name}; pool: {pool_desc}; {threads} threads each; n_ctx "
          f"{N_CTX}; the same llama.cpp build; flash attention on in both (logo-edge's auto picks it on CPU; "
          f"llama-cpp-python given --flash_attn true); llama-cpp-python --logits_all false (its default true "
          f"computes logits at every prompt position)\nrequests: non-streaming POST /v1/chat/completions, greedy "
          f"(temperature 0; llama-cpp-python also repeat_penalty 1, top_k 0, min_p 0), max_tokens {gen}, no stop "
          f"words, {len(PROMPTS)} fixed 'Write a long story about ...' prompts in the same order for every row; "
          f"tokens = usage.completion_tokens (fewer than requests x {gen} where a model stopped at EOS)\n"
          f"levels: " + ", ".join(f"{c} concurrent client(s) x {reqs[c]} requests" for c in levels)
          + "; one warm-up request per row first; wall time per level from the first send to the last answer; "
          "latency per request includes waiting in the server's queue\n"
          "rows:\n"
          f"  base     {LCP} server, no adapter                   vs  {LE} serve, \"lora\": []\n"
          f"  adapter  {LCP} server --lora_path {pick.name:<14} vs  {LE} serve, \"lora\": [{{\"name\": "
          f"\"{pick.stem}\", \"scale\": 1.0}}]\n"
          f"  routed   {LE} serve, model = the base name: probe + top-{k} mixture over the pool per request. "
          f"{LCP}'s server has NO counterpart\n"
          f"           (one adapter per server process, set at start-up): its ratios are against the {LCP} "
          f"one-adapter row, so they include routing and k={k} adapters vs 1\n"
          f"{LE} serve --parallel 1 (one engine; {LCP} serializes requests on a lock)"
          + (f"; also {LE} serve --parallel {par} (rows 'x{par}')" if par > 1 else ""), flush=True)


def _print_table(rows: list[Row], levels) -> None:
    print(f"\n{'row':<8} {'server':<38} {'conc':>4} {'reqs':>4} {'prompt tok':>10} {'tokens':>6} {'req/s':>7} "
          f"{'tok/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'cpu srv':>7} {'cpu rest':>8}")
    for conc in levels:
        for r in rows:
            m = r.levels[conc]
            print(f"{r.key:<8} {r.label:<38} {conc:>4} {len(m.lat):>4} {sum(m.prompt):>10} {sum(m.completion):>6} "
                  f"{m.rps:7.2f} {m.tps:7.1f} {m.pct(50):8.0f} {m.pct(95):8.0f} {m.cpu[0]:7.2f} {m.cpu[1]:8.2f}")
        print()
    print(f"cpu srv / cpu rest: cores busy during the level ({os.cpu_count()} on this machine) in the server under "
          f"test / in everything else (the bench's client and idle servers, other jobs): a large 'rest' means "
          f"another job competed, and llama.cpp's threads spin at barriers, so that row is slowed\n")
    by_server = {r.server: r for r in rows if r.ref is None}
    print(f"ratios logo-edge / llama-cpp-python (req/s and tok/s: > 1 is faster; p50 and p95: < 1 is faster)\n"
          f"{'row':<8} {'logo-edge':<28} {'vs':<30} {'conc':>4} {'x tokens':>8} {'x req/s':>7} {'x tok/s':>7} "
          f"{'x p50':>6} {'x p95':>6}")
    for conc in levels:
        for r in rows:
            if r.ref is None:
                continue
            a, b = r.levels[conc], by_server[r.ref].levels[conc]
            print(f"{r.key:<8} {r.label.removeprefix(LE + ' ')[:28]:<28} {by_server[r.ref].label[:30]:<30} "
                  f"{conc:>4} {sum(a.completion) / sum(b.completion):8.3f} {a.rps / b.rps:7.3f} "
                  f"{a.tps / b.tps:7.3f} {a.pct(50) / b.pct(50):6.3f} {a.pct(95) / b.pct(95):6.3f}")
    print("\nsame greedy answer as the llama-cpp-python row, per prompt (like-with-like check; routed mixes other "
          "adapters and is not expected to match)")
    for r in rows:
        if r.ref is None:
            continue
        ref = by_server[r.ref].texts
        same = sum(r.texts[i] == ref.get(i) for i in r.texts)
        print(f"  {r.label:<38} vs {by_server[r.ref].label:<38} {same}/{len(r.texts)} prompts")
