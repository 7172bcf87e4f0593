"""`logo-edge chat --server URL`: the chat loop against a running server, through the official openai client."""

from __future__ import annotations

import os
from typing import Callable, Iterator


def remote_chat(url: str, api_key: str | None, model: str | None,
                extra_body: dict | None = None) -> Callable[..., Iterator[dict]]:
    """send(messages, **sampling) -> chunk dicts (the routing record on the last), as the engine's own stream;
    `extra_body`: the server's own fields sent with every request (`lora`: fixed adapters, [] for the base)."""
    try:
        import openai
    except ImportError as e:
        raise SystemExit("error: chatting with a server needs the openai client: pip install 'logo-edge[serve]'") \
            from e
    base = url.rstrip("/")
    client = openai.OpenAI(base_url=base if base.endswith("/v1") else base + "/v1",
                           api_key=api_key or os.environ.get("LOGO_EDGE_API_KEY") or "none", max_retries=0)
    name = model or client.models.list().data[0].id  # the base model: routed

    def send(messages: list[dict], **sampling) -> Iterator[dict]:
        try:
            for chunk in client.chat.completions.create(model=name, messages=messages, stream=True,
                                                        extra_body=extra_body or None, **sampling):
                yield chunk.model_dump()  # extra fields (routing) included
        except openai.APIStatusError as e:
            from ..errors import LogoEdgeError

            raise LogoEdgeError(f"the server answered {e.status_code}: {e.message}") from e

    return send
