import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny():
    """Directory with hf/ (tiny random llama), tiny-f32.gguf, peft/<name>/ and gguf/<name>.gguf."""
    import tiny as tiny_mod

    return tiny_mod.build(progress=lambda m: print(f"[fixture] {m}", file=sys.stderr))


@pytest.fixture(scope="session")
def tiny_engine(tiny):
    from logo_edge.engine import Engine

    with pytest.warns(UserWarning, match="od_only"):
        eng = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=512, n_batch=64, kv_type="f32", flash_attn=False)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def hf_tiny(tiny):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM.from_pretrained(tiny / "hf", torch_dtype=torch.float32).eval()
