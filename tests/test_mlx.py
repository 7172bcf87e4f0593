"""mlx-lm LoRA dirs -> GGUF: the update against the file's own scale * lora_b.T @ lora_a.T, and against llama.cpp.

The tests write mlx_lm.lora's output themselves: adapters.safetensors with model.layers.N.<module>.lora_a
(d_in, r) / lora_b (r, d_out), and adapter_config.json as mlx-lm's save_config writes it (sorted keys).
"""

import json

import numpy as np
import pytest
from gguf import GGUFReader
from safetensors.numpy import save_file

from logo_edge.convert.lora import convert_lora
from logo_edge.convert.mlx import convert_mlx, is_mlx_adapter
from logo_edge.errors import ConversionError
from logo_edge.gguf_files import tensor_array

HIDDEN, INTER, N_HEAD, N_KV, N_LAYER = 64, 128, 4, 2, 4
HEAD_DIM = HIDDEN // N_HEAD
ALL7 = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}
PHI3 = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}
# family -> (HF architecture, module -> GGUF module); the base is a config.json alone (BaseSpec reads no weights)
FAMILIES = {"llama": ("LlamaForCausalLM", ALL7), "qwen2": ("Qwen2ForCausalLM", ALL7),
            "phi3": ("Phi3ForCausalLM", PHI3)}


def module_shape(module: str) -> tuple[int, int]:
    """(d_in, d_out) of an HF module of the tiny config (hidden 64, 4 heads, 2 KV heads, intermediate 128)."""
    kv = N_KV * HEAD_DIM
    return {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, kv), "self_attn.v_proj": (HIDDEN, kv),
            "self_attn.o_proj": (HIDDEN, HIDDEN), "self_attn.qkv_proj": (HIDDEN, HIDDEN + 2 * kv),
            "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER), "mlp.gate_up_proj": (HIDDEN, 2 * INTER),
            "mlp.down_proj": (INTER, HIDDEN)}[module]


def hf_base(tmp_path, hf_arch="LlamaForCausalLM"):
    d = tmp_path / f"base-{hf_arch}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(
        architectures=[hf_arch], hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV, num_hidden_layers=N_LAYER)))
    return d


def random_tensors(modules, layers, rank, seed=0, ranks=None):
    """lora_a (d_in, r) and lora_b (r, d_out) for each module of each layer, in mlx-lm's names."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in layers:
        for mod in modules:
            d_in, d_out = module_shape(mod)
            r = (ranks or {}).get(mod, rank)
            out[f"model.layers.{layer}.{mod}.lora_a"] = rng.normal(0, 0.15, (d_in, r)).astype(np.float32)
            out[f"model.layers.{layer}.{mod}.lora_b"] = rng.normal(0, 0.15, (r, d_out)).astype(np.float32)
    return out


def write_mlx(d, tensors, rank=8, scale=20.0, num_layers=N_LAYER, keys=None, **cfg_extra):
    """An mlx_lm.lora output dir: adapters.safetensors (metadata format=mlx) + adapter_config.json."""
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "adapters.safetensors"), metadata={"format": "mlx"})
    lp = {"rank": rank, "dropout": 0.0, "scale": scale, **({"keys": keys} if keys is not None else {})}
    cfg = {"adapter_path": str(d), "batch_size": 4, "data": "data", "fine_tune_type": "lora", "iters": 10,
           "learning_rate": 1e-5, "lora_parameters": lp, "model": "tiny", "num_layers": num_layers, "seed": 0,
           **cfg_extra}
    (d / "adapter_config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=4))
    return d


def read_gguf(path):
    r = GGUFReader(path)
    meta = {k: r.fields[k].contents() for k in r.fields if not k.startswith("GGUF.")}
    t = {x.name: tensor_array(x) for x in r.tensors}
    stems = sorted({n.rsplit(".", 1)[0] for n in t})
    return meta, {s: (t[s + ".lora_a"], t[s + ".lora_b"]) for s in stems}


def gguf_rows(n_rows: int, n_head: int) -> np.ndarray:
    """For each HF q/k row, its row in llama's GGUF: per head, HF's halves [x_0..x_{d/2-1} | y_0..] become
    interleaved pairs (x_i, y_i) at 2i, 2i+1 (written out index by index, not as convert_hf_to_gguf's reshape)."""
    hd = n_rows // n_head
    out = np.empty(n_rows, int)
    for row in range(n_rows):
        head, j = divmod(row, hd)
        half, i = divmod(j, hd // 2)
        out[row] = head * hd + 2 * i + half
    return out


def expected_update(arch, module, a, b, scale):
    """scale * lora_b.T @ lora_a.T (d_out, d_in), rows in the GGUF base weight's order."""
    dw = scale * b.T.astype(np.float64) @ a.T.astype(np.float64)
    if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
        placed = np.empty_like(dw)
        placed[gguf_rows(dw.shape[0], N_HEAD if module == "self_attn.q_proj" else N_KV)] = dw
        dw = placed
    return dw


def check_updates(out, tensors, arch, modules, scale):
    meta, pairs = read_gguf(out)
    alpha = meta["adapter.lora.alpha"]
    want = {}
    for key in tensors:
        if key.endswith(".lora_a"):
            _, _, layer, rest = key.split(".", 3)
            mod = rest.rsplit(".", 1)[0]
            want[f"blk.{layer}.{modules[mod]}.weight"] = expected_update(
                arch, mod, tensors[key], tensors[key[:-1] + "b"], scale)
    assert sorted(pairs) == sorted(want)
    for stem, (a, b) in pairs.items():
        c = alpha / a.shape[0]  # what llama.cpp applies
        np.testing.assert_allclose(c * b.astype(np.float64) @ a, want[stem], rtol=1e-6, atol=1e-7, err_msg=stem)
    return meta


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_update_is_scale_b_a_from_the_file(tmp_path, family):
    hf_arch, modules = FAMILIES[family]
    tensors = random_tensors(modules, range(N_LAYER), rank=8, seed=1)
    d = write_mlx(tmp_path / "adapters", tensors, rank=8, scale=1.7)
    assert is_mlx_adapter(d)
    out = convert_lora(d, hf_base(tmp_path, hf_arch), tmp_path / "o.gguf")  # the CLI's path: PEFT or mlx
    meta = check_updates(out, tensors, family, modules, 1.7)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == family
    assert meta["adapter.lora.alpha"] == pytest.approx(1.7 * 8)
    assert meta["logo_edge.origin"] == f"mlx:{d.resolve()}"
    assert meta["general.name"] == "adapters"


def test_ranks_differing_from_the_config_are_folded_into_b(tmp_path):
    tensors = random_tensors(["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"], range(N_LAYER), rank=8,
                             seed=2, ranks={"self_attn.v_proj": 4, "mlp.down_proj": 16})
    d = write_mlx(tmp_path / "a", tensors, rank=8, scale=0.3, alpha=16)  # an old config's alpha: read by nothing
    meta = check_updates(convert_mlx(d, hf_base(tmp_path), tmp_path / "o.gguf"), tensors, "llama", ALL7, 0.3)
    assert meta["adapter.lora.alpha"] == pytest.approx(0.3 * 8)


@pytest.mark.parametrize(("num_layers", "adapted"), [(2, [2, 3]), (1, [3]), (-1, [0, 1, 2, 3]), (4, [0, 1, 2, 3])])
def test_num_layers_adapts_the_last_blocks(tmp_path, num_layers, adapted):
    tensors = random_tensors(["self_attn.q_proj", "self_attn.v_proj"], adapted, rank=4, seed=3)
    d = write_mlx(tmp_path / "a", tensors, rank=4, num_layers=num_layers, keys=["self_attn.q_proj", "self_attn.v_proj"])
    _, pairs = read_gguf(convert_mlx(d, hf_base(tmp_path), tmp_path / "o.gguf"))
    assert sorted({int(s.split(".")[1]) for s in pairs}) == adapted


@pytest.mark.parametrize(("num_layers", "layers", "match"), [
    (2, [1, 2, 3], r"num_layers=2 .* blocks 2\.\.3 of 4 are adapted, but layer 1 is adapted"),
    (3, [2, 3], r"num_layers=3 .* but layers \[1\] have no LoRA tensors"),
    (6, range(4), r"num_layers=6 but the base model has only 4 blocks"),
    (2, [3, 9], r"layer 9 does not exist in the base model"),
])
def test_num_layers_inconsistent_with_the_tensors(tmp_path, num_layers, layers, match):
    d = write_mlx(tmp_path / "a", random_tensors(["self_attn.q_proj"], layers, 4), rank=4, num_layers=num_layers)
    with pytest.raises(ConversionError, match=match):
        convert_mlx(d, hf_base(tmp_path), tmp_path / "o.gguf")


def _adapter(tmp_path, **kw):
    return write_mlx(tmp_path / "a", random_tensors(["self_attn.q_proj", "self_attn.v_proj"], range(N_LAYER), 8), **kw)


def test_refuses_dora_and_full_fine_tuning(tmp_path):
    base = hf_base(tmp_path)
    tensors = random_tensors(["self_attn.q_proj"], range(N_LAYER), 8)
    dora = {**tensors, **{f"model.layers.{i}.self_attn.q_proj.m": np.ones(HIDDEN, np.float32) for i in range(4)}}
    d = write_mlx(tmp_path / "dora", dora, fine_tune_type="dora")
    assert is_mlx_adapter(d)
    with pytest.raises(ConversionError, match=r"adapter_config.json: fine_tune_type is 'dora'.*DoRA"):
        convert_lora(d, base, tmp_path / "o.gguf")
    d = write_mlx(tmp_path / "dora-old", dora, use_dora=True)  # configs before fine_tune_type (mlx-lm < 0.19)
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["fine_tune_type"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="DoRA"):
        convert_mlx(d, base, tmp_path / "o.gguf")
    d = write_mlx(tmp_path / "dora-tensors", dora)  # the config says lora, the file holds magnitudes
    with pytest.raises(ConversionError, match=r"'model.layers.0.self_attn.q_proj.m' is a DoRA magnitude"):
        convert_mlx(d, base, tmp_path / "o.gguf")
    full = {"model.layers.3.self_attn.q_proj.weight": np.zeros((HIDDEN, HIDDEN), np.float32)}
    d = write_mlx(tmp_path / "full", full, fine_tune_type="full", num_layers=1)
    with pytest.raises(ConversionError, match="fine_tune_type is 'full'"):
        convert_mlx(d, base, tmp_path / "o.gguf")
    d = write_mlx(tmp_path / "full-as-lora", full, num_layers=1)
    with pytest.raises(ConversionError, match=r"q_proj.weight' is a full weight"):
        convert_mlx(d, base, tmp_path / "o.gguf")


def test_refuses_missing_or_broken_files(tmp_path):
    base = hf_base(tmp_path)
    d = _adapter(tmp_path)
    (d / "adapters.safetensors").unlink()
    assert is_mlx_adapter(d)  # by its config: convert-lora reports mlx-lm's file, not PEFT's
    with pytest.raises(ConversionError, match=r"a/adapters.safetensors: adapter weights not found"):
        convert_lora(d, base, tmp_path / "o.gguf")
    d = _adapter(tmp_path)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConversionError, match=r"adapter_config.json: not valid JSON"):
        convert_lora(d, base, tmp_path / "o.gguf")
    (d / "adapter_config.json").unlink()
    with pytest.raises(ConversionError, match=r"adapter_config.json: not found; an mlx-lm adapter dir"):
        convert_lora(d, base, tmp_path / "o.gguf")
    assert not is_mlx_adapter(tmp_path / "nowhere")


@pytest.mark.parametrize(("cfg", "match"), [
    (dict(scale=0.0), r"scale is 0.0; it must be a finite, non-zero number"),
    (dict(scale=float("nan")), r"scale is nan"),
    (dict(scale="20"), r"has no numeric scale"),
    (dict(num_layers="all"), r"num_layers is 'all'"),
    (dict(rank=0), r"rank is 0"),
    (dict(keys=["self_attn.q_proj"]), r"adapts 'self_attn.v_proj', which lora_parameters.keys \['self_attn.q_proj'\]"),
    (dict(fine_tune_type="lokr"), r"fine_tune_type 'lokr' is not one of"),
])
def test_refuses_bad_config_values(tmp_path, cfg, match):
    d = _adapter(tmp_path, **cfg)
    with pytest.raises(ConversionError, match=match):
        convert_mlx(d, hf_base(tmp_path), tmp_path / "o.gguf")


def _edited(tmp_path, edit):
    return write_mlx(tmp_path / "a", edit(random_tensors(["self_attn.q_proj", "self_attn.v_proj"], range(N_LAYER), 8)))


@pytest.mark.parametrize(("edit", "match"), [
    # a module the llama family lacks (phi3's fused qkv_proj), an MoE switch layer, lm_head
    (lambda w: {k.replace("self_attn.q_proj", "self_attn.qkv_proj"): v for k, v in w.items()},
     r"LoRA on module 'self_attn.qkv_proj', which the llama family lacks"),
    (lambda w: {**w, "model.layers.3.mlp.switch_mlp.gate_proj.lora_a": np.zeros((4, 8, HIDDEN), np.float32)},
     r"switch_mlp.gate_proj.lora_a' is an MoE expert"),
    (lambda w: {**w, "lm_head.lora_a": np.zeros((HIDDEN, 8), np.float32)}, r"'lm_head.lora_a' is lm_head"),
    # an adapter for a wider model, mismatched ranks, a missing half, a diverged run
    (lambda w: {k: np.zeros((128, 8), np.float32) if k.endswith("lora_a") else v for k, v in w.items()},
     r"layer 0 self_attn.q_proj: lora_a \(128, 8\) and lora_b \(8, 64\) do not fit the base weight \(in=64, out=64\)"),
    (lambda w: {**w, "model.layers.1.self_attn.v_proj.lora_b": np.zeros((4, 32), np.float32)},
     r"layer 1 self_attn.v_proj: rank mismatch: lora_a \(64, 8\) has rank 8, lora_b \(4, 32\) has rank 4"),
    (lambda w: {k: v for k, v in w.items() if k != "model.layers.2.self_attn.q_proj.lora_b"},
     r"layer 2 self_attn.q_proj has only lora_a"),
    (lambda w: {**w, "model.layers.2.self_attn.v_proj.lora_b": np.full((8, 32), np.nan, np.float32)},
     r"layer 2 self_attn.v_proj: lora_b holds 256 non-finite values"),
])
def test_refuses_what_a_gguf_lora_cannot_hold(tmp_path, edit, match):
    d = _edited(tmp_path, edit)
    with pytest.raises(ConversionError, match=match):
        convert_lora(d, hf_base(tmp_path), tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.slow
def test_llama_cpp_logits_equal_hf_with_the_update_added_by_hand(tiny, tmp_path):
    """The converted adapter in llama.cpp against transformers with scale * lora_b.T @ lora_a.T added to each
    adapted weight: q/k (RoPE-permuted in GGUF), every other module, only the last num_layers blocks."""
    import torch
    from transformers import LlamaForCausalLM

    from logo_edge.llm import Context, ContextConfig, Model

    scale, modules = 2.5, list(ALL7)
    tensors = random_tensors(modules, range(1, N_LAYER), rank=4, seed=7)
    d = write_mlx(tmp_path / "adapters", tensors, rank=4, scale=scale, num_layers=N_LAYER - 1, keys=modules)
    out = convert_lora(d, tiny / "tiny-f32.gguf", tmp_path / "mlx.gguf")

    hf = LlamaForCausalLM.from_pretrained(tiny / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_a"):
                layer, mod = int(key.split(".")[2]), key.split(".", 3)[3].rsplit(".", 1)[0]
                weight = hf.model.layers[layer].get_submodule(mod).weight  # (d_out, d_in)
                weight += torch.from_numpy(scale * tensors[key[:-1] + "b"].T @ a.T)

    model = Model(tiny / "tiny-f32.gguf", extra_bufts=False)
    ctx = Context(model, ContextConfig(n_ctx=128, n_batch=64, kv_type="f32", flash_attn=False))
    lora = model.load_lora(out)
    try:
        for prompt in ("The quick brown fox jumps over the lazy dog.", "SELECT name FROM users WHERE age > 30;"):
            tokens = model.tokenize(prompt)
            ctx.cache_truncate(0)
            ctx.set_adapters([], [])
            ctx.decode(tokens, 0)
            base = ctx.logits()
            ctx.cache_truncate(0)
            ctx.set_adapters([lora], [1.0])
            ctx.decode(tokens, 0)
            got = ctx.logits()
            with torch.no_grad():
                ref = hf(torch.tensor([tokens])).logits[0, -1].double().numpy()
            tol = 1e-4 * np.abs(ref).max()
            assert np.abs(got - base).max() > 1000 * tol  # the adapter matters: the comparison has power
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=tol, err_msg=prompt)
    finally:
        lora.free()
        ctx.close()
        model.close()
