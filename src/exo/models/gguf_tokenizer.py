"""The tokenizer files of a GGUF import: ``tokenizer.json`` and ``tokenizer_config.json``
built from the GGUF's ``tokenizer.*`` metadata.

GGUF stores a byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``) as its token
strings (``tokenizer.ggml.tokens``, in GPT-2's printable byte alphabet), its merge rules
(``tokenizer.ggml.merges``, "left right"), token types (3 = control, 4 = user-defined) and
the ids of BOS/EOS. ``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer: "smollm" (also
starcoder, refact, ...) splits every digit on its own and then applies GPT-2's regex, which
is the ``tokenizers`` sequence Digits(individual_digits) + ByteLevel; "gpt2" is ByteLevel
alone. Control and user-defined tokens become added tokens, so their text encodes to one id.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from exo.models.gguf_metadata import (
    GGUFImportError,
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

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>")
"""Names models use for "end of turn": stop tokens where the vocabulary has them as specials."""


def _build_tokenizer(metadata: Metadata) -> tuple[Tokenizer, list[str]]:
    model_kind = metadata_str(metadata, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise GGUFImportError(
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
            raise GGUFImportError(f"malformed merge rule {merge!r}")
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
        raise GGUFImportError(f"pre-tokenizer '{pre_name}' is not supported")
    tokenizer.decoder = decoders.ByteLevel()
    added = [
        index
        for index, token_type in enumerate(token_types)
        if token_type in (CONTROL_TOKEN_TYPE, USER_DEFINED_TOKEN_TYPE)
    ]
    tokenizer.add_special_tokens(
        [
            AddedToken(
                tokens[index], special=token_types[index] == CONTROL_TOKEN_TYPE, normalized=False
            )
            for index in added
        ]
    )
    return tokenizer, tokens


def stop_token_ids(metadata: Metadata) -> list[int]:
    """The EOS id, then the end-of-turn tokens the vocabulary has as control tokens."""
    tokens = metadata_str_list(metadata, "tokenizer.ggml.tokens")
    token_types = (
        metadata_int_list(metadata, "tokenizer.ggml.token_type")
        if "tokenizer.ggml.token_type" in metadata
        else [1] * len(tokens)
    )
    stops = [metadata_int(metadata, "tokenizer.ggml.eos_token_id")]
    for index, token in enumerate(tokens):
        if (
            token in END_OF_TURN_TOKENS
            and token_types[index] == CONTROL_TOKEN_TYPE
            and index not in stops
        ):
            stops.append(index)
    return stops


def write_tokenizer_files(metadata: Metadata, directory: Path, context_length: int) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` (chat template, BOS/EOS) for the
    GGUF's vocabulary, in the form ``transformers.AutoTokenizer`` loads."""
    tokenizer, tokens = _build_tokenizer(metadata)
    tokenizer.save(str(directory / "tokenizer.json"))
    bos_id = (
        metadata_int(metadata, "tokenizer.ggml.bos_token_id")
        if "tokenizer.ggml.bos_token_id" in metadata
        else None
    )
    eos_id = metadata_int(metadata, "tokenizer.ggml.eos_token_id")
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokens[eos_id],
        "add_bos_token": metadata_bool(metadata, "tokenizer.ggml.add_bos_token", False),
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
    }
    if bos_id is not None:
        config["bos_token"] = tokens[bos_id]
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata_str(metadata, "tokenizer.chat_template")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
