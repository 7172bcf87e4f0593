"""The evaluation pipeline on the shipped pool and real held-out BIG-bench data (quick mode)."""

import csv

import pytest

pytestmark = pytest.mark.slow


def test_splits_are_fixed_and_no_input_is_in_two_of_them():
    """Every shipped task (the pools' and the unseen ones): no test or validation input appears in train, nor
    in the other held-out split; a repeated input is one held-out example with every reference; every large-pool
    task holds out at least 25 test examples and is a distinct BIG-bench task."""
    import json

    from logo_edge.tasks import LARGE_TASKS, POOL_TASKS, UNSEEN_TASKS, _task_json, splits

    sources = [t.source for t in POOL_TASKS + UNSEEN_TASKS + LARGE_TASKS]
    assert len(set(sources)) == len(sources)
    for task in POOL_TASKS + UNSEEN_TASKS + LARGE_TASKS:
        a, b = splits(task), splits(task)
        assert [e.prompt for e in a["test"]] == [e.prompt for e in b["test"]]  # seeded: reproducible
        test, val, train = ({e.prompt for e in a[k]} for k in ("test", "val", "train"))
        assert len(a["test"]) > 0 and len(test) == len(a["test"]) and len(val) == len(a["val"]), task.name
        assert not test & train and not val & train and not test & val, task.name
        assert task not in LARGE_TASKS or len(a["test"]) >= 25, task.name
    e2e = next(t for t in POOL_TASKS if t.name == "e2e")
    raw = _task_json(e2e.source)["examples"]
    by_input: dict[str, set] = {}
    for ex in raw:
        by_input.setdefault(json.dumps(ex.get("input"), sort_keys=True), set()).add(str(ex.get("target")))
    assert max(len(r) for r in by_input.values()) > 1  # the source repeats inputs with other references
    assert max(len(e.refs) for e in splits(e2e)["test"]) > 1  # held out together, every reference kept


def test_quick_eval_routes_far_above_chance_on_the_shipped_pool(tmp_path):
    from logo_edge.defaults import default_pool
    from logo_edge.engine import Engine
    from logo_edge.eval import run_eval
    from logo_edge.tasks import POOL_TASKS

    pool = default_pool()
    assert pool is not None, "the shipped pool models/pool/*.gguf is missing"
    with Engine(adapters=pool, n_ctx=1024) as eng:
        names = eng.pool.names
        assert len(names) >= 10
        summary = run_eval(eng, 3, tmp_path, quick=True, tasks=[t.name for t in POOL_TASKS if t.name in names])
    top1, top3 = summary["hit_rates"]["norm [zscore], normed, last 8 blocks"]  # the shipped default
    assert top1 >= 0.8 and top3 >= 0.9, summary["hit_rates"]  # chance: 0.1 / 0.3
    paper = summary["hit_rates"]["norm [raw], residual, last block"]
    assert paper[0] < top1  # the paper's raw signal on the last block ranks worse
    assert (tmp_path / "report.md").read_text().count("|") > 20
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {r["method"] for r in rows} == {"base", "oracle", "LoGo-norm k=3", "LoGo-norm k=3 [zscore]"}
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
    by = {m: [float(r["score"]) for r in rows if r["method"] == m] for m in ("base", "oracle")}
    assert sum(by["oracle"]) > sum(by["base"])  # the task's own adapter helps on held-out data


def test_eval_routes_a_pool_with_mlp_only_and_v_only_adapters_as_the_engine_does(tmp_path):
    """The large pool holds adapters without the probe target: the evaluation's default method must route them
    exactly as a request does (Engine.route, both probe banks), and count their hit rates."""
    from pathlib import Path

    from logo_edge.defaults import default_model_path
    from logo_edge.engine import Engine
    from logo_edge.eval import merge_eval, run_eval
    from logo_edge.eval_modules import ATTENTION, QUERY, strip_modules
    from logo_edge.gguf_files import BaseInfo

    src = Path(__file__).resolve().parents[1] / "models" / "pool-mixed"
    pool = tmp_path / "pool"
    pool.mkdir()
    info = BaseInfo.read(default_model_path())
    assert strip_modules(src / "addition.gguf", pool / "addition.gguf", info, ATTENTION)  # gate/up/down left
    assert strip_modules(src / "wikidata.gguf", pool / "wikidata.gguf", info, QUERY)  # v left
    for name in ("sentiment", "sql", "intent"):
        (pool / f"{name}.gguf").write_bytes((src / f"{name}.gguf").read_bytes())
    tasks = ["addition", "wikidata", "sentiment", "sql", "intent"]
    with Engine(adapters=pool, n_ctx=1024) as eng:
        assert len(eng.pool.other_bank) == 1 and not eng.pool.unprobeable
        for k in (0, 1):  # two shards, merged into one report (as a large pool's run on two cores)
            run_eval(eng, 2, tmp_path / f"shard{k}", quick=True, tasks=tasks, n_route=6,
                     methods=["base", "LoGo-norm k=3 [zscore]"], shard=(k, 2))
        summary = merge_eval(eng, [tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "out")
        rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
        assert {(r["task"], int(r["idx"])) for r in rows} == {(t, 6 * i + j) for i, t in enumerate(tasks)
                                                              for j in range(2)}
        assert {r["method"] for r in rows} == {"base", "LoGo-norm k=3 [zscore]"}
        from logo_edge.tasks import TASKS, splits

        for r in (r for r in rows if r["method"] == "LoGo-norm k=3 [zscore]"):
            ex = splits(TASKS[r["task"]])["test"][int(r["idx"]) % 6]  # idx runs over 6 examples per task
            rec = eng.route([{"role": "user", "content": ex.prompt}])
            got = {a.split(":")[0]: float(a.split(":")[1]) for a in r["adapters"].split(";")}
            # the same computation; the probe's batches split differently (the eval's probes reuse the previous
            # prompt's prefix), which moves low-order bits
            assert got == pytest.approx({a.name: a.weight for a in rec.selected}, abs=5e-3), r["task"]
    top1, _ = summary["hit_rates"]["norm [zscore], normed, last 8 blocks"]
    assert top1 >= 0.8, summary["hit_rates"]  # chance 0.2; the MLP-only and v-only adapters' prompts count


def test_the_probe_cache_method_is_generated_with_the_probe_cache(tmp_path, monkeypatch):
    """The eval's "[zscore, probe-cache]" row must answer with prefill="probe-cache" (the probe's base-model K/V
    kept), its own generation: it used to end in "probe-cache]" and not "[probe-cache]", so the row silently
    reused the exact answer. Checked against a fresh engine answering with the probe cache itself."""
    import csv

    from logo_edge.defaults import default_pool
    from logo_edge.engine import Engine
    from logo_edge.eval import Evaluator, run_eval
    from logo_edge.tasks import TASKS, splits

    calls = []
    real = Evaluator.generate

    def generate(self, ex, mixture, merge="mixture", **route):
        calls.append(route.get("prefill", "exact"))
        return real(self, ex, mixture, merge, **route)

    monkeypatch.setattr(Evaluator, "generate", generate)
    approx = "LoGo-norm k=3 [zscore, probe-cache]"
    with Engine(adapters=default_pool(), n_ctx=1024) as eng:
        run_eval(eng, 2, tmp_path, tasks=["sentiment"], methods=["LoGo-norm k=3 [zscore]", approx])
        assert calls.count("probe-cache") == 2 and calls.count("exact") == 2
        rows = [r for r in csv.DictReader(open(tmp_path / "results.csv")) if r["method"] == approx]
        assert len(rows) == 2, rows
        for r, ex in zip(rows, splits(TASKS["sentiment"])["test"]):
            eng.forget_prompts()
            out = eng.create_chat_completion([{"role": "user", "content": ex.prompt}], prefill="probe-cache",
                                             max_tokens=TASKS["sentiment"].max_tokens)
            assert r["pred"] == out["choices"][0]["message"]["content"].strip()[:200]
