"""Fixtures shared by every test directory."""

from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def logged_warnings() -> Iterator[list[str]]:
    """Messages loguru logs at WARNING or above while the test runs."""
    messages: list[str] = []

    def sink(message: Any) -> None:
        messages.append(str(message.record["message"]))

    sink_id = logger.add(sink, level="WARNING", format="{message}")
    yield messages
    logger.remove(sink_id)
