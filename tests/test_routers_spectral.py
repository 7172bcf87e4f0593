"""Arrow and SpectR (logo_edge.routers_spectral) against torch SVDs of the dense c B A, from PEFT's own weights.

The reference reads each adapter's q_proj A, B and scaling from the PEFT model (HF row order; GGUF stores
B's rows RoPE-permuted), forms dW = scaling * B @ A, and takes torch.linalg.svd of it.
"""

import numpy as np
import pytest
import torch

from logo_edge.errors import RoutingError
from logo_edge.routers_spectral import SpectralBank, SpectralConfig, spectrum

PROMPTS = ["hello there", "Translate to French: the cat sleeps.", "What is 17 + 25?"]


def dense_reference(entries_by_block, x, method):
    """Per block (torch, float64, from the dense product): Arrow |x . v1|, SpectR scaling * ||V_r^T x||."""
    out = []
    for (a, b, c), xb in zip(entries_by_block, x):
        dw = c * torch.as_tensor(b, dtype=torch.float64) @ torch.as_tensor(a, dtype=torch.float64)
        _, s, vh = torch.linalg.svd(dw, full_matrices=False)
        xb = torch.as_tensor(xb, dtype=torch.float64)
        if method == "arrow":
            out.append(float((vh[0] @ xb).abs()))
        else:  # SpectR: svd of B A, A' = scaling * V^T over the adapter's rank
            r = int((s > s[0] * 1e-6).sum())
            out.append(abs(c) * float(torch.linalg.vector_norm(vh[:r] @ xb)))
    return np.array(out)


def random_entries(rng, n_adapters, n_blocks, d_in=24, d_out=20):
    rows = []
    for i in range(n_adapters):
        r = int(rng.integers(1, 7))
        row = [(rng.normal(size=(r, d_in)).astype(np.float32), rng.normal(size=(d_out, r)).astype(np.float32),
                float(rng.choice([0.5, 2.0, -1.0]))) for _ in range(n_blocks)]
        if i % 3 == 1 and n_blocks > 1:
            row[0] = None  # no LoRA on an earlier block: the mean runs over the blocks it has
        rows.append(row)
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_spectrum_is_the_svd_of_the_dense_product_and_ignores_row_permutations_of_b(seed):
    """S and V^T of c B A without forming it; permuting B's rows (what llama.cpp's GGUF does to q/k for
    RoPE) changes neither the singular values nor the right singular vectors: P B A = (P U) S V^T."""
    rng = np.random.default_rng(seed)
    r = int(rng.integers(1, 9))
    a, b, c = rng.normal(size=(r, 40)), rng.normal(size=(32, r)), float(rng.uniform(0.1, 4))
    s, vt = spectrum(a, b, c)
    _, s_ref, vh = torch.linalg.svd(c * torch.as_tensor(b) @ torch.as_tensor(a), full_matrices=False)
    np.testing.assert_allclose(s, s_ref[:r].numpy(), rtol=1e-9)
    np.testing.assert_allclose(np.abs(vt @ vh[:r].numpy().T), np.eye(r), atol=1e-6)  # equal up to sign
    s_p, vt_p = spectrum(a, b[rng.permutation(len(b))], c)
    np.testing.assert_allclose(s_p, s, rtol=1e-9)
    np.testing.assert_allclose(np.abs(vt_p @ vt.T), np.eye(r), atol=1e-6)


def test_spectrum_drops_directions_with_no_output():
    a = np.random.default_rng(0).normal(size=(4, 10))
    b = np.zeros((6, 4))
    b[:, 0] = 1.0  # rank 1
    s, vt = spectrum(a, b, 1.0)
    assert s.shape == (1,) and vt.shape == (1, 10)


@pytest.mark.parametrize("seed", range(3))
def test_bank_scores_equal_a_plain_loop_over_dense_svds(seed):
    """Both methods, both block combinations, adapters of different ranks and scales, some without an
    earlier block: the vectorized bank against the per-adapter, per-block torch reference."""
    rng = np.random.default_rng(seed)
    n_blocks = 3
    entries = random_entries(rng, 7, n_blocks)
    bank = SpectralBank([f"a{i}" for i in range(7)], entries)
    x = rng.normal(size=(n_blocks, 24)).astype(np.float32)
    for method in ("arrow", "spectr"):
        ref = []
        for row in entries:
            have = [(e, xb) for e, xb in zip(row, x) if e is not None]
            per = dense_reference([e for e, _ in have], [xb for _, xb in have], method)
            ref.append((per.mean(), per[-1]))
        ref = np.array(ref)
        np.testing.assert_allclose(bank.scores(x, method, "mean"), ref[:, 0], rtol=1e-4)
        np.testing.assert_allclose(bank.scores(x, method, "target"), ref[:, 1], rtol=1e-4)


def test_route_weights_top_k_and_edge_cases():
    rng = np.random.default_rng(1)
    names = [f"a{i}" for i in range(5)] + ["v_only"]
    bank = SpectralBank(names, random_entries(rng, 5, 2), {"v_only": "no LoRA on the probe target"})
    x = rng.normal(size=(2, 24))
    s = bank.scores(x, "arrow")
    r = bank.route(x, SpectralConfig("arrow", 3, temperature=0.5))
    top = list(np.argsort(-s, kind="stable")[:3])
    assert r.selected == top
    e = np.exp((s[top] - s[top].max()) / 0.5)
    np.testing.assert_allclose(r.weights[top], e / e.sum())  # PEFT: softmax(score / T) over the top-k
    assert r.weights.sum() == pytest.approx(1.0) and r.weights[5] == 0 and np.isnan(r.signals[5])
    assert "v_only" in r.excluded
    r = bank.route(x, SpectralConfig("spectr", 9))  # k > N: every probeable adapter, uniform (SpectR)
    assert sorted(r.selected) == list(range(5))
    np.testing.assert_allclose(r.weights[:5], 0.2)
    with pytest.raises(RoutingError, match="k must be"):
        SpectralConfig("arrow", 0)
    with pytest.raises(RoutingError, match="unknown spectral router"):
        SpectralConfig("lora-hub")
    with pytest.raises(RoutingError, match="temperature"):
        SpectralConfig("arrow", temperature=0)
    with pytest.raises(RoutingError, match="probe state has shape"):
        bank.route(rng.normal(size=(3, 24)), SpectralConfig("arrow"))
    with pytest.raises(RoutingError, match="no adapter could be scored"), pytest.warns(RuntimeWarning, match="a0"):
        bank.route(np.full((2, 24), np.nan), SpectralConfig("spectr"))


def test_zscore_calibration_standardises_each_adapter_over_the_calibration_states():
    """calibration="zscore": each adapter's score minus its mean over the calibration states, over their sd (a plain
    loop here); the top k and weights follow from the standardised scores; refused before calibrate()."""
    rng = np.random.default_rng(2)
    names = [f"a{i}" for i in range(5)]
    bank = SpectralBank(names, random_entries(rng, 5, 2), {})
    cal, x = rng.normal(size=(12, 2, 24)), rng.normal(size=(2, 24))
    with pytest.raises(RoutingError, match="needs the calibration prompts' states"):
        bank.route(x, SpectralConfig("arrow", 2, calibration="zscore"))
    bank.calibrate(cal)
    for method in ("arrow", "spectr"):
        c = np.array([[bank.scores(s, method)[i] for i in range(5)] for s in cal])
        z = (bank.scores(x, method) - c.mean(axis=0)) / c.std(axis=0)
        r = bank.route(x, SpectralConfig(method, 2, calibration="zscore"))
        np.testing.assert_allclose(r.signals, z, rtol=1e-6)
        assert r.selected == list(np.argsort(-z, kind="stable")[:2])
    with pytest.raises(RoutingError, match="calibration must be"):
        SpectralConfig("arrow", calibration="ratio")


def test_a_zero_update_scores_zero():
    rng = np.random.default_rng(2)
    entries = random_entries(rng, 3, 1)
    a, b, c = entries[1][0]
    entries[1][0] = (a, np.zeros_like(b), c)
    bank = SpectralBank(["a", "zero", "c"], entries)
    x = rng.normal(size=(1, 24))
    for method in ("arrow", "spectr"):
        s = bank.scores(x, method)
        assert s[1] == 0 and (s[[0, 2]] > 0).all()


@pytest.fixture(scope="module")
def peft_q(tiny):
    """name -> per tiny-model layer (A, B, scaling) of q_proj, as PEFT loads the adapters (HF row order)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from tiny import ADAPTERS, N_LAYER

    base = LlamaForCausalLM.from_pretrained(tiny / "hf", dtype=torch.float32).eval()
    names = list(ADAPTERS)
    model = PeftModel.from_pretrained(base, tiny / "peft" / names[0], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(tiny / "peft" / n, adapter_name=n)
    layers = model.base_model.model.model.layers
    out = {}
    for n in names:
        q = [layers[b].self_attn.q_proj for b in range(N_LAYER)]
        out[n] = [(m.lora_A[n].weight.detach().double().numpy(), m.lora_B[n].weight.detach().double().numpy(),
                   float(m.scaling[n])) for m in q]
    return out


def test_scores_on_the_tiny_pool_equal_torch_svds_of_peft_weights(tiny_engine, peft_q):
    """The bank read from the GGUF files (B's q rows RoPE-permuted by the converter) scores the engine's
    `normed` probe states (q_proj's input at each window block) as the dense SVD of PEFT's own
    scaling * B @ A does; v_only, mlp_only and od_only have no q_proj and are not ranked (LoGo ranks the first
    two, over v and over gate and up)."""
    pool = tiny_engine.pool
    bank = SpectralBank.from_pool(pool)
    assert SpectralBank.from_pool(pool) is bank  # read once per pool
    assert bank.names == pool.names and set(bank.unprobeable) == {"v_only", "mlp_only", "od_only"}
    assert "Arrow and SpectR read the target module" in bank.unprobeable["v_only"]
    probeable = bank.probeable
    assert set(probeable) == set(peft_q)
    from logo_edge.gguf_files import read_lora

    b_gguf = read_lora(pool.adapters[pool.index("qv_r8")].path, pool.model.info, only=pool.target_tensor)
    assert not np.allclose(b_gguf.pairs[pool.target_tensor][1], peft_q["qv_r8"][pool.target_block][1])  # permuted
    for prompt in PROMPTS:
        full = tiny_engine.probe(tiny_engine.tokenize(prompt), "normed")  # the FFN's input too: mlp_only
        assert full.shape == (2 * len(pool.blocks), pool.model.n_embd)
        h = full[:len(pool.blocks)]  # (n_blocks, d_in), q_proj's input
        np.testing.assert_array_equal(bank.scores(full, "arrow", "mean"), bank.scores(h, "arrow", "mean"))
        for method in ("arrow", "spectr"):
            ref = np.array([dense_reference([peft_q[n][b] for b in pool.blocks], h, method) for n in probeable])
            np.testing.assert_allclose(bank.scores(h, method, "mean"), ref.mean(axis=1), rtol=2e-4)
            np.testing.assert_allclose(bank.scores(h, method, "target"), ref[:, -1], rtol=2e-4)


def test_arrow_prototypes_equal_peft_power_iteration(tiny, peft_q):
    """PEFT's own `ArrowLoraLinearLayer.top_right_singular_vec_from_BA` (power iteration on A^T B^T B A)
    finds the prototype the bank holds, where the top singular value is well separated."""
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    from tiny import ADAPTERS

    entries = [peft_q[n] for n in ADAPTERS]
    bank = SpectralBank(list(ADAPTERS), entries)
    config = ArrowConfig(rng_seed=0)
    config.task_adapter_names = list(ADAPTERS)  # what create_arrow_model sets
    layer = ArrowLoraLinearLayer(entries[0][0][0].shape[1], config)
    checked = 0
    for i, row in enumerate(entries):
        for j, (a, b, c) in enumerate(row):
            s, _ = spectrum(a, b, c)
            if len(s) > 1 and s[1] / s[0] > 0.99:
                continue  # power iteration converges as (s2/s1)^(2 iters): skip near-degenerate tops
            v = layer.top_right_singular_vec_from_BA(torch.as_tensor(a), torch.as_tensor(b), iters=3000).numpy()
            assert abs(float(v @ bank.proto[j, i])) == pytest.approx(1.0, abs=1e-4)
            checked += 1
    assert checked >= 3 * len(entries)


@pytest.mark.slow
def test_route_times_reports_every_router(tiny, tmp_path, capsys):
    """`python -m logo_edge.routers_spectral --pools ...`: one row per pool with every router's time."""
    import shutil

    from logo_edge.routers_spectral import main

    pool = tmp_path / "pool"
    pool.mkdir()
    for n in ("qv_r8", "all7_r4", "rs_r16"):
        shutil.copy(tiny / "gguf" / f"{n}.gguf", pool / f"{n}.gguf")
    assert main(["--pools", str(pool), "--repeats", "2", "--threads", "1", "--model", str(tiny / "tiny-f32.gguf")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["N", "LoGo", "default", "ms", "Arrow", "ms", "SpectR", "ms", "spectral", "build", "s",
                                "spectral", "MB"]
    nums = [float(x) for x in lines[1].split()]
    assert nums[0] == 3 and all(np.isfinite(nums)) and all(x > 0 for x in nums[1:])


@pytest.mark.slow
def test_hit_rates_rank_the_calibrated_scores_as_standardised_by_hand(tiny, monkeypatch):
    """hit_rates: on tiny adapters under pool task names, the calibrated spectral hit rates equal ranking each
    prompt's scores standardised by the calibration prompts' mean and sd, computed here by a plain loop."""
    from logo_edge.calibration import calibration_prompts
    from logo_edge.engine import Engine
    from logo_edge.routers_spectral import hit_rates
    from logo_edge.tasks import TASKS, splits

    with Engine(tiny / "tiny-f32.gguf", n_ctx=1024, n_batch=64, n_threads=1, kv_type="f32") as eng:
        for task, adapter in (("sentiment", "qv_r8"), ("addition", "all7_r4"), ("langid", "rs_r16")):
            eng.add_adapter(tiny / "gguf" / f"{adapter}.gguf", task)
        got = hit_rates(eng, 2)
        bank = SpectralBank.from_pool(eng.pool)
        cal = eng.pool.calibration_states("normed")
        cal_every = [eng.probe_tokens(eng.tokenize(eng.format_chat([{"role": "user", "content": p}])), "normed")
                     for p in calibration_prompts()]
        want, want_mean = [], []
        for task in ("sentiment", "addition", "langid"):
            for ex in splits(TASKS[task])["test"][:2]:
                tokens = eng.tokenize(eng.format_chat([{"role": "user", "content": ex.prompt}]))
                h, h_all = eng.probe(tokens, "normed"), eng.probe_tokens(tokens, "normed")
                z, z_mean = [], []
                for i in range(3):
                    c = [bank.scores(x, "spectr")[i] for x in cal]
                    z.append((bank.scores(h, "spectr")[i] - np.mean(c)) / np.std(c))
                    # prompt mean: the mean over tokens of each token's score, standardised the same way
                    c = [np.mean([bank.scores(x[:, t], "spectr")[i] for t in range(x.shape[1])]) for x in cal_every]
                    s = np.mean([bank.scores(h_all[:, t], "spectr")[i] for t in range(h_all.shape[1])])
                    z_mean.append((s - np.mean(c)) / np.std(c))
                want.append(bank.probeable[int(np.argmax(z))] == task)
                want_mean.append(bank.probeable[int(np.argmax(z_mean))] == task)
    assert got["SpectR [zscore]"][0] == pytest.approx(np.mean(want))
    assert got["SpectR [prompt mean, zscore]"][0] == pytest.approx(np.mean(want_mean))
    assert set(got) == {"LoGo default", "Arrow", "SpectR", "Arrow [zscore]", "SpectR [zscore]", "Arrow [prompt mean]",
                        "SpectR [prompt mean]", "Arrow [prompt mean, zscore]", "SpectR [prompt mean, zscore]"}
    assert all(0 <= lo <= m <= hi <= 1 for m, lo, hi in got.values())


def test_prompt_mean_scores_equal_torch_on_every_token(tiny_engine, hf_tiny, peft_q):
    """The prompt-mean variant: the probe's every-token states equal transformers' (input_layernorm's output at
    every token of each window block), and the score is the mean over tokens of the dense SVD reference's."""
    pool = tiny_engine.pool
    bank = SpectralBank.from_pool(pool)
    probeable = bank.probeable
    prompt = " ".join(f"word{i}" for i in range(40)) + " and the question?"
    for text in (prompt, PROMPTS[0]):
        tokens = tiny_engine.tokenize(text)
        h_all = tiny_engine.probe_tokens(tokens, "normed")
        assert h_all.shape == (len(pool.blocks), len(tokens), pool.model.n_embd)
        np.testing.assert_array_equal(h_all[:, -1], tiny_engine.probe(tokens, "normed")[:len(pool.blocks)])
        with torch.no_grad():
            out = hf_tiny(torch.tensor([tokens]), output_hidden_states=True)
            refs = [hf_tiny.model.layers[b].input_layernorm(out.hidden_states[b][0]).double().numpy()
                    for b in pool.blocks]
        for i, ref in enumerate(refs):
            np.testing.assert_allclose(h_all[i], ref, rtol=0, atol=1e-4 * np.abs(ref).max())
        for method in ("arrow", "spectr"):
            per_token = np.array([[dense_reference([peft_q[n][b] for b in pool.blocks], h_all[:, t], method).mean()
                                   for n in probeable] for t in range(len(tokens))])
            np.testing.assert_allclose(bank.scores(h_all, method, "mean"), per_token.mean(axis=0), rtol=2e-4)


def test_every_token_probe_spans_ubatches(tiny, tmp_path):
    """A prompt longer than n_batch: the every-token states of all ubatches, in order (each token's state equals
    the last-token probe of the prompt cut after it)."""
    from logo_edge.engine import Engine

    with pytest.warns(UserWarning, match="od_only"):
        eng = Engine(tiny / "tiny-f32.gguf", tiny / "gguf", n_ctx=256, n_batch=16, kv_type="f32", flash_attn=False)
    with eng:
        tokens = eng.tokenize(" ".join(f"w{i}" for i in range(30)))
        assert len(tokens) > 32
        h_all = eng.probe_tokens(tokens, "residual")
        n = len(eng.pool.blocks)
        for t in (0, 15, 16, 17, len(tokens) - 1):
            eng.forget_prompts()
            np.testing.assert_allclose(h_all[:, t], eng.probe(tokens[:t + 1], "residual")[:n], rtol=0, atol=1e-5)
