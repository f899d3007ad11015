"""The GGUF byte-level BPE tokenizer, chat template and streaming decoder."""

import pytest

from exo.models.tokenizer import (
    ChatTemplate,
    ChatTemplateError,
    GGUFTokenizer,
    byte_to_unicode_table,
)

SAMPLES = [
    "Hello world!",
    "  leading spaces, trailing spaces   ",
    "The year 2024 costs $12.50 (approx.)",
    "naïve café, Straße, 日本語のテキスト, emoji 😀👍🏽",
    "line one\nline two\n\n\ttabbed\r\n",
    "I'm sure they'll say we've done it",
    "def f(x):\n    return x ** 2  # comment",
]


def test_byte_alphabet_is_a_bijection_over_all_bytes() -> None:
    table = byte_to_unicode_table()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A"
    assert table[ord(" ")] == "Ġ"
    assert table[ord("\n")] == "Ċ"


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer: GGUFTokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids
    assert tokenizer.decode(ids) == text
    # Our byte table and the tokenizers library's ByteLevel decoder agree.
    assert tokenizer._tokenizer.decode(ids, skip_special_tokens=False) == text


def test_known_encoding(tokenizer: GGUFTokenizer) -> None:
    assert tokenizer.encode("Hello world!") == [19556, 905, 17]


def test_digits_are_split_one_by_one(tokenizer: GGUFTokenizer) -> None:
    # llama.cpp's "smollm" pre-tokenizer isolates each digit before GPT-2's regex.
    ids = tokenizer.encode("12345")
    assert [tokenizer.token(i) for i in ids] == ["1", "2", "3", "4", "5"]


def test_metadata_ids(tokenizer: GGUFTokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert tokenizer.token(tokenizer.eos_token_id) == "<|im_end|>"
    assert tokenizer.bos_token_id is not None
    assert tokenizer.token(tokenizer.bos_token_id) == "<|im_start|>"
    assert not tokenizer.add_bos_token
    assert tokenizer.stop_token_ids == {
        tokenizer.token_id("<|im_end|>"),
        tokenizer.token_id("<|endoftext|>"),
    }


def test_chat_template_renders_and_special_tokens_are_single_ids(
    tokenizer: GGUFTokenizer,
) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.encode(text)
    start = tokenizer.token_id("<|im_start|>")
    end = tokenizer.token_id("<|im_end|>")
    assert (start, end) == (1, 2)
    assert start is not None and end is not None
    assert ids.count(start) == 3
    assert ids.count(end) == 2
    assert ids[0] == start
    assert tokenizer.decode(ids) == text
    # Without the generation prompt the assistant header is absent.
    bare = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert not bare.endswith("<|im_start|>assistant\n")


def test_chat_template_keeps_a_given_system_message(tokenizer: GGUFTokenizer) -> None:
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "SmolLM" not in text


def test_streaming_decoder_never_splits_a_character(tokenizer: GGUFTokenizer) -> None:
    text = "😀 日本語 👍🏽 ok"
    ids = tokenizer.encode(text)
    # The emoji needs more than one token: a naive per-token decode would break it.
    assert len(ids) > len(text.split())
    decoder = tokenizer.streaming_decoder()
    pieces = [decoder.add(token) for token in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # at least one token completed no character on its own


def test_streaming_decoder_skips_special_tokens(tokenizer: GGUFTokenizer) -> None:
    decoder = tokenizer.streaming_decoder(skip_special_tokens=True)
    ids = tokenizer.encode("<|im_start|>assistant\nHi<|im_end|>")
    assert "".join(decoder.add(token) for token in ids) == "assistant\nHi"


def test_a_template_refusing_the_messages_is_a_value_error() -> None:
    # Runners turn ValueError into a failed request; any other error would end the runner.
    template = ChatTemplate(
        source="{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('Conversation must start with a user message') }}{% endif %}"
        "{{ messages[0]['content'] }}",
        bos_token="",
        eos_token="",
    )
    assert template.render([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(ChatTemplateError, match="must start with a user message"):
        template.render([{"role": "assistant", "content": "hi"}])
    assert issubclass(ChatTemplateError, ValueError)
