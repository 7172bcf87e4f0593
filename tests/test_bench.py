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


def test_agreement_counts_topk_and_weight_and_score_differences():
    from logo_edge.bench_torch import agreement

    def c(names, weights, scores):  # a calibrated routing: scores are z, signals z + 10
        return {"names": names, "weights": weights, "scores": scores, "signals": {n: z + 10 for n, z in scores.items()}}

    z = {"a": 1.0, "b": 0.5, "c.d": 0.4}
    want = [c(["a", "b"], [0.6, 0.4], z), c(["c.d", "a"], [0.5, 0.5], z), c(["a", "b"], [0.5, 0.5], z)]
    zt = {"a": 1.0, "b": 0.52, "c_d": 0.4}  # PEFT names: "_" for "."
    got = [c(["a", "b"], [0.61, 0.39], zt), c(["c_d", "a"], [0.5, 0.5], zt), c(["b", "a"], [0.5, 0.5], zt)]
    a = agreement(got, want)
    assert a == {"same_topk": 2, "n_prompts": 3, "max_weight_diff_same": pytest.approx(0.01),
                 "max_weight_diff": pytest.approx(0.01), "max_signal_rel_diff": pytest.approx(0.02 / 10.5),
                 "max_score_diff": pytest.approx(0.02), "max_swap_gap": pytest.approx(0.5)}  # a and b swapped
    got[0] = c(["a", "c_d"], [0.6, 0.4], zt)  # another adapter: its weight and b's both count
    a = agreement(got, want)
    assert a["max_weight_diff"] == pytest.approx(0.4) and a["max_weight_diff_same"] == pytest.approx(0.0)
    assert a["max_swap_gap"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        agreement(got[:2], want)


def test_report_fails_the_twin_check_on_a_disagreement():
    """On the f32 GGUF of torch's own weights, one prompt routed differently is a FAIL (not noise)."""
    from logo_edge.bench_torch import MODES, report

    routing = dict(signal="norm", calibration="raw", probe_input="residual", blocks=[29], shortlist=0)
    ok = {"same_topk": 4, "n_prompts": 4, "max_weight_diff_same": 0.0, "max_weight_diff": 0.0,
          "max_signal_rel_diff": 0.0, "max_score_diff": 0.0, "max_swap_gap": 0.0}
    info = {"routings": {"paper": routing, "logo-edge": {**routing, "calibration": "zscore", "blocks": [22, 29]}},
            "n_adapters": 10, "make_s": 1.0, "load_s": 1.0, "calibrate_s": 1.0,
            "agreement": {"bench": {m: ok for m in MODES}, "twin": {m: ok for m in MODES}}}
    def check(info):
        return next(ln for ln in report(info, "pool") if "check:" in ln)

    assert check(info).endswith("PASS")
    info["agreement"]["twin"]["logo-edge"] = {**ok, "same_topk": 3, "max_weight_diff": 0.3}
    assert check(info).endswith("FAIL")


TINY_PROMPTS = ["The quick brown fox jumps over the lazy dog.", "SELECT name FROM users WHERE age > 30;",
                "Translate to French: good morning", "12 + 35 ="]


@pytest.mark.slow
def test_torch_reference_on_the_peft_dirs_agrees_with_the_engine_and_can_fail(tiny):
    """Rows 5/5b's reference on the tiny model's PEFT dirs (never their GGUFs): the paper's routing and
    logo-edge's default one (zscore over the probe window) pick what the engine picks over the converted
    GGUFs, with the same weights, and generate the same tokens; one adapter changed in torch is caught."""
    import torch

    from logo_edge.bench_torch import (
        MODES,
        agreement,
        build_reference,
        calibration_tokens,
        engine_choices,
        routing_settings,
    )
    from logo_edge.defaults import PROBE_BLOCKS
    from logo_edge.engine import Engine

    # the reference scores q_proj, as the bench's own adapters (all with q) are scored: the engine likewise here
    with pytest.warns(UserWarning, match="od_only"):
        eng = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=512, n_batch=64, kv_type="f32", flash_attn=False,
                     probe_modules="target")
    try:
        routings = routing_settings(eng)
        assert routings["logo-edge"]["calibration"] == "zscore"
        assert routings["logo-edge"]["blocks"] == list(range(max(0, 4 - PROBE_BLOCKS), 4))  # 4 blocks: all
        ref = build_reference(tiny / "hf", [tiny / "peft" / n for n in eng.pool.names], 3, routings)
        assert ref.probeable("paper") == [n for n in eng.pool.names if n not in ("v_only", "mlp_only", "od_only")]
        with torch.inference_mode():
            ref.calibrate([ref.probe(torch.tensor([t])) for t in calibration_tokens(eng)])
        prompts = [eng.tokenize(p) for p in TINY_PROMPTS]
        prompts.append(eng.tokenize(eng.format_chat([{"role": "user", "content": TINY_PROMPTS[0]}])))
        want = [engine_choices(eng, t) for t in prompts]
        assert len({tuple(w[m]["names"]) for w in want for m in MODES}) > 1

        def measured(mode):
            with torch.inference_mode():
                got = [ref.route(torch.tensor([t]), mode) for t in prompts]
            return agreement(got, [w[mode] for w in want])

        for mode in MODES:
            a = measured(mode)
            assert a["same_topk"] == len(prompts) and a["max_weight_diff"] < 1e-4, (mode, a)
            assert a["max_signal_rel_diff"] < 1e-4 and a["max_score_diff"] < 1e-3, (mode, a)
        out = eng.create_completion(prompts[1], max_tokens=12, ignore_eos=True)
        got = ref.request(prompts[1], 12, "logo-edge")
        sel = sorted((a for a in out["routing"]["adapters"] if a["rank"] is not None), key=lambda a: a["rank"])
        assert got["choice"]["names"] == [a["name"] for a in sel] and got["n_tok"] == 12
        assert eng.model.detokenize(got["tokens"]) == out["choices"][0]["text"]
        # the check can fail: one adapter's q_proj B scaled in torch alone (after calibration)
        with torch.no_grad():
            for b in routings["logo-edge"]["blocks"]:
                q = ref.layers[b].self_attn.q_proj
                if "qkd_r2" in q.lora_B:
                    q.lora_B["qkd_r2"].weight.mul_(10)
        for mode in MODES:
            a = measured(mode)
            # the scaled B moves the signal 10x (paper: p = 1), 10^0.25 = 1.78x (logo-edge: the default sv_power)
            assert a["max_weight_diff"] > 0.05 and a["max_signal_rel_diff"] > 0.5, (mode, a)
    finally:
        eng.close()


@pytest.mark.slow
def test_torch_rows_make_peft_adapters_and_agree_with_logo_edge(tiny):
    """Rows 5/5b end to end on the tiny model: PEFT adapters made by a worker, converted by convert-lora for
    logo-edge (on the model and on its f32 twin made from the HF dir), the PyTorch worker on the PEFT dirs; both
    routings agree, every request makes g tokens; the rows' own pool (GGUF -> gguf_to_peft) is checked beside."""
    from logo_edge.bench_torch import MODES, engine_choices, torch_rows
    from logo_edge.engine import Engine

    pool = sorted((tiny / "gguf").glob("*_r*.gguf"))  # the probeable ones
    with Engine(tiny / "tiny-f32.gguf", pool, n_ctx=512, n_threads=1, flash_attn=False) as eng:
        prompts = [eng.tokenize(p) for p in TINY_PROMPTS]
        expected = [engine_choices(eng, t) for t in prompts]
    cases = [{"p": 8, "g": 5, "prompts": prompts[:2]}, {"p": 12, "g": 7, "prompts": prompts[2:]}]
    out = torch_rows(tiny / "tiny-f32.gguf", cases, k=3, threads=1, n_ctx=512, rows_pool=pool,
                     rows_expected=expected, hf_dir=tiny / "hf", n_adapters=6)
    assert out["n_adapters"] == 6 and len(out["cases"]) == 2, out
    for case, res in zip(cases, out["cases"]):
        for mode in MODES:
            assert [s["n_tok"] for s in res["samples"][mode]] == [case["g"]] * (len(case["prompts"]) - 1)
    assert sorted(out["agreement"]) == ["bench", "rows", "twin"]
    for pool_name in ("bench", "twin", "rows"):
        for mode in MODES:
            a = out["agreement"][pool_name][mode]
            assert a["same_topk"] == a["n_prompts"] == 4 and a["max_weight_diff"] < 1e-3, (pool_name, mode, a)
            assert a["max_signal_rel_diff"] < 5e-3, (pool_name, mode, a)  # f16 K/V in llama.cpp here
    from logo_edge.bench_torch import report

    lines = report(out, "5 tiny adapters")
    assert sum(" 4/4 " in ln for ln in lines) == 6
    assert any(ln.endswith("PASS") for ln in lines)


@pytest.mark.slow
def test_quick_bench_prints_every_row_with_finite_numbers(capsys):
    from logo_edge.cli import main

    # one thread: a smoke test that stays quick on a loaded machine, where spinning llama.cpp threads starve
    assert main(["bench", "--quick", "--threads", "1"]) == 0
    check_quick_output(capsys.readouterr().out)


def check_quick_output(out: str) -> None:
    """Rows 1-4 with seven finite positive numbers and the same tokens generated, the ratio line, memory, the
    sweeps and the pack cost, the chat, the targets."""
    tokens = set()
    for label in ("1  llama.cpp base model", "2  llama.cpp + k adapters by hand", "3  logo-edge routed, exact",
                  "3b logo-edge routed, exact, mixture", "4  logo-edge probe-cache"):
        line = next(ln for ln in out.splitlines() if ln.startswith(label))
        nums = _numbers(line[len(label):].split(")")[-1])
        assert len(nums) == 7, line  # TTFT, tok/s, total, tokens, and three ratios to row 1
        assert all(math.isfinite(x) and x > 0 for x in nums), line
        tokens.add(nums[3])
    assert tokens == {16}, tokens  # like with like: every row generates what was asked (--quick: 16)
    assert re.search(r"^ +qv +8 +3 +[0-9.]+ +[0-9.]+ +[0-9.]+ .* (packed|mixture)$", out, re.M)  # pack cost
    assert re.search(r"^1  llama.cpp base model .* 1\.000 +1\.000 +1\.000$", out, re.M)
    ratio = re.search(r"decode tok/s, logo-edge routed / llama-cpp-python same adapters: " + NUM, out)
    assert ratio and math.isfinite(float(ratio.group(1))) and float(ratio.group(1)) > 0
    assert re.search(r"^5  PyTorch/PEFT LoGo .*skipped \(--quick\)", out, re.M)
    assert re.search(r"^5b PyTorch/PEFT LoGo .*skipped \(--quick\)", out, re.M)
    assert re.search(r"^4  logo-edge probe-cache \(approximate\) +" + NUM, out, re.M)
    peaks = [float(m) for m in re.findall(r"^[1-4][ b] .* ([0-9.]+) MB", out, re.M)]
    assert len(peaks) >= 3 and all(p > 10 for p in peaks)
    sweep = re.search(r"^ +10 +([0-9.]+) +([0-9.]+) +([0-9.]+) +([0-9.]+)", out, re.M)  # N = 10
    assert sweep and all(float(x) > 0 for x in sweep.groups())
    assert re.search(r"^ +3 +[0-9.]+ +[0-9.]+", out, re.M)  # k = 3 in the k sweep
    interval = r" +\[[0-9.]+, [0-9.]+\]"  # paired per-repeat ratios: their interval (one repeat: a point)
    assert re.search(r"routed decode tok/s / same adapters by hand +[0-9.]+" + interval + r" +>= 0.97 +(PASS|FAIL)",
                     out)
    assert re.search(r"routed TTFT / base TTFT \(exact, k=3\) +[0-9.]+" + interval + r" +<= 2.1 +(PASS|FAIL)", out)
    assert "every row generated the same tokens per turn: yes; the same prompt tokens: yes" in out  # chat section


def test_paired_ratio_cancels_the_machines_drift_between_repeats():
    """Each repeat's two rows run side by side: a machine that slows down between repeats (a shared VM) moves both,
    so the per-repeat ratio is the true one where the ratio of medians is not; noise within a repeat shows in the
    interval."""
    from logo_edge.bench import Sample, paired_ratio

    speed = [1.0, 1.0, 1.9, 2.1, 1.0, 1.8, 2.2]  # a slower machine in some repeats
    base = [Sample(0.5 * f, 150 / f, 1.0 * f, 128) for f in speed]
    routed = [Sample(1.02 * f, 0.95 * 150 / f, 2.0 * f, 128) for f in speed]  # true: TTFT 2.04x, decode 0.95
    assert paired_ratio(routed, base, "ttft") == pytest.approx((2.04, 2.04, 2.04))
    assert paired_ratio(routed, base, "tok_s")[0] == pytest.approx(0.95)
    # runs from different repeats paired (what separately taken medians amount to): the drift is the interval
    value, lo, hi = paired_ratio(routed, base[2:] + base[:2], "ttft")
    assert hi - lo > 0.5 and lo < 2.04 < hi


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
    check_kept(turns["mixkeep"], res["keep"])
    check_kept(turns["routed"], None)
    out = capsys.readouterr().out
    assert re.search(r"every row generated the same tokens per turn: yes; the same prompt tokens: yes", out)
    assert re.search(r"^  target: same-task turn 3, routed exact \(row 4\) TTFT / base \(row 2\) " + NUM, out, re.M)
    # the tiny model's random adapters may route apart turn to turn; with keep=1 any routing agrees:
    res = chat_section(tiny / "tiny-f32.gguf", pool, threads=1, quick=True, keep=1.0)
    assert res["kept_turns_probe"] == [2, 3, 4]  # every turn continuing its conversation (half the prompt cached)
    check_kept(res["turns"]["mixkeep"], 1.0)


def check_kept(turns: list[dict], keep: float | None) -> None:
    """A routed row's record per turn against the engine's rule: kept = the history is mostly cached and (row 7,
    the base-probe rule, `keep` given) the new routing is within total variation `keep` of the mixture set (the
    previous turn's); kept turns answer with that mixture and reuse the history; new ones prefill it all again."""
    from logo_edge.engine import KEEP_MIN_PREFIX

    assert turns[0]["mixture"] == "new"
    for i, (prev, now) in enumerate(zip(turns, turns[1:])):
        if now["mixture"] == "returned":  # K/V kept per mixture: an earlier turn's mixture and its history back
            assert any(now["weights"] == t["weights"] for t in turns[:i]) and now["cached"] > 0, (prev, now)
            continue
        continuing = prev["prompt"] >= max(KEEP_MIN_PREFIX, now["prompt"] // 2)  # at least what it can reuse
        names = set(prev["weights"]) | set(now["weights"])
        tv = 0.5 * sum(abs(now["weights"].get(n, 0.0) - prev["weights"].get(n, 0.0)) for n in names)
        if now["mixture"] == "kept":
            assert continuing and now["weights"] == prev["weights"] and now["cached"] >= prev["prompt"]
        else:
            assert keep is None or not continuing or tv > keep, (prev, now)
            assert now["cached"] == 0  # a new mixture prefills the whole prompt again
