"""Start the server: engines, the app, uvicorn. The command line's `serve` calls `run(args)`."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def make_config(args, model_path: Path):
    from .app import API_KEY_ENV, ServeConfig

    dirs = [Path(d) for d in (args.adapters or []) if Path(d).is_dir()] + [Path(d) for d in args.adapter_dir or []]
    for d in args.adapter_dir or []:
        if not Path(d).is_dir():
            raise SystemExit(f"error: --adapter-dir {d} is not a directory")
    from ..native.build import cache_root

    return ServeConfig(model_name=args.model_name or model_path.name.removesuffix(".gguf"),
                       adapter_dirs=tuple(dirs), api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                       max_body_bytes=args.max_body_kb * 1024, max_tokens=args.max_tokens_limit,
                       cors_origins=tuple(args.cors or ()), convert_dir=cache_root() / "serve-converted")


def build(args):
    """(app, workers) for these arguments; the engines are loaded before this returns."""
    from .. import defaults
    from ..cli import route_config
    from ..engine import Engine
    from .app import create_app
    from .workers import Workers

    model_path = Path(args.model) if args.model else defaults.default_model_path()
    adapters = args.adapters if args.adapters is not None else defaults.default_pool()
    routing = route_config(args)

    # engines share the cores: oversubscribed llama.cpp thread pools spin against each other
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)

    def make_engine():
        return Engine(model_path, adapters, n_ctx=args.n_ctx, n_threads=threads, n_gpu_layers=args.gpu_layers,
                      target_block=args.target_block, target_module=args.target_module,
                      probe_modules=args.probe_modules, sv_power=args.sv_power,
                      probe_blocks=args.probe_blocks, routing=routing, max_loaded_mb=args.max_loaded_mb,
                      pool_index=args.pool_index, rpc=args.rpc)

    if getattr(args, "generate_on", None):  # fleet hook: probe here, generate on llama-server (serve/fleet.py)
        from .fleet import FleetEngines

        make_engine = FleetEngines(make_engine, args.generate_on, model_path, threads=args.backend_threads,
                                   n_ctx=args.n_ctx)
    workers = Workers(make_engine, args.parallel, args.max_queue)
    return create_app(make_config(args, model_path), workers), workers


def run(args) -> int:
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        print("error: the server needs its extra: pip install 'logo-edge[serve]'", file=sys.stderr)
        return 1
    import uvicorn

    if not _loopback(args.host) and not (args.api_key or os.environ.get("LOGO_EDGE_API_KEY")):
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    app, workers = build(args)
    cfg = app.state.cfg
    print(f"logo-edge serving {cfg.model_name} with {len(workers.engine.pool)} adapters on "
          f"http://{args.host}:{args.port} ({len(workers)} engine(s); API key {'on' if cfg.api_key else 'off'})",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        workers.close()
    return 0


def _loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
