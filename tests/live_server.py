"""A live `logo-edge serve` in a child process on a free loopback port, stopped by the test that started it."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from logo_edge.serve.process import child_server, free_port


@contextmanager
def live_server(*args: str, env: dict | None = None, timeout: float = 180, log: Path | None = None):
    """Start `logo-edge serve ARGS --port P`; yield its base URL (http://127.0.0.1:P) once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "logo_edge.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with tempfile.TemporaryDirectory() as tmp:
        logdir = log.parent if log else Path(tmp)
        name = log.stem if log else "server"
        with child_server(name, cmd, port, {**os.environ, **(env or {})}, logdir) as (url, proc, logfile):
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode} before answering:\n"
                                       + logfile.read_text()[-3000:])
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if json.loads(r.read())["status"] == "ok":
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")
                time.sleep(0.2)
            yield url


@contextmanager
def rpc_servers(exe: Path, n: int, logdir: Path):
    """Start `n` llama.cpp ggml-rpc-server processes (one thread each) on free loopback ports; yield their
    "host:port" endpoints; stop them."""
    import subprocess

    procs, endpoints = [], []
    try:
        for k in range(n):
            port = free_port()
            log = open(logdir / f"rpc-{k}.log", "w")
            procs.append((subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port), "-t", "1"], stdout=log,
                                           stderr=subprocess.STDOUT), log))
            endpoints.append(f"127.0.0.1:{port}")
        yield endpoints
    finally:
        for p, log in procs:
            p.terminate()
            p.wait(timeout=20)
            log.close()
