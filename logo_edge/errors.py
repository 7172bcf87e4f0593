"""Typed exceptions: each names the file or value at fault and says what to change."""


class LogoEdgeError(Exception):
    """Base of every error logo-edge raises on purpose."""


class NativeLibraryError(LogoEdgeError):
    """The patched libllama is missing or is not the patched build."""


class ModelLoadError(LogoEdgeError):
    """The base model file could not be loaded."""


class AdapterError(LogoEdgeError):
    """An adapter file is missing, corrupt, or does not fit the base model."""


class AdapterFileChangedError(AdapterError):
    """A pooled adapter's file was removed, renamed or rewritten after the pool read it: its weights would no
    longer be the ones it was validated and routed with (HTTP 409)."""

    status = 409
    code = "adapter_file_changed"


class ConversionError(LogoEdgeError):
    """A PEFT adapter or HF model could not be converted to GGUF."""


class ContextOverflowError(LogoEdgeError):
    """The prompt (plus the tokens to generate) does not fit in the context."""


class DecodeError(LogoEdgeError):
    """llama_decode returned a non-zero status."""

    def __init__(self, code: int, what: str = "decode"):
        super().__init__(f"llama_decode failed during {what} with code {code}")
        self.code = code


class NativeCallError(LogoEdgeError):
    """A llama.cpp call other than llama_decode reported failure; `call` and `code` say which and how."""

    def __init__(self, call: str, code: int, meaning: str):
        super().__init__(f"{call} returned {code}: {meaning}")
        self.call = call
        self.code = code


class ProbeError(LogoEdgeError, RuntimeError):
    """The probe could not read h from the model's graph: a tensor is missing, not f32, or not built the
    way the probe reads it (another norm graph)."""


class RoutingError(LogoEdgeError):
    """Routing settings are invalid (k < 1, unknown signal, empty pool...)."""


class EngineBusyError(LogoEdgeError):
    """The engine is in the middle of another generation; it runs one at a time."""


class RequestError(LogoEdgeError, ValueError):
    """A prompt, message list or sampling argument the engine cannot take; the message names which."""
