"""Fixtures: the bundled GGUF loaded once per session (whole model and its tokenizer)."""

import pytest

from exo.models.bundled import bundled_gguf_path
from exo.models.gguf import StageWeights, load_stage
from exo.models.llama import LlamaStage
from exo.models.tokenizer import GGUFTokenizer


@pytest.fixture(scope="session")
def full_weights() -> StageWeights:
    return load_stage(bundled_gguf_path())


@pytest.fixture(scope="session")
def tokenizer(full_weights: StageWeights) -> GGUFTokenizer:
    return GGUFTokenizer(full_weights.metadata)


@pytest.fixture(scope="session")
def full_model(full_weights: StageWeights) -> LlamaStage:
    return LlamaStage(full_weights)
