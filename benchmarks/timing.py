"""Wall-clock timing with repeats: the machine is shared, so the median is reported."""

from __future__ import annotations

import statistics
import time
from typing import Callable, List, Tuple


def time_calls(
    fn: Callable[[], object], repeats: int, budget_s: float, first_s: float = None
) -> Tuple[float, List[float]]:
    """Median seconds of ``fn()`` over up to ``repeats`` timed calls.

    Stops early once the calls have used ``budget_s`` (at least one call is always
    timed), so a method that takes a minute per call does not hold the run for
    ``repeats`` minutes. ``first_s`` is the duration of an earlier call of the same
    work (e.g. the parity run) that counts as one sample.
    """
    samples: List[float] = [] if first_s is None else [first_s]
    spent = sum(samples)
    while len(samples) < repeats and (not samples or spent < budget_s):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
    return statistics.median(samples), samples
