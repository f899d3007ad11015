"""The runner's timing logic: medians, clocks, when a measurement is reported."""

import pytest

from exo.worker.runner.timing import (
    MIN_DECODE_TOKENS,
    REPORT_INTERVAL_S,
    ReportThrottle,
    StageClock,
    StageTimeReporter,
    TokenClock,
    median_ms,
)


def test_median_in_milliseconds() -> None:
    assert median_ms([0.003, 0.001, 0.002]) == pytest.approx(2.0)
    assert median_ms([0.004, 0.001, 0.002, 0.003]) == pytest.approx(2.5)
    # One slow step (a hiccup, a page fault) does not move it.
    assert median_ms([0.010, 0.010, 0.011, 5.0, 0.010]) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        median_ms([])


def test_stage_clock_keeps_one_requests_steps() -> None:
    clock = StageClock()
    clock.record_decode_step(0.5)
    clock.begin_request()  # a new request forgets what the last one left
    clock.record_decode_step(0.1)
    clock.record_decode_step(0.2)
    assert clock.take() == [0.1, 0.2]
    assert clock.take() == []


def test_token_clock_separates_the_first_token_from_decode() -> None:
    clock = TokenClock(started=10.0)
    assert (clock.time_to_first_token_ms, clock.ms_per_token, clock.decode_tokens) == (
        None,
        None,
        0,
    )
    clock.token(10.5)
    assert clock.time_to_first_token_ms == pytest.approx(500.0)
    assert clock.ms_per_token is None  # one token: nothing decoded yet
    for now in (10.6, 10.7, 10.9):
        clock.token(now)
    assert clock.tokens == 4 and clock.decode_tokens == 3
    assert clock.ms_per_token == pytest.approx(400.0 / 3)
    assert clock.time_to_first_token_ms == pytest.approx(500.0)


def test_throttle_allows_the_first_then_one_per_interval() -> None:
    throttle = ReportThrottle(interval_s=5.0)
    assert throttle.allow(100.0)
    assert not throttle.allow(100.1)
    assert not throttle.allow(104.9)
    assert throttle.allow(105.0)
    # A refused report does not restart the interval; an allowed one does.
    assert not throttle.allow(109.0)
    assert throttle.allow(110.0)


class FakeMonotonic:
    """Test time for the reporter's throttle (the clock, not the logic under test)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _rank_zero_tokens(count: int) -> TokenClock:
    clock = TokenClock(started=0.0)
    for index in range(count):
        clock.token(0.2 + 0.05 * index)
    return clock


def test_reporter_needs_enough_decode_tokens() -> None:
    reporter = StageTimeReporter(rank=1, monotonic=FakeMonotonic(), warm_up_requests=0)
    assert reporter.report([0.01] * (MIN_DECODE_TOKENS - 1)) is None
    # A short request does not use up the first report.
    report = reporter.report([0.01] * MIN_DECODE_TOKENS)
    assert report is not None and report.tokens == MIN_DECODE_TOKENS
    rank_zero = StageTimeReporter(rank=0, monotonic=FakeMonotonic(), warm_up_requests=0)
    assert rank_zero.report([0.01] * 10, _rank_zero_tokens(MIN_DECODE_TOKENS)) is None


def test_reporter_reports_rank_zero_end_to_end_and_others_stage_only() -> None:
    rank_zero = StageTimeReporter(rank=0, monotonic=FakeMonotonic(), warm_up_requests=0)
    report = rank_zero.report([0.02, 0.01, 0.03, 0.02, 0.9], _rank_zero_tokens(6))
    assert report is not None
    assert report.rank == 0
    assert report.stage_ms_per_token == pytest.approx(20.0)
    assert report.ms_per_token == pytest.approx(50.0)
    assert report.time_to_first_token_ms == pytest.approx(200.0)
    assert report.tokens == 5
    other = StageTimeReporter(rank=2, monotonic=FakeMonotonic(), warm_up_requests=0).report(
        [0.004] * 7
    )
    assert other is not None
    assert (other.rank, other.tokens, other.ms_per_token, other.time_to_first_token_ms) == (
        2,
        7,
        None,
        None,
    )
    assert other.stage_ms_per_token == pytest.approx(4.0)


def test_reporter_reports_at_most_once_per_interval() -> None:
    time = FakeMonotonic()
    reporter = StageTimeReporter(rank=1, monotonic=time, warm_up_requests=0)
    steps = [0.01] * 8
    assert reporter.report(steps) is not None
    time.now += REPORT_INTERVAL_S / 2
    assert reporter.report(steps) is None
    time.now += REPORT_INTERVAL_S / 2
    assert reporter.report(steps) is not None


def test_the_first_long_enough_request_after_loading_warms_up_unreported() -> None:
    reporter = StageTimeReporter(rank=1, monotonic=FakeMonotonic())
    assert reporter.report([0.01] * 2) is None  # too short: not the warm-up either
    assert reporter.report([0.02] * 8) is None  # the warm-up
    report = reporter.report([0.01] * 8)
    assert report is not None
    assert report.stage_ms_per_token == pytest.approx(10.0)
