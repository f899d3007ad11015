"""The bundled model's tokenizer through mlx-lm: encoding, chat template, stop tokens and
streaming text that never splits a character."""

import json
from pathlib import Path

import pytest

from exo.models.tokenizer import ChatTemplateError, ModelTokenizer, load_model_tokenizer

SAMPLES = [
    "Hello world!",
    "The year 2024 costs $12.50 (approx.)",
    "naïve café, Straße, 日本語のテキスト, emoji 😀👍🏽",
    "line one\nline two\n\n\ttabbed",
    "def f(x):\n    return x ** 2  # comment",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(bundled_tokenizer: ModelTokenizer, text: str) -> None:
    ids = bundled_tokenizer.encode(text)
    assert ids
    assert bundled_tokenizer.decode(ids) == text


def test_known_encodings(bundled_tokenizer: ModelTokenizer) -> None:
    assert bundled_tokenizer.encode("Hello world!") == [19556, 905, 17]
    # llama.cpp's "smollm" pre-tokenizer isolates each digit before GPT-2's regex.
    assert len(bundled_tokenizer.encode("12345")) == 5


def test_stop_tokens(bundled_tokenizer: ModelTokenizer) -> None:
    assert bundled_tokenizer.stop_token_ids == {0, 2}  # <|endoftext|>, <|im_end|>


def test_chat_template(bundled_tokenizer: ModelTokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = bundled_tokenizer.encode_chat(messages)
    text = bundled_tokenizer._wrapper.decode(ids)  # pyright: ignore[reportPrivateUsage]
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids.count(1) == 3 and ids.count(2) == 2  # specials are single ids
    given = bundled_tokenizer.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert "SmolLM" not in bundled_tokenizer.decode(given)


def test_streaming_text_never_splits_a_character(bundled_tokenizer: ModelTokenizer) -> None:
    text = "😀 日本語 👍🏽 ok"
    ids = bundled_tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the emoji take more than one token each
    detokenizer = bundled_tokenizer.detokenizer()
    pieces: list[str] = []
    for token in ids:
        detokenizer.add_token(token)
        pieces.append(detokenizer.last_segment)
    detokenizer.finalize()
    pieces.append(detokenizer.last_segment)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # at least one token completed no character on its own


def test_a_template_refusing_the_messages_is_a_value_error(
    tmp_path: Path, tiny_models: dict[tuple[str, bool], Path]
) -> None:
    for file in tiny_models[("llama", False)].iterdir():
        if file.name != "tokenizer_config.json":
            (tmp_path / file.name).symlink_to(file)
    refusing = (
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('Conversation must start with a user message') }}{% endif %}"
        "{{ messages[0]['content'] }}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": refusing})
    )
    tokenizer = load_model_tokenizer(tmp_path)
    assert tokenizer.encode_chat([{"role": "user", "content": "hi"}]) == tokenizer.encode("hi")
    # Runners turn ValueError into a failed request; any other error would end the runner.
    with pytest.raises(ChatTemplateError, match="must start with a user message"):
        tokenizer.encode_chat([{"role": "assistant", "content": "hi"}])
    assert issubclass(ChatTemplateError, ValueError)
