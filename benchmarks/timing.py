"""Wall-clock timing with repeats: the machine is shared, so the median is reported."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Tuple, TypeVar

Arg = TypeVar("Arg")


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


def time_rounds(
    calls: Dict[str, Callable[[Arg], object]],
    fresh: Callable[[], Arg],
    repeats: int,
    budget_s: float,
    settle_s: float = 0.0,
) -> Dict[str, List[float]]:
    """Seconds of each ``call(fresh())``, the argument made outside the timer: name ->
    the timed samples.

    The calls take turns (one round times each once), so a load change on a shared
    machine hits them alike and their ratio stays meaningful. The first round is a
    warm-up, dropped; a call stops being repeated once it has spent ``budget_s`` (a
    call of seconds is timed once or twice, and its one call counts when it alone
    spent the budget). ``settle_s``: a pause before each call, outside the timer, so
    that threads a call leaves spinning (onnxruntime's pool spins for 20 to 35 ms of
    CPU after a run) are asleep before the next method's call starts.
    """
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats + 1):
        for name, call in calls.items():
            spent = samples[name]
            if len(spent) >= 2 and sum(spent) >= budget_s:
                continue
            if len(spent) == 1 and spent[0] >= budget_s:
                continue
            arg = fresh()
            if settle_s:
                time.sleep(settle_s)
            start = time.perf_counter()
            call(arg)
            spent.append(time.perf_counter() - start)
    return {name: spent[1:] if len(spent) > 1 else spent for name, spent in samples.items()}


def spread(samples: List[float]) -> float:
    """The interquartile range of ``samples`` over their median (0 for fewer than two):
    how noisy the median is."""
    if len(samples) < 2:
        return 0.0
    low, _, high = statistics.quantiles(samples, n=4, method="inclusive")
    return (high - low) / statistics.median(samples)
