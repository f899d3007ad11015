"""A model directory's config.json as a typed model: the hyperparameters exo reads.

mlx-lm reads the whole file through the family's own ``ModelArgs``; exo needs only what a
model card is made of (layers, sizes, heads, context). Multimodal checkpoints keep the
language model's values under ``text_config``; they are read from there, while
``model_type`` (which picks mlx-lm's model class) stays the top-level one.
"""

import json
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONFIG_FILE = "config.json"
DEFAULT_CONTEXT_LENGTH = 4096
"""Context assumed when config.json names no ``max_position_embeddings``."""


class ModelConfigError(ValueError):
    """config.json is missing or malformed; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class ModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", protected_namespaces=())

    model_type: str = Field(min_length=1)
    num_hidden_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = Field(default=None, gt=0)
    head_dim: int | None = Field(default=None, gt=0)
    max_position_embeddings: int | None = Field(default=None, gt=0)
    vocab_size: int | None = Field(default=None, gt=0)
    tie_word_embeddings: bool | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings or DEFAULT_CONTEXT_LENGTH

    @classmethod
    def read(cls, directory: Path) -> tuple["ModelConfig", dict[str, Any]]:
        """The typed hyperparameters and the raw JSON object of ``directory/config.json``."""
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise ModelConfigError(path, "missing")
        try:
            raw: object = json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ModelConfigError(path, f"cannot read: {error.strerror or error}") from error
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ModelConfigError(path, f"not valid JSON: {error}") from error
        if not isinstance(raw, dict):
            raise ModelConfigError(path, "not a JSON object")
        fields = cast(dict[str, Any], raw)
        text_config = fields.get("text_config")
        values = dict(fields)
        if "num_hidden_layers" not in fields and isinstance(text_config, dict):
            values = {**cast(dict[str, Any], text_config), "model_type": fields.get("model_type")}
        try:
            return cls.model_validate(values), fields
        except ValidationError as error:
            problems = "; ".join(
                f"'{'.'.join(str(part) for part in detail['loc'])}': {detail['msg']}"
                for detail in error.errors()
            )
            raise ModelConfigError(path, problems) from error
