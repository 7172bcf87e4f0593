"""`logo-edge bench` and its PyTorch/PEFT reference row (logo_edge/bench_torch.py)."""

import math
import re

import numpy as np
import pytest

NUM = r"(-?[0-9.]+|nan|inf)"


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])-?\d+\.?\d*", line)]


def test_gguf_to_peft_round_trips_through_the_converter(tmp_path):
    """GGUF -> PEFT (ours, inverse RoPE permutation) -> GGUF (the project's converter) gives the same tensors."""
    pytest.importorskip("safetensors")
    from logo_edge.bench_torch import gguf_to_peft
    from logo_edge.convert.lora import BaseSpec, peft_to_pairs
    from logo_edge.defaults import default_model_path
    from logo_edge.errors import ModelLoadError
    from logo_edge.gguf_files import BaseInfo, write_lora

    try:
        model = default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))
    info = BaseInfo.read(model)
    rng = np.random.default_rng(0)
    pairs = {}
    for stem, r in (("blk.0.attn_q.weight", 8), ("blk.3.attn_k.weight", 8), ("blk.3.attn_v.weight", 4),
                    ("blk.29.ffn_down.weight", 16)):  # ranks differ per module: rank_pattern
        n_in, n_out = info.shapes[stem][:2]
        pairs[stem] = (rng.standard_normal((r, n_in), np.float32), rng.standard_normal((n_out, r), np.float32))
    src = write_lora(tmp_path / "a.gguf", info.arch, 12.0, pairs, "f32", name="a")
    name, d = gguf_to_peft(src, info, tmp_path / "peft")
    back, alpha = peft_to_pairs(d, BaseSpec.load(model))
    assert name == "a" and sorted(back) == sorted(pairs)
    for stem, (a, b) in pairs.items():
        c_ours = 12.0 / a.shape[0]
        c_back = alpha / back[stem][0].shape[0]
        np.testing.assert_array_equal(back[stem][0], a)
        np.testing.assert_allclose(back[stem][1] * c_back, b * c_ours, rtol=1e-6)


@pytest.mark.slow
def test_torch_reference_routes_and_generates_like_the_engine(tiny, tmp_path):
    """The bench's PyTorch/PEFT row on the tiny model: same top-k, weights and greedy tokens as logo-edge
    routing the paper's way (raw norm, last block alone)."""
    from logo_edge.bench_torch import build_reference
    from logo_edge.engine import Engine, RouteConfig

    with pytest.warns(UserWarning, match="v_only"):
        eng = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=512, n_batch=64, kv_type="f32", flash_attn=False,
                     probe_blocks=1, routing=RouteConfig(calibration="raw"))
    paths = [a.path for a in eng.pool.adapters]  # the pool's order (ties go to the lower index)
    ref = build_reference(tiny / "hf", tiny / "tiny-f32.gguf", paths, 3, tmp_path)
    assert ref.names == eng.pool.names
    try:
        for prompt in ["The quick brown fox jumps over the lazy dog.", "SELECT name FROM users WHERE age > 30;"]:
            tokens = eng.tokenize(prompt)
            out = eng.create_completion(tokens, max_tokens=12)
            sel = sorted((a for a in out["routing"]["adapters"] if a["rank"] is not None), key=lambda a: a["rank"])
            got = ref.request(tokens, 12)
            assert got["tokens"], "the tiny model stopped at once: the generation check would be empty"
            assert got["names"] == [a["name"] for a in sel]
            assert got["weights"] == pytest.approx([a["weight"] for a in sel], rel=1e-4)
            assert eng.model.detokenize(got["tokens"]) == out["choices"][0]["text"]
    finally:
        eng.close()


@pytest.mark.slow
def test_quick_bench_prints_every_row_with_finite_numbers(capsys):
    from logo_edge.cli import main

    # one thread: a smoke test that stays quick on a loaded machine, where spinning llama.cpp threads starve
    assert main(["bench", "--quick", "--threads", "1"]) == 0
    check_quick_output(capsys.readouterr().out)


def check_quick_output(out: str) -> None:
    """Rows 1-3 with seven finite positive numbers, the ratio line, memory, both sweeps, the chat, the targets."""
    for label in ("1  llama.cpp base model", "2  llama.cpp + k adapters by hand", "3  logo-edge routed, exact"):
        line = next(ln for ln in out.splitlines() if ln.startswith(label))
        nums = _numbers(line[len(label):])
        assert len(nums) == 7, line  # TTFT, tok/s, total, tokens, and three ratios to row 1
        assert all(math.isfinite(x) and x > 0 for x in nums), line
    assert re.search(r"^1  llama.cpp base model .* 1\.000 +1\.000 +1\.000$", out, re.M)
    ratio = re.search(r"decode tok/s, logo-edge routed / llama-cpp-python same adapters: " + NUM, out)
    assert ratio and math.isfinite(float(ratio.group(1))) and float(ratio.group(1)) > 0
    assert re.search(r"^5  PyTorch/PEFT LoGo .*skipped \(--quick\)", out, re.M)
    assert re.search(r"^4  logo-edge probe-cache \(approximate\) +" + NUM, out, re.M)
    peaks = [float(m) for m in re.findall(r"^[1-4][ b] .* ([0-9.]+) MB", out, re.M)]
    assert len(peaks) >= 3 and all(p > 10 for p in peaks)
    sweep = re.search(r"^ +10 +([0-9.]+) +([0-9.]+) +([0-9.]+) +([0-9.]+)", out, re.M)  # N = 10
    assert sweep and all(float(x) > 0 for x in sweep.groups())
    assert re.search(r"^ +3 +[0-9.]+ +[0-9.]+", out, re.M)  # k = 3 in the k sweep
    assert re.search(r"routed decode tok/s / same adapters by hand +[0-9.]+ +>= 0.97 +(PASS|FAIL)", out)
    assert "every row generated the same tokens per turn: yes; the same prompt tokens: yes" in out  # chat section


@pytest.mark.slow
def test_chat_section_compares_rows_like_with_like(tiny, capsys):
    """The multi-turn chat section on the tiny model: every row sees the same prompt tokens and generates the
    same number of tokens at every turn; row 4 keeps its mixture exactly when the engine's rule says so."""
    from logo_edge.bench_chat import ROWS, chat_section

    pool = [tiny / "gguf" / f"{n}.gguf" for n in ("qv_r8", "all7_r4", "rs_r16", "qkd_r2", "pattern_r8")]
    res = chat_section(tiny / "tiny-f32.gguf", pool, threads=1, quick=True)
    turns, gen = res["turns"], res["gen"]
    assert gen == 8 and res["tasks"] == ["sentiment"] * 3 + ["addition"] and res["same_task_turns"] == [2, 3]
    for t in range(4):
        assert {turns[r][t]["n_tok"] for r in ROWS} == {gen}, t
        assert len({turns[r][t]["prompt"] for r in ROWS}) == 1, t
        assert all(turns[r][t]["same_prompt"] for r in ROWS)  # row 1's own token ids are the engine's
        for r in ROWS:
            x = turns[r][t]
            assert math.isfinite(x["ttft"]) and 0 < x["ttft"] <= x["total"], (r, t)
    assert all(turns["base"][t]["cached"] > 0 for t in (1, 2, 3))  # the history's prefix is reused
    assert res["tokens_ok"] and res["prompts_ok"]
    assert {x["mixture"] for r in ("routed0", "approx") for x in turns[r]} == {"new"}  # keep=0: never kept
    assert turns["fixed"][3]["weights"] == pytest.approx(turns["routed0"][3]["weights"])  # row 3's choice
    check_kept(turns["routed"], res["keep"])
    out = capsys.readouterr().out
    assert re.search(r"every row generated the same tokens per turn: yes; the same prompt tokens: yes", out)
    assert re.search(r"^  target: same-task turn 3, routed exact \(row 4\) TTFT / base \(row 2\) " + NUM, out, re.M)
    # the tiny model's random adapters may route apart turn to turn; with keep=1 any routing agrees:
    res = chat_section(tiny / "tiny-f32.gguf", pool, threads=1, quick=True, keep=1.0)
    assert res["kept_turns"] == [2, 3, 4]  # every turn continuing its conversation (half the prompt cached)
    check_kept(res["turns"]["routed"], 1.0)


def check_kept(turns: list[dict], keep: float) -> None:
    """Row 4's record per turn against the engine's rule: kept = the history is mostly cached and the new routing
    is within total variation `keep` of the mixture set (the previous turn's); else new weights, no reuse."""
    from logo_edge.engine import KEEP_MIN_PREFIX

    assert turns[0]["mixture"] == "new"
    for prev, now in zip(turns, turns[1:]):
        continuing = prev["prompt"] >= max(KEEP_MIN_PREFIX, now["prompt"] // 2)  # at least what it can reuse
        names = set(prev["weights"]) | set(now["weights"])
        tv = 0.5 * sum(abs(now["weights"].get(n, 0.0) - prev["weights"].get(n, 0.0)) for n in names)
        if now["mixture"] == "kept":
            assert continuing and now["weights"] == prev["weights"] and now["cached"] >= prev["prompt"]
        else:
            assert not continuing or tv > keep, (prev, now)
            assert now["cached"] == 0  # a new mixture prefills the whole prompt again
