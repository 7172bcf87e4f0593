"""The build cache: a cached libllama whose files fail their recorded SHA-256 is never loaded, and
`logo-edge build` rebuilds it saying why."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from logo_edge.native import build


@pytest.fixture()
def cache_copy(tmp_path):
    """A copy of the real cache's library directory under a fresh cache root (same key)."""
    import logo_edge._lib  # noqa: F401  (the real library is found and verified first)

    real = Path(os.environ["LLAMA_CPP_LIB_PATH"])
    root = tmp_path / "cache"
    dest = root / "native" / real.name
    shutil.copytree(real, dest)
    return root, dest


def _import_in(root: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    env["LOGO_EDGE_CACHE"] = str(root)
    return subprocess.run([sys.executable, "-c", "import logo_edge._lib"], env=env, capture_output=True, text=True,
                          timeout=120)


def test_an_intact_build_verifies_and_loads(cache_copy):
    root, dest = cache_copy
    assert build.verify_hashes(dest) is None
    assert _import_in(root).returncode == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "no sums", "extra file"])
def test_a_damaged_build_is_never_loaded(cache_copy, damage):
    root, dest = cache_copy
    lib = next(p for p in dest.iterdir() if p.name.startswith("libllama"))
    if damage == "truncate":
        lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(lib.read_bytes())
        data[len(data) // 3] ^= 0xFF
        lib.write_bytes(bytes(data))
    elif damage == "no sums":
        (dest / build.HASHES).unlink()
    else:
        (dest / "libevil.so").write_bytes(b"\x7fELF")
    why = build.verify_hashes(dest)
    assert why is not None
    r = _import_in(root)
    assert r.returncode != 0
    assert "is not used" in r.stderr and "logo-edge build" in r.stderr, r.stderr[-2000:]


def test_build_rebuilds_a_damaged_cache_saying_why(cache_copy, monkeypatch, capsys):
    root, dest = cache_copy
    monkeypatch.setenv("LOGO_EDGE_CACHE", str(root))
    lib = next(p for p in dest.iterdir() if p.name.startswith("libllama"))
    lib.write_bytes(b"truncated")

    class Stop(Exception):
        pass

    def no_source():  # stop where the rebuild would start compiling (minutes)
        raise Stop

    monkeypatch.setattr(build, "source_tree", no_source)
    with pytest.raises(Stop):
        build.build("cpu")
    assert "is not used" in capsys.readouterr().err


@pytest.mark.parametrize("record", ["none", "other patches", "other cpu", "this machine"])
def test_another_keys_build_is_loaded_only_if_made_from_these_patches_for_this_cpu(cache_copy, record):
    """With no build under this machine's key, another key's build of the same version (custom flags) may be
    used, but only one whose BUILD.json says it was made from this package's patches and, if tuned, on a CPU
    with these features: a shared cache's build from another CPU could run instructions this one lacks."""
    import json

    root, dest = cache_copy
    other = dest.with_name(dest.name.rsplit("-", 1)[0] + "-0123456789ab")  # a key this machine never computes
    dest.rename(other)
    info = {"patches": build.patches_digest(), "cpu": build.cpu_features(), "backend": "cpu", "flags": []}
    if record == "other patches":
        info["patches"] = "0" * 16
    elif record == "other cpu":
        info["cpu"] = "fpu sse2"
    (other / build.BUILD_INFO).unlink(missing_ok=True)  # (a build of this version records one)
    if record != "none":
        (other / build.BUILD_INFO).write_text(json.dumps(info))
    r = _import_in(root)
    if record == "this machine":
        assert r.returncode == 0, r.stderr[-2000:]
    else:
        assert r.returncode != 0 and "was not found" in r.stderr, r.stderr[-2000:]
        assert f"Not used: {other} (" in r.stderr, r.stderr[-2000:]  # the skipped build, and why


def test_the_cli_builds_and_manages_pools_before_the_library_exists(tmp_path):
    """On a fresh install (no libllama yet) `logo-edge build` is what makes it: the command line must parse and
    run it; commands that need the engine say how to get the library."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    env["LOGO_EDGE_CACHE"] = str(tmp_path / "empty")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "logo_edge.cli", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    for args in (["build", "--help"], ["--help"], ["pool", "--help"]):
        r = cli(*args)
        assert r.returncode == 0 and "usage: logo-edge" in r.stdout, (args, r.stderr[-2000:])
    r = cli("route", "hello")
    assert r.returncode == 2 and "libllama was not found" in r.stderr and "logo-edge build" in r.stderr, r.stderr


def test_a_second_build_waits_for_the_first_and_takes_its_result(cache_copy, tmp_path):
    """Two processes building the same library into one cache (two `make test` runs, a server and a test): the
    second waits for the first, saying so, and takes its build instead of compiling again into the same place."""
    import time

    root, dest = cache_copy
    staged, go = tmp_path / "staged", tmp_path / "go"
    shutil.move(dest, staged)  # the cache has no build yet
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    env["LOGO_EDGE_CACHE"] = str(root)
    first = subprocess.Popen([sys.executable, "-c", f"""
import pathlib, shutil, time
from logo_edge.native import build
with build.cache_lock({dest.name!r}):  # what a build holds while it compiles
    print("building", flush=True)
    deadline = time.monotonic() + 120
    while not pathlib.Path({str(go)!r}).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.copytree({str(staged)!r}, {str(dest)!r})
"""], env=env, stdout=subprocess.PIPE, text=True)
    second = None
    try:
        assert first.stdout.readline() == "building\n"
        second = subprocess.Popen([sys.executable, "-c", """
from logo_edge.native import build
def compile_it():
    raise SystemExit("the second process started a build of its own")
build.source_tree = compile_it
print(build.build("cpu"))
"""], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        said = []
        deadline = time.monotonic() + 120
        while not any("waiting for another process" in line for line in said) and time.monotonic() < deadline:
            line = second.stderr.readline()  # it blocks on the lock, saying so; then the first may finish
            if not line:
                break
            said.append(line)
        go.touch()
        out, err = second.communicate(timeout=120)
    finally:
        go.touch()
        first.wait(timeout=60)
        if second is not None and second.poll() is None:
            second.kill()
    assert second.returncode == 0, "".join(said) + err[-2000:]
    assert any("waiting for another process" in line for line in said), said
    assert Path(out.strip()) == dest and build.verify_hashes(dest) is None
