"""The OpenAI wire format and the ecosystem's extensions, as pydantic models (the HTTP edge only).

Request fields the engine cannot honour are refused with a 400 naming them, never ignored: unknown
fields fail validation (`extra="forbid"`), and known OpenAI fields are accepted only at their neutral
value (n=1, penalties 0, no logprobs...).
"""

from __future__ import annotations

import math
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SCALE = 100.0


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraItem(Strict):
    """llama-server's per-request adapter: by position in /lora-adapters (`id`) or by `name`."""

    id: int | None = Field(default=None, ge=0)
    name: str | None = None
    scale: float = 1.0

    @field_validator("scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v) or abs(v) > MAX_SCALE:
            raise ValueError(f"scale must be a finite number in [-{MAX_SCALE:g}, {MAX_SCALE:g}], got {v}")
        return v

    def model_post_init(self, _) -> None:
        if (self.id is None) == (self.name is None):
            raise ValueError("each lora entry needs exactly one of `id` or `name`")


class LogoSettings(Strict):
    """Routing overrides for one request (logo-edge's own field)."""

    k: int | None = None
    signal: str | None = None
    calibration: str | None = None
    merge: str | None = None
    prefill: str | None = None
    probe_input: str | None = None
    keep: float | None = None
    keep_probe: str | None = None
    keep_score: float | None = None
    keep_drop: float | None = None
    min_score: float | None = None
    fallback: str | None = None
    shortlist: int | None = None
    examples: bool | None = None  # false: LoGo's signal alone, even for adapters with example prompts

    def overrides(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class StreamOptions(Strict):
    include_usage: bool = False


class _Generation(Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # 0 = greedy (the routing record is exact)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # llama-server's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # metadata, as OpenAI
    lora: list[LoraItem] | None = None
    logo: LogoSettings | None = None
    # OpenAI fields accepted only at their neutral value
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict | None = None

    def unsupported(self) -> list[str]:
        """The fields set to something the engine does not do."""
        bad = []
        if self.n != 1:
            bad.append(f"n={self.n} (one choice per request)")
        for f in ("frequency_penalty", "presence_penalty"):
            if getattr(self, f) != 0:
                bad.append(f"{f}={getattr(self, f)}")
        if self.logprobs not in (None, False, 0) or self.top_logprobs:
            bad.append("logprobs")
        if self.logit_bias:
            bad.append("logit_bias")
        return bad

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id...: harmless metadata

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def chat(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Generation):
    prompt: Union[str, list[int], list[str]]
    echo: bool = False
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.echo:
            bad.append("echo")
        if self.suffix:
            bad.append("suffix")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            bad.append("prompt as a list of several strings (one prompt per request)")
        return bad

    def text(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return self.prompt


class LoadLoraRequest(Strict):
    """vLLM's load_lora_adapter body."""

    lora_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM also accepts lora_int_id

    lora_name: str = Field(min_length=1)


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
