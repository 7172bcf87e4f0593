"""`logo-edge bench --server`: logo-edge serve vs llama-cpp-python's server, in --quick mode."""

import math
import subprocess
import sys

import pytest


def _table(out: str) -> list[list[str]]:
    """The main table's rows (between its header and the ratios), split on whitespace."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("row ") and "server" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("ratios"))
    return [line.split() for line in lines[start + 1:end] if line.split()[:1] in (["base"], ["adapter"], ["routed"])]


@pytest.mark.slow
def test_bench_server_quick_runs_both_servers_side_by_side():
    import logo_edge._lib  # noqa: F401  (llama_cpp on the patched build, before its server is imported)

    pytest.importorskip("llama_cpp.server.app")  # llama-cpp-python's server extra
    pytest.importorskip("uvicorn")
    from logo_edge.defaults import default_model_path, default_pool
    from logo_edge.errors import ModelLoadError

    try:
        default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))
    if default_pool() is None:
        pytest.skip("the shipped pool is missing")
    # one thread per server: llama.cpp's OpenMP threads spin at barriers, so with all cores and another job
    # on the machine (a parallel test run) each token can take seconds; the plumbing is what is tested here
    r = subprocess.run([sys.executable, "-m", "logo_edge.cli", "bench", "--server", "--quick", "--threads", "1"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _table(r.stdout)
    servers = {"llama-cpp-python": 0, "logo-edge": 0}
    for cells in rows:
        conc, reqs, prompt, tokens, rps, tps, p50, p95, _cpu_srv, _cpu_rest = cells[-10:]
        nums = [float(x) for x in (prompt, tokens, rps, tps, p50, p95)]
        assert all(math.isfinite(x) and x > 0 for x in nums), cells
        assert int(conc) in (1, 2) and int(reqs) == 2
        servers[next(s for s in servers if s in cells[1])] += 1
    assert servers["llama-cpp-python"] == 4 and servers["logo-edge"] == 6, rows  # 2 + 3 rows at 2 levels
    assert "NO counterpart" in r.stdout
    ratios = r.stdout.split("\nratios ", 1)[1].split("same greedy answer", 1)[0]
    got = [float(x) for line in ratios.splitlines()[2:] if line.strip() for x in line.split()[-5:]]
    assert len(got) == 6 * 5 and all(math.isfinite(x) and x > 0 for x in got)
