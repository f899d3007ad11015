"""A model directory's tokenizer, through mlx-lm: encoding, the chat template, stop tokens
and streaming detokenization.

mlx-lm loads the Hugging Face tokenizer files (``tokenizer.json`` / ``tokenizer.model`` and
``tokenizer_config.json``) with ``transformers``, renders the chat template with the
tokenizer's own template engine, and picks a streaming detokenizer for the vocabulary
(byte-level BPE, SentencePiece or a plain one) that holds back a character split across
tokens. The stop tokens are the tokenizer's EOS plus config.json's and
generation_config.json's ``eos_token_id``.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper
from mlx_lm.utils import load_config, load_tokenizer


class ChatTemplateError(ValueError):
    """The chat template refused the messages (roles that do not alternate, say) or failed
    to render them: a bad request, not a broken runner."""


class ModelTokenizer:
    def __init__(self, wrapper: TokenizerWrapper) -> None:
        self._wrapper = wrapper
        self.stop_token_ids: frozenset[int] = frozenset(wrapper.eos_token_ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of a raw prompt (with the BOS token where the tokenizer adds one)."""
        return list(self._wrapper.encode(text))

    def encode_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        try:
            ids: Any = self._wrapper.apply_chat_template(
                list(messages), add_generation_prompt=add_generation_prompt, tokenize=True
            )
        except Exception as error:  # jinja2 and transformers raise their own types
            raise ChatTemplateError(f"the chat template failed: {error}") from error
        return [int(token) for token in ids]

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._wrapper.decode(list(token_ids), skip_special_tokens=True))

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer (one per request)."""
        return self._wrapper.detokenizer


def load_model_tokenizer(directory: Path) -> ModelTokenizer:
    config = load_config(directory)
    return ModelTokenizer(load_tokenizer(directory, eos_token_ids=config.get("eos_token_id")))
