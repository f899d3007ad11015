"""Fixtures: the bundled model imported once per session (tiny models: the root conftest)."""

import json
from pathlib import Path
from typing import Any

import pytest

from exo.models.bundled import bundled_gguf_path
from exo.models.stage import ModelStage, load_stage
from exo.models.tokenizer import ModelTokenizer, load_model_tokenizer
from exo.models.weights_cache import default_weights_cache, ensure_imported

GOLDEN_FILE = Path(__file__).parent / "data" / "bundled_golden_tokens.json"


@pytest.fixture(scope="session")
def bundled_directory() -> Path:
    return ensure_imported(bundled_gguf_path(), default_weights_cache())


@pytest.fixture(scope="session")
def bundled_stage(bundled_directory: Path) -> ModelStage:
    return load_stage(bundled_directory)


@pytest.fixture(scope="session")
def bundled_tokenizer(bundled_directory: Path) -> ModelTokenizer:
    return load_model_tokenizer(bundled_directory)


@pytest.fixture(scope="session")
def golden_requests() -> list[dict[str, Any]]:
    """Today's engine's greedy tokens on three prompts, recorded before the move to mlx-lm."""
    return json.loads(GOLDEN_FILE.read_text())["requests"]
