"""The persisted pool index (logo_edge/pool_index.py) and the two-stage shortlist route.

Every check compares against a pool built from scratch (no index, every file read) on the same files:
the index must change how fast a pool starts, never what it routes to."""

import mmap
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logo_edge.errors import AdapterError
from logo_edge.router import CALIBRATIONS, LEAD_NORM, NOT_SHORTLISTED, TARGET_NORM, ProbeBank, shortlist_norms

PROMPTS = ["What is 12 + 30?", "Translate 'cat' into French.", "SELECT name FROM users;", "Is this review happy?"]


@pytest.fixture()
def pool_dir(tiny, tmp_path, monkeypatch):
    """A pool directory of 12 random q,v adapters for the tiny base, v_only, mlp_only and od_only, in a fresh cache."""
    import logo_edge.engine  # noqa: F401  (finds the native library in the real cache first)
    from logo_edge.bench import _write_random
    from logo_edge.gguf_files import BaseInfo

    monkeypatch.setenv("LOGO_EDGE_CACHE", str(tmp_path / "cache"))  # a fresh index (and calibration) cache
    info = BaseInfo.read(tiny / "tiny-f32.gguf")
    d = tmp_path / "pool"
    d.mkdir()
    for i in range(12):
        _write_random(info, d / f"a{i:02d}.gguf", ["attn_q", "attn_v"], rank=2 + i % 5, seed=i)
    shutil.copy(tiny / "gguf" / "v_only.gguf", d / "v_only.gguf")  # scored over its v: no q
    shutil.copy(tiny / "gguf" / "mlp_only.gguf", d / "mlp_only.gguf")  # scored over the FFN's input
    shutil.copy(tiny / "gguf" / "od_only.gguf", d / "od_only.gguf")  # an adapter the probe cannot read
    return d


def engine(tiny, adapters, **kw):
    from logo_edge.engine import Engine

    with pytest.warns(UserWarning, match="od_only"):
        return Engine(tiny / "tiny-f32.gguf", adapters, n_ctx=256, kv_type="f32", flash_attn=False, probe_blocks=3,
                      **kw)


def routes(eng, **over):
    out = []
    for p in PROMPTS:
        eng.forget_prompts()
        rec = eng.route(p, **over)
        out.append(([(a.name, a.rank) for a in rec.selected], [a.weight for a in rec.adapters],
                    [a.signal for a in rec.adapters]))
    return out


def assert_same(got, want):
    for (sel_g, w_g, s_g), (sel_w, w_w, s_w) in zip(got, want):
        assert sel_g == sel_w
        np.testing.assert_allclose(w_g, w_w, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(np.array(s_g, float), np.array(s_w, float), rtol=1e-6, equal_nan=True)


def late_adapter(tiny, tmp_path):
    """One more adapter, outside the pool directory (a hot add)."""
    from logo_edge.bench import _write_random
    from logo_edge.gguf_files import BaseInfo

    extra = tmp_path / "elsewhere" / "late.gguf"
    extra.parent.mkdir()
    _write_random(BaseInfo.read(tiny / "tiny-f32.gguf"), extra, ["attn_q", "attn_v"], rank=6, seed=42)
    return extra


class Reads:
    """Counts the adapter files the pool reads (validates and folds)."""

    def __init__(self, monkeypatch):
        import logo_edge.pool as pool_mod

        self.files = []
        real = pool_mod.read_lora

        def counting(path, *a, **kw):
            self.files.append(os.path.basename(str(path)))
            return real(path, *a, **kw)

        monkeypatch.setattr(pool_mod, "read_lora", counting)


def test_indexed_pool_routes_as_a_pool_built_from_scratch(tiny, pool_dir, monkeypatch):
    scratch = engine(tiny, pool_dir, pool_index=False)
    want = routes(scratch)
    want_stats = {a.name: a.stats for a in scratch.pool.adapters}
    scratch.close()
    first = engine(tiny, pool_dir)  # builds the index
    assert_same(routes(first), want)
    first.close()
    reads = Reads(monkeypatch)
    again = engine(tiny, pool_dir)  # maps it: no file is read
    try:
        assert reads.files == []
        base = again.pool.bank.T
        while getattr(base, "base", None) is not None:
            base = base.base
        assert isinstance(base, mmap.mmap)  # the bank is the index's file, mapped, not a copy
        assert again.pool.names == sorted(p.stem for p in pool_dir.glob("*.gguf"))
        assert again.pool.unprobeable.keys() == {"od_only"}
        assert again.pool.adapters[again.pool.index("mlp_only")].probed == ["ffn_gate", "ffn_up"]
        assert again.pool.adapters[again.pool.index("v_only")].probed == ["attn_v"]
        assert_same(routes(again), want)
        for a in again.pool.adapters:
            for pi, stats in want_stats[a.name].items():
                for sig, (m, sd) in stats.items():
                    assert a.stats[pi][sig] == pytest.approx((m, sd), rel=1e-9)
        # generation through the mapped pool loads the real adapter files
        out = again.create_completion(PROMPTS[0], max_tokens=4)
        assert out["routing"]["mode"] == "routed"
    finally:
        again.close()


def test_sv_power_routes_the_same_through_its_own_index_and_weighs_the_singular_values(tiny, pool_dir):
    """A pool folded with sv_power (its own index: not the p = 1 one) routes as one built from scratch; its raw
    signal of every adapter scored over the target alone (at the target block) is ||S^p V^T h|| of that
    adapter's dense update (numpy SVD of c B A on the file's own A and B)."""
    from logo_edge.gguf_files import read_lora

    p = 0.25
    scratch = engine(tiny, pool_dir, pool_index=False, sv_power=p, probe_modules="target-first")
    want = routes(scratch)
    h = scratch.probe(scratch.tokenize(PROMPTS[0]), "residual")
    plain = engine(tiny, pool_dir, sv_power=1.0, probe_modules="target-first")  # p = 1, indexed first
    try:
        assert routes(plain) != want  # the weighing changes the signals
        for eng in [engine(tiny, pool_dir, sv_power=p, probe_modules="target-first") for _ in range(2)]:  # build, map
            try:
                assert eng.pool.bank.sv_power == p
                assert_same(routes(eng), want)
            finally:
                eng.close()
        pool, checked = scratch.pool, 0
        h = pool.split_states(h)[0]  # the target input's window (the probe read the FFN's input too)
        got = pool.bank.norms(h, last=1)
        for a in pool.adapters:
            if a.probed != [pool.target_module]:
                continue
            checked += 1
            lora = read_lora(a.path, scratch.model.info, only=[pool.target_tensor])
            A, B = lora.pairs[pool.target_tensor]
            _, s, vt = np.linalg.svd(lora.scale(pool.target_tensor) * B.astype(np.float64) @ A, full_matrices=False)
            keep = s > s.max() * 1e-6
            ref = np.linalg.norm(s[keep] ** p * (vt[keep] @ h[-1].astype(np.float64)))
            assert got[a.bank_index] == pytest.approx(ref, rel=1e-4)
        assert checked == 12  # every q,v adapter of the directory
    finally:
        plain.close()
        scratch.close()


def test_an_index_calibrated_for_one_probe_input_serves_an_engine_routing_on_another(tiny, pool_dir):
    """The index is built by an engine calibrated on the normed input; the next routes on the residual (the
    index then lacks its statistics: it used to fail with KeyError 'residual') as a pool built from scratch."""
    from logo_edge.engine import RouteConfig

    engine(tiny, pool_dir, routing=RouteConfig(probe_input="normed")).close()
    scratch = engine(tiny, pool_dir, pool_index=False)
    want = routes(scratch)
    scratch.close()
    for _ in range(2):  # computes the missing statistics and keeps them in the index; then maps them
        eng = engine(tiny, pool_dir)
        try:
            assert_same(routes(eng), want)
        finally:
            eng.close()


def test_changed_added_removed_and_touched_files_are_reindexed_alone(tiny, pool_dir, monkeypatch):
    from logo_edge.bench import _write_random
    from logo_edge.gguf_files import BaseInfo

    engine(tiny, pool_dir).close()
    info = BaseInfo.read(tiny / "tiny-f32.gguf")
    _write_random(info, pool_dir / "a03.gguf", ["attn_q"], rank=3, seed=99)  # changed content
    _write_random(info, pool_dir / "new.gguf", ["attn_q", "attn_k"], rank=4, seed=77)  # added
    (pool_dir / "a05.gguf").unlink()  # removed
    st = (pool_dir / "a07.gguf").stat()
    os.utime(pool_dir / "a07.gguf", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    reads = Reads(monkeypatch)
    eng = engine(tiny, pool_dir)
    try:
        assert sorted(reads.files) == ["a03.gguf", "new.gguf"]
        got = routes(eng)
    finally:
        eng.close()
    scratch = engine(tiny, pool_dir, pool_index=False)
    try:
        assert_same(got, routes(scratch))
    finally:
        scratch.close()


def test_hot_add_and_remove_through_the_index_equal_scratch(tiny, pool_dir, tmp_path):
    extra = late_adapter(tiny, tmp_path)
    eng = engine(tiny, pool_dir)
    try:
        eng.add_adapter(extra)
        eng.remove_adapter("a02")
        with pytest.raises(AdapterError, match="already in the pool"):
            eng.add_adapter(extra)
        got = routes(eng)
        names = eng.pool.names
    finally:
        eng.close()
    files = [p for p in sorted(pool_dir.glob("*.gguf")) if p.stem != "a02"]
    scratch = engine(tiny, files + [extra], pool_index=False)
    try:
        # a file given alone is named by its general.name (here its stem too)
        assert scratch.pool.names == names
        assert_same(got, routes(scratch))
    finally:
        scratch.close()


def test_removals_that_compact_the_index_route_as_scratch_and_keep_statistics(tiny, pool_dir, tmp_path):
    """Removing most of a pool compacts the index into a new generation (every row moves): the pool must read
    the moved rows, not its old offsets, and keep the statistics computed since it was loaded."""
    from logo_edge.bench import _write_random
    from logo_edge.gguf_files import BaseInfo

    info = BaseInfo.read(tiny / "tiny-f32.gguf")
    for i in range(12, 24):  # 24 q,v adapters: over the 256 rows compaction needs
        _write_random(info, pool_dir / f"a{i:02d}.gguf", ["attn_q", "attn_v"], rank=8, seed=i)
    eng = engine(tiny, pool_dir)
    try:
        other = "residual" if eng.routing.probe_input == "normed" else "normed"
        eng.route(PROMPTS[0], probe_input=other)  # calibrates another probe input after load (stored in the index)
        gen = eng.pool._index.meta["generation"]
        for i in range(16):
            eng.remove_adapter(f"a{i:02d}")
        assert eng.pool._index.meta["generation"] > gen  # compacted
        got, got_other = routes(eng, shortlist=0), routes(eng, shortlist=0, probe_input=other)
        names = eng.pool.names
    finally:
        eng.close()
    files = [p for p in sorted(pool_dir.glob("*.gguf")) if not (p.stem.startswith("a") and int(p.stem[1:]) < 16)]
    scratch = engine(tiny, files, pool_index=False)
    try:
        assert scratch.pool.names == names
        assert_same(got, routes(scratch, shortlist=0))
        assert_same(got_other, routes(scratch, shortlist=0, probe_input=other))
    finally:
        scratch.close()


@pytest.mark.parametrize("index", [False, True])
def test_an_adapter_whose_update_is_zero_is_unprobeable_and_the_others_route_as_without_it(tiny, pool_dir, index):
    """An untrained adapter (B = 0) has no direction to read: it is named unprobeable, and every other
    adapter's signal is what it is without it (a bank row range of 0 shifted its neighbours' sums)."""
    from logo_edge.gguf_files import BaseInfo, write_lora

    info = BaseInfo.read(tiny / "tiny-f32.gguf")
    pairs = {}
    for b in range(info.n_layer):
        for m in ("attn_q", "attn_v"):
            n_in, n_out = info.shapes[f"blk.{b}.{m}.weight"][:2]
            pairs[f"blk.{b}.{m}.weight"] = (np.random.default_rng(b).standard_normal((4, n_in), np.float32) * .02,
                                            np.zeros((n_out, 4), np.float32))
    write_lora(pool_dir / "a00_untrained.gguf", info.arch, 8, pairs, "f16", name="a00_untrained")
    with pytest.warns(UserWarning, match=r"'a00_untrained'.*update c B A is zero"):
        eng = engine(tiny, pool_dir, pool_index=index)
    try:
        assert "a00_untrained" in eng.pool.unprobeable
        got = routes(eng)
        keep = [n != "a00_untrained" for n in eng.pool.names]
    finally:
        eng.close()
    files = [p for p in sorted(pool_dir.glob("*.gguf")) if p.stem != "a00_untrained"]
    without = engine(tiny, files, pool_index=False)
    try:
        want = routes(without)
    finally:
        without.close()
    for (sel_g, _, s_g), (sel_w, _, s_w) in zip(got, want):
        assert sel_g == sel_w
        s_g = [s for s, k in zip(s_g, keep) if k]
        np.testing.assert_allclose(np.array(s_g, float), np.array(s_w, float), rtol=1e-6, equal_nan=True)


def test_a_killed_writer_or_a_broken_index_is_recovered(tiny, pool_dir, capfd):
    from logo_edge.pool_index import PoolIndex

    eng = engine(tiny, pool_dir)
    want = routes(eng)
    root = eng.pool._index.root
    eng.close()
    t = next(root.glob("t.*.f32"))
    with open(t, "ab") as f:  # rows a killed writer appended but never committed
        f.write(b"\x7f" * 4096)
    eng = engine(tiny, pool_dir)
    assert_same(routes(eng), want)
    eng.close()
    (root / "meta.json").write_text("{not json")
    eng = engine(tiny, pool_dir)
    try:
        assert "unreadable" in capfd.readouterr().err
        assert_same(routes(eng), want)
    finally:
        eng.close()
    assert PoolIndex(root, 3, 7, 7).meta["rows"] == 0  # another shape: not this index, rebuilt


def test_a_bad_file_fails_the_pool_naming_it_and_keeps_the_good_ones_indexed(tiny, pool_dir, monkeypatch):
    from logo_edge.engine import Engine

    (pool_dir / "zz_bad.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(AdapterError, match="zz_bad.gguf"):
        Engine(tiny / "tiny-f32.gguf", pool_dir, n_ctx=256, kv_type="f32", flash_attn=False, probe_blocks=3)
    (pool_dir / "zz_bad.gguf").unlink()
    reads = Reads(monkeypatch)
    engine(tiny, pool_dir).close()
    assert reads.files == []  # everything before the bad file was committed


def test_shortlist_is_exact_when_it_covers_the_pool_and_reads_the_leading_rows_of_its_members(tiny, pool_dir):
    eng = engine(tiny, pool_dir)
    try:
        exact = routes(eng, shortlist=0)
        assert_same(routes(eng, shortlist=32), exact)  # 12 probeable adapters <= 32: no shortlist
        for p in PROMPTS:
            eng.forget_prompts()
            rec = eng.route(p, shortlist=4)
            # the shortlist bounds the bank's reads; adapters scored over the FFN's input (mlp_only) are all read
            other = [a.name for a in eng.pool.adapters if a.other_index is not None]
            assert other == ["mlp_only"] and rec.settings["shortlist"] == 4 + len(other)
            considered = [a for a in rec.adapters if a.name not in eng.pool.unprobeable and a.note != NOT_SHORTLISTED]
            assert len(considered) == 4 + len(other) and all(a.signal is not None for a in considered)
            assert {a.name for a in rec.selected} <= {a.name for a in considered}
            eng.forget_prompts()
            h, _ = eng.pool.split_states(eng.probe(eng.tokenize(p)))
            bank = eng.pool._bank
            lead = dict(zip([a.name for a in eng.pool.adapters if a.bank_index is not None], bank.norms(h, lead=True)))
            for a in considered:  # the shortlist's window norms: over each adapter's leading rows
                if a.name in lead:
                    assert a.signal == pytest.approx(lead[a.name], rel=1e-5)
        # the index keeps each adapter's leading rows (q, k, v stacked: fewer than its rows); the shortlist's first
        # stage routes as over the files read afresh
        bank = eng.pool._bank
        assert (bank.leads <= bank.ranks).all() and (bank.leads < bank.ranks).any()
        fresh = engine(tiny, pool_dir, pool_index=False)
        try:
            np.testing.assert_array_equal(fresh.pool._bank.leads, bank.leads)
            assert_same(routes(eng, shortlist=4), routes(fresh, shortlist=4))
        finally:
            fresh.close()
    finally:
        eng.close()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(2, 12), size=st.integers(1, 12), seed=st.integers(0, 10_000),
       calibration=st.sampled_from(["raw", "ratio", "zscore"]), power=st.sampled_from([1.0, 0.25]))
def test_shortlist_takes_the_best_target_scores(n, size, seed, calibration, power):
    """Stage one ranks by the target block's norm over each adapter's leading rows: the whole update where it is
    one module (or sv_power is 1), else the stacked modules' top singular directions, as many as the largest
    module's rank (numpy's SVD of the dense updates here); stage two reads the same rows at every window block
    for the shortlist alone; both are calibrated with the same norms' statistics."""
    rng = np.random.default_rng(seed)

    def one(r):
        return rng.normal(size=(r, 6)), rng.normal(size=(5, r)), float(rng.uniform(-2, 2))
    entries = []
    for r in rng.integers(1, 5, size=n):
        row = [one(r) for _ in range(3)]
        if rng.random() < 0.5:  # the target stacked with other modules reading its input (probe_modules="input")
            row[-1] = [(*row[-1], True)] + [one(int(k)) for k in rng.integers(1, 5, size=rng.integers(1, 3))]
        entries.append(row)
    bank, h = ProbeBank.of(entries, sv_power=power), rng.normal(size=(3, 6))

    def lead_norm(e, x):
        parts = e if isinstance(e, list) else [e]
        dense = np.concatenate([c * b @ a for a, b, c, *_ in parts])
        _, sv, vt = np.linalg.svd(dense, full_matrices=False)
        keep = sv > sv.max() * 1e-6
        if power != 1.0:
            keep[max(a.shape[0] for a, *_ in parts):] = False
        return np.linalg.norm(sv[keep] ** power * (vt[keep] @ x))

    def lead_window(row, hs):
        return np.sqrt(sum(lead_norm(e, x) ** 2 for e, x in zip(row, hs)))

    want1 = np.array([lead_norm(row[-1], h[-1]) for row in entries])
    np.testing.assert_allclose(bank.lead_norms(h), want1, rtol=1e-4, atol=1e-6)
    want2 = np.array([lead_window(row, h) for row in entries])
    np.testing.assert_allclose(bank.norms(h, lead=True), want2, rtol=1e-4, atol=1e-6)
    states = rng.normal(size=(7, 3, 6))
    for i, row in enumerate(entries):  # their calibration statistics are the same norms'
        ref1 = np.array([lead_norm(row[-1], x[-1]) for x in states])
        ref2 = np.array([lead_window(row, x) for x in states])
        got = bank.stats(i, states)
        np.testing.assert_allclose(got[TARGET_NORM], (ref1.mean(), ref1.std()), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(got[LEAD_NORM], (ref2.mean(), ref2.std()), rtol=1e-3, atol=1e-6)
    mean, sd = rng.uniform(0.5, 2, size=n), rng.uniform(0.5, 2, size=n)
    raw, considered = shortlist_norms(bank, h, size, calibration, None if calibration == "raw" else (mean, sd))
    score1 = CALIBRATIONS[calibration][0](want1, mean, sd) if calibration != "raw" else want1
    assert considered.sum() == min(size, n)
    assert score1[considered].min() >= score1[~considered].max(initial=-np.inf) - 1e-6
    np.testing.assert_allclose(raw[considered], want2[considered], rtol=1e-4, atol=1e-6)
    assert np.isnan(raw[~considered]).all()


def test_a_second_engine_on_the_same_index_never_changes_the_first_ones_routes(tiny, pool_dir, tmp_path):
    """Found under load: engine A hot-adds a file from elsewhere into the directory's index; engine B, opened
    on the directory alone, drops that entry. A maps the same files: its routes must not move."""
    extra = late_adapter(tiny, tmp_path)
    a = engine(tiny, pool_dir)
    try:
        a.add_adapter(extra)
        want = routes(a)
        b = engine(tiny, pool_dir)  # syncs the index to the directory: `late` is dropped there
        try:
            assert "late" not in b.pool.names
            b.remove_adapter("a04")
            assert_same(routes(a), want)
        finally:
            b.close()
        assert_same(routes(a), want)
    finally:
        a.close()


def test_a_file_another_pool_dropped_from_the_index_does_not_stop_this_pool_changing(tiny, pool_dir):
    """A served pool's adapter file is deleted and another process's pool syncs the shared index without it:
    this pool still adds and removes its other adapters; the gone one stays listed, unprobeable, named."""
    eng = engine(tiny, pool_dir)
    try:
        gone = pool_dir / "a03.gguf"
        gone.unlink()
        eng.pool._index.sync(sorted(p.resolve() for p in pool_dir.glob("*.gguf")), eng.pool._read)
        eng.remove_adapter("a05")
        assert "a05" not in eng.pool.names and "a03" in eng.pool.names
        assert "file is gone" in eng.pool.unprobeable["a03"]
        routes(eng)  # the others route
    finally:
        eng.close()


def test_an_update_that_multiplies_to_zero_is_unprobeable(tiny, pool_dir):
    """B A = 0 with neither zero (A's second row, B's first column empty): no row to read, so unprobeable
    (it aborted the whole pool's load)."""
    from logo_edge.gguf_files import BaseInfo, write_lora

    info = BaseInfo.read(tiny / "tiny-f32.gguf")
    pairs = {}
    for b in range(info.n_layer):
        for m in ("attn_q", "attn_v"):
            n_in, n_out = info.shapes[f"blk.{b}.{m}.weight"][:2]
            a = np.zeros((2, n_in), np.float32)
            a[0] = 0.02
            bb = np.zeros((n_out, 2), np.float32)
            bb[:, 1] = 0.02
            pairs[f"blk.{b}.{m}.weight"] = (a, bb)
    write_lora(pool_dir / "a00_null.gguf", info.arch, 8, pairs, "f16", name="a00_null")
    for index in (False, True):
        with pytest.warns(UserWarning, match=r"'a00_null'.*zero"):
            eng = engine(tiny, pool_dir, pool_index=index)
        with eng:
            assert "a00_null" in eng.pool.unprobeable
            routes(eng)
