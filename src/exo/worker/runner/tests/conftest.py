"""Fixtures: the whole bundled model in this process, behind an Engine."""

import pytest

from exo.models.tokenizer import ModelTokenizer
from exo.worker.runner.engine import Engine
from exo.worker.runner.generate import load_local_engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    return load_local_engine()


@pytest.fixture(scope="session")
def tokenizer(engine: Engine) -> ModelTokenizer:
    return engine.tokenizer
