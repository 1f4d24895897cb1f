"""bench/prefix_cache.py's runs: one untimed run of each engine kind first (the process's first cached and uncached
batches are slow), then `reps` timed runs of each, alternating which kind goes first."""

import sys

from tests.bench.support import BENCH

sys.path.insert(0, str(BENCH))  # its siblings (options.py), as when run
from bench.prefix_cache import alternating_runs  # noqa: E402


def test_each_engine_kind_runs_once_untimed_before_the_alternating_timed_reps():
    order = []

    def timed(caching: bool) -> dict:
        order.append(caching)
        return {"run": len(order)}

    results = alternating_runs(lambda caching: caching, timed, reps=2)
    assert order == [True, False, True, False, False, True]
    assert results == {True: [{"run": 3}, {"run": 6}], False: [{"run": 4}, {"run": 5}]}
