"""Model cards: what placement needs to know about a model, and where its weights are."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

WeightsSource = Literal["bundled_gguf", "mlx_directory", "planning_only"]


class ModelCard(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_id: str
    family: str | None = None
    """The mlx-lm module that builds the model (``llama`` for Mistral), when it has weights."""
    n_layers: int = Field(gt=0)
    layer_bytes: int = Field(gt=0, description="Bytes of weights in one transformer layer.")
    non_layer_bytes: int = Field(
        ge=0, description="Bytes outside the layers: embeddings, final norm, LM head."
    )
    hidden_size: int = Field(gt=0)
    kv_cache_bytes_per_token: int = Field(
        ge=0, description="KV-cache bytes per token for the whole model (all layers)."
    )
    context_length: int = Field(default=4096, gt=0)
    activation_bytes_per_token: int = Field(
        default=0, ge=0, description="Bytes of the hidden state sent between pipeline stages."
    )
    vocab_size: int = Field(default=0, ge=0, description="Tokens in the vocabulary; 0 unknown.")
    embedding_bytes: int = Field(
        default=0,
        ge=0,
        description="Bytes of the token embedding (within non_layer_bytes); 0 unknown.",
    )
    lm_head_bytes: int = Field(
        default=0, ge=0, description="Bytes of a separate LM head; 0 when tied or unknown."
    )
    tied_embeddings: bool = Field(
        default=False, description="The LM head is the embedding matrix (read as a linear)."
    )
    parameters_per_layer: int = Field(
        default=0, ge=0, description="Weights in one layer (for prompt FLOPs); 0 unknown."
    )
    source: WeightsSource = "planning_only"
    weights_path: str | None = None

    @property
    def total_bytes(self) -> int:
        return self.n_layers * self.layer_bytes + self.non_layer_bytes

    @property
    def hop_bytes_per_token(self) -> int:
        """Bytes crossing a pipeline boundary per generated token (fp16 hidden state)."""
        return self.activation_bytes_per_token or self.hidden_size * 2
