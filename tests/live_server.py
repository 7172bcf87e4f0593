"""A live `logo-edge serve` in a child process on a free loopback port, stopped by the test that started it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(*args: str, env: dict | None = None, timeout: float = 180, log: Path | None = None):
    """Start `logo-edge serve ARGS --port P`; yield its base URL (http://127.0.0.1:P) once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "logo_edge.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                            env={**os.environ, **(env or {})}, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                err = "" if log else proc.stderr.read()
                raise RuntimeError(f"the server exited with {proc.returncode} before answering:\n{err[-3000:]}")
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
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()
