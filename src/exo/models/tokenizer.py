"""Tokenizer and chat template built from a GGUF file's metadata.

GGUF stores a byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``) as its token
strings (``tokenizer.ggml.tokens``, in GPT-2's printable byte alphabet), its merge rules
(``tokenizer.ggml.merges``, "left right"), token types (3 = control/special) and the ids of
BOS/EOS. ``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer: "smollm" (also starcoder,
refact, ...) splits every digit on its own and then applies GPT-2's regex, which is the
``tokenizers`` sequence Digits(individual_digits) + ByteLevel; "gpt2" is ByteLevel alone.

Decoding for streaming goes through bytes: each token maps to the bytes it stands for and an
incremental UTF-8 decoder holds back a character split across tokens until it is complete.
"""

import codecs
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from exo.models.gguf import (
    GGUFFormatError,
    Metadata,
    metadata_bool,
    metadata_int,
    metadata_int_list,
    metadata_str,
    metadata_str_list,
)

CONTROL_TOKEN_TYPE = 3
USER_DEFINED_TOKEN_TYPE = 4

# llama.cpp pre-tokenizer names whose regex is "each digit alone, then GPT-2's".
_DIGIT_SPLITTING_PRE_TOKENIZERS = {"smollm", "starcoder", "refact", "codeshell", "command-r"}
_GPT2_PRE_TOKENIZERS = {"gpt2", "default", ""}

# Names models use for "end of turn"; stop tokens where the vocabulary has them as specials.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>")


def byte_to_unicode_table() -> dict[int, str]:
    """GPT-2's reversible byte alphabet: printable Latin-1 bytes stand for themselves, every
    other byte is shifted to a code point from 256 upward, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code_point)
            next_code_point += 1
    return table


def byte_level_token_bytes(tokens: Sequence[str], literal_ids: Container[int]) -> list[bytes]:
    """The bytes each byte-level BPE token stands for. Tokens are written in GPT-2's byte
    alphabet; ``literal_ids`` (control and added tokens) and tokens with a character
    outside that alphabet stand for their own UTF-8 text."""
    unicode_to_byte = {char: byte for byte, char in byte_to_unicode_table().items()}
    result: list[bytes] = []
    for index, token in enumerate(tokens):
        if index in literal_ids or any(char not in unicode_to_byte for char in token):
            result.append(token.encode("utf-8"))
        else:
            result.append(bytes(unicode_to_byte[char] for char in token))
    return result


def stop_token_ids(
    eos_ids: Iterable[int], special_ids: Container[int], token_id: Callable[[str], int | None]
) -> frozenset[int]:
    """The end-of-sequence ids plus the usual end-of-turn tokens the vocabulary has as
    special tokens."""
    stops = set(eos_ids)
    for name in END_OF_TURN_TOKENS:
        found = token_id(name)
        if found is not None and found in special_ids:
            stops.add(found)
    return frozenset(stops)


class ChatTemplateError(ValueError):
    """The chat template refused the messages (its ``raise_exception``, e.g. roles that do
    not alternate) or failed to render them: a bad request, not a broken runner."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str
    eos_token: str

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True
        )

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        globals_: dict[str, object] = cast(dict[str, object], environment.globals)
        globals_["raise_exception"] = raise_exception
        try:
            template = environment.from_string(self.source)
            return template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"the chat template failed: {error}") from error


class GGUFTokenizer:
    """Encode/decode and chat formatting for a GGUF's byte-level BPE vocabulary."""

    def __init__(self, metadata: Metadata) -> None:
        model_kind = metadata_str(metadata, "tokenizer.ggml.model")
        if model_kind != "gpt2":
            raise GGUFFormatError(
                f"tokenizer model '{model_kind}' is not supported (only byte-level BPE 'gpt2')"
            )
        tokens = metadata_str_list(metadata, "tokenizer.ggml.tokens")
        merges = metadata_str_list(metadata, "tokenizer.ggml.merges")
        token_types = (
            metadata_int_list(metadata, "tokenizer.ggml.token_type")
            if "tokenizer.ggml.token_type" in metadata
            else [1] * len(tokens)
        )
        pre_name = (
            metadata_str(metadata, "tokenizer.ggml.pre") if "tokenizer.ggml.pre" in metadata else ""
        )

        merge_pairs: list[tuple[str, str]] = []
        for merge in merges:
            left, separator, right = merge.partition(" ")
            if not separator:
                raise GGUFFormatError(f"malformed merge rule {merge!r}")
            merge_pairs.append((left, right))
        vocabulary = {token: index for index, token in enumerate(tokens)}

        tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=merge_pairs))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre_name in _DIGIT_SPLITTING_PRE_TOKENIZERS:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        elif pre_name in _GPT2_PRE_TOKENIZERS:
            tokenizer.pre_tokenizer = byte_level
        else:
            raise GGUFFormatError(f"pre-tokenizer '{pre_name}' is not supported")
        tokenizer.decoder = decoders.ByteLevel()
        self.special_token_ids: frozenset[int] = frozenset(
            index
            for index, token_type in enumerate(token_types)
            if token_type in (CONTROL_TOKEN_TYPE, USER_DEFINED_TOKEN_TYPE)
        )
        tokenizer.add_special_tokens(
            [
                AddedToken(
                    tokens[index],
                    special=token_types[index] == CONTROL_TOKEN_TYPE,
                    normalized=False,
                )
                for index in sorted(self.special_token_ids)
            ]
        )
        self._tokenizer = tokenizer
        self._tokens = tokens
        self._token_bytes = byte_level_token_bytes(tokens, self.special_token_ids)

        self.bos_token_id: int | None = (
            metadata_int(metadata, "tokenizer.ggml.bos_token_id")
            if "tokenizer.ggml.bos_token_id" in metadata
            else None
        )
        self.eos_token_id: int = metadata_int(metadata, "tokenizer.ggml.eos_token_id")
        self.add_bos_token: bool = metadata_bool(metadata, "tokenizer.ggml.add_bos_token", False)
        self.stop_token_ids: frozenset[int] = stop_token_ids(
            [self.eos_token_id], self.special_token_ids, vocabulary.get
        )
        self.chat_template: ChatTemplate | None = (
            ChatTemplate(
                source=metadata_str(metadata, "tokenizer.chat_template"),
                bos_token=tokens[self.bos_token_id] if self.bos_token_id is not None else "",
                eos_token=tokens[self.eos_token_id],
            )
            if "tokenizer.chat_template" in metadata
            else None
        )

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def token(self, token_id: int) -> str:
        return self._tokens[token_id]

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special-token text (e.g. ``<|im_start|>``) becomes its id."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.token_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def token_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        return b"".join(
            self._token_bytes[i]
            for i in ids
            if not (skip_special_tokens and i in self.special_token_ids)
        )

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self.chat_template is None:
            raise GGUFFormatError("the GGUF file has no tokenizer.chat_template")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def streaming_decoder(self, skip_special_tokens: bool = True) -> "StreamingDecoder":
        return StreamingDecoder(self, skip_special_tokens)


class StreamingDecoder:
    """Turns token ids, one at a time, into text pieces that are always whole characters."""

    def __init__(self, tokenizer: GGUFTokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Text completed by this token (possibly empty while a character is split)."""
        data = self._tokenizer.token_bytes([token_id], self._skip_special_tokens)
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)
