"""The MLX Llama stages: whole-model generation, layer ranges chained, the KV cache."""

import mlx.core as mx
import numpy as np

from exo.models.bundled import bundled_gguf_path
from exo.models.gguf import load_stage, scalar_int
from exo.models.llama import KV_CACHE_STEP, LayerCache, LlamaStage, causal_mask
from exo.models.tokenizer import GGUFTokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _greedy(model: LlamaStage, prompt: list[int], count: int) -> list[int]:
    cache = model.new_cache()
    logits = model.forward(mx.array([prompt]), cache)
    tokens: list[int] = []
    for _ in range(count):
        token = scalar_int(mx.argmax(logits[0, -1]))
        tokens.append(token)
        logits = model.forward(mx.array([[token]]), cache)
    return tokens


def test_greedy_answer_names_paris(full_model: LlamaStage, tokenizer: GGUFTokenizer) -> None:
    prompt = tokenizer.encode_chat(QUESTION)
    tokens = _greedy(full_model, prompt, 8)
    assert "Paris" in tokenizer.decode(tokens)


def test_chained_layer_ranges_match_the_whole_model(
    full_model: LlamaStage, tokenizer: GGUFTokenizer
) -> None:
    path = bundled_gguf_path()
    stages = [
        LlamaStage(load_stage(path, start, end)) for start, end in [(0, 7), (7, 19), (19, 30)]
    ]
    assert [s.is_first for s in stages] == [True, False, False]
    assert [s.is_last for s in stages] == [False, False, True]
    prompt = mx.array([tokenizer.encode_chat(QUESTION)])

    whole = full_model.forward(prompt, full_model.new_cache())
    caches = [stage.new_cache() for stage in stages]
    hidden = prompt
    for stage, cache in zip(stages, caches, strict=True):
        hidden = stage.forward(hidden, cache)
    assert stages[0].forward(prompt, stages[0].new_cache()).shape == (1, prompt.shape[1], 576)
    assert hidden.shape == whole.shape == (1, 1, 49152)
    np.testing.assert_array_equal(np.array(hidden), np.array(whole))


def test_decoding_with_the_cache_matches_a_full_prefill(
    full_model: LlamaStage, tokenizer: GGUFTokenizer
) -> None:
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    full = full_model.forward(mx.array([ids]), full_model.new_cache())

    cache = full_model.new_cache()
    full_model.forward(mx.array([ids[:5]]), cache)  # prefill, then a chunk with an offset
    full_model.forward(mx.array([ids[5:-1]]), cache)
    assert cache.offset == len(ids) - 1
    stepped = full_model.forward(mx.array([ids[-1:]]), cache)
    assert cache.offset == len(ids)
    np.testing.assert_allclose(np.array(stepped), np.array(full), rtol=1e-3, atol=1e-3)


def test_cache_grows_past_its_first_allocation_and_keeps_its_contents() -> None:
    cache = LayerCache()
    first = mx.random.normal((1, 3, KV_CACHE_STEP - 6, 64))
    keys, values = cache.append(first, first * 2)
    assert keys.shape[2] == KV_CACHE_STEP - 6
    for step in range(10):
        new = mx.full((1, 3, 1, 64), float(step))
        keys, values = cache.append(new, new * 2)
    mx.eval(keys, values)
    assert cache.length == KV_CACHE_STEP + 4
    assert cache.keys is not None and cache.keys.shape[2] == 2 * KV_CACHE_STEP
    np.testing.assert_array_equal(np.array(keys[:, :, : KV_CACHE_STEP - 6]), np.array(first))
    np.testing.assert_array_equal(np.array(values[:, :, -1]), np.full((1, 3, 64), 18.0))


def test_causal_mask_with_offset() -> None:
    assert causal_mask(1, 10) is None
    mask = np.array(causal_mask(3, 2))
    assert mask.shape == (3, 5)
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]
