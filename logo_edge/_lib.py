"""Bindings only: find the patched libllama, load llama_cpp against it, bind what the patch adds.

`llama_cpp` picks its library when first imported, so this module sets
LLAMA_CPP_LIB_PATH before importing it. Everything else in logo_edge imports
`llama_cpp` through here.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from .errors import NativeLibraryError

_SUFFIX = ".dylib" if sys.platform == "darwin" else ".so"


def _candidate_dirs() -> list[Path]:
    env = os.environ.get("LLAMA_CPP_LIB_PATH")
    if env:
        return [Path(env)]
    from .native import build  # the build module knows the cache layout

    dirs = [build.lib_dir(backend) for backend in ("cpu", "cuda", "metal")]
    if os.environ.get("LOGO_EDGE_RPC"):  # llama.cpp's RPC backend: the build with GGML_RPC=ON first
        dirs.insert(0, build.lib_dir("cpu", build.RPC_FLAGS))
    native_root = build.cache_root() / "native"
    if native_root.is_dir():  # any other build of this version (custom flags) made from these patches for this CPU
        for p in sorted(native_root.glob(f"llama-cpp-python-{build.LLAMA_CPP_PYTHON_VERSION}-*")):
            if p in dirs or p.name.endswith(".tmp") or not (p / f"libllama{_SUFFIX}").exists():
                continue
            why = build.fits_here(p)
            if why is None:
                dirs.append(p)
            else:
                _SKIPPED.append(f"{p} ({why})")
    return dirs


_SKIPPED: list[str] = []  # other builds found and not used, with why (for the error when none is found)


def find_lib_dir() -> Path:
    """Directory of the patched libllama, or NativeLibraryError saying how to build it."""
    dirs = _candidate_dirs()
    for d in dirs:
        if (d / f"libllama{_SUFFIX}").exists():
            if not os.environ.get("LLAMA_CPP_LIB_PATH"):  # a build of ours: never load one that fails its hashes
                from .native.build import verify_hashes

                why = verify_hashes(d)
                if why is not None:
                    raise NativeLibraryError(f"the cached libllama build {d} is not used: {why}. Rebuild it with "
                                             "`logo-edge build` (or `make lib`), which replaces it.")
            return d
    raise NativeLibraryError(
        "the patched libllama was not found (looked in: " + ", ".join(map(str, dirs)) + "). "
        "Build it once with `logo-edge build` (or `python -m logo_edge.native.build`), "
        "or point LLAMA_CPP_LIB_PATH at a directory holding a patched libllama."
        + (" Not used: " + "; ".join(_SKIPPED) + "." if _SKIPPED else "")
    )


LIB_DIR = find_lib_dir()
os.environ["LLAMA_CPP_LIB_PATH"] = str(LIB_DIR)
# llama.cpp's CPU threads (OpenMP) spin after each graph for GOMP_SPINCOUNT rounds (300,000 by default,
# milliseconds): right after the probe they take the cores the routing products need (a 1,000-adapter
# route went from 3 ms to 8-30 ms). 2,000 rounds keep decode speed (the gap between tokens is longer) and
# free the cores. Read once, when libgomp starts; a value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "2000")

import llama_cpp  # noqa: E402  (must follow LLAMA_CPP_LIB_PATH)
from llama_cpp import _internals  # noqa: E402,F401

_llama = llama_cpp.llama_cpp._lib
if not hasattr(_llama, "llama_set_eval_callback"):
    raise NativeLibraryError(
        f"{LIB_DIR / ('libllama' + _SUFFIX)} lacks llama_set_eval_callback: it is not the patched "
        "build. Run `logo-edge build` and unset LLAMA_CPP_LIB_PATH, or point it at the patched build."
    )

EvalCallback = llama_cpp.ggml_backend_sched_eval_callback

# void llama_set_eval_callback(struct llama_context * ctx, ggml_backend_sched_eval_callback cb, void * ud);
llama_set_eval_callback = _llama.llama_set_eval_callback
llama_set_eval_callback.argtypes = [ctypes.c_void_p, EvalCallback, ctypes.c_void_p]
llama_set_eval_callback.restype = None

def _soname(stem: str) -> Path:
    """The file libllama loaded `stem` by (its soname: libggml-cpu.so.0, libggml-cpu.0.dylib); another copy of it under
    another name would be a second library, with its own state, that never computes."""
    return next((p for p in (LIB_DIR / f"{stem}{_SUFFIX}.0", LIB_DIR / f"{stem}.0{_SUFFIX}") if p.exists()),
                LIB_DIR / f"{stem}{_SUFFIX}")


_ggml_base = ctypes.CDLL(str(_soname("libggml-base")))  # the copy libllama uses, not a second one

# void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data, size_t offset, size_t size);
ggml_backend_tensor_get = _ggml_base.ggml_backend_tensor_get
ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
ggml_backend_tensor_get.restype = None

# int64_t ggml_nelements(const struct ggml_tensor * tensor);
ggml_nelements = _ggml_base.ggml_nelements
ggml_nelements.argtypes = [ctypes.c_void_p]
ggml_nelements.restype = ctypes.c_int64

# const char * ggml_get_name(const struct ggml_tensor * tensor);
ggml_get_name = _ggml_base.ggml_get_name
ggml_get_name.argtypes = [ctypes.c_void_p]
ggml_get_name.restype = ctypes.c_void_p

# size_t ggml_tensor_overhead(void);  == sizeof(struct ggml_object) + sizeof(struct ggml_tensor)
ggml_tensor_overhead = _ggml_base.ggml_tensor_overhead
ggml_tensor_overhead.argtypes = []
ggml_tensor_overhead.restype = ctypes.c_size_t

# const char * ggml_op_name(enum ggml_op op);  const char * ggml_type_name(enum ggml_type type);
ggml_op_name = _ggml_base.ggml_op_name
ggml_op_name.argtypes = [ctypes.c_int]
ggml_op_name.restype = ctypes.c_char_p
ggml_type_name = _ggml_base.ggml_type_name
ggml_type_name.argtypes = [ctypes.c_int]
ggml_type_name.restype = ctypes.c_char_p


# int ggml_cpu_lora_fused_nodes(void): one-token LoRA products the CPU backend computed as one node
# (llama-lora-fused-decode.patch), from the libggml-cpu already loaded (RTLD_NOLOAD); None where there is none
# or it lacks the patch (LLAMA_CPP_LIB_PATH elsewhere)
try:
    _ggml_cpu = ctypes.CDLL(str(_soname("libggml-cpu")),
                            mode=getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 0))
except OSError:
    _ggml_cpu = None
_lora_fused_nodes = getattr(_ggml_cpu, "ggml_cpu_lora_fused_nodes", None) if _ggml_cpu is not None else None
if _lora_fused_nodes is not None:
    _lora_fused_nodes.argtypes = []
    _lora_fused_nodes.restype = ctypes.c_int


def lora_fused_nodes() -> int | None:
    """How many one-token LoRA products (res + s B (A x)) this process's CPU backend computed fused, or None
    where the library lacks the patch. GGML_CPU_DISABLE_LORA_FUSION=1 at start turns the fusion off."""
    return None if _lora_fused_nodes is None else int(_lora_fused_nodes()) & 0xFFFFFFFF  # wraps: take deltas mod 2**32


GGML_TYPE_F32 = 0
# enum ggml_op values the probe checks (ggml.h of the pinned tree; tests compare them with ggml_op_name)
GGML_OP_ADD = 2
GGML_OP_MUL = 7
GGML_OP_NORM = 24
GGML_OP_RMS_NORM = 25
GGML_OP_COUNT = 101  # ggml_op_name indexes a table of this many names: never pass it more
GGML_OBJECT_SIZE = 32  # struct ggml_object { size_t offs, size; ggml_object * next; enum type; char pad[4]; }


class GGMLTensor(ctypes.Structure):
    """Mirror of `struct ggml_tensor` (ggml.h of the pinned tree); checked against the library in tests."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


# ---- llama.cpp's RPC backend (a libllama built with GGML_RPC=ON; LOGO_EDGE_RPC=1 selects it at import)

# libllama links libggml by its soname (libggml.so.0); llama-cpp-python also opens libggml.so, which can be a
# second copy with its own backend registry: register devices where libllama looks
_ggml = ctypes.CDLL(str(_soname("libggml")))
_ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
_ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
_ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
_ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
_ggml.ggml_backend_register.restype = None
_RPC_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)  # ggml_backend_reg_t (const char * endpoint)
_rpc_servers: dict[str, int] = {}  # endpoint -> its registry entry, registered once per process


def add_rpc_servers(endpoints) -> None:
    """Register `host:port` rpc-servers as devices, as llama.cpp's `--rpc` does (common/arg.cpp
    add_rpc_devices): the next model loaded with layers offloaded is placed across them. NativeLibraryError
    when this libllama has no RPC backend."""
    reg = _ggml.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise NativeLibraryError(
            f"the libllama in {LIB_DIR} was built without llama.cpp's RPC backend: build it with "
            "`logo-edge build --cmake-flag=-DGGML_RPC=ON` and start the process with LOGO_EDGE_RPC=1 (the CLI's "
            "--rpc sets it), so that build is loaded")
    address = _ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not address:
        raise NativeLibraryError(f"the RPC backend of {LIB_DIR} has no ggml_backend_rpc_add_server")
    add = _RPC_ADD_SERVER(address)
    for endpoint in endpoints:
        if endpoint in _rpc_servers:
            continue
        dev_reg = add(endpoint.encode())
        if not dev_reg:
            raise NativeLibraryError(f"rpc-server {endpoint!r} could not be added (unreachable, or another RPC "
                                     "protocol version)")
        _ggml.ggml_backend_register(dev_reg)
        _rpc_servers[endpoint] = dev_reg
