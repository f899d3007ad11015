"""A Llama decoder in MLX that holds and runs one contiguous range of layers.

A stage built from :class:`exo.models.gguf.StageWeights` runs ``forward(inputs, cache)``:

* the first stage takes token ids ``(batch, length)`` and embeds them;
* a middle stage takes hidden states ``(batch, length, hidden)`` and returns new ones;
* the last stage also applies the final RMS norm and the output head and returns logits
  ``(batch, length, vocab)`` (only for the last position when ``last_only``).

A single stage holding every layer is the whole model. Quantized linears run with
``mx.quantized_matmul`` straight on the packed GGUF weights (group size 32, bit width per
tensor); the tied output head multiplies by the quantized token embedding the same way.
Rotary embeddings follow ``LlamaHyperparameters.rope_traditional``: the interleaved layout
for GGUF files (they keep llama.cpp's permutation of the Q/K rows, which pairs consecutive
dimensions), the half-split layout for Hugging Face / MLX checkpoints.
"""

import math
from dataclasses import dataclass

import mlx.core as mx

from exo.models.gguf import LayerWeights, LinearWeights, LlamaHyperparameters, StageWeights

ACTIVATION_DTYPE = mx.float32
KV_CACHE_STEP = 256


def linear(x: mx.array, weights: LinearWeights) -> mx.array:
    """``x @ W.T`` for a quantized or dense ``W`` of shape ``(out, in)``."""
    if weights.scales is None:
        return x @ weights.weight.astype(x.dtype).T
    return mx.quantized_matmul(
        x,
        weights.weight,
        weights.scales,
        weights.biases,
        transpose=True,
        group_size=weights.group_size,
        bits=weights.bits,
    )


def embed(token_ids: mx.array, weights: LinearWeights) -> mx.array:
    """Rows ``token_ids`` of the (possibly quantized) embedding matrix, as float32."""
    if weights.scales is None:
        return weights.weight[token_ids].astype(ACTIVATION_DTYPE)
    rows = mx.dequantize(
        weights.weight[token_ids],
        weights.scales[token_ids],
        weights.biases[token_ids] if weights.biases is not None else None,
        group_size=weights.group_size,
        bits=weights.bits,
    )
    return rows.astype(ACTIVATION_DTYPE)


@dataclass
class LayerCache:
    """Keys and values of one layer, ``(batch, kv_heads, capacity, head_dim)``, grown in
    steps; the first ``length`` positions are filled."""

    keys: mx.array | None = None
    values: mx.array | None = None
    length: int = 0

    def append(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store new positions; return all keys and values so far."""
        new = keys.shape[2]
        needed = self.length + new
        if self.keys is None or self.values is None or needed > self.keys.shape[2]:
            capacity = ((needed + KV_CACHE_STEP - 1) // KV_CACHE_STEP) * KV_CACHE_STEP
            shape = (keys.shape[0], keys.shape[1], capacity, keys.shape[3])
            grown_keys = mx.zeros(shape, dtype=keys.dtype)
            grown_values = mx.zeros(shape, dtype=values.dtype)
            if self.keys is not None and self.values is not None and self.length > 0:
                grown_keys[:, :, : self.length, :] = self.keys[:, :, : self.length, :]
                grown_values[:, :, : self.length, :] = self.values[:, :, : self.length, :]
            self.keys, self.values = grown_keys, grown_values
        self.keys[:, :, self.length : needed, :] = keys
        self.values[:, :, self.length : needed, :] = values
        self.length = needed
        return self.keys[:, :, :needed, :], self.values[:, :, :needed, :]


class KVCache:
    """One :class:`LayerCache` per layer a stage holds."""

    def __init__(self, layer_count: int) -> None:
        self.layers = [LayerCache() for _ in range(layer_count)]

    @property
    def offset(self) -> int:
        """Positions already processed (the same for every layer)."""
        return self.layers[0].length if self.layers else 0

    def arrays(self) -> list[mx.array]:
        result: list[mx.array] = []
        for layer in self.layers:
            if layer.keys is not None and layer.values is not None:
                result.extend((layer.keys, layer.values))
        return result


def causal_mask(length: int, offset: int) -> mx.array | None:
    """True where query ``i`` (absolute position ``offset + i``) may attend to key ``j``."""
    if length == 1:
        return None
    query_positions = mx.arange(offset, offset + length)[:, None]
    key_positions = mx.arange(offset + length)[None, :]
    return key_positions <= query_positions


class DecoderLayer:
    def __init__(self, weights: LayerWeights, hyperparameters: LlamaHyperparameters) -> None:
        self.weights = weights
        self.head_count = hyperparameters.head_count
        self.head_count_kv = hyperparameters.head_count_kv
        self.head_dim = hyperparameters.head_dim
        self.rope_dimension = hyperparameters.rope_dimension
        self.rope_base = hyperparameters.rope_base
        self.eps = hyperparameters.rms_norm_eps
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.rope_traditional = hyperparameters.rope_traditional
        self.rope_periods = (
            mx.array(hyperparameters.rope_periods, dtype=mx.float32)
            if hyperparameters.rope_periods is not None
            else None
        )

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(
            x,
            self.rope_dimension,
            traditional=self.rope_traditional,
            base=None if self.rope_periods is not None else self.rope_base,
            scale=1.0,
            offset=offset,
            freqs=self.rope_periods,
        )

    def __call__(self, x: mx.array, mask: mx.array | None, cache: LayerCache) -> mx.array:
        w = self.weights
        batch, length, _ = x.shape
        offset = cache.length

        normed = mx.fast.rms_norm(x, w.attention_norm.astype(x.dtype), self.eps)
        queries = linear(normed, w.query)
        keys = linear(normed, w.key)
        values = linear(normed, w.value)
        queries = queries.reshape(batch, length, self.head_count, self.head_dim).transpose(
            0, 2, 1, 3
        )
        keys = keys.reshape(batch, length, self.head_count_kv, self.head_dim).transpose(0, 2, 1, 3)
        values = values.reshape(batch, length, self.head_count_kv, self.head_dim).transpose(
            0, 2, 1, 3
        )
        queries = self._rope(queries, offset)
        keys = self._rope(keys, offset)
        all_keys, all_values = cache.append(keys, values)
        attended = mx.fast.scaled_dot_product_attention(
            queries, all_keys, all_values, scale=self.scale, mask=mask
        )
        attended = attended.transpose(0, 2, 1, 3).reshape(batch, length, -1)
        x = x + linear(attended, w.attention_output)

        normed = mx.fast.rms_norm(x, w.feed_forward_norm.astype(x.dtype), self.eps)
        gate = linear(normed, w.gate)
        hidden = (gate * mx.sigmoid(gate)) * linear(normed, w.up)
        return x + linear(hidden, w.down)


class LlamaStage:
    """Layers ``[layer_start, layer_end)`` of a Llama model, plus embedding/head as needed."""

    def __init__(self, weights: StageWeights) -> None:
        self.weights = weights
        self.hyperparameters = weights.hyperparameters
        self.layer_start = weights.layer_start
        self.layer_end = weights.layer_end
        self.is_first = weights.is_first
        self.is_last = weights.is_last
        self.layers = [DecoderLayer(layer, self.hyperparameters) for layer in weights.layers]
        if self.is_first and weights.token_embedding is None:
            raise ValueError("the first stage needs the token embedding")
        head = weights.output_head or weights.token_embedding
        if self.is_last and (head is None or weights.output_norm is None):
            raise ValueError("the last stage needs the output norm and head")
        self._head = head

    @property
    def hidden_size(self) -> int:
        return self.hyperparameters.hidden_size

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def forward(self, inputs: mx.array, cache: KVCache, last_only: bool = True) -> mx.array:
        """Token ids (first stage) or hidden states in; hidden states or, on the last stage,
        logits out (``(batch, 1, vocab)`` when ``last_only``)."""
        if self.is_first:
            if self.weights.token_embedding is None:
                raise ValueError("the first stage needs the token embedding")
            x = embed(inputs, self.weights.token_embedding)
        else:
            x = inputs.astype(ACTIVATION_DTYPE)
        mask = causal_mask(x.shape[1], cache.offset)
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            x = layer(x, mask, layer_cache)
        if not self.is_last:
            return x
        if last_only:
            x = x[:, -1:, :]
        if self.weights.output_norm is None or self._head is None:
            raise ValueError("the last stage needs the output norm and head")
        x = mx.fast.rms_norm(
            x, self.weights.output_norm.astype(x.dtype), self.hyperparameters.rms_norm_eps
        )
        return linear(x, self._head)

    __call__ = forward
