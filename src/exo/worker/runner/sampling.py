"""From the last position's logits to the next token, for one request.

Where the logits are (one process, or a pipeline's last rank), a :class:`RequestSampler`
does, per token and in this order:

1. **penalties** (OpenAI's definition): every token generated so far in this completion has
   ``presence_penalty`` subtracted from its logit once and ``frequency_penalty`` once per
   time it was generated; the prompt does not count. One scatter-add over the generated
   ids and one vector subtraction, in MLX (no loop over the vocabulary);
2. **JSON** (``response_format: json_object``): the candidates are taken in order of logit
   (the :data:`JSON_CANDIDATES` best first, the whole vocabulary only if none of those
   fits) and each one's bytes are tried on a copy of the
   :class:`~exo.worker.runner.json_prefix.JsonPrefix`; the first valid ones
   (:data:`JSON_KEEP`, or one at temperature 0) are kept and every other token is masked.
   A token after which the object could not be closed in the tokens left (``max_tokens``)
   is not valid, so the output parses even when it stops on the length; once the object
   is complete the end token is the only choice;
3. **sampling**: log-probabilities (``logits - logsumexp``) and mlx-lm's sampler
   (temperature, ``top_p``), seeded per request (:func:`token_sampler`);
4. **log-probabilities** when asked: the sampled token's and the ``top_logprobs`` best,
   from the distribution of step 3 before temperature and ``top_p`` (so after the penalties
   and the JSON mask).

A request with none of 1, 2 and 4 samples exactly as mlx-lm does (the same operations), so
plain requests keep mlx-lm's speed and a pipeline gives the single process's tokens either
way.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Protocol, cast

import mlx.core as mx
from loguru import logger
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

from exo.models.tokenizer import ModelTokenizer, load_model_tokenizer
from exo.shared.types.generation import SamplingParams
from exo.worker.runner.json_prefix import JsonPrefix

TokenSampler = Callable[[mx.array], mx.array]
"""Log-probabilities of the last position -> the sampled token id (mlx-lm's sampler)."""

JSON_CANDIDATES = 256
"""Tokens, best logit first, tried against the JSON state before the whole vocabulary."""
JSON_KEEP = 16
"""Valid tokens kept for sampling in JSON mode (temperature > 0)."""
MIN_LOGPROB = -9999.0
"""Stands for a log-probability of minus infinity (which JSON cannot carry)."""

_SPM_SPACE = "\u2581".encode()


def token_sampler(sampling: SamplingParams) -> TokenSampler:
    """mlx-lm's sampler for ``sampling``: argmax at temperature 0, else softmax(logits / T)
    cut to the ``top_p`` nucleus. A seed reseeds MLX's generator, so the same seed draws
    the same tokens wherever the logits are (one process, or a pipeline's last rank)."""
    if sampling.seed is not None:
        mx.random.seed(sampling.seed % 2**64)
    top_p = sampling.top_p if sampling.top_p < 1.0 else 0.0
    return make_sampler(temp=sampling.temperature, top_p=top_p)


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(character): byte for byte, character in zip(printable, characters, strict=True)}


class Vocabulary(Protocol):
    """What JSON mode needs to know about tokens."""

    @property
    def end_token(self) -> int: ...

    def token_bytes(self, token: int) -> bytes: ...

    def is_special(self, token: int) -> bool: ...


class TokenVocabulary:
    """Each token's bytes and whether it is a special token, from a model's tokenizer,
    worked out per token the first time it is asked for."""

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self._tokenizer = tokenizer
        detokenizer = tokenizer.detokenizer()
        self._byte_level: list[str] | None = None
        self._sentencepiece: list[bytes] | None = None
        if isinstance(detokenizer, BPEStreamingDetokenizer):
            self._byte_level = cast(list[str], detokenizer.tokenmap)
        elif isinstance(detokenizer, SPMStreamingDetokenizer):
            self._sentencepiece = cast(list[bytes], detokenizer.tokenmap)
        self._bytes: dict[int, bytes] = {}
        self._special: dict[int, bool] = {}
        self.stop_token_ids = tokenizer.stop_token_ids
        self._end_token = min(self.stop_token_ids) if self.stop_token_ids else 0

    @property
    def end_token(self) -> int:
        """What JSON mode ends the output with."""
        return self._end_token

    def token_bytes(self, token: int) -> bytes:
        known = self._bytes.get(token)
        if known is None:
            known = self._bytes[token] = self._compute_bytes(token)
        return known

    def _compute_bytes(self, token: int) -> bytes:
        if self._byte_level is not None:
            if token >= len(self._byte_level):
                return b""
            decoder = _byte_decoder()
            return b"".join(
                bytes([decoder[char]]) if char in decoder else char.encode()
                for char in self._byte_level[token]
            )
        if self._sentencepiece is not None:
            if token >= len(self._sentencepiece):
                return b""
            return self._sentencepiece[token].replace(_SPM_SPACE, b" ")
        return self._tokenizer.decode([token]).encode()

    def is_special(self, token: int) -> bool:
        """A stop token, or one the tokenizer leaves out of text (a control token)."""
        known = self._special.get(token)
        if known is None:
            known = self._special[token] = token in self.stop_token_ids or (
                bool(self.token_bytes(token)) and self._tokenizer.decode([token]) == ""
            )
        return known

    def text(self, token: int) -> str:
        return self.token_bytes(token).decode(errors="replace")


def vocabulary_loader(directory: Path) -> Callable[[], TokenVocabulary]:
    """Loads the model directory's tokenizer the first time it is called (a pipeline's last
    rank needs it only for a JSON request)."""
    return functools.cache(lambda: TokenVocabulary(load_model_tokenizer(directory)))


@dataclass(frozen=True)
class SampledToken:
    """A sampled token with its log-probability and the best alternatives (token id,
    log-probability), best first."""

    token: int
    logprob: float = 0.0
    top: tuple[tuple[int, float], ...] = field(default_factory=tuple)


def finite_logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def apply_penalties(
    logits: mx.array, generated: mx.array, presence: float, frequency: float
) -> mx.array:
    """``logits`` (…, vocabulary) less ``presence`` for every token in ``generated`` and
    ``frequency`` times the number of times it is there."""
    counts = mx.zeros((logits.shape[-1],), dtype=mx.float32).at[generated].add(1.0)
    penalty = counts * frequency + (counts > 0).astype(mx.float32) * presence
    return logits - penalty.astype(logits.dtype)


def sampled_token(logprobs: mx.array, token: int, top: int) -> SampledToken:
    """``token`` with its log-probability and the ``top`` most likely tokens of
    ``logprobs`` (one position's)."""
    row = logprobs.reshape(-1)
    chosen = row[token]
    if top <= 0:
        return SampledToken(token, float(cast(float, chosen.item())))
    count = min(top, row.shape[0])
    best = mx.argpartition(-row, kth=count - 1)[:count]
    values = row[best]
    order = mx.argsort(-values)
    best, values = best[order], values[order]
    mx.eval(chosen, best, values)
    ids = cast(list[int], best.tolist())
    logprobs_of_best = cast(list[float], values.tolist())
    return SampledToken(
        token, float(cast(float, chosen.item())), tuple(zip(ids, logprobs_of_best, strict=True))
    )


class RequestSampler:
    """One request's sampling state (see the module's docstring). ``max_tokens`` is the
    most tokens the request may generate (JSON mode closes the object within it);
    ``vocabulary`` is needed in JSON mode only."""

    def __init__(
        self,
        sampling: SamplingParams,
        max_tokens: int,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        if sampling.json_object and vocabulary is None:
            raise ValueError("JSON mode needs the model's tokenizer where it samples")
        self.sampling = sampling
        self.max_tokens = max_tokens
        self._sample = token_sampler(sampling)
        self._vocabulary = vocabulary
        self._json = JsonPrefix() if sampling.json_object else None
        self._fed = 0
        """Generated tokens already fed to the JSON state."""
        self._broken = False

    def process(self, generated: mx.array, logits: mx.array) -> mx.array:
        """The logits (1, vocabulary) of the next position after the penalties and the JSON
        mask, given the tokens generated so far (1-D; may not be evaluated yet)."""
        count = generated.size
        sampling = self.sampling
        if count and (sampling.presence_penalty or sampling.frequency_penalty):
            logits = apply_penalties(
                logits, generated, sampling.presence_penalty, sampling.frequency_penalty
            )
        if self._json is not None:
            if count > self._fed:
                self._feed(cast(list[int], generated[self._fed :].tolist()))
            logits = self._constrain(logits, self.max_tokens - count)
        return logits

    def sample(self, logprobs: mx.array) -> mx.array:
        return self._sample(logprobs)

    def choose(self, generated: mx.array, logits: mx.array) -> tuple[mx.array, mx.array]:
        """The next token (not evaluated) and the log-probabilities it was drawn from, as
        mlx-lm's ``generate_step`` computes them."""
        logits = self.process(generated, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        return self.sample(logprobs), logprobs

    # --- JSON ------------------------------------------------------------------------

    def _feed(self, tokens: list[int]) -> None:
        state, vocabulary = self._json, self._vocabulary
        assert state is not None and vocabulary is not None
        self._fed += len(tokens)
        for token in tokens:
            if state.complete or vocabulary.is_special(token):
                continue  # the end token (a pipeline step past the end feeds it too)
            if not state.feed(vocabulary.token_bytes(token)):
                logger.warning("a token outside the JSON constraint was sampled; ending")
                self._broken = True

    def _constrain(self, logits: mx.array, remaining: int) -> mx.array:
        state, vocabulary = self._json, self._vocabulary
        assert state is not None and vocabulary is not None
        allowed: list[int] = []
        if not (state.complete or self._broken or remaining <= 0):
            want = 1 if self.sampling.temperature == 0 else JSON_KEEP
            row = logits.reshape(-1)
            count = min(JSON_CANDIDATES, row.shape[0])
            best = mx.argpartition(-row, kth=count - 1)[:count]
            best = best[mx.argsort(-row[best])]
            allowed = self._valid(cast(list[int], best.tolist()), state, remaining, want)
            if not allowed:  # rare: none of the best fits (a tight budget, an odd model)
                ranked = cast(list[int], mx.argsort(-row).tolist())
                allowed = self._valid(ranked, state, remaining, want)
        if not allowed:
            allowed = [vocabulary.end_token]
        keep = mx.zeros((logits.shape[-1],), dtype=mx.float32).at[mx.array(allowed)].add(1.0)
        return mx.where(keep > 0, logits, mx.array(-math.inf, dtype=logits.dtype))

    def _valid(self, ranked: list[int], state: JsonPrefix, remaining: int, want: int) -> list[int]:
        """The first ``want`` tokens of ``ranked`` that continue the JSON object and leave
        it closable in the ``remaining - 1`` tokens after them."""
        vocabulary = self._vocabulary
        assert vocabulary is not None
        found: list[int] = []
        for token in ranked:
            data = vocabulary.token_bytes(token)
            if not data:
                continue
            trial = state.copy()
            if not trial.feed(data) or len(trial.closing()) > remaining - 1:
                continue
            if vocabulary.is_special(token):
                continue
            found.append(token)
            if len(found) >= want:
                break
        return found
