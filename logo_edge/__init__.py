"""logo-edge: instance-level LoRA routing (LoGo) on llama.cpp.

    from logo_edge import Engine, RouteConfig

The names load on first use: importing the package does not load the native library, so
`python -m logo_edge.native.build` can build it before it exists.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Engine": "engine",
    "RouteConfig": "engine",
    "SamplingConfig": "engine",
    "AdapterPool": "pool",
    "shipped_pool": "defaults",
    "default_model_path": "defaults",
    "RoutingRecord": "record",
    "LogoEdgeError": "errors",
    "AdapterError": "errors",
    "ModelLoadError": "errors",
    "RoutingError": "errors",
    "EngineBusyError": "errors",
    "NativeLibraryError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'logo_edge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
