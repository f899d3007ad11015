"""What a runner measures per generated token, and when it reports it.

Every rank times its own compute per decode step (:class:`StageClock`, fed by the steppers
and :func:`~exo.worker.runner.pipeline.serve_stage`); rank 0 also times the tokens as the
engine receives them (:class:`TokenClock`). After a request, :class:`StageTimeReporter`
turns them into one :class:`~exo.worker.runner.messages.StageTimeOutput` for the worker:
only for a request with at least :data:`MIN_DECODE_TOKENS` decode tokens, not for the first
such request after loading (:data:`WARM_UP_REQUESTS`), and at most one per
:data:`REPORT_INTERVAL_S` (the first report always).

A decode token is every generated token but the first: the first comes out of the forward
of the prompt's last token and belongs to the time to first token.
"""

import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from exo.worker.runner.messages import StageTimeOutput

MIN_DECODE_TOKENS = 4
"""Fewer decode tokens than this say too little about a device to be reported."""
REPORT_INTERVAL_S = 5.0
"""A runner reports at most one measurement this often."""
WARM_UP_REQUESTS = 1
"""Requests after loading whose timings are not reported: MLX allocates its buffers and
caches its kernels during the first, which ran 10–15 % slower than the next ones here
(bench/calibration.py)."""


def median_ms(seconds: Sequence[float]) -> float:
    """The median of durations in seconds, in milliseconds."""
    if not seconds:
        raise ValueError("no durations to take the median of")
    return statistics.median(seconds) * 1000.0


class StageClock:
    """This rank's own compute time per decode step of the request under way."""

    def __init__(self) -> None:
        self._steps: list[float] = []

    def begin_request(self) -> None:
        self._steps = []

    def record_decode_step(self, seconds: float) -> None:
        self._steps.append(seconds)

    def take(self) -> list[float]:
        """The request's decode steps so far (and forget them)."""
        steps, self._steps = self._steps, []
        return steps


class TokenClock:
    """When rank 0 started a request and when its tokens arrived (``perf_counter`` seconds)."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.tokens = 0
        self._first: float | None = None
        self._last: float | None = None

    def token(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now
        self.tokens += 1

    @property
    def decode_tokens(self) -> int:
        return max(self.tokens - 1, 0)

    @property
    def time_to_first_token_ms(self) -> float | None:
        return None if self._first is None else (self._first - self.started) * 1000.0

    @property
    def ms_per_token(self) -> float | None:
        """Wall time per decode token, from the first token to the last."""
        if self._first is None or self._last is None or self.decode_tokens == 0:
            return None
        return (self._last - self._first) * 1000.0 / self.decode_tokens


class ReportThrottle:
    """Allows one report per ``interval_s``; the first always."""

    def __init__(self, interval_s: float = REPORT_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: float | None = None

    def allow(self, now: float) -> bool:
        if self._last is not None and now - self._last < self.interval_s:
            return False
        self._last = now
        return True


class StageTimeReporter:
    """Turns one request's timings into the message for the worker, or None when the
    request was too short, warmed MLX up (the first long enough after loading) or the last
    report is too recent."""

    def __init__(
        self,
        rank: int,
        throttle: ReportThrottle | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        warm_up_requests: int = WARM_UP_REQUESTS,
    ) -> None:
        self.rank = rank
        self.throttle = throttle if throttle is not None else ReportThrottle()
        self._monotonic = monotonic
        self._warm_up_left = warm_up_requests

    def report(
        self, decode_steps: Sequence[float], tokens: TokenClock | None = None
    ) -> StageTimeOutput | None:
        """``decode_steps``: this rank's compute per decode step; ``tokens``: rank 0's clock
        of the same request."""
        if len(decode_steps) < MIN_DECODE_TOKENS:
            return None
        if tokens is not None and tokens.decode_tokens < MIN_DECODE_TOKENS:
            return None
        if self._warm_up_left > 0:
            self._warm_up_left -= 1
            return None
        if not self.throttle.allow(self._monotonic()):
            return None
        return StageTimeOutput(
            rank=self.rank,
            stage_ms_per_token=median_ms(decode_steps),
            ms_per_token=tokens.ms_per_token if tokens is not None else None,
            time_to_first_token_ms=tokens.time_to_first_token_ms if tokens is not None else None,
            tokens=tokens.decode_tokens if tokens is not None else len(decode_steps),
            measured_at=datetime.now(UTC),
        )
