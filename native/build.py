"""Build the patched libllama once and cache it outside the repo.

The llama.cpp tree is the one vendored in the llama-cpp-python sdist the
bindings come from, so the C API and the bindings always agree. The cache is
keyed by that version, the patch's hash, the backend and the CMake flags:
a second build with the same inputs returns at once.

    python -m logo_edge.native.build [--backend cpu|cuda|metal] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
PATCH = Path(__file__).with_name("llama-eval-callback.patch")
BACKEND_FLAGS = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=ON"],
    "metal": ["-DGGML_METAL=ON"],
}
BASE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_CURL=OFF",
    # the libraries move to the cache after the build: let them find each other there
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=" + ("@loader_path" if sys.platform == "darwin" else "$ORIGIN"),
]


class BuildError(RuntimeError):
    """The native build could not be completed; the message says which step."""


def cache_root() -> Path:
    """Where sdists, sources and built libraries are cached (LOGO_EDGE_CACHE overrides)."""
    env = os.environ.get("LOGO_EDGE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "logo-edge"


def build_key(backend: str, extra_flags: list[str]) -> str:
    """Key of one build: bindings version, patch content, backend and flags."""
    h = hashlib.sha256()
    h.update(LLAMA_CPP_PYTHON_VERSION.encode())
    h.update(PATCH.read_bytes())
    h.update(" ".join(BASE_FLAGS + BACKEND_FLAGS[backend] + extra_flags).encode())
    return f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}-{backend}-{h.hexdigest()[:12]}"


def lib_dir(backend: str = "cpu", extra_flags: list[str] | None = None) -> Path:
    """Directory that holds (or will hold) libllama for these settings."""
    return cache_root() / "native" / build_key(backend, extra_flags or [])


def _log(msg: str) -> None:
    print(f"[logo-edge build] {msg}", file=sys.stderr, flush=True)


def fetch_sdist() -> Path:
    """Download the llama-cpp-python sdist from the package index (cached)."""
    dest = cache_root() / "sdist"
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if (dest / name).exists():
        return dest / name
    dest.mkdir(parents=True, exist_ok=True)
    _log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if not (dest / name).exists():
        raise BuildError(f"could not download {name} from the package index:\n{res.stderr[-2000:]}")
    return dest / name


def check_patch(tree: Path) -> None:
    """Raise BuildError unless the patch applies cleanly to `tree` (dry run)."""
    res = subprocess.run(["patch", "-p1", "--dry-run", "--forward", "-i", str(PATCH)],
                         cwd=tree, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(f"{PATCH.name} does not apply to {tree}:\n{res.stdout}{res.stderr}")


def extract_tree(sdist: Path, into: Path) -> Path:
    """Extract vendor/llama.cpp of the sdist into `into` and return its path."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(into, members=[m for m in members if m.name], filter="data")
    return into


def source_tree() -> Path:
    """The pristine (unpatched) llama.cpp tree of the pinned sdist, extracted once into the cache.

    Its converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) are the reference ours are
    checked against."""
    dest = cache_root() / "src" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    if (dest / "CMakeLists.txt").exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    extract_tree(fetch_sdist(), tmp)
    tmp.rename(dest)
    return dest


def build(backend: str = "cpu", extra_flags: list[str] | None = None, force: bool = False,
          jobs: int | None = None) -> Path:
    """Build the patched libllama for `backend` unless cached; return the library directory."""
    if backend not in BACKEND_FLAGS:
        raise BuildError(f"unknown backend {backend!r}: choose one of {sorted(BACKEND_FLAGS)}")
    extra_flags = extra_flags or []
    out = lib_dir(backend, extra_flags)
    if (out / "libllama.so").exists() or (out / "libllama.dylib").exists():
        if not force:
            _log(f"cached: {out}")
            return out
    t0 = time.time()
    cache_root().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llama-build-", dir=cache_root()))
    try:
        tree = work / "llama.cpp"
        shutil.copytree(source_tree(), tree, symlinks=True)
        check_patch(tree)
        subprocess.run(["patch", "-p1", "--forward", "-s", "-i", str(PATCH)], cwd=tree, check=True)
        bdir = work / "build"
        flags = BASE_FLAGS + BACKEND_FLAGS[backend] + extra_flags
        _log(f"configuring ({backend}): {' '.join(flags)}")
        _run(["cmake", "-S", str(tree), "-B", str(bdir), *flags], "cmake configure")
        jobs = jobs or os.cpu_count() or 2
        _log(f"compiling libllama with {jobs} jobs (about 5 minutes on 2 cores)")
        _run(["cmake", "--build", str(bdir), "--target", "llama", "-j", str(jobs)], "cmake build",
             progress=True)
        libs = [p for p in (bdir / "bin").glob("lib*") if p.suffix in (".so", ".dylib") or ".so." in p.name]
        if not any(p.name.startswith("libllama") for p in libs):
            raise BuildError(f"the build finished but no libllama was found in {bdir / 'bin'}")
        tmp_out = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        for p in libs:
            shutil.copy2(p, tmp_out / p.name, follow_symlinks=True)
        shutil.rmtree(out, ignore_errors=True)
        tmp_out.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"built in {time.time() - t0:.0f} s: {out}")
    return out


def _run(cmd: list[str], what: str, progress: bool = False) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:  # type: ignore[union-attr]
        tail = (tail + [line])[-40:]
        if progress and line.startswith("["):
            print(f"\r[logo-edge build] {line.strip()[:100]:<100}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    if proc.wait() != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{''.join(tail)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="cpu", choices=sorted(BACKEND_FLAGS))
    ap.add_argument("--cmake-flag", action="append", default=[], help="extra -D flag for CMake")
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    ap.add_argument("--print-dir", action="store_true", help="print the library directory and exit")
    args = ap.parse_args(argv)
    if args.print_dir:
        print(lib_dir(args.backend, args.cmake_flag))
        return 0
    try:
        print(build(args.backend, args.cmake_flag, args.force))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
