"""How an error message quotes a value the client sent (an id, a model name): whole when
short, else its first :data:`MAX_ECHOED_LENGTH` characters and how long it was, so an
answer never carries back a huge input."""

MAX_ECHOED_LENGTH = 64
"""Most characters of a client's value an error message quotes."""


def echoed(text: str, limit: int = MAX_ECHOED_LENGTH) -> str:
    """``text`` whole when it has at most ``limit`` characters, else its first ``limit``
    and ``… (N characters)``."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\u2026 ({len(text)} characters)"
