"""The demo's examples and the task data: chosen by the stated rule from real held-out data, fetched via pip."""

import pytest


@pytest.mark.slow
def test_shipped_demo_examples_follow_the_rule_on_the_real_data():
    from logo_edge.demo import DEMO_WINDOW, choose_examples, load_examples
    from logo_edge.tasks import POOL_TASKS, splits

    shipped = load_examples()
    assert shipped == choose_examples()  # python -m logo_edge.demo --write-examples regenerates it
    assert [e.task for e in shipped] == [t.name for t in POOL_TASKS]
    for task, ex in zip(POOL_TASKS, shipped):
        sp = splits(task)
        assert ex.index < DEMO_WINDOW and sp["test"][ex.index].prompt == ex.prompt
        assert ex.prompt not in {e.prompt for e in sp["train"]}  # held out: never trained on


def test_bigbench_comes_through_pip_and_its_index(tmp_path, monkeypatch):
    """The archive is fetched by pip, so pip's configured index is the one asked: a dead one fails clearly."""
    from logo_edge import tasks

    monkeypatch.setenv("LOGO_EDGE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(tasks.DataError, match=r"pip could not fetch bigbench==1\.0\.0"):
        tasks.bigbench_archive()
    assert not list((tmp_path / "data").glob("*.tar.gz"))  # nothing half-written left behind


def test_the_large_pool_is_what_its_manifest_and_the_issue_say():
    """models/pool-large: one adapter per distinct BIG-bench task (>= 60), as train_pool.py's recipe deck deals
    them (its manifest records each), every file valid for the base model and routable by the default probe,
    adapters without the probe target among them (v-only, k/v, MLP-only), small enough to ship (< 100 MB)."""
    import json
    import sys
    from pathlib import Path

    from logo_edge import pool_ops
    from logo_edge.tasks import TASKS

    root = Path(__file__).resolve().parents[1]
    pool = root / "models" / "pool-large"
    sys.path.insert(0, str(root / "models"))
    try:
        import train_pool
    finally:
        sys.path.remove(str(root / "models"))
    entries = pool_ops.list_pool(pool)
    manifest = json.loads((pool / "manifest.json").read_text())["adapters"]
    assert len(entries) >= 60 and sorted(e.name for e in entries) == sorted(manifest)
    assert len({TASKS[e.name].source for e in entries}) == len(entries)  # distinct tasks
    assert sum(e.size for e in entries) < 100e6
    ranks = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for e in entries:
        recipe = train_pool.POOLS["large"][e.name]
        assert manifest[e.name]["recipe"]["target_modules"] == list(recipe.target_modules), e.name
        assert e.modules == sorted(ranks[m] for m in recipe.target_modules) and e.rank == recipe.r, e.name
        assert e.probeable, e.name
    kinds = {tuple(e.modules) for e in entries}
    assert ("attn_v",) in kinds and ("attn_k", "attn_v") in kinds and ("ffn_down", "ffn_gate", "ffn_up") in kinds
