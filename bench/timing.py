"""Timing helpers of the benchmarks: a token stream's time to the first token and decode
rate after it, and percentiles of measured times."""

import time
from collections.abc import Iterable, Sequence
from typing import NamedTuple


class StreamTiming(NamedTuple):
    ttft_s: float
    """Seconds from the call to the first token."""
    tokens_per_s: float
    """Tokens after the first, per second after the first arrived."""
    tokens: int


def timed(arrivals: Iterable[int]) -> StreamTiming:
    """Time a stream whose items are how many tokens arrived with each (0: none yet)."""
    started = time.perf_counter()
    first: float | None = None
    count = 0
    for arrived in arrivals:
        if arrived and first is None:
            first = time.perf_counter()
        count += arrived
    finished = time.perf_counter()
    if first is None or count < 2:
        raise RuntimeError(f"only {count} tokens came back")
    return StreamTiming(first - started, (count - 1) / max(finished - first, 1e-9), count)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value at ``fraction`` (0..1) of the sorted values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]
