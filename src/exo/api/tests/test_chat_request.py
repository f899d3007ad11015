"""What a chat request may hold: OpenAI's parameters become a task's params, those exo does
not implement are refused naming the parameter (a 400 on /v1), harmless defaults pass."""

from typing import Any

import pytest
from pydantic import ValidationError

from exo.api.chat import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, ChatCompletionRequest
from exo.api.validation import error_code, error_parameter

BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refusal(body: dict[str, Any]) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate({**BASE, **body})
    errors = raised.value.errors()
    return error_parameter(errors), error_code(errors)


def test_params_carry_every_honoured_parameter() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            **BASE,
            "n": 3,
            "seed": 40,
            "temperature": 0.3,
            "top_p": 0.5,
            "max_completion_tokens": 9,
            "stop": "x",
            "presence_penalty": -1.0,
            "frequency_penalty": 0.5,
            "logprobs": True,
            "top_logprobs": 4,
            "response_format": {"type": "json_object"},
        }
    )
    assert request.choices == 3
    params = [request.params(choice) for choice in range(request.choices)]
    assert [p.seed for p in params] == [40, 41, 42]  # each choice its own seed
    assert [p.choice_index for p in params] == [0, 1, 2]
    first = params[0]
    assert (first.temperature, first.top_p, first.max_tokens, first.stop) == (0.3, 0.5, 9, ["x"])
    assert (first.presence_penalty, first.frequency_penalty) == (-1.0, 0.5)
    assert (first.logprobs, first.top_logprobs, first.response_format) == (True, 4, "json_object")


def test_defaults() -> None:
    params = ChatCompletionRequest.model_validate(BASE).params()
    assert params.temperature == DEFAULT_TEMPERATURE == 0.7
    assert params.max_tokens == DEFAULT_MAX_TOKENS == 256
    assert params.seed is None and params.response_format == "text" and not params.logprobs


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
        ({"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"function_call": {"name": "f"}}, "function_call", "unsupported_parameter"),
        ({"logit_bias": {"1": 3}}, "logit_bias", "unsupported_parameter"),
        ({"audio": {"voice": "x"}}, "audio", "unsupported_parameter"),
        ({"modalities": ["audio"]}, "modalities", "unsupported_parameter"),
        ({"prediction": {"type": "content"}}, "prediction", "unsupported_parameter"),
        ({"store": True}, "store", "unsupported_parameter"),
        ({"service_tier": "flex"}, "service_tier", "unsupported_parameter"),
        (
            {"response_format": {"type": "json_schema"}},
            "response_format.type",
            "unsupported_parameter",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_value"),
        ({"top_k": 4}, "top_k", "unknown_parameter"),
        (
            {"messages": [{"role": "user", "content": "x", "name": "n"}]},
            "messages.0.name",
            "unknown_parameter",
        ),
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "invalid_value"),
        ({"n": 17}, "n", "invalid_value"),
        ({"seed": 2**63}, "seed", "invalid_value"),
    ],
)
def test_what_exo_does_not_do_is_refused_by_name(
    body: dict[str, Any], param: str, code: str
) -> None:
    assert refusal(body) == (param, code)


def test_harmless_values_pass() -> None:
    ChatCompletionRequest.model_validate(
        {
            **BASE,
            "tools": [],
            "tool_choice": "none",
            "function_call": "none",
            "logit_bias": {},
            "modalities": ["text"],
            "user": "u",
            "metadata": {"a": "b"},
            "store": False,
            "parallel_tool_calls": False,
            "service_tier": "auto",
            "stream": True,
            "stream_options": {"include_usage": True},
            "audio": None,
            "response_format": {"type": "text"},
        }
    )
