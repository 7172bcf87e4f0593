"""Throughput of generation on 1 and 2 llama-server backends (serve/fleet.py), on one machine.

    python -m logo_edge.bench_fleet [--model GGUF --adapters DIR] [--backends 1 2] [--clients 8]

The probe runs first, once per prompt, in this process (its cost is printed apart); then `clients` threads send
the routed requests to the fleet, each a fixed number of tokens (ignore_eos), and requests/s and tokens/s are
measured for each fleet size in one run. The cores are split between the backends (threads = cores / backends),
so on one machine this is a simulation of scale: it shows the fleet's overheads and its routing, not the gain
of adding machines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

PROMPTS = [
    "What is 482 plus 317?", "Translate to French: the cat sleeps on the warm mat.",
    "Write a SQL query that counts the users created in 2023.", "Is the sentence 'I loved this film' positive?",
    "Summarize: the meeting moved to Thursday because the room was booked.", "Name three prime numbers above 50.",
    "Sort these words: pear, apple, fig, banana.", "Who wrote the play Hamlet?",
]


def run(model: Path, adapters, backends: list[int], clients: int, requests: int, max_tokens: int, cores: int,
        slots: int) -> list[dict]:
    from .engine import Engine, SamplingConfig
    from .serve.fleet import Fleet, pool_paths, sampling_body

    with Engine(model, adapters, n_threads=cores) as eng:
        t0 = time.perf_counter()
        planned = []
        for p in PROMPTS:
            prompt = eng.format_chat([{"role": "user", "content": p}]) if eng.model.info.chat_template else p
            rec = eng.route(prompt)
            planned.append((eng.tokenize(prompt), {a.name: a.weight for a in rec.adapters if a.weight}))
        probe_ms = (time.perf_counter() - t0) / len(PROMPTS) * 1000
        pool = pool_paths(eng)
    body = sampling_body(SamplingConfig(max_tokens=max_tokens, ignore_eos=True))
    rows = []
    for n in backends:
        threads = max(1, cores // n)
        with Fleet.spawn(model, pool, n, threads=threads, slots=slots) as fleet:
            for tokens, mix in planned[:n]:  # warm each backend once
                list(fleet.generate(tokens, mix, {**body, "n_predict": 2}))
            lat, done, toks = [], [0], [0]
            lock = threading.Lock()
            jobs = list(range(requests))

            def client():
                while True:
                    with lock:
                        if not jobs:
                            return
                        j = jobs.pop()
                    tokens, mix = planned[j % len(planned)]
                    t = time.perf_counter()
                    final = [f for _, f in fleet.generate(tokens, mix, body) if f][-1]
                    with lock:
                        lat.append(time.perf_counter() - t)
                        done[0] += 1
                        toks[0] += int(final.get("tokens_predicted", 0))

            t0 = time.perf_counter()
            ts = [threading.Thread(target=client) for _ in range(clients)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            wall = time.perf_counter() - t0
            rows.append(dict(backends=n, threads=threads, slots=slots, requests=done[0], wall_s=wall,
                             req_s=done[0] / wall, tok_s=toks[0] / wall, p50_s=statistics.median(lat),
                             per_backend=[b.served for b in fleet.backends], probe_ms=probe_ms))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--adapters", nargs="+", help="pool (default: the shipped pool)")
    ap.add_argument("--backends", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="threads split among the backends")
    ap.add_argument("--slots", type=int, default=4, help="llama-server slots per backend (-np)")
    args = ap.parse_args(argv)
    from . import defaults

    model = Path(args.model) if args.model else defaults.default_model_path()
    adapters = args.adapters if args.adapters is not None else defaults.shipped_pool()
    rows = run(model, adapters, args.backends, args.clients, args.requests, args.max_tokens, args.cores, args.slots)
    print(f"model {model.name}, {args.clients} clients, {args.requests} requests x {args.max_tokens} tokens, "
          f"{args.cores} cores split among the backends, probe {rows[0]['probe_ms']:.0f} ms/request (front, apart)")
    print(f"{'backends':>8} {'threads':>7} {'req/s':>7} {'tok/s':>7} {'p50 s':>7}  per backend")
    for r in rows:
        print(f"{r['backends']:>8} {r['threads']:>7} {r['req_s']:>7.2f} {r['tok_s']:>7.1f} {r['p50_s']:>7.2f}  "
              f"{r['per_backend']}")
    if len(rows) > 1:
        print(f"ratio {rows[-1]['backends']} vs {rows[0]['backends']} backend(s): "
              f"{rows[-1]['req_s'] / rows[0]['req_s']:.2f}x requests/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
