"""The sampler's pieces without a model: penalties, the JSON-prefix automaton, the JSON
constraint over a small vocabulary, seeds, and the pipeline's wire format for them."""

import json
import random
from typing import cast

import mlx.core as mx
import numpy as np
import pytest

from exo.shared.types.generation import SamplingParams
from exo.worker.runner.json_prefix import MAX_WHITESPACE_RUN, JsonPrefix
from exo.worker.runner.pipeline import Header, decode_reply, encode_reply, reply_bytes
from exo.worker.runner.sampling import (
    RequestSampler,
    SampledToken,
    apply_penalties,
    sampled_token,
)

# --- penalties ---------------------------------------------------------------------------


def test_penalties_follow_openais_definition() -> None:
    logits = mx.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    generated = mx.array([1, 3, 3, 3], dtype=mx.int32)
    penalised = apply_penalties(logits, generated, presence=0.5, frequency=0.25)
    # token 1: once -> 2 - 0.5 - 0.25; token 3: three times -> 4 - 0.5 - 0.75; others as is
    assert np.allclose(np.array(penalised), [[1.0, 1.25, 3.0, 2.75, 5.0]])
    # Negative penalties encourage repetition.
    encouraged = apply_penalties(logits, generated, presence=-1.0, frequency=0.0)
    assert np.allclose(np.array(encouraged), [[1.0, 3.0, 3.0, 5.0, 5.0]])


def test_the_sampler_penalises_only_what_it_generated() -> None:
    sampler = RequestSampler(SamplingParams(frequency_penalty=2.0), max_tokens=8)
    logits = mx.array([[0.0, 1.0, 0.9]])
    assert np.allclose(np.array(sampler.process(mx.array([], dtype=mx.int32), logits)), logits)
    tokens: list[int] = []
    for _ in range(4):
        token, _ = sampler.choose(mx.array(tokens, dtype=mx.int32), logits)
        tokens.append(int(cast(int, token.item())))
    # Greedy would repeat token 1; the frequency penalty makes it alternate with token 2,
    # and then token 0 wins once both have been used.
    assert tokens[:2] == [1, 2]
    assert tokens[2] == 0


# --- the JSON-prefix automaton -----------------------------------------------------------


def _accepts(text: bytes) -> bool:
    return JsonPrefix().feed(text)


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(7 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randint(-1000, 1000)
    if kind == 2:
        return rng.uniform(-1e6, 1e6)
    if kind in (3, 4):
        return "".join(rng.choice('ab "\\\n/é€😀\t') for _ in range(rng.randrange(6)))
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{index}": _random_value(rng, depth + 1) for index in range(rng.randrange(4))}


def _random_object(rng: random.Random) -> bytes:
    value = {f"key{index}": _random_value(rng) for index in range(rng.randrange(4))}
    indent = rng.choice([None, 2])
    return json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=indent).encode()


def test_every_prefix_of_a_json_object_is_accepted_and_closes() -> None:
    rng = random.Random(7)
    for _ in range(300):
        document = _random_object(rng)
        state = JsonPrefix()
        for index, byte in enumerate(document):
            assert state.feed(bytes([byte])), (document, index)
            closed = document[: index + 1] + state.closing()
            json.loads(closed)  # the shortest completion parses
        assert state.complete and state.closing() == b""


def test_what_it_accepts_can_always_be_completed() -> None:
    """Soundness on random byte soup: whatever is accepted, plus closing(), parses."""
    rng = random.Random(11)
    alphabet = b'{}[]",:-+.eE0123456789tfrueanl \n\\u"x\xc3\xa9\xe2\x82'
    accepted = 0
    for _ in range(30000):
        data = b"{" + bytes(rng.choice(alphabet) for _ in range(rng.randrange(14)))
        state = JsonPrefix()
        if state.feed(data):
            accepted += 1
            parsed: object = json.loads(data + state.closing())
            assert isinstance(parsed, dict)
    assert accepted > 1000


@pytest.mark.parametrize(
    "text",
    [
        b"[1]",  # the top level must be an object
        b'"a"',
        b" x",
        b'{a":1}',
        b'{"a" 1}',
        b'{"a":01}',
        b'{"a":1.}',
        b'{"a":tru}',
        b'{"a":1,}',
        b'{"a":"\x01"}',  # a raw control character in a string
        b'{"a":"\\x"}',  # an unknown escape
        b'{"a":"\xff"}',  # not UTF-8
        b'{"a":"\xed\xa0\x80"}',  # a UTF-16 surrogate in UTF-8
        b'{"a":1}}',
        b'{"a":1} ',  # nothing may follow the object
        b' {"a":1}',  # nor precede it
        b"{" + b" " * (MAX_WHITESPACE_RUN + 1),
    ],
)
def test_invalid_prefixes_are_refused(text: bytes) -> None:
    assert not _accepts(text)


def test_copies_are_independent() -> None:
    state = JsonPrefix()
    assert state.feed(b'{"a": [1')
    trial = state.copy()
    assert trial.feed(b"]}") and trial.complete
    assert not state.complete and state.closing() == b"]}"


# --- the JSON constraint over a vocabulary -----------------------------------------------


class ByteVocabulary:
    """Every single byte, a few multi-byte pieces, an end token and a control token."""

    PIECES = [bytes([byte]) for byte in range(256)] + [
        b'{"',
        b'":',
        b'", "',
        b"true",
        b"null",
        b"```json",
        b"Hello",
        b"}\n",
        b"<|im_start|>",
    ]
    END = len(PIECES)
    CONTROL = len(PIECES) - 1

    @property
    def end_token(self) -> int:
        return self.END

    def token_bytes(self, token: int) -> bytes:
        return self.PIECES[token] if token < len(self.PIECES) else b""

    def is_special(self, token: int) -> bool:
        return token in (self.END, self.CONTROL)

    @property
    def size(self) -> int:
        return len(self.PIECES) + 1


def _run_json(sampling: SamplingParams, max_tokens: int, seed: int) -> tuple[bytes, bool]:
    """Generate with random logits (a model that knows no JSON); the bytes and whether it
    ended with the end token."""
    vocabulary = ByteVocabulary()
    sampler = RequestSampler(sampling, max_tokens, vocabulary)
    rng = np.random.default_rng(seed)
    generated: list[int] = []
    for _ in range(max_tokens):
        logits = mx.array(rng.normal(0, 3, size=(1, vocabulary.size)).astype(np.float32))
        token, _ = sampler.choose(mx.array(generated, dtype=mx.int32), logits)
        token_id = int(cast(int, token.item()))
        generated.append(token_id)
        if token_id == vocabulary.END:
            return b"".join(vocabulary.token_bytes(t) for t in generated[:-1]), True
    return b"".join(vocabulary.token_bytes(t) for t in generated), False


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_mode_output_parses_even_when_cut_by_max_tokens(temperature: float) -> None:
    sampling = SamplingParams(temperature=temperature, seed=5, json_object=True)
    for seed, max_tokens in [(1, 3), (2, 8), (3, 20), (4, 60)]:
        text, ended = _run_json(sampling, max_tokens, seed)
        parsed: object = json.loads(text)
        assert isinstance(parsed, dict), text
        assert b"<|im_start|>" not in text and not text.startswith(b"```")
        if ended:  # the end token comes right after the object, nowhere else
            assert text.endswith(b"}")


def test_json_mode_checks_the_best_candidates_first() -> None:
    """The most likely valid token is chosen greedily, whatever its rank in the vocabulary."""
    vocabulary = ByteVocabulary()
    sampler = RequestSampler(SamplingParams(json_object=True), 50, vocabulary)
    logits = np.zeros((1, vocabulary.size), dtype=np.float32)
    logits[0, ByteVocabulary.PIECES.index(b"```json")] = 9.0  # invalid: masked
    logits[0, ord("{")] = 5.0
    logits[0, ByteVocabulary.PIECES.index(b'{"')] = 7.0  # valid and best
    token, logprobs = sampler.choose(mx.array([], dtype=mx.int32), mx.array(logits))
    assert int(cast(int, token.item())) == ByteVocabulary.PIECES.index(b'{"')
    # Every token but the valid ones kept is masked out of the distribution.
    assert float(cast(float, logprobs[0, ByteVocabulary.PIECES.index(b"```json")].item())) == (
        -np.inf
    )


# --- seeds and log-probabilities ---------------------------------------------------------


def _draws(sampling: SamplingParams, count: int) -> list[int]:
    sampler = RequestSampler(sampling, count)
    logits = mx.zeros((1, 50))
    tokens: list[int] = []
    for _ in range(count):
        token, _ = sampler.choose(mx.array(tokens, dtype=mx.int32), logits)
        tokens.append(int(cast(int, token.item())))
    return tokens


def test_the_same_seed_draws_the_same_tokens() -> None:
    seeded = SamplingParams(temperature=1.0, seed=42, presence_penalty=0.1)
    assert _draws(seeded, 30) == _draws(seeded, 30)
    other = seeded.model_copy(update={"seed": 43})
    assert _draws(other, 30) != _draws(seeded, 30)


def test_sampled_token_reports_the_best_alternatives_in_order() -> None:
    logits = mx.array([[0.0, 3.0, 1.0, 2.0]])
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    sampled = sampled_token(logprobs, 2, top=3)
    expected = np.array(logprobs)[0]
    assert sampled.token == 2 and sampled.logprob == pytest.approx(expected[2])
    assert [token for token, _ in sampled.top] == [1, 3, 2]
    assert [value for _, value in sampled.top] == pytest.approx(expected[[1, 3, 2]].tolist())
    assert sampled_token(logprobs, 1, top=0).top == ()


def test_header_and_reply_carry_the_new_parameters() -> None:
    sampling = SamplingParams(
        temperature=0.5,
        top_p=0.9,
        seed=3,
        presence_penalty=-1.5,
        frequency_penalty=0.25,
        logprobs=True,
        top_logprobs=2,
        json_object=True,
    )
    decoded = Header.decode(Header(1, sampling=sampling, max_tokens=77).encode())
    assert decoded.sampling == sampling and decoded.max_tokens == 77
    reply = SampledToken(9, -0.5, ((9, -0.5), (4, -1.25)))
    data = encode_reply(reply, sampling)
    assert len(data) == reply_bytes(sampling)
    assert decode_reply(data, sampling) == reply
    plain = SamplingParams()
    assert decode_reply(encode_reply(SampledToken(5), plain), plain) == SampledToken(5)
