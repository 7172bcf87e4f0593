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
