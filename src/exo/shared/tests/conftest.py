"""Fixtures shared by the tests of the log and the store."""

from collections.abc import Iterator

import pytest
from loguru import logger


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """What loguru logs during the test, as "LEVEL message"."""
    lines: list[str] = []
    handler = logger.add(
        lambda message: lines.append(f"{message.record['level'].name} {message.record['message']}"),
        level="DEBUG",
    )
    yield lines
    logger.remove(handler)
