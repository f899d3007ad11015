"""Fixtures shared by every test directory, and how the suite runs in parallel.

``uv run pytest`` runs on two xdist workers (``-n 2 --dist loadgroup`` in pyproject.toml;
pytest stays below 9.2, where xdist's groups silently stop working: pytest-xdist#1386).
Every test under ``tests/`` starts real node processes. They form two groups of about
the same length (:data:`SECOND_NODE_GROUP` names the files of the second), each run one
test at a time on a worker of its own, so that at most two clusters share the machine's
two cores. Their rings never meet: each worker's nodes take their ring ports from a range
of their own (``tests/cluster.py::ring_port``). The unit tests under ``src/`` fill the
workers in after the groups. ``-n 0`` runs everything in one process, as before.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

NODE_TESTS = Path(__file__).resolve().parent / "tests"
SECOND_NODE_GROUP = frozenset(
    {
        "test_api_guard.py",
        "test_cli.py",
        "test_cluster_core.py",
        "test_cluster_security.py",
        "test_durability.py",
        "test_log_integrity.py",
        "test_metrics_cluster.py",
        "test_openai_surface.py",
        "test_placement_cluster.py",
    }
)
"""The node test files of the ``nodes-b`` group; the others are ``nodes-a``. Chosen so
that the two take about the same time (the durations ``.ci/run`` prints: 474 s and 435 s
on the 2-core machine); a new file goes to the shorter group."""


def pytest_itemcollected(item: pytest.Item) -> None:
    """Marks each node test as it is collected (xdist reads the groups at the end of
    collection)."""
    if NODE_TESTS in item.path.resolve().parents:
        group = "nodes-b" if item.path.name in SECOND_NODE_GROUP else "nodes-a"
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def exo_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home of the test session's own (``$EXO_HOME``), so imported models and logs never
    land in the user's ``~/.exo``; runner processes the tests start inherit it."""
    home = tmp_path_factory.mktemp("exo-home")
    previous = os.environ.get("EXO_HOME")
    os.environ["EXO_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("EXO_HOME", None)
    else:
        os.environ["EXO_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    """(family, quantised) -> an MLX model directory built from mlx-lm's own model class
    with random weights (see ``exo.models.tests.tiny_models``)."""
    from exo.models.tests.tiny_models import FAMILY_CONFIGS, build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {
        (family, quantized): build_tiny_model(
            root / f"{family}-{'q4' if quantized else 'dense'}",
            family,
            quantized=quantized,
            seed=index,
        )
        for index, family in enumerate(FAMILY_CONFIGS)
        for quantized in (False, True)
    }


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
