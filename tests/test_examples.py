"""Example prompts (logo_edge.examples): the file format, the prototype router against a plain reference, and
routing the shipped pool by its adapters' training inputs, checked on held-out test prompts."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logo_edge.errors import AdapterError, ModelLoadError
from logo_edge.examples import TEMPERATURE, Prototypes, example_states, examples_path, read_examples, write_examples
from logo_edge.router import NOT_SHORTLISTED, Routing


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=60).filter(str.strip), min_size=1, max_size=8))
def test_examples_file_round_trips(tmp_path_factory, prompts):
    path = tmp_path_factory.mktemp("ex") / "a.examples.jsonl"
    write_examples(path, prompts)
    assert read_examples(path) == prompts


@pytest.mark.parametrize("text, says", [
    ("", "no example prompts"),
    ('{"prompt": "ok"}\nnot json\n', "line 2: not JSON"),
    ('{"text": "no prompt key"}\n', "line 1: each line must be a JSON object"),
    ('["a list"]\n', "line 1: each line must be a JSON object"),
    ('{"prompt": "   "}\n', "line 1: each line must be a JSON object"),
    (json.dumps({"prompt": "x" * 9000}) + "\n", "line 1: the prompt has 9000 characters"),
])
def test_a_malformed_examples_file_is_named_with_its_line(tmp_path, text, says):
    path = tmp_path / "sql.examples.jsonl"
    path.write_text(text)
    with pytest.raises(AdapterError, match=says) as e:
        read_examples(path)
    assert str(path) in str(e.value)


def test_examples_sit_beside_the_adapter():
    assert examples_path("/p/sql.gguf").name == "sql.examples.jsonl"
    assert examples_path("/p/a.b.gguf").name == "a.b.examples.jsonl"


def _reference(h, examples, generic):
    """A plain loop: centre on the generic mean, unit length, average, unit length; cosine."""
    c = generic.reshape(len(generic), -1).mean(0)

    def unit(v):
        return v / np.linalg.norm(v)

    protos = [unit(np.mean([unit(e.reshape(-1) - c) for e in ex], 0)) for ex in examples]
    return np.array([float(unit(h.reshape(-1) - c) @ p) for p in protos])


def test_prototype_routing_equals_a_plain_loop():
    rng = np.random.default_rng(0)
    generic = rng.normal(size=(20, 2, 6))
    examples = [rng.normal(size=(int(rng.integers(1, 5)), 2, 6)) + i for i in range(4)]
    h = rng.normal(size=(2, 6)) + 2
    protos = Prototypes.build([0, 1, 2, 3], examples, generic)
    want = _reference(h, examples, generic)
    np.testing.assert_allclose(protos.cosines(h), want, rtol=1e-10)
    names = ["a", "b", "c", "d"]
    logo = Routing(names, np.ones(4), np.zeros(4), [], {}, np.array([9.0, 0.0, 0.0, 0.0]))
    r = protos.route(logo, h, 2)  # every adapter has examples: the cosine ranks, LoGo's scores do not count
    top = [int(i) for i in np.argsort(-want)[:2]]
    assert r.selected == top
    w = np.exp((want[top] - want[top].max()) / TEMPERATURE)
    np.testing.assert_allclose(r.weights[top], w / w.sum(), rtol=1e-10)
    assert r.weights.sum() == pytest.approx(1.0)


def test_without_examples_an_adapter_keeps_its_logo_z_score():
    """Mixed pool: z-scores throughout, the prototypes' cosine z-scored over the generic prompts."""
    rng = np.random.default_rng(1)
    generic = rng.normal(size=(30, 8))
    examples = [rng.normal(size=(3, 8)) + 1, rng.normal(size=(3, 8)) - 1]
    protos = Prototypes.build([0, 2], examples, generic)
    h = rng.normal(size=8)
    names = ["a", "b", "c", "d"]
    logo = Routing(names, np.ones(4), np.zeros(4), [], {"d": NOT_SHORTLISTED},
                   np.array([0.5, 7.0, -1.0, np.nan]))
    r = protos.route(logo, h, 3)
    cos = _reference(h, examples, generic)
    gcos = np.stack([_reference(g, examples, generic) for g in generic])
    z = (cos - gcos.mean(0)) / gcos.std(0)
    np.testing.assert_allclose(r.scores[[0, 2]], z, rtol=1e-9)
    assert r.scores[1] == 7.0 and np.isnan(r.scores[3])
    assert r.selected[0] == 1 and "d" in r.excluded and set(r.selected) == {0, 1, 2}


def test_example_states_are_cached_and_a_bad_cache_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGO_EDGE_CACHE", str(tmp_path))
    calls = []

    def probe(p):
        calls.append(p)
        return np.full((2, 3), len(p), np.float32)

    a = example_states("m-b1-2", ["x", "yy"], probe)
    assert calls == ["x", "yy"] and a.shape == (2, 2, 3)
    b = example_states("m-b1-2", ["x", "yy"], probe)
    assert len(calls) == 2 and np.array_equal(a, b)
    (f,) = (tmp_path / "examples").glob("*.npy")
    f.write_bytes(b"not an array")
    assert np.array_equal(example_states("m-b1-2", ["x", "yy"], probe), a) and len(calls) == 4


@pytest.fixture(scope="module")
def shipped_copy(tmp_path_factory):
    """The shipped pool copied, each adapter with five inputs of its task's training split beside it."""
    from logo_edge.defaults import default_model_path, shipped_pool
    from logo_edge.tasks import TASKS, splits

    try:
        model = default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))
    pool = tmp_path_factory.mktemp("pool") / "pool"
    shutil.copytree(shipped_pool(), pool)
    for g in pool.glob("*.gguf"):
        write_examples(examples_path(g), list(dict.fromkeys(e.prompt for e in splits(TASKS[g.stem])["train"]))[:5])
    return model, pool


def _firsts(eng, tasks, n=3):
    from logo_edge.tasks import TASKS, splits

    out = {}
    for t in tasks:
        for ex in splits(TASKS[t])["test"][:n]:
            rec = eng.route([{"role": "user", "content": ex.prompt}])
            out.setdefault(t, []).append(next(a.name for a in rec.adapters if a.rank == 1))
    return out, rec


@pytest.mark.slow
def test_the_shipped_pool_routes_held_out_prompts_by_its_examples(shipped_copy):
    """Held-out test prompts go to their own task's adapter when every adapter has examples; swapping two
    adapters' example files swaps where their prompts go (the examples decide, not LoGo's signal)."""
    from logo_edge import Engine

    model, pool = shipped_copy
    with Engine(model, str(pool), n_ctx=1024) as eng:
        firsts, rec = _firsts(eng, eng.pool.names)
        assert rec.settings["examples"] == len(eng.pool.names)
        hits = sum(f == t for t, fs in firsts.items() for f in fs)
        assert hits >= 0.9 * sum(map(len, firsts.values())), firsts
        off, _ = _firsts(eng, ["sql"], 2)
        ex_off = eng.route("hello", examples=False)
        assert "examples" not in ex_off.settings
    a, b = examples_path(pool / "sql.gguf"), examples_path(pool / "sentiment.gguf")
    sa, sb = a.read_text(), b.read_text()
    try:
        a.write_text(sb)
        b.write_text(sa)
        with Engine(model, str(pool), n_ctx=1024) as eng:
            swapped, _ = _firsts(eng, ["sql", "sentiment"], 2)
    finally:
        a.write_text(sa)
        b.write_text(sb)
    assert swapped == {"sql": ["sentiment"] * 2, "sentiment": ["sql"] * 2}, swapped


@pytest.mark.slow
def test_adapters_without_examples_and_a_broken_file_still_route(shipped_copy, tmp_path):
    """Half the pool without examples, one examples file malformed (a warning names it): every adapter is still
    ranked, on z-scores, and a chat of two turns answers."""
    from logo_edge import Engine

    model, src = shipped_copy
    pool = tmp_path / "pool"
    shutil.copytree(src, pool)
    names = sorted(p.stem for p in pool.glob("*.gguf"))
    for n in names[::2]:
        examples_path(pool / f"{n}.gguf").unlink()
    examples_path(pool / f"{names[1]}.gguf").write_text("{broken\n")
    with Engine(model, str(pool), n_ctx=1024) as eng:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            protos = eng.prototypes()
        assert any(f"{names[1]}.examples.jsonl, line 1: not JSON" in str(x.message) for x in w)
        assert len(protos.index) == len(names[1::2]) - 1
        firsts, rec = _firsts(eng, names, 2)
        assert sum(f == t for t, fs in firsts.items() for f in fs) >= 0.8 * 2 * len(names), firsts
        assert rec.settings["examples"] == len(protos.index)
        msgs = [{"role": "user", "content": "Is this review positive or negative? 'A wonderful film.'"}]
        one = eng.create_chat_completion(msgs, max_tokens=8)
        msgs += [one["choices"][0]["message"], {"role": "user", "content": "And 'A dull, boring film.'?"}]
        two = eng.create_chat_completion(msgs, max_tokens=8)
        assert two["choices"][0]["message"]["content"] is not None


@pytest.mark.slow
def test_eval_reports_the_examples_router_as_a_request_routes(shipped_copy, tmp_path):
    """`logo-edge eval` on a pool with examples: an "examples k=3" method whose mixtures are the engine's own
    routing of the same prompt, its hit rates beside LoGo's, and LoGo's methods still LoGo's alone."""
    import csv

    from logo_edge import Engine
    from logo_edge.eval import run_eval
    from logo_edge.tasks import TASKS, splits

    model, pool = shipped_copy
    tasks = ["sql", "sentiment", "addition"]
    with Engine(model, str(pool), n_ctx=1024) as eng:
        summary = run_eval(eng, 1, tmp_path, quick=True, tasks=tasks, n_route=3,
                           methods=["examples k=3", "LoGo-norm k=3 [zscore]"])
        rows = list(csv.DictReader(open(tmp_path / "results.csv")))
        for r in rows:
            ex = splits(TASKS[r["task"]])["test"][0]
            rec = eng.route([{"role": "user", "content": ex.prompt}], examples=r["method"] == "examples k=3")
            got = {a.split(":")[0]: float(a.split(":")[1]) for a in r["adapters"].split(";")}
            assert got == pytest.approx({a.name: a.weight for a in rec.selected}, abs=5e-3), r
    hits = summary["hit_rates"]["examples [zscore], normed, last 8 blocks"]
    assert hits[0] == 1.0, summary["hit_rates"]
    assert "| examples k=3 |" in (tmp_path / "report.md").read_text()


def test_the_large_pools_examples_are_training_inputs_of_their_own_task():
    """models/pool-large ships ten example prompts per adapter: every one an input of its own task's training
    split, none a validation or test input of any shipped task (the reports measure on those)."""
    from pathlib import Path

    from logo_edge.tasks import TASKS, splits

    pool = Path(__file__).resolve().parents[1] / "models" / "pool-large"
    held_out = {e.prompt for t in TASKS.values() for s in ("val", "test") for e in splits(t)[s]}
    files = sorted(pool.glob("*.gguf"))
    assert files
    for g in files:
        prompts = read_examples(examples_path(g))
        train = {e.prompt for e in splits(TASKS[g.stem])["train"]}
        assert len(prompts) == 10 and set(prompts) <= train and not set(prompts) & held_out, g.stem
