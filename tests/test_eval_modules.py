"""The every-adapter-routable study's pool variants: attn_q removed, nothing else changed."""

import numpy as np
import pytest

from logo_edge.eval_modules import ATTENTION, strip_modules, variant_pool
from logo_edge.gguf_files import BaseInfo, read_lora

pytestmark = pytest.mark.slow


def test_strip_modules_removes_attn_q_and_keeps_every_other_tensor(tiny, tmp_path):
    info = BaseInfo.read(tiny / "tiny-f32.gguf")
    src = tiny / "gguf" / "qkd_r2.gguf"
    assert not strip_modules(tiny / "gguf" / "v_only.gguf", tmp_path / "none.gguf", info, ATTENTION)
    assert not (tmp_path / "none.gguf").exists()  # nothing left: not written
    assert strip_modules(src, tmp_path / "kd.gguf", info)
    before, after = read_lora(src, info), read_lora(tmp_path / "kd.gguf", info)
    assert {k for k in before.pairs if ".attn_q." not in k} == set(after.pairs) and after.pairs
    assert not any(".attn_q." in k for k in after.pairs)
    for k, (a, b) in after.pairs.items():
        np.testing.assert_array_equal(a, before.pairs[k][0])
        np.testing.assert_array_equal(b, before.pairs[k][1])
        assert after.scale(k) == before.scale(k)


def test_variant_pool_strips_every_other_adapter_and_copies_the_rest(tiny, tmp_path):
    info = BaseInfo.read(tiny / "tiny-f32.gguf")
    stripped = variant_pool(tiny / "gguf", tmp_path / "odd", "odd", info)
    files = sorted((tiny / "gguf").glob("*.gguf"))
    assert stripped == [p.stem for i, p in enumerate(files) if i % 2 == 1 and
                        any(".attn_q." not in s for s in read_lora(p, info, only=[]).stems)]
    for i, p in enumerate(files):
        got = read_lora(tmp_path / "odd" / p.name, info, only=[]).stems
        want = [s for s in read_lora(p, info, only=[]).stems if p.stem not in stripped or ".attn_q." not in s]
        assert got == want, p.name
