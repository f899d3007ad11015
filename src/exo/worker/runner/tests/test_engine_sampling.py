"""The new sampling parameters on the bundled model, in one process: JSON mode, penalties
and log-probabilities (the pipeline's last rank runs the same sampler: test_pipeline.py)."""

import json

import pytest

from exo.shared.types.generation import GenerationRequest
from exo.worker.runner.engine import Engine

CAT = [{"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}]


@pytest.mark.parametrize(("temperature", "max_tokens"), [(0.0, 24), (1.0, 8)])
def test_json_mode_output_parses(engine: Engine, temperature: float, max_tokens: int) -> None:
    request = GenerationRequest(
        messages=CAT,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=3,
        response_format="json_object",
    )
    result = engine.complete(request)
    parsed: object = json.loads(result.text)  # even when cut by max_tokens
    assert isinstance(parsed, dict)
    if temperature == 0:
        # Unconstrained, this model opens with a Markdown fence, not with the object.
        plain = engine.complete(
            request.model_copy(update={"response_format": "text", "max_tokens": 2})
        )
        assert not plain.text.startswith("{")


def test_frequency_penalty_stops_repetition(engine: Engine) -> None:
    request = GenerationRequest(
        messages=[{"role": "user", "content": "Write the word 'cat' ten times."}],
        max_tokens=12,
    )
    plain = engine.complete(request)
    penalised = engine.complete(request.model_copy(update={"frequency_penalty": 2.0}))
    assert penalised.token_ids != plain.token_ids

    def distinct(ids: list[int]) -> float:
        return len(set(ids)) / len(ids)

    assert distinct(penalised.token_ids) > distinct(plain.token_ids)


def test_logprobs_describe_each_token(engine: Engine) -> None:
    request = GenerationRequest(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
    )
    result = engine.complete(request)
    entries = result.logprobs
    assert entries is not None
    shown = [token for token in result.token_ids if token not in engine.tokenizer.stop_token_ids]
    assert len(entries) == len(shown) > 0
    assert (
        bytes(b for entry in entries for b in entry.bytes).decode().strip() == result.text.strip()
    )
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    # Without logprobs, none are reported.
    quiet = request.model_copy(update={"logprobs": False, "max_tokens": 1})
    assert engine.complete(quiet).logprobs is None
