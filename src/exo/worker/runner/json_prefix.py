"""Is this text the beginning of a JSON object? A byte-level pushdown automaton for
``response_format: {"type": "json_object"}``.

:class:`JsonPrefix` takes the output's bytes as they are generated and refuses a byte that
no JSON object could continue with (RFC 8259, with strict UTF-8 inside strings and a
single object at the top). The sampler (:mod:`exo.worker.runner.sampling`) tries each
candidate token's bytes on a copy and masks those refused; :meth:`JsonPrefix.closing` gives
the shortest bytes that complete the object, so the sampler can also refuse tokens after
which the object could no longer be closed within ``max_tokens``. Whitespace between
tokens is allowed up to :data:`MAX_WHITESPACE_RUN` bytes in a row, so a model cannot pad
forever; the output starts with the object's "{" and nothing may follow the object (the
sampler ends the output there).

Pure Python, no MLX: each byte is a few comparisons, and a token is a few bytes.
"""

from typing import Final

MAX_WHITESPACE_RUN: Final = 16
"""Longest run of whitespace outside strings (enough for pretty-printed nesting)."""

WHITESPACE: Final = frozenset(b" \t\n\r")
HEX_DIGITS: Final = frozenset(b"0123456789abcdefABCDEF")
DIGITS: Final = frozenset(b"0123456789")
SIMPLE_ESCAPES: Final = frozenset(b'"\\/bfnrt')

# What the automaton expects next.
START: Final = 0  # the top-level "{"
VALUE: Final = 1  # a value (after ":" or after "," in an array)
ARRAY_FIRST: Final = 2  # a value or "]" (just after "[")
OBJECT_FIRST: Final = 3  # a key or "}" (just after "{")
KEY: Final = 4  # a key (after "," in an object)
COLON: Final = 5
AFTER: Final = 6  # "," or the container's closing bracket
STRING: Final = 7
ESCAPE: Final = 8  # after a backslash in a string
UNICODE: Final = 9  # hex digits of a \uXXXX escape
NUMBER: Final = 10
LITERAL: Final = 11  # the rest of true, false or null
DONE: Final = 12  # the object is complete

# Where a number is.
AFTER_MINUS: Final = 0
ZERO: Final = 1  # a leading 0: no more digits before "." or "e"
INTEGER: Final = 2
AFTER_DOT: Final = 3
FRACTION: Final = 4
AFTER_E: Final = 5
AFTER_E_SIGN: Final = 6
EXPONENT: Final = 7
COMPLETE_NUMBERS: Final = frozenset((ZERO, INTEGER, FRACTION, EXPONENT))


def _utf8_lead(byte: int) -> tuple[int, int, int] | None:
    """For a UTF-8 lead byte: continuation bytes to follow and the range allowed for the
    first of them (which excludes overlong forms, surrogates and code points past
    U+10FFFF); None for a byte that cannot start a character."""
    if 0xC2 <= byte <= 0xDF:
        return 1, 0x80, 0xBF
    if byte == 0xE0:
        return 2, 0xA0, 0xBF
    if 0xE1 <= byte <= 0xEC or 0xEE <= byte <= 0xEF:
        return 2, 0x80, 0xBF
    if byte == 0xED:
        return 2, 0x80, 0x9F
    if byte == 0xF0:
        return 3, 0x90, 0xBF
    if 0xF1 <= byte <= 0xF3:
        return 3, 0x80, 0xBF
    if byte == 0xF4:
        return 3, 0x80, 0x8F
    return None


class JsonPrefix:
    """The state after some bytes of a JSON object; :meth:`feed` more, :meth:`copy` to try
    bytes without committing them."""

    __slots__ = (
        "hex_left",
        "in_key",
        "literal",
        "mode",
        "number",
        "spaces",
        "stack",
        "utf8_high",
        "utf8_left",
        "utf8_low",
    )

    def __init__(self) -> None:
        self.stack = ""
        """Open containers, outermost first: "{" or "["."""
        self.mode = START
        self.in_key = False
        self.utf8_left = 0
        self.utf8_low = 0x80
        self.utf8_high = 0xBF
        self.hex_left = 0
        self.number = AFTER_MINUS
        self.literal = b""
        self.spaces = 0

    def copy(self) -> "JsonPrefix":
        other = JsonPrefix.__new__(JsonPrefix)
        other.stack = self.stack
        other.mode = self.mode
        other.in_key = self.in_key
        other.utf8_left = self.utf8_left
        other.utf8_low = self.utf8_low
        other.utf8_high = self.utf8_high
        other.hex_left = self.hex_left
        other.number = self.number
        other.literal = self.literal
        other.spaces = self.spaces
        return other

    @property
    def complete(self) -> bool:
        """The top-level object is closed: the output must end here."""
        return self.mode == DONE

    def feed(self, data: bytes) -> bool:
        """Take ``data``; False (and the state is then undefined: feed a copy) when some
        byte of it cannot continue a JSON object."""
        return all(self._byte(byte) for byte in data)

    def closing(self) -> bytes:
        """The shortest bytes that complete the object from here (empty when complete)."""
        mode = self.mode
        if mode == START:
            return b"{}"
        if mode == STRING:
            pending = (
                bytes([self.utf8_low]) + b"\x80" * (self.utf8_left - 1) if self.utf8_left else b""
            )
            tail = pending + b'"' + (b":0" if self.in_key else b"")
        elif mode == ESCAPE:
            tail = b'n"' + (b":0" if self.in_key else b"")
        elif mode == UNICODE:
            tail = b"0" * self.hex_left + b'"' + (b":0" if self.in_key else b"")
        elif mode == NUMBER:
            tail = b"" if self.number in COMPLETE_NUMBERS else b"0"
        elif mode == LITERAL:
            tail = self.literal
        elif mode == VALUE:
            tail = b"0"
        elif mode == KEY:
            tail = b'"":0'
        elif mode == COLON:
            tail = b":0"
        else:  # ARRAY_FIRST, OBJECT_FIRST, AFTER, DONE
            tail = b""
        return (
            tail
            + "".join("}" if bracket == "{" else "]" for bracket in reversed(self.stack)).encode()
        )

    # --- one byte ----------------------------------------------------------------------

    def _byte(self, byte: int) -> bool:
        mode = self.mode
        if mode == STRING:
            return self._string_byte(byte)
        if mode == ESCAPE:
            if byte in SIMPLE_ESCAPES:
                self.mode = STRING
                return True
            if byte == ord("u"):
                self.mode = UNICODE
                self.hex_left = 4
                return True
            return False
        if mode == UNICODE:
            if byte not in HEX_DIGITS:
                return False
            self.hex_left -= 1
            if self.hex_left == 0:
                self.mode = STRING
            return True
        if mode == LITERAL:
            if byte != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self.mode = AFTER
            return True
        if mode == NUMBER:
            if self._number_byte(byte):
                return True
            if self.number not in COMPLETE_NUMBERS:
                return False
            self.mode = mode = AFTER  # the number ended; the byte is what follows it
        if mode in (DONE, START):
            return mode == START and byte == ord("{") and self._structural_byte(mode, byte)
        if byte in WHITESPACE:
            self.spaces += 1
            return self.spaces <= MAX_WHITESPACE_RUN
        self.spaces = 0
        return self._structural_byte(mode, byte)

    def _structural_byte(self, mode: int, byte: int) -> bool:
        if mode == START:
            if byte != ord("{"):
                return False
            self._open("{")
            return True
        if mode == OBJECT_FIRST:
            if byte == ord("}"):
                self._close()
                return True
            return self._begin_key(byte)
        if mode == KEY:
            return self._begin_key(byte)
        if mode == COLON:
            if byte != ord(":"):
                return False
            self.mode = VALUE
            return True
        if mode == ARRAY_FIRST and byte == ord("]"):
            self._close()
            return True
        if mode in (VALUE, ARRAY_FIRST):
            return self._begin_value(byte)
        # AFTER a value inside a container
        top = self.stack[-1]
        if byte == ord(","):
            self.mode = KEY if top == "{" else VALUE
            return True
        if (byte == ord("}") and top == "{") or (byte == ord("]") and top == "["):
            self._close()
            return True
        return False

    def _open(self, bracket: str) -> None:
        self.stack += bracket
        self.mode = OBJECT_FIRST if bracket == "{" else ARRAY_FIRST

    def _close(self) -> None:
        self.stack = self.stack[:-1]
        self.mode = AFTER if self.stack else DONE

    def _begin_key(self, byte: int) -> bool:
        if byte != ord('"'):
            return False
        self.mode = STRING
        self.in_key = True
        return True

    def _begin_value(self, byte: int) -> bool:
        if byte == ord("{"):
            self._open("{")
        elif byte == ord("["):
            self._open("[")
        elif byte == ord('"'):
            self.mode = STRING
            self.in_key = False
        elif byte == ord("-"):
            self.mode = NUMBER
            self.number = AFTER_MINUS
        elif byte in DIGITS:
            self.mode = NUMBER
            self.number = ZERO if byte == ord("0") else INTEGER
        elif byte == ord("t"):
            self.mode, self.literal = LITERAL, b"rue"
        elif byte == ord("f"):
            self.mode, self.literal = LITERAL, b"alse"
        elif byte == ord("n"):
            self.mode, self.literal = LITERAL, b"ull"
        else:
            return False
        return True

    def _string_byte(self, byte: int) -> bool:
        if self.utf8_left:
            if not self.utf8_low <= byte <= self.utf8_high:
                return False
            self.utf8_left -= 1
            self.utf8_low, self.utf8_high = 0x80, 0xBF
            return True
        if byte == ord('"'):
            self.mode = COLON if self.in_key else AFTER
            return True
        if byte == ord("\\"):
            self.mode = ESCAPE
            return True
        if byte < 0x20:
            return False  # control characters must be escaped
        if byte < 0x80:
            return True
        lead = _utf8_lead(byte)
        if lead is None:
            return False
        self.utf8_left, self.utf8_low, self.utf8_high = lead
        return True

    def _number_byte(self, byte: int) -> bool:
        """Take ``byte`` as part of the number if it can be."""
        number = self.number
        if byte in DIGITS:
            if number == AFTER_MINUS:
                self.number = ZERO if byte == ord("0") else INTEGER
            elif number == ZERO:
                return False
            elif number in (AFTER_DOT, FRACTION):
                self.number = FRACTION
            elif number in (AFTER_E, AFTER_E_SIGN, EXPONENT):
                self.number = EXPONENT
            return True
        if byte == ord(".") and number in (ZERO, INTEGER):
            self.number = AFTER_DOT
            return True
        if byte in b"eE" and number in (ZERO, INTEGER, FRACTION):
            self.number = AFTER_E
            return True
        if byte in b"+-" and number == AFTER_E:
            self.number = AFTER_E_SIGN
            return True
        return False
