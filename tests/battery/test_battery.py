"""The reliability battery (logo_edge.battery): its quick subset, the regression files it found, and the
calibration cache's corruption checks.

Full run: `LOGO_EDGE_BATTERY=full pytest -m battery tests/battery` (or `--battery-full` with tests/battery
on the command line), or `logo-edge check` outside pytest."""

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from logo_edge import battery
from logo_edge.errors import AdapterError

REGRESSIONS = Path(__file__).resolve().parents[1] / "regressions" / "adapters"
CASES = json.loads((REGRESSIONS / "cases.json").read_text())


@pytest.fixture(scope="module")
def base(tiny):
    from logo_edge.gguf_files import BaseInfo

    return BaseInfo.read(tiny / "tiny-f32.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_regression_adapter_files_are_refused_naming_the_problem(name, base):
    """Files the battery found (mutations of tiny's qkd_r2.gguf): each once hung, crashed llama.cpp, leaked an
    untyped exception or reached llama.cpp unvalidated; now an AdapterError naming the file and the fault."""
    from logo_edge.gguf_files import read_lora

    path = REGRESSIONS / f"{name}.gguf"
    with pytest.raises(AdapterError, match=CASES[name]["match"]) as e:
        read_lora(path, base)
    assert str(path) in str(e.value)


@pytest.mark.slow
def test_regression_files_are_still_the_mutations_they_describe(tiny):
    seed = (tiny / "gguf" / "qkd_r2.gguf").read_bytes()
    lay = battery._layout(seed)
    for name, case in CASES.items():
        ops = [tuple(op) for op in case["mutations"]]
        assert battery.mutate(seed, lay, ops) == (REGRESSIONS / f"{name}.gguf").read_bytes(), name


@pytest.mark.slow
def test_mutated_adapters_in_process_give_a_file_or_an_adapter_error(tiny, base):
    """The adapter part's property, in-process and without llama.cpp: read_lora returns or raises AdapterError."""
    from logo_edge.gguf_files import read_lora

    seeds = [p.read_bytes() for p in sorted((tiny / "gguf").glob("*.gguf"))]
    layouts = [battery._layout(d) for d in seeds]
    tmp = Path(tempfile.mkdtemp()) / "m.gguf"

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(battery.mutation_strategy(len(seeds)))
    def prop(m):
        i, ops = m
        tmp.write_bytes(battery.mutate(seeds[i], layouts[i], ops))
        try:
            read_lora(tmp, base)
        except AdapterError as e:
            assert str(tmp) in str(e)

    prop()


def test_corrupt_calibration_cache_is_rebuilt_never_used(tmp_path):
    fig = battery.check_cache(tmp_path)
    assert fig.counts["tried"] >= 8 and fig.counts["rebuilt"] == fig.counts["tried"], battery.table([fig])
    assert fig.bad == 0, battery.table([fig])


def _battery(request, tiny, tmp_path, parts):
    full = request.config.getoption("--battery-full", default=False) or os.environ.get("LOGO_EDGE_BATTERY") == "full"
    figs = battery.run(quick=not full, out=tmp_path, model=str(tiny / "tiny-f32.gguf"), adapters=str(tiny / "gguf"),
                       parts=parts)
    report = battery.table(figs)
    print(report)
    assert all(f.counts["tried"] > 0 for f in figs), report
    assert sum(f.bad for f in figs) == 0, report


@pytest.mark.slow
@pytest.mark.battery
def test_battery_adapter_files_and_cache(tiny, request, tmp_path):
    """Quick subset (full: LOGO_EDGE_BATTERY=full): no crash, hang, memory blow-up, untyped error or
    unvalidated file reaching llama.cpp; a corrupt calibration cache is never used."""
    _battery(request, tiny, tmp_path, ("cache", "adapters"))


@pytest.mark.slow
@pytest.mark.battery
def test_battery_requests(tiny, request, tmp_path):
    """Fuzzed Python API calls and HTTP bodies: typed errors / 4xx only, no 5xx, hang or dead server."""
    _battery(request, tiny, tmp_path, ("api", "server"))


@pytest.mark.slow
@pytest.mark.battery
def test_battery_kills_leave_old_or_new_file_never_partial(tiny, tmp_path):
    """~12 SIGKILLs at random moments of an adapter conversion (over an older valid adapter), of a
    calibration cache write and of a pool index update: the old file or the complete new one is left, never
    a partial file; the index reopens to what one built from scratch holds."""
    from logo_edge.battery_kills import run_kills

    figs = run_kills(tiny / "tiny-f32.gguf", tiny / "gguf", 12, tmp_path)
    report = battery.table(figs)
    print(report)
    assert [f.part for f in figs] == ["kills: convert", "kills: calib cache", "kills: pool index"]
    for f in figs:
        assert f.counts["kills"] == 12, report
        assert f.counts["partial"] == 0 and f.bad == 0, report
        if f.part == "kills: pool index":  # reopened, it routes as an index built from scratch on the same files
            assert f.counts["recovered"] == 12, report
        else:
            assert f.counts["old_left"] + f.counts["new_left"] + f.counts["absent"] == 12, report


@pytest.mark.slow
@pytest.mark.battery
def test_battery_soak_quick(tiny, tmp_path):
    """Quick soak: 300 Engine requests (and 30 over HTTP) rotating over 120 adapters with an LRU budget of
    ~12: no error, handles alive == the LRU within its budget, no gross RSS growth."""
    from logo_edge.battery_soak import run_soak

    figs = run_soak(tiny / "tiny-f32.gguf", 300, 30, True, tmp_path)
    report = battery.table(figs)
    print(report)
    eng = figs[0]
    assert eng.counts["tried"] == 300 and eng.counts["errors"] == 0, report
    assert eng.counts["handles_alive"] == eng.counts["lru_len"] > 0, report
    assert eng.counts["adapters_used"] >= 100, report
    assert figs[1].counts["tried"] == 30 and figs[1].counts["errors"] == 0, report
    assert sum(f.bad for f in figs) == 0, report
