"""An error message quotes at most a short prefix of what the client sent."""

from exo.shared.echo import MAX_ECHOED_LENGTH, echoed


def test_a_short_value_is_quoted_whole() -> None:
    assert echoed("m" * MAX_ECHOED_LENGTH) == "m" * MAX_ECHOED_LENGTH


def test_a_long_value_is_cut_and_its_length_given() -> None:
    quoted = echoed("x" * 60_000)
    assert quoted == "x" * MAX_ECHOED_LENGTH + "\u2026 (60000 characters)"
    assert len(quoted) < 100
