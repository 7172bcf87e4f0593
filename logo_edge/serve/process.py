"""Servers as child processes on free loopback ports, stopped by whoever started them (bench, tests)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def child_server(name: str, cmd: list[str], port: int, env: dict, logdir: Path):
    """Run a server command (its output to logdir/NAME.log); yield (URL, process, log); stop it (SIGINT, then kill)."""
    log = logdir / f"{name}.log"
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.close()


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the bench dies, even by SIGKILL (no orphan servers)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


