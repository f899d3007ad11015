"""Timing a token stream: time to the first token and the decode rate after it."""

import time
from collections.abc import Iterable
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
