"""What the example prototypes cost per request at N adapters: the cosines of one probe state (16 x 576, the
large pool's layout) with N random prototype rows, on one thread, and the rows' memory. A micro-measurement, not
`logo-edge bench` (whose pool sweep has no examples files).

    python cost.py        # N = 100 and 1,000: median of 50
"""
from __future__ import annotations

import time

import numpy as np

from logo_edge.examples import Prototypes
from logo_edge.router import one_blas_thread


def main() -> None:
    rng = np.random.default_rng(0)
    d = 16 * 576
    for n in (100, 1000):
        p = Prototypes(np.arange(n), rng.normal(size=(n, d)), np.zeros(d), np.zeros(n), np.ones(n))
        h = rng.normal(size=(16, 576)).astype(np.float32)
        times = []
        with one_blas_thread():
            for _ in range(50):
                t0 = time.perf_counter()
                p.cosines(h)
                times.append(time.perf_counter() - t0)
        print(f"N = {n}: {1000 * np.median(times):.2f} ms, rows {p.rows.nbytes / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
