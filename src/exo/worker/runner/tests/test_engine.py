"""The engine: greedy and sampled decoding, stop tokens/strings, max_tokens, cancellation."""

from collections.abc import Iterator, Sequence
from typing import cast

import mlx.core as mx
import numpy as np
import pytest

from exo.models.tokenizer import ModelTokenizer
from exo.shared.types.generation import GenerationChunk, GenerationRequest, SamplingParams
from exo.worker.runner.engine import Engine, token_sampler

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class ScriptedStepper:
    """Answers with a fixed token sequence, whatever the prompt (engine logic in isolation)."""

    def __init__(self, script: Sequence[int]) -> None:
        self.script = list(script)
        self.prompts: list[list[int]] = []
        self.sampling: list[SamplingParams] = []
        self.max_tokens: list[int] = []
        self.pulled = 0
        self.closed = False

    @property
    def context_length(self) -> int:
        return 8192

    def generate(
        self, prompt: Sequence[int], sampling: SamplingParams, max_tokens: int
    ) -> Iterator[int]:
        self.prompts.append(list(prompt))
        self.sampling.append(sampling)
        self.max_tokens.append(max_tokens)
        try:
            for token in self.script[:max_tokens]:
                self.pulled += 1
                yield token
        finally:
            self.closed = True


STOP = 2  # <|im_end|>, the bundled model's end of turn


def _scripted(tokenizer: ModelTokenizer, text: str, then_stop: bool = True) -> ScriptedStepper:
    tokens = tokenizer.encode(text)
    if then_stop:
        tokens.append(STOP)
    return ScriptedStepper(tokens)


def _joined(chunks: list[GenerationChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


def test_greedy_chat_answer_contains_paris(engine: Engine) -> None:
    result = engine.complete(GenerationRequest(messages=QUESTION, max_tokens=24))
    assert "Paris" in result.text
    assert result.finish_reason == "stop"  # it ends with <|im_end|>
    assert result.prompt_tokens == 37
    assert result.completion_tokens == len(result.token_ids)
    assert result.token_ids[-1] in engine.tokenizer.stop_token_ids
    assert "<|im_end|>" not in result.text


def test_greedy_is_deterministic_and_max_tokens_gives_length(engine: Engine) -> None:
    request = GenerationRequest(prompt="Once upon a time", max_tokens=5)
    first = engine.complete(request)
    second = engine.complete(request)
    assert first.finish_reason == "length"
    assert first.completion_tokens == 5
    assert first.token_ids == second.token_ids
    assert first.text == engine.tokenizer.decode(first.token_ids)


def test_seeded_sampling_repeats_and_differs_by_seed(engine: Engine) -> None:
    def sample(seed: int) -> list[int]:
        request = GenerationRequest(
            prompt="My favourite animal is", max_tokens=8, temperature=1.2, seed=seed
        )
        return engine.complete(request).token_ids

    assert sample(1) == sample(1)
    assert len({tuple(sample(seed)) for seed in (1, 2, 3)}) > 1


def test_stop_string_is_not_emitted(engine: Engine) -> None:
    result = engine.complete(GenerationRequest(messages=QUESTION, max_tokens=24, stop=["Paris"]))
    assert result.finish_reason == "stop"
    assert "Paris" not in result.text
    assert result.text.startswith("The capital of France is")


def test_stop_string_split_across_tokens_is_held_back(tokenizer: ModelTokenizer) -> None:
    stepper = _scripted(tokenizer, "alpha beta STOPPING gamma delta")
    engine = Engine(tokenizer, stepper)
    chunks = list(engine.generate(GenerationRequest(prompt="x", stop=["STOP"])))
    assert _joined(chunks) == "alpha beta "
    assert chunks[-1].finish_reason == "stop"
    assert all("S" not in chunk.text for chunk in chunks)


def test_partial_stop_prefix_is_released_when_it_does_not_complete(
    tokenizer: ModelTokenizer,
) -> None:
    stepper = _scripted(tokenizer, "one ST two STA three")
    engine = Engine(tokenizer, stepper)
    result = engine.complete(GenerationRequest(prompt="x", stop=["STOP"]))
    assert result.text == "one ST two STA three"
    assert result.finish_reason == "stop"  # the scripted EOS


def test_multibyte_characters_stream_whole(tokenizer: ModelTokenizer) -> None:
    stepper = _scripted(tokenizer, "emoji 😀👍🏽 and 日本")
    chunks = list(Engine(tokenizer, stepper).generate(GenerationRequest(prompt="x")))
    assert _joined(chunks) == "emoji 😀👍🏽 and 日本"
    assert all("\ufffd" not in chunk.text for chunk in chunks)
    assert sum(len(chunk.token_ids) for chunk in chunks) == len(stepper.script)


def test_the_stepper_gets_the_prompt_and_the_token_budget(tokenizer: ModelTokenizer) -> None:
    stepper = _scripted(tokenizer, "a b c", then_stop=False)
    engine = Engine(tokenizer, stepper)
    request = GenerationRequest(prompt="hello there", max_tokens=len(stepper.script))
    result = engine.complete(request)
    assert result.finish_reason == "length"
    assert stepper.prompts == [tokenizer.encode("hello there")]
    assert stepper.max_tokens == [len(stepper.script)]
    assert result.token_ids == stepper.script


def test_cancellation_between_tokens(tokenizer: ModelTokenizer) -> None:
    stepper = _scripted(tokenizer, "one two three four five six seven")
    engine = Engine(tokenizer, stepper)
    calls = 0

    def should_cancel() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 3

    chunks = list(engine.generate(GenerationRequest(prompt="x"), should_cancel))
    # Checked once before the prefill, then after each token: cancelled after two tokens.
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].completion_tokens == 2
    assert stepper.pulled == 2 and stepper.closed  # the token stream was closed early


def test_cancelled_before_start_runs_nothing(tokenizer: ModelTokenizer) -> None:
    stepper = _scripted(tokenizer, "never")
    chunks = list(Engine(tokenizer, stepper).generate(GenerationRequest(prompt="x"), lambda: True))
    assert [(c.finish_reason, c.completion_tokens, c.text) for c in chunks] == [
        ("cancelled", 0, "")
    ]
    assert stepper.prompts == []


def test_prompt_longer_than_context_is_refused(tokenizer: ModelTokenizer) -> None:
    class Tiny(ScriptedStepper):
        @property
        def context_length(self) -> int:
            return 4

    engine = Engine(tokenizer, Tiny([0]))
    with pytest.raises(ValueError, match="context"):
        list(engine.generate(GenerationRequest(prompt="one two three four five six")))


def test_sampler_greedy_seeded_and_top_p() -> None:
    logits = mx.array([[0.0, 3.0, 2.9, -1.0]])
    logprobs = logits - mx.logsumexp(logits, keepdims=True)

    def draw(sampling: SamplingParams, count: int) -> list[int]:
        sampler = token_sampler(sampling)
        return [int(cast(int, sampler(logprobs).item())) for _ in range(count)]

    assert draw(SamplingParams(temperature=0), 5) == [1] * 5
    # A tiny nucleus keeps only the most likely token, whatever the temperature.
    assert set(draw(SamplingParams(temperature=5.0, top_p=0.01, seed=0), 50)) == {1}
    wide = np.array(draw(SamplingParams(temperature=1.0, seed=0), 2000))
    assert set(wide.tolist()) <= {0, 1, 2, 3}
    assert 0.3 < np.mean(wide == 1) < 0.65  # ~0.50 in theory
    assert 0.3 < np.mean(wide == 2) < 0.6  # ~0.45
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.6, seed=0), 200)) == {1, 2}
    # The same seed draws the same tokens.
    seeded = SamplingParams(temperature=1.0, seed=7)
    assert draw(seeded, 30) == draw(seeded, 30)
