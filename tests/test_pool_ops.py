"""Pool directories (logo_edge/pool_ops.py) and `logo-edge pool`: add, remove, rename, list, verify.

Every check is against a fact made here, not read back through the function under test: the bytes of
the source file, the PEFT config's r and target modules, tensors written with write_lora, the update
scale * B @ A computed from the PEFT / mlx-lm safetensors, and the directory's bytes before and after a
refused operation (a refusal must leave the pool exactly as it was)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from logo_edge import cli, pool_ops
from logo_edge.convert.lora import convert_lora
from logo_edge.errors import AdapterError
from logo_edge.gguf_files import BaseInfo, read_lora, write_lora

PEFT_TO_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
BAD_NAMES = ["../x", "a b", "x.gguf", "a" * 101, "-x", ".x", "x/y"]


def snapshot(d):
    """Every file of a directory (hidden ones too) -> its bytes: what "the pool is unchanged" compares."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


def manifest(d):
    return json.loads((d / "manifest.json").read_text())


@pytest.fixture(scope="module")
def base(tiny):
    return tiny / "tiny-f32.gguf"


@pytest.fixture(scope="module")
def info(base):
    return BaseInfo.read(base)


@pytest.fixture()
def pool(tmp_path, tiny, base):
    """A pool holding qv_r8 (added from the fixture's file) and its manifest."""
    d = tmp_path / "pool"
    pool_ops.add_file(d, tiny / "gguf" / "qv_r8.gguf", base=base)
    return d


def mixed_rank(path, seed=0):
    """An adapter with rank 2 on attn_q and rank 8 on attn_v in every block (largest rank: 8)."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for b in range(4):
        pairs[f"blk.{b}.attn_q.weight"] = (rng.normal(0, 0.1, (2, 64)), rng.normal(0, 0.1, (64, 2)))
        pairs[f"blk.{b}.attn_v.weight"] = (rng.normal(0, 0.1, (8, 64)), rng.normal(0, 0.1, (32, 8)))
    return write_lora(path, "llama", 4.0, pairs, name="mixed")


def expected_row(tiny, name):
    """(rank, modules, blocks, probeable) of a fixture adapter from its PEFT config alone."""
    cfg = json.loads((tiny / "peft" / name / "adapter_config.json").read_text())
    n_layer = json.loads((tiny / "hf" / "config.json").read_text())["num_hidden_layers"]
    rank = max([cfg["r"], *cfg["rank_pattern"].values()])
    modules = sorted(PEFT_TO_GGUF[m] for m in cfg["target_modules"])
    # the default probe scores q_proj, or without it any of k, v (same input), or of gate, up (the FFN's input)
    read = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    return rank, modules, n_layer, bool(read & set(cfg["target_modules"]))


# ---- names and places (no model needed)


@pytest.mark.parametrize("bad", [*BAD_NAMES, "", "x\n"])
def test_check_name_refuses(bad):
    with pytest.raises(AdapterError, match="is not allowed"):
        pool_ops.check_name(bad)


@pytest.mark.parametrize("good", ["a", "a" * 100, "Qwen2.5-math_v1+fix", "7b"])
def test_check_name_accepts(good):
    assert pool_ops.check_name(good) == good


def test_user_pool_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LOGO_EDGE_POOL", "~/mine")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert pool_ops.user_pool_dir() == tmp_path / "home" / "mine"
    monkeypatch.delenv("LOGO_EDGE_POOL")
    assert pool_ops.user_pool_dir() == tmp_path / "xdg" / "logo-edge" / "pool"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert pool_ops.user_pool_dir() == tmp_path / "home" / ".local" / "share" / "logo-edge" / "pool"


@pytest.mark.parametrize("text", ["{not json", "[]", '{"adapters": []}', "\xff\xfe"])
def test_broken_manifest_is_an_error_and_kept(tmp_path, text):
    (tmp_path / "manifest.json").write_bytes(text.encode("latin-1"))
    before = snapshot(tmp_path)
    with pytest.raises(AdapterError, match="manifest"):
        pool_ops.read_manifest(tmp_path)
    assert snapshot(tmp_path) == before


def test_missing_manifest_is_empty(tmp_path):
    assert pool_ops.read_manifest(tmp_path) == {"adapters": {}}


# ---- add_file


@pytest.mark.slow
def test_add_file_copies_bytes_and_records_origin(tiny, base, tmp_path):
    src = tiny / "gguf" / "qv_r8.gguf"
    d = tmp_path / "new" / "pool"  # created on demand
    e = pool_ops.add_file(d, src, base=base)
    assert (d / "qv_r8.gguf").read_bytes() == src.read_bytes()
    assert manifest(d) == {"adapters": {"qv_r8": {"origin": f"file:{src.resolve()}"}}}
    assert (e.name, e.path, e.rank, e.modules, e.blocks) == ("qv_r8", d / "qv_r8.gguf", 8, ["attn_q", "attn_v"], 4)
    assert e.size == src.stat().st_size and e.origin == f"file:{src.resolve()}"
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "qv_r8.gguf"]  # no temporary left
    assert src.exists()  # a copy, not a move

    pool_ops.add_file(d, src, name="mine", origin="hf://org/x@abc", base=base)
    assert (d / "mine.gguf").read_bytes() == src.read_bytes()
    assert manifest(d)["adapters"]["mine"] == {"origin": "hf://org/x@abc"}


@pytest.mark.slow
def test_add_file_default_name(tiny, base, info, tmp_path):
    d = tmp_path / "pool"
    renamed = tmp_path / "some-file.gguf"
    renamed.write_bytes((tiny / "gguf" / "all7_r4.gguf").read_bytes())
    assert pool_ops.add_file(d, renamed, base=base).name == "all7_r4"  # general.name, not the file's stem
    pairs = read_lora(tiny / "gguf" / "qkd_r2.gguf", info).pairs
    write_lora(tmp_path / "no-name.gguf", "llama", 2.0, pairs)  # no general.name: the stem
    assert pool_ops.add_file(d, tmp_path / "no-name.gguf", base=base).name == "no-name"
    write_lora(tmp_path / "spaced.gguf", "llama", 2.0, pairs, name="My adapter v2")
    assert pool_ops.add_file(d, tmp_path / "spaced.gguf", base=base).name == "My-adapter-v2"
    assert sorted(p.name for p in d.glob("*.gguf")) == ["My-adapter-v2.gguf", "all7_r4.gguf", "no-name.gguf"]


@pytest.mark.slow
def test_add_file_name_taken_then_replace(tiny, base, pool):
    other = tiny / "gguf" / "all7_r4.gguf"
    before = snapshot(pool)
    with pytest.raises(AdapterError, match="already has an adapter named 'qv_r8'"):
        pool_ops.add_file(pool, other, name="qv_r8", base=base)
    assert snapshot(pool) == before
    with pytest.raises(AdapterError, match="'qv_r8'"):  # the default name, taken the same way
        pool_ops.add_file(pool, tiny / "gguf" / "qv_r8.gguf", base=base)
    assert snapshot(pool) == before

    e = pool_ops.add_file(pool, other, name="qv_r8", base=base, replace=True)
    assert (pool / "qv_r8.gguf").read_bytes() == other.read_bytes()
    assert manifest(pool) == {"adapters": {"qv_r8": {"origin": f"file:{other.resolve()}"}}}
    assert (e.rank, e.modules) == (4, sorted(PEFT_TO_GGUF.values()))
    assert sorted(p.name for p in pool.iterdir()) == ["manifest.json", "qv_r8.gguf"]


@pytest.mark.slow
@pytest.mark.parametrize("bad", [*BAD_NAMES, "", "x\n"])
def test_add_file_refuses_bad_names(tiny, base, pool, bad):
    before = snapshot(pool)
    with pytest.raises(AdapterError, match="is not allowed"):
        pool_ops.add_file(pool, tiny / "gguf" / "all7_r4.gguf", name=bad, base=base)
    assert snapshot(pool) == before
    assert not (pool.parent / "x.gguf").exists()  # '../x' wrote nothing beside the pool


def _truncated(tiny, out):
    data = (tiny / "gguf" / "qv_r8.gguf").read_bytes()
    out.write_bytes(data[:len(data) // 2])


def _random_bytes(tiny, out):
    out.write_bytes(np.random.default_rng(1).bytes(20000))


def _the_base(tiny, out):
    out.write_bytes((tiny / "tiny-f32.gguf").read_bytes())


@pytest.mark.slow
@pytest.mark.parametrize("make", [_truncated, _random_bytes, _the_base])
def test_add_file_refuses_non_adapters(tiny, base, pool, tmp_path, make):
    src = tmp_path / "bad.gguf"
    make(tiny, src)
    before = snapshot(pool)
    with pytest.raises(AdapterError) as err:
        pool_ops.add_file(pool, src, base=base)
    assert str(src) in str(err.value)
    assert snapshot(pool) == before  # no file, no .part, manifest bytes identical
    with pytest.raises(AdapterError, match="no such adapter file"):
        pool_ops.add_file(pool, tmp_path / "absent.gguf", base=base)
    assert snapshot(pool) == before


def _wider(rng):  # a llama adapter for a model of width 96
    return "llama", {f"blk.{b}.attn_q.weight": (rng.normal(size=(4, 96)), rng.normal(size=(96, 4))) for b in range(4)}


def _other_arch(rng):  # the right shapes, another architecture
    return "qwen2", {f"blk.{b}.attn_q.weight": (rng.normal(size=(4, 64)), rng.normal(size=(64, 4))) for b in range(4)}


def _deeper(rng):  # a block the 4-block base does not have
    return "llama", {f"blk.{b}.attn_q.weight": (rng.normal(size=(4, 64)), rng.normal(size=(64, 4))) for b in range(6)}


@pytest.mark.slow
@pytest.mark.parametrize("make,why", [(_wider, "another model size"), (_other_arch, "architecture 'qwen2'"),
                                      (_deeper, r"blk\.4\.attn_q\.weight is not a weight")])
def test_add_file_refuses_other_models(base, pool, tmp_path, make, why):
    arch, pairs = make(np.random.default_rng(0))
    src = write_lora(tmp_path / "other.gguf", arch, 8.0, pairs, name="other")
    before = snapshot(pool)
    with pytest.raises(AdapterError, match=why) as err:
        pool_ops.add_file(pool, src, base=base)
    assert str(src) in str(err.value)
    assert snapshot(pool) == before


@pytest.mark.slow
def test_add_file_with_broken_manifest_adds_nothing(tiny, base, pool):
    (pool / "manifest.json").write_text("{oops")
    before = snapshot(pool)
    with pytest.raises(AdapterError, match="manifest"):
        pool_ops.add_file(pool, tiny / "gguf" / "all7_r4.gguf", base=base)
    assert snapshot(pool) == before


# ---- add_source: PEFT and mlx-lm directories


@pytest.mark.slow
def test_add_source_peft_equals_direct_conversion(tiny, base, tmp_path):
    src = tiny / "peft" / "qv_r8"
    d = tmp_path / "pool"
    e = pool_ops.add_source(d, src, base=base)
    assert e.name == "qv_r8" and e.path == d / "qv_r8.gguf"
    assert manifest(d) == {"adapters": {"qv_r8": {"origin": f"peft:{src.resolve()}"}}}
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "qv_r8.gguf"]  # no temporary left

    direct = convert_lora(src, base, tmp_path / "direct.gguf", "f16")
    info = BaseInfo.read(base)
    got, want = read_lora(d / "qv_r8.gguf", info), read_lora(direct, info)
    assert sorted(got.pairs) == sorted(want.pairs) and got.alpha == want.alpha
    for stem, (a, b) in want.pairs.items():
        np.testing.assert_array_equal(got.pairs[stem][0], a, err_msg=stem)
        np.testing.assert_array_equal(got.pairs[stem][1], b, err_msg=stem)

    # and the update itself, from PEFT's safetensors: (alpha / r) * B @ A on v_proj (no rope row order)
    cfg = json.loads((src / "adapter_config.json").read_text())
    st = load_file(src / "adapter_model.safetensors")
    for layer in range(4):
        key = f"base_model.model.model.layers.{layer}.self_attn.v_proj"
        want_dw = cfg["lora_alpha"] / cfg["r"] * st[f"{key}.lora_B.weight"] @ st[f"{key}.lora_A.weight"]
        stem = f"blk.{layer}.attn_v.weight"
        a, b = got.pairs[stem]
        np.testing.assert_allclose(got.scale(stem) * b @ a, want_dw, atol=2e-3 * np.abs(want_dw).max())


@pytest.mark.slow
def test_add_source_gguf_and_name(tiny, base, pool):
    src = tiny / "gguf" / "rs_r16.gguf"
    e = pool_ops.add_source(pool, src, name="rs", base=base)
    assert e.origin == f"file:{src.resolve()}" and (pool / "rs.gguf").read_bytes() == src.read_bytes()
    e = pool_ops.add_source(pool, tiny / "peft" / "qkd_r2", name="qkd", base=base)
    assert e.origin == f"peft:{(tiny / 'peft' / 'qkd_r2').resolve()}" and e.rank == 2


@pytest.mark.slow
def test_add_source_name_taken_leaves_pool(tiny, base, pool):
    before = snapshot(pool)
    with pytest.raises(AdapterError, match="'qv_r8'"):
        pool_ops.add_source(pool, tiny / "peft" / "qv_r8", base=base)
    assert snapshot(pool) == before  # the converted temporary is gone too
    with pytest.raises(AdapterError, match="is not allowed"):
        pool_ops.add_source(pool, tiny / "peft" / "qv_r8", name="a b", base=base)
    assert snapshot(pool) == before


@pytest.mark.slow
def test_add_source_refuses_empty_name(tiny, base, pool):
    with pytest.raises(AdapterError, match="is not allowed"):
        pool_ops.add_source(pool, tiny / "peft" / "all7_r4", name="", base=base)


@pytest.mark.slow
def test_add_source_conversion_is_not_a_pool_adapter(tiny, base, pool, monkeypatch):
    import logo_edge.convert.lora as lora_mod

    seen = []
    real = lora_mod.convert_lora

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.append([p.name for p in pool_ops.adapter_files(pool)])  # what a `pool list` would see now
        return out

    monkeypatch.setattr(lora_mod, "convert_lora", spy)
    pool_ops.add_source(pool, tiny / "peft" / "all7_r4", base=base)
    assert seen == [["qv_r8.gguf"]]


def write_mlx(d, rank=4, scale=2.0, seed=0):
    """An mlx_lm.lora output dir for the tiny base (q, v, o in every block): the tensors written."""
    rng = np.random.default_rng(seed)
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32), "self_attn.o_proj": (64, 64)}
    tensors = {}
    for layer in range(4):
        for mod, (d_in, d_out) in shapes.items():
            tensors[f"model.layers.{layer}.{mod}.lora_a"] = rng.normal(0, 0.15, (d_in, rank)).astype(np.float32)
            tensors[f"model.layers.{layer}.{mod}.lora_b"] = rng.normal(0, 0.15, (rank, d_out)).astype(np.float32)
    d.mkdir(parents=True)
    save_file(tensors, str(d / "adapters.safetensors"), metadata={"format": "mlx"})
    cfg = {"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": {"rank": rank, "scale": scale,
                                                                          "dropout": 0.0}}
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=4, sort_keys=True))
    return tensors


@pytest.mark.slow
def test_add_source_mlx(base, info, tmp_path):
    src = tmp_path / "mlx-ad"
    tensors = write_mlx(src, rank=4, scale=2.0)
    d = tmp_path / "pool"
    e = pool_ops.add_source(d, src, base=base)
    assert e.name == "mlx-ad" and e.origin == f"mlx:{src.resolve()}" and manifest(d)["adapters"]["mlx-ad"] == {
        "origin": f"mlx:{src.resolve()}"}
    assert (e.rank, e.modules, e.blocks) == (4, ["attn_output", "attn_q", "attn_v"], 4)
    got = read_lora(d / "mlx-ad.gguf", info)
    want = read_lora(convert_lora(src, base, tmp_path / "direct.gguf", "f16"), info)
    assert sorted(got.pairs) == sorted(want.pairs)
    for stem, (a, b) in want.pairs.items():
        np.testing.assert_array_equal(got.pairs[stem][0], a, err_msg=stem)
        np.testing.assert_array_equal(got.pairs[stem][1], b, err_msg=stem)
    for layer in range(4):  # mlx-lm's update: scale * lora_b.T @ lora_a.T (v, o: no rope row order)
        for mod, gguf in [("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output")]:
            key = f"model.layers.{layer}.{mod}"
            want_dw = 2.0 * tensors[f"{key}.lora_b"].T @ tensors[f"{key}.lora_a"].T
            stem = f"blk.{layer}.{gguf}.weight"
            a, b = got.pairs[stem]
            np.testing.assert_allclose(got.scale(stem) * b @ a, want_dw, atol=2e-3 * np.abs(want_dw).max())
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "mlx-ad.gguf"]


# ---- remove and rename


@pytest.mark.slow
def test_rename_and_remove(tiny, base, pool):
    src = tiny / "gguf" / "qv_r8.gguf"
    pool_ops.add_file(pool, tiny / "gguf" / "all7_r4.gguf", base=base)
    m = manifest(pool)
    shipped = {"origin": "hf://org/qv@1", "recipe": {"steps": 100, "lr": 1e-4}, "score": 0.5}
    m["adapters"]["qv_r8"] = shipped
    (pool / "manifest.json").write_text(json.dumps(m))
    all7_entry = m["adapters"]["all7_r4"]

    assert pool_ops.rename(pool, "qv_r8", "math") == pool / "math.gguf"
    assert (pool / "math.gguf").read_bytes() == src.read_bytes() and not (pool / "qv_r8.gguf").exists()
    assert manifest(pool) == {"adapters": {"math": shipped, "all7_r4": all7_entry}}  # recipe and score kept

    before = snapshot(pool)
    with pytest.raises(AdapterError, match="already has an adapter named 'all7_r4'"):
        pool_ops.rename(pool, "math", "all7_r4")
    with pytest.raises(AdapterError, match=r"no adapter named 'qv_r8' \(have: all7_r4, math\)"):
        pool_ops.rename(pool, "qv_r8", "x")
    with pytest.raises(AdapterError, match="is not allowed"):
        pool_ops.rename(pool, "math", "../math")
    with pytest.raises(AdapterError, match=r"no adapter named 'nope' \(have: all7_r4, math\)"):
        pool_ops.remove(pool, "nope")
    with pytest.raises(AdapterError, match="no adapter named"):
        pool_ops.remove(pool, "../pool/math")
    assert snapshot(pool) == before

    assert pool_ops.remove(pool, "math") == pool / "math.gguf"
    assert sorted(p.name for p in pool.iterdir()) == ["all7_r4.gguf", "manifest.json"]
    assert manifest(pool) == {"adapters": {"all7_r4": all7_entry}}
    with pytest.raises(AdapterError, match=r"\(have: all7_r4\)"):
        pool_ops.remove(pool, "math")


@pytest.mark.slow
def test_rename_never_overwrites_a_file_that_appears_after_its_check(tiny, pool, monkeypatch):
    """Another process adds `new` between rename's check and its move: the rename is refused, both files kept."""
    real = pool_ops.read_manifest
    other = (tiny / "gguf" / "all7_r4.gguf").read_bytes()

    def meanwhile(pool_dir):
        (pool / "late.gguf").write_bytes(other)
        return real(pool_dir)

    monkeypatch.setattr(pool_ops, "read_manifest", meanwhile)
    with pytest.raises(AdapterError, match="already has an adapter named 'late'"):
        pool_ops.rename(pool, "qv_r8", "late")
    assert (pool / "late.gguf").read_bytes() == other
    assert (pool / "qv_r8.gguf").read_bytes() == (tiny / "gguf" / "qv_r8.gguf").read_bytes()


def test_remove_and_rename_without_manifest_entry(tiny, pool):
    (pool / "loose.gguf").write_bytes((tiny / "gguf" / "qkd_r2.gguf").read_bytes())
    m = (pool / "manifest.json").read_bytes()
    pool_ops.rename(pool, "loose", "tight")
    assert (pool / "tight.gguf").read_bytes() == (tiny / "gguf" / "qkd_r2.gguf").read_bytes()
    pool_ops.remove(pool, "tight")
    assert sorted(p.name for p in pool.iterdir()) == ["manifest.json", "qv_r8.gguf"]
    assert (pool / "manifest.json").read_bytes() == m


@pytest.mark.slow
def test_remove_and_rename_keep_a_broken_manifest(pool):
    (pool / "manifest.json").write_text("{oops")
    before = snapshot(pool)
    with pytest.raises(AdapterError, match="manifest"):
        pool_ops.remove(pool, "qv_r8")
    with pytest.raises(AdapterError, match="manifest"):
        pool_ops.rename(pool, "qv_r8", "other")
    assert snapshot(pool) == before


# ---- list


@pytest.fixture()
def full_pool(tiny, tmp_path):
    """Every fixture adapter copied in (no manifest) plus a mixed-rank one written here."""
    d = tmp_path / "full"
    d.mkdir()
    for p in (tiny / "gguf").glob("*.gguf"):
        (d / p.name).write_bytes(p.read_bytes())
    mixed_rank(d / "mixed.gguf")
    return d


FIXTURE_NAMES = ["all7_r4", "mlp_only", "od_only", "pattern_r8", "qkd_r2", "qv_r8", "rs_r16", "v_only"]


def check_rows(rows, tiny, d, origins):
    """list_pool rows (as dicts) against the PEFT configs, the mixed adapter's writing and file sizes."""
    assert [r["name"] for r in rows] == sorted([*FIXTURE_NAMES, "mixed"])
    for r in rows:
        if r["name"] == "mixed":
            want = (8, ["attn_q", "attn_v"], 4, True)
        else:
            want = expected_row(tiny, r["name"])
        assert (r["rank"], r["modules"], r["blocks"], r["probeable"]) == want, r["name"]
        assert r["size"] == os.path.getsize(d / f"{r['name']}.gguf") and str(r["path"]) == str(d / f"{r['name']}.gguf")
        assert r["origin"] == origins.get(r["name"], "local file")
        assert r["loaded"] is None


@pytest.mark.slow
def test_list_pool(tiny, base, full_pool, capsys):
    check_rows([e.to_dict() for e in pool_ops.list_pool(full_pool, base)], tiny, full_pool, {})
    assert [e.probeable for e in pool_ops.list_pool(full_pool, base)].count(False) == 1  # od_only alone

    origins = {"qv_r8": "hf://org/qv@123", "rs_r16": "shipped"}  # a recipe without an origin: shipped
    (full_pool / "manifest.json").write_text(json.dumps({"adapters": {"qv_r8": {"origin": "hf://org/qv@123"},
                                                                      "rs_r16": {"recipe": {"steps": 5}}}}))
    check_rows([e.to_dict() for e in pool_ops.list_pool(full_pool, base)], tiny, full_pool, origins)

    assert cli.main(["pool", "--pool", str(full_pool), "--model", str(base), "list", "--json"]) == 0
    check_rows(json.loads(capsys.readouterr().out), tiny, full_pool, origins)

    assert cli.main(["pool", "--pool", str(full_pool), "--model", str(base), "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{full_pool}: 9 adapter(s)"
    v_only = next(line for line in out if line.startswith("v_only"))
    assert v_only.split()[1:4] == ["8", "4", f"{os.path.getsize(full_pool / 'v_only.gguf') / 2**20:.2f}"]
    assert v_only.split()[4:] == ["yes", "attn_v", "local", "file"]
    mlp = next(line for line in out if line.startswith("mlp_only"))
    assert mlp.split()[4:] == ["yes", "ffn_down,ffn_gate,ffn_up", "local", "file"]
    od = next(line for line in out if line.startswith("od_only"))
    assert od.split()[4:] == ["no", "attn_output,ffn_down", "local", "file"]


@pytest.mark.slow
def test_list_pool_errors(base, tmp_path):
    with pytest.raises(AdapterError, match="no such pool directory"):
        pool_ops.list_pool(tmp_path / "absent", base)
    (tmp_path / "manifest.json").write_text("{oops")
    before = snapshot(tmp_path)
    with pytest.raises(AdapterError, match="manifest"):
        pool_ops.list_pool(tmp_path, base)
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_list_pool_manifest_entry_not_an_object(base, pool):
    (pool / "manifest.json").write_text(json.dumps({"adapters": {"qv_r8": "oops"}}))
    with pytest.raises(AdapterError, match="manifest"):
        pool_ops.list_pool(pool, base)


# ---- verify


def run_pool(d, base, *args):
    return cli.main(["pool", "--pool", str(d), "--model", str(base), *args])


@pytest.mark.slow
def test_verify(tiny, base, full_pool, capsys):
    assert pool_ops.verify(full_pool, base) == [(n, None) for n in sorted([*FIXTURE_NAMES, "mixed"])]
    assert run_pool(full_pool, base, "verify") == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{full_pool}: 0 problem(s)"

    _truncated(tiny, full_pool / "rs_r16.gguf")
    (full_pool / "manifest.json").write_text(json.dumps({"adapters": {"ghost": {"origin": "x"}, "qv_r8": {}}}))
    got = dict(pool_ops.verify(full_pool, base))
    assert {n for n, problem in got.items() if problem} == {"rs_r16", "ghost"}
    assert str(full_pool / "rs_r16.gguf") in got["rs_r16"] and "ghost.gguf is missing" in got["ghost"]
    assert run_pool(full_pool, base, "verify") == 1
    out = capsys.readouterr().out
    assert "BAD rs_r16: " in out and "BAD ghost: " in out and "ok  qv_r8" in out
    assert out.splitlines()[-1] == f"{full_pool}: 2 problem(s)"

    (full_pool / "manifest.json").write_text('{"adapters": {"qv_r8": ')
    before = snapshot(full_pool)
    got = dict(pool_ops.verify(full_pool, base))
    assert "cannot be read" in got["manifest.json"] and got["qv_r8"] is None
    assert run_pool(full_pool, base, "verify") == 1
    assert "BAD manifest.json" in capsys.readouterr().out
    assert snapshot(full_pool) == before


# ---- a running engine's pool


@pytest.fixture(scope="module")
def engine_pool(tiny, base, tmp_path_factory):
    """An Engine over a pool (qv_r8 added with an origin, all7_r4, v_only, mlp_only, od_only, a mixed-rank adapter),
    in a
    fresh index cache; yields (engine, pool dir)."""
    import logo_edge.engine  # noqa: F401  (finds the native library in the real cache first)
    from logo_edge.engine import Engine

    d = tmp_path_factory.mktemp("engine") / "pool"
    pool_ops.add_file(d, tiny / "gguf" / "qv_r8.gguf", base=base)
    for n in ["all7_r4", "v_only", "mlp_only", "od_only"]:
        (d / f"{n}.gguf").write_bytes((tiny / "gguf" / f"{n}.gguf").read_bytes())
    mixed_rank(d / "mixed.gguf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOGO_EDGE_CACHE", str(d.parent / "cache"))
        with pytest.warns(UserWarning, match="od_only"):
            eng = Engine(base, d, n_ctx=256, kv_type="f32", flash_attn=False)
        yield eng, d
        eng.close()


@pytest.mark.slow
def test_engine_entries(engine_pool, tiny, base):
    eng, d = engine_pool
    want = {e.name: e for e in pool_ops.list_pool(d, base)}
    got = pool_ops.engine_entries(eng)
    assert [e.name for e in got] == sorted(want)
    for e in got:
        w = want[e.name]
        assert (e.path, e.modules, e.blocks, e.probeable, e.origin) == (w.path, w.modules, w.blocks, w.probeable,
                                                                         w.origin), e.name
    probeable = {e.name: e.probeable for e in got}
    assert probeable["od_only"] is False and probeable["v_only"] and probeable["mlp_only"]
    assert {e.name: e.origin for e in got}["qv_r8"] == f"file:{(tiny / 'gguf' / 'qv_r8.gguf').resolve()}"
    assert not any(e.loaded for e in got)

    eng.create_completion("hi", adapters={"qv_r8": 1.0}, max_tokens=2)
    assert {e.name: e.loaded for e in pool_ops.engine_entries(eng)} == {
        "all7_r4": False, "mixed": False, "mlp_only": False, "od_only": False, "qv_r8": True, "v_only": False}


@pytest.mark.slow
def test_engine_entries_rank_is_largest(engine_pool):
    eng, _ = engine_pool
    assert {e.name: e.rank for e in pool_ops.engine_entries(eng)} == {
        "all7_r4": 4, "mixed": 8, "mlp_only": 4, "od_only": 4, "qv_r8": 8, "v_only": 8}


# ---- the command line, end to end


@pytest.mark.slow
def test_cli_end_to_end(tiny, base, tmp_path):
    d = tmp_path / "pool"
    env = {k: v for k, v in os.environ.items() if k != "LOGO_EDGE_POOL"}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")  # never the user's own pool

    def run(*args, pool=True, extra_env=None):
        argv = [sys.executable, "-m", "logo_edge.cli", "pool", *(["--pool", str(d)] if pool else []),
                "--model", str(base), *args]
        return subprocess.run(argv, capture_output=True, text=True, env={**env, **(extra_env or {})}, timeout=120)

    r = run("add", str(tiny / "gguf" / "qv_r8.gguf"), str(tiny / "peft" / "all7_r4"))
    assert r.returncode == 0, r.stderr
    assert (d / "qv_r8.gguf").read_bytes() == (tiny / "gguf" / "qv_r8.gguf").read_bytes()
    assert manifest(d)["adapters"]["all7_r4"] == {"origin": f"peft:{(tiny / 'peft' / 'all7_r4').resolve()}"}

    r = run("add", "--name", "x", str(tiny / "gguf" / "qkd_r2.gguf"), str(tiny / "gguf" / "rs_r16.gguf"))
    assert r.returncode == 2 and "--name names one adapter" in r.stderr
    r = run("add", str(tiny / "gguf" / "qv_r8.gguf"))
    assert r.returncode == 2 and "already has an adapter named 'qv_r8'" in r.stderr

    r = run("list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["name"], x["rank"], x["probeable"]) for x in rows] == [("all7_r4", 4, True), ("qv_r8", 8, True)]
    assert rows[1]["origin"] == f"file:{(tiny / 'gguf' / 'qv_r8.gguf').resolve()}"

    assert run("rename", "qv_r8", "math").returncode == 0
    assert run("rm", "all7_r4").returncode == 0
    r = run("rm", "nope")
    assert r.returncode == 2 and "no adapter named 'nope' (have: math)" in r.stderr
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "math.gguf"]
    assert manifest(d) == {"adapters": {"math": {"origin": f"file:{(tiny / 'gguf' / 'qv_r8.gguf').resolve()}"}}}
    assert run("verify").returncode == 0

    r = run("list", "--json", pool=False, extra_env={"LOGO_EDGE_POOL": str(d)})  # the pool from the environment
    assert r.returncode == 0, r.stderr
    assert [x["name"] for x in json.loads(r.stdout)] == ["math"]

    _truncated(tiny, d / "math.gguf")
    r = run("verify", pool=False, extra_env={"LOGO_EDGE_POOL": str(d)})
    assert r.returncode == 1 and "BAD math" in r.stdout
    assert not (tmp_path / "xdg").exists()


@pytest.mark.slow
def test_example_prompts_travel_with_their_adapter(tiny, base, tmp_path):
    """NAME.examples.jsonl beside an added file is copied (moved with `move`), renamed and removed with it; a
    malformed one stops the add with the pool unchanged; replacing an adapter drops the old one's examples."""
    from logo_edge.examples import examples_path, read_examples, write_examples

    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / "qv.gguf"
    shutil.copyfile(tiny / "gguf" / "qv_r8.gguf", src)
    pool = tmp_path / "pool"
    pool_ops.add_file(pool, tiny / "gguf" / "all7_r4.gguf", base=base)
    examples_path(src).write_text('{"prompt": "fine"}\n{oops\n')
    before = snapshot(pool)
    with pytest.raises(AdapterError, match=r"qv.examples.jsonl, line 2: not JSON"):
        pool_ops.add_file(pool, src, name="qv", base=base)
    assert snapshot(pool) == before

    write_examples(examples_path(src), ["What is 2 + 2?", "Add 3 and 4."])
    pool_ops.add_file(pool, src, name="qv", base=base)
    assert read_examples(pool / "qv.examples.jsonl") == ["What is 2 + 2?", "Add 3 and 4."]
    pool_ops.rename(pool, "qv", "math")
    assert read_examples(pool / "math.examples.jsonl")[0] == "What is 2 + 2?"
    assert not (pool / "qv.examples.jsonl").exists()
    examples_path(src).unlink()
    pool_ops.add_file(pool, src, name="math", base=base, replace=True)  # the new file has none
    assert not (pool / "math.examples.jsonl").exists()
    write_examples(examples_path(src), ["x"])
    pool_ops.add_file(pool, src, name="moved", base=base, move=True)
    assert read_examples(pool / "moved.examples.jsonl") == ["x"] and not any(src_dir.iterdir())
    pool_ops.remove(pool, "moved")
    assert sorted(p.name for p in pool.iterdir()) == ["all7_r4.gguf", "manifest.json", "math.gguf"]
